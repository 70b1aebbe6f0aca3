"""data/tokenize_text.py: shards readable by the trainer, validation never overlapping
training, and an interrupted run (local files or a Hub stream) that continues to the same
shards as one full run; data/shards.py's token-range check."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.shards import ShardError, check_token_range, open_shard, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS = 50256


def doc_texts(n=400):
    rng = np.random.default_rng(0)
    words = "the a of cat dog runs quickly model token data shard encoder mask attention window".split()
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(5, 120))) for i in range(n)]


def corpus(path, n=400):
    with open(path, "w") as f:
        for t in doc_texts(n):
            f.write(json.dumps({"text": t}) + "\n")


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


def test_token_ids_at_or_beyond_the_vocabulary_are_rejected(tmp_path):
    """The first id >= vocab_size is named with its file and position before it can reach
    the embedding; ids up to vocab_size - 1 pass."""
    V = 50304
    tokens = np.random.default_rng(0).integers(0, V, 10_000).astype(np.uint16)
    tokens[[0, -1]] = V - 1  # the largest valid id, at both ends
    clean = str(tmp_path / "clean.bin")
    write_shard(clean, tokens)
    check_token_range(open_shard(clean), clean, V)
    assert np.array_equal(open_shard(clean, vocab_size=V), tokens)
    tokens[6543], tokens[8000] = V, 65535  # the first bad id is the one to report
    bad = str(tmp_path / "bad.bin")
    write_shard(bad, tokens)
    for check in (lambda: check_token_range(open_shard(bad), bad, V), lambda: open_shard(bad, vocab_size=V)):
        with pytest.raises(ShardError) as e:
            check()
        msg = str(e.value)
        assert msg.startswith(bad) and "id 50304 at position 6543" in msg and "data/tokenize_text.py" in msg
    print(msg)
    open_shard(bad)  # without vocab_size only the header is checked
    check_token_range(open_shard(bad), bad, 65536)


def assert_same_shards(out, ref):
    """The shards under output prefix `out` have the names and tokens of those under `ref`."""
    a, b = (sorted(p.parent.glob(p.name + "_*.bin")) for p in (out, ref))
    assert [p.name for p in a] == [p.name for p in b]
    assert all(np.array_equal(open_shard(x), open_shard(y)) for x, y in zip(a, b))


def test_hub_stream_resumes_where_it_stopped(tmp_path, monkeypatch, tok, capsys):
    """A Hub stream that is cut off (--max-docs, then a dropped connection) continues from the
    saved stream position: the same shards as one full run, and no document is streamed twice.
    The fake stands at the datasets boundary: an Arrow-backed streaming IterableDataset."""
    import datasets

    import tokenize_text

    docs = doc_texts(300)
    streamed, drop_after = [], None  # what the fake stream yielded; a connection drop after that many rows

    def row_seen(row):
        if len(streamed) == drop_after:
            raise ConnectionError("fake connection drop")
        streamed.append(row["text"])
        return row

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        assert (name, split, streaming) == ("fake/corpus", "train", True)
        return datasets.Dataset.from_list([{"text": t} for t in docs]).to_iterable_dataset(num_shards=3).map(row_seen)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    def run(out, *extra):
        streamed.clear()
        tokenize_text.main(["--hf-dataset", "fake/corpus", "--out", str(out), "--shard-tokens", "3000",
                            "--val-permille", "100", "--workers", "1", "--batch-docs", "8", *extra])
        return json.load(open(f"{out}.progress.json"))

    full = tmp_path / "full" / "c"
    run(full)
    assert streamed == docs and len(list(full.parent.glob("c_train_*.bin"))) >= 4
    part = tmp_path / "part" / "c"
    assert run(part, "--max-docs", "150")["docs"] == 150 and streamed == docs[:150]
    # a connection drop: the progress saved with the last train shard is behind what was read
    # (4 batches of 8 are tokenized ahead), so it must hold the stream position of that shard
    drop_after = 120
    with pytest.raises(ConnectionError):
        run(part)
    assert streamed == docs[150:270]
    saved = json.load(open(f"{part}.progress.json"))["docs"]
    assert 150 < saved < 270
    drop_after = None
    old = tmp_path / "old" / "c"  # a progress file of the older format, without the stream position
    os.makedirs(old.parent)
    for f in part.parent.glob("c*"):
        (old.parent / f.name).write_bytes(f.read_bytes())
    progress = json.load(open(f"{old}.progress.json"))
    del progress["stream"]
    json.dump(progress, open(f"{old}.progress.json", "w"))
    capsys.readouterr()
    run(part)
    assert streamed == docs[saved:]  # the first documents are not streamed again
    assert "resuming after" in capsys.readouterr().out
    assert_same_shards(part, full)
    run(old)
    assert "no stream position" in capsys.readouterr().out and streamed == docs  # re-streamed, then skipped
    assert_same_shards(old, full)
    with capsys.disabled():
        print(f"connection dropped after document 270; resumed at document {saved}, the last saved shard")


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


def test_text_given_as_a_shard_names_the_tokenizer_script(tmp_path):
    """A raw .jsonl where token shards go (--data.train_files corpus.jsonl), short or long:
    the error says which script turns text into shards."""
    from data.shards import read_header

    for n in (1, 40):
        path = tmp_path / f"corpus{n}.jsonl"
        corpus(path, n)
        with pytest.raises(ShardError, match=r"corpus\d+.jsonl: magic number \d+ is not 20240520; not a token shard "
                                             r"\(text such as .jsonl, .txt or .parquet becomes shards with data/tokenize_text.py\)"):
            read_header(str(path))


def test_a_rerun_with_other_inputs_or_options_is_refused_never_skipped(tmp_path, tok, capsys):
    """The progress file names its inputs (files with sizes and mtimes) and options: an added
    file, an empty file filled since, another --val-permille or stray shards without a progress
    file are refused in one line saying how to restart, and --restart tokenizes them (once:
    "already complete" and exit 0, the new text never tokenized)."""
    import tokenize_text

    a, b, empty = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "e.jsonl"
    corpus(a, 30)
    with open(b, "w") as f:
        f.write(json.dumps({"text": "a document that only the second file holds"}) + "\n")
    empty.write_text("")
    out = tmp_path / "shards" / "c"

    def run(*files, extra=()):
        tokenize_text.main(["--files", *map(str, files), "--out", str(out), "--workers", "1", "--val-permille", "100", *extra])
        return capsys.readouterr().out

    def refused(*files, extra=()):
        before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
        with pytest.raises(SystemExit) as e:
            run(*files, extra=extra)
        assert "\n" not in e.value.code and e.value.code.endswith(
            f"pass --restart to tokenize from scratch into {out}, or choose another --out")
        assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # nothing touched
        return e.value.code

    def n_docs():
        paths = sorted(out.parent.glob("c_*.bin"))
        return len(docs_of(paths)) if paths else 0

    run(a)
    assert "already complete" in run(a) and n_docs() == 30
    assert f"({b} is a new input)" in refused(a, b)
    assert "--restart: removed" in run(a, b, extra=["--restart"]) and n_docs() == 31
    assert "(val_permille was 100, now 50)" in refused(a, b, extra=["--val-permille", "50"])
    run(empty, extra=["--restart"])
    assert n_docs() == 0
    empty.write_text(a.read_text())
    assert f"({empty} changed (0 -> {empty.stat().st_size:,} bytes))" in refused(empty)
    run(empty, extra=["--restart"])
    assert n_docs() == 30
    os.remove(f"{out}.progress.json")
    assert "exist but no" in refused(a)


def test_a_small_corpus_always_gets_a_validation_shard_and_the_trainer_names_val_permille(tmp_path, tok, capsys, monkeypatch):
    """Three documents at the default --val-permille 5: none falls under the hash, so the last
    one is held out (with its exact duplicate); train and validation stay disjoint. Without
    validation shards, the trainer's error names tokenize_text.py's --val-permille."""
    import tokenize_text
    import trainer

    texts = ["the first small document", "a second one, repeated", "the third", "a second one, repeated"]
    assert not any(tokenize_text.is_val(t, 5) for t in texts)
    src = tmp_path / "small.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "small"
    tokenize_text.main(["--files", str(src), "--out", str(out), "--workers", "1"])
    assert "held out the last document (2 copies, " in capsys.readouterr().out
    train, val = docs_of(sorted(tmp_path.glob("small_train_*.bin"))), docs_of([tmp_path / "small_val_000000.bin"])
    assert sorted(tok.decode(d) for d in val) == [texts[1]] * 2 and sorted(tok.decode(d) for d in train) == sorted([texts[0], texts[2]])
    assert json.load(open(f"{out}.progress.json"))["val_shard"] == 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no validation shards match .*nothing_val_\*.bin.*--val-permille"):
        trainer.main(["--model.preset", "tiny", "--data.seq_len", "128", "--train.batch_tokens", "256",
                      "--data.train_files", str(tmp_path / "small_train_*.bin"), "--data.val_files", str(tmp_path / "nothing_val_*.bin")])
