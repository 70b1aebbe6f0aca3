"""data/tokenize_text.py: shards readable by the trainer, validation never overlapping
training, and an interrupted run that continues to the same shards as one full run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.shards import open_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS = 50256


def corpus(path, n=400):
    rng = np.random.default_rng(0)
    words = "the a of cat dog runs quickly model token data shard encoder mask attention window".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words, rng.integers(5, 120)))}) + "\n")


def tokenize(src, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "data", "tokenize_text.py"), "--files", str(src), "--out", str(out),
           "--shard-tokens", "3000", "--val-permille", "100", "--workers", "2", "--batch-docs", "32", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def docs_of(paths):
    toks = np.concatenate([np.asarray(open_shard(p)) for p in paths])
    return [tuple(d) for d in np.split(toks, np.flatnonzero(toks == CLS)[1:])]


def test_tokenize_split_and_resume(tmp_path, tok):
    src = tmp_path / "c.jsonl"
    corpus(src)
    tokenize(src, tmp_path / "full" / "c")
    tokenize(src, tmp_path / "part" / "c", "--max-docs", "150")  # an interrupted run ...
    r = tokenize(src, tmp_path / "part" / "c")  # ... continued
    assert "resuming after 150 documents" in r.stdout
    for kind in ("train", "val"):
        full = sorted((tmp_path / "full").glob(f"c_{kind}_*.bin"))
        part = sorted((tmp_path / "part").glob(f"c_{kind}_*.bin"))
        assert [p.name for p in full] == [p.name for p in part]
        assert all(np.array_equal(open_shard(a), open_shard(b)) for a, b in zip(full, part))
    train = docs_of(sorted((tmp_path / "full").glob("c_train_*.bin")))
    val = docs_of(sorted((tmp_path / "full").glob("c_val_*.bin")))
    assert len(train) + len(val) == 400 and 15 < len(val) < 70  # ~10% by hash
    assert not set(train) & set(val)
    texts = [json.loads(line)["text"] for line in open(src)]
    assert sorted(tok.decode(d) for d in train + val) == sorted(texts)  # every document, exactly once
    assert len(list((tmp_path / "full").glob("c_train_*.bin"))) >= 3  # shard rollover exercised
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "tokenize_text.py"), "--files", str(tmp_path / "none*.jsonl"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no files match" in r.stderr


def test_download_scripts_with_a_fake_hub(tmp_path, monkeypatch):
    """The download scripts' own logic, offline: fakes stand at the huggingface_hub and
    datasets boundaries."""
    import datasets
    import huggingface_hub

    import download_fineweb_edu
    import download_glue
    from data.shards import write_shard

    calls = []

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        calls.append(filename)
        n = 7 if "train_000002" not in filename else -1  # shard 2 arrives truncated
        write_shard(os.path.join(local_dir, filename), np.arange(max(n, 5)))
        if n < 0:
            with open(os.path.join(local_dir, filename), "r+b") as f:
                f.truncate(1024 + 4)
        return os.path.join(local_dir, filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    out = tmp_path / "fwe"
    download_fineweb_edu.main(["1", "--out", str(out)])
    assert calls == ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin"]
    download_fineweb_edu.main(["1", "--out", str(out)])  # complete shards are skipped
    assert len(calls) == 2
    with pytest.raises(SystemExit, match="download of finewebedu_train_000002.bin is broken"):
        download_fineweb_edu.main(["2", "--out", str(out)])

    rows = {"train": [{"premise": "p", "hypothesis": "h", "label": 0, "idx": 0}],
            "validation_matched": [{"premise": "q", "hypothesis": "i", "label": 2, "idx": 0}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: rows)
    download_glue.main(["mnli", "--out", str(tmp_path / "glue")])
    got = [json.loads(line) for line in open(tmp_path / "glue" / "mnli" / "validation_matched.jsonl")]
    assert got == rows["validation_matched"]
