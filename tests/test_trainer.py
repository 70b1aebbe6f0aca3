"""Pretraining pipeline: shards, packing loader, masking, 1 vs 2 processes, resume,
export/load, bad inputs."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import trainer
from bench import log_summary
from data.shards import ShardError, open_shard, read_header, write_shard
from model import CLS_ID, MASK_ID, PAD_ID, SEP_ID, KBERT, ModelConfig, document_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_docs(n_docs, seed, start=0, max_len=300):
    """Documents [CLS, unique ids...]; token values are globally unique so every token can be traced."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], start
    for _ in range(n_docs):
        L = int(rng.integers(1, max_len))
        docs.append(np.concatenate([[CLS_ID], np.arange(nxt, nxt + L) % CLS_ID]))
        nxt += L
    return docs


@pytest.fixture
def shards(tmp_path):
    """Two small train shards (the second starting mid-document) and one val shard."""
    docs = synthetic_docs(120, seed=0)
    flat = np.concatenate(docs)
    cut = len(flat) // 2 + 7
    write_shard(str(tmp_path / "syn_train_000001.bin"), flat[:cut])
    write_shard(str(tmp_path / "syn_train_000002.bin"), flat[cut:])
    write_shard(str(tmp_path / "syn_val_000000.bin"), np.concatenate(synthetic_docs(30, seed=1, start=45000)))
    return tmp_path


def base_args(tmp, run_id, steps=6):
    return ["--model.preset", "tiny", "--data.train_files", f"{tmp}/syn_train_*.bin", "--data.val_files", f"{tmp}/syn_val_*.bin",
            "--data.seq_len", "128", "--train.batch_tokens", "1024", "--train.micro_batch_seqs", "2", "--train.steps", str(steps),
            "--train.val_every", "3", "--train.val_tokens", "1024", "--train.save_every", "3",
            "--train.checkpoint_dir", f"{tmp}/ck", "--train.export_dir", f"{tmp}/ex", "--train.run_id", run_id,
            "--train.local_window_start", "32", "--train.global_window_start", "64", "--train.global_window_end", "128"]


def losses(history):
    return [h["loss"] for h in history if "acc" not in h]


# -- shards -------------------------------------------------------------------------------


def test_shard_round_trip_and_header_errors(tmp_path):
    toks = np.array([CLS_ID, 1, 2, 65535, 0], dtype=np.uint16)
    p = str(tmp_path / "a.bin")
    write_shard(p, toks)
    assert read_header(p) == 5 and np.array_equal(open_shard(p), toks)
    raw = open(p, "rb").read()
    open(tmp_path / "magic.bin", "wb").write(b"\x00" * 4 + raw[4:])
    with pytest.raises(ShardError, match=r"magic.bin.*magic"):
        read_header(str(tmp_path / "magic.bin"))
    open(tmp_path / "trunc.bin", "wb").write(raw[:-2])
    with pytest.raises(ShardError, match=r"trunc.bin.*promises 5 tokens"):
        open_shard(str(tmp_path / "trunc.bin"))
    open(tmp_path / "tiny.bin", "wb").write(raw[:10])
    with pytest.raises(ShardError, match="shorter than"):
        read_header(str(tmp_path / "tiny.bin"))
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_header(str(tmp_path / "nope.bin"))
    with pytest.raises(ShardError, match="uint16"):
        write_shard(p, np.array([70000]))


# -- loader -------------------------------------------------------------------------------


def test_loader_packs_every_token_exactly_once(shards):
    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    source = np.concatenate([np.asarray(open_shard(f)) for f in files])
    loader = trainer.PackedLoader(files, seq_len=128, seed=3, shuffle=False)
    seqs = []
    while loader.epoch == 0:
        seqs.append(loader.next_sequence())
    seqs = np.stack(seqs)
    assert loader.seq_index == len(seqs)
    assert (seqs[:, 0] == CLS_ID).all()  # every row starts a document
    for row in seqs:  # padding only at the end of a row
        pad = np.flatnonzero(row == PAD_ID)
        assert pad.size == 0 or (pad == np.arange(pad[0], 128)).all()
    got = seqs[(seqs != CLS_ID) & (seqs != PAD_ID)]
    src = source[source != CLS_ID]
    n = len(src)  # the last sequence may continue into epoch 1, which starts over
    assert np.array_equal(got[:n], src) and np.array_equal(got[n:], src[: len(got) - n])  # every token once, in order
    # each packed document is a contiguous piece of one source document (token values are unique)
    doc_of = np.zeros(CLS_ID, dtype=np.int64)
    doc_of[src] = np.cumsum(source == CLS_ID)[source != CLS_ID]
    docs = document_ids(torch.from_numpy(seqs)).numpy()
    for r, row in enumerate(seqs):
        for d in np.unique(docs[r]):
            toks = row[(docs[r] == d) & (row != CLS_ID) & (row != PAD_ID)]
            if toks.size:
                assert len(np.unique(doc_of[toks])) == 1 and (np.diff(toks) == 1).all()
    padding = (seqs == PAD_ID).mean()
    print(f"padding fraction {padding:.3f} over {len(seqs)} sequences")


def test_loader_is_deterministic_and_resumable(shards):
    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    a = trainer.PackedLoader(files, 128, seed=5)
    ref, _ = a.next_batch(200)  # an epoch is ~154 sequences: this crosses into epoch 1
    assert a.epoch == 1
    b = trainer.PackedLoader(files, 128, seed=5)
    first, _ = b.next_batch(13)
    c = trainer.PackedLoader(files, 128, seed=5)
    c.load_state_dict(b.state_dict())
    rest, idx = c.next_batch(187)
    assert idx == 13 and np.array_equal(np.concatenate([first, rest]), ref)
    others = [trainer.PackedLoader(files, 128, seed=s).next_batch(200)[0] for s in (6, 7, 8)]
    assert any(not np.array_equal(o, ref) for o in others)  # shard order depends on the seed


def test_attention_pairs_matches_dense_mask():
    ids = torch.randint(0, 1000, (2, 256))
    ids[:, 0] = CLS_ID
    ids[0, [50, 51, 180]] = CLS_ID
    ids[1, 200:] = PAD_ID
    from model import dense_mask

    for w in (1, 16, 100, 1000):
        mask = dense_mask(document_ids(ids), torch.tensor(w))
        real = (ids != PAD_ID)
        expected = (mask[:, 0] & real[:, :, None] & real[:, None, :]).sum().item()
        assert trainer.attention_pairs(trainer.document_lengths(ids.numpy()), w) == expected


# -- masking ------------------------------------------------------------------------------


def test_masking_statistics_and_rank_independence():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (64, 8192), generator=g)
    ids[:, ::97] = CLS_ID
    ids[:, 5::211] = SEP_ID
    inputs, labels = trainer.mask_tokens(ids, 1000, seed=7, mask_rate=0.3, random_frac=0.1, keep_frac=0.1)
    normal = ids < CLS_ID
    sel = labels >= 0
    assert not sel[~normal].any()  # special tokens never selected
    assert torch.equal(labels[sel], ids[sel])
    rate = sel.sum().item() / normal.sum().item()
    n = sel.sum().item()
    masked = (inputs[sel] == MASK_ID).sum().item() / n
    kept = (inputs[sel] == ids[sel]).sum().item() / n
    rand = 1 - masked - kept
    print(f"selected {rate:.4f} [MASK] {masked:.4f} random {rand:.4f} keep {kept:.4f}")
    for got, want in ((rate, 0.3), (masked, 0.8), (rand, 0.1), (kept, 0.1)):
        assert abs(got - want) < 0.01  # within one percentage point ...
        assert abs(got - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-4  # ... and within 4 sigma of a fair coin
    assert torch.equal(inputs[~sel], ids[~sel])
    # the same global rows get the same masks however the batch is split across ranks
    part_in, part_lab = trainer.mask_tokens(ids[10:20], 1010, seed=7, mask_rate=0.3, random_frac=0.1, keep_frac=0.1)
    assert torch.equal(part_in, inputs[10:20]) and torch.equal(part_lab, labels[10:20])
    other, _ = trainer.mask_tokens(ids, 1000, seed=8, mask_rate=0.3, random_frac=0.1, keep_frac=0.1)
    assert not torch.equal(other, inputs)


def test_schedules():
    t = trainer.TrainConfig(steps=100, warmup_frac=0.1, cooldown_frac=0.5, local_window_start=64, local_window_end=256,
                            global_window_start=1024, global_window_end=8192, window_grow_frac=0.5)
    assert trainer.lr_multiplier(0, t) == pytest.approx(0.1) and trainer.lr_multiplier(30, t) == 1.0
    assert trainer.lr_multiplier(75, t) == pytest.approx(0.5) and trainer.lr_multiplier(99, t) == pytest.approx(0.02)
    assert trainer.windows_at(0, t) == (64, 1024) and trainer.windows_at(50, t) == (256, 8192)
    assert all(w % 128 == 0 for w in trainer.windows_at(20, t))
    assert trainer.masking_at(99, t)[0] == pytest.approx(t.mask_rate_end)
    t2 = trainer.TrainConfig(steps=100, batch_tokens=1 << 19, batch_tokens_start=1 << 17, batch_warmup_frac=0.2)
    sizes = [trainer.batch_seqs_at(s, t2, 8192, 16) for s in (0, 10, 20, 50)]
    assert sizes[0] == 16 and sizes[-1] == 64 and sizes == sorted(sizes) and all(s % 16 == 0 for s in sizes)


# -- training runs ------------------------------------------------------------------------


def test_resume_gives_identical_losses(shards, monkeypatch):
    monkeypatch.chdir(shards)
    full = trainer.main(base_args(shards, "full"))
    ck = shards / "ck" / "full"
    assert sorted(os.listdir(ck)) == ["step_0000003.pt", "step_0000006.pt"]
    resumed = trainer.main(base_args(shards, "resumed") + ["--train.resume", str(ck / "step_0000003.pt")])
    a, b = losses(full["history"]), losses(resumed["history"])
    print("uninterrupted:", [f"{x:.6f}" for x in a])
    print("resumed at 3: ", [f"{x:.6f}" for x in b])
    assert len(a) == 6 and b == a[3:]
    assert resumed["val"]["loss"] == full["val"]["loss"]
    # a kill mid-write leaves a partial newer file: the folder resume skips it and says so
    open(ck / "step_0000009.pt", "wb").write(b"garbage from an interrupted write")
    state = trainer.load_checkpoint(str(ck), print)
    assert state["step"] == 6


def test_one_vs_two_processes_same_losses(shards):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    args = base_args(shards, "x", steps=4) + ["--train.val_every", "0", "--train.save_every", "0"]
    runs = {}
    for n in (1, 2):
        a = [x if x != "x" else f"np{n}" for x in args]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29541",
               os.path.join(ROOT, "trainer.py")] + a
        r = subprocess.run(cmd, cwd=shards, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        runs[n] = [float(v) for v in re.findall(r"^step:\d+/4 loss:([\d.]+)", r.stdout, re.M)]
    print("1 process: ", runs[1])
    print("2 processes:", runs[2])
    assert len(runs[1]) == 4 and np.allclose(runs[1], runs[2], rtol=0, atol=2e-4)


def test_nan_loss_stops_and_keeps_last_checkpoint(shards, monkeypatch):
    monkeypatch.chdir(shards)
    calls = {"n": 0}
    real = KBERT.mlm_head_loss

    def poisoned(self, h, target, reduction="mean"):
        calls["n"] += 1
        loss, correct = real(self, h, target, reduction)
        return (loss * float("nan") if calls["n"] > 4 * 4 else loss), correct  # 4 micro-batches per step

    monkeypatch.setattr(KBERT, "mlm_head_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "nan") + ["--train.val_every", "0"])
    assert e.value.code == 2
    assert sorted(os.listdir(shards / "ck" / "nan")) == ["step_0000003.pt"]
    assert "loss is nan" in open(shards / "logs" / "nan.txt").read()


def test_nonfinite_gradient_with_finite_loss_stops_and_names_the_tensor(shards, monkeypatch):
    """From the 5th step on, one matrix gets an inf gradient while the loss stays finite: the
    run stops at that step and the log names the matrix (the clue for a NaN hunt)."""
    monkeypatch.chdir(shards)
    calls = {"n": 0}
    real = KBERT.mlm_head_loss

    def poisoned(self, h, target, reduction="mean"):
        calls["n"] += 1
        if calls["n"] == 4 * 4 + 1:
            self.blocks[1].mlp.fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return real(self, h, target, reduction)

    monkeypatch.setattr(KBERT, "mlm_head_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "inf") + ["--train.val_every", "0"])
    assert e.value.code == 2
    text = open(shards / "logs" / "inf.txt").read()
    assert "step:5 loss is " in text and "gradients non-finite on 1 of 1 ranks" in text
    assert "non-finite gradients (rank-local): blocks.1.mlp.fc.weight\n" in text
    assert "step:4/" in text and "gnorm:" in text
    # the log summary GPU runs are reported with reads the same log
    summary = log_summary.summarize(str(shards / "logs" / "inf.txt"), skip=1)
    assert summary["steps"] == 4 and summary["timed_steps"] == "2-4" and summary["median_tokens_per_s"] > 0
    assert summary["median_mfu_pct"] is None and "step:5 loss is" in summary["stopped"]


def test_export_loads_back_offline_with_identical_outputs(shards, monkeypatch):
    monkeypatch.chdir(shards)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = trainer.main(base_args(shards, "exp", steps=2) + ["--train.val_every", "0"])
    folder = out["export"]
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    card = open(os.path.join(folder, "README.md")).read()
    assert "tokens seen: 2,048" in card and "validation loss" in card
    model, config = trainer.load_encoder(folder)
    ckpt = torch.load(shards / "ck" / "exp" / "step_0000002.pt", weights_only=True)
    ref = KBERT(ModelConfig(**config["model"]))
    ref.load_state_dict(ckpt["model"])
    ids = torch.randint(0, 50000, (2, 128))
    ids[:, 0] = CLS_ID
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    with pytest.raises(FileNotFoundError, match="Hub"):
        trainer.load_encoder("someone/not-a-local-folder")
    with pytest.raises(FileNotFoundError, match="neither"):
        trainer.load_encoder(str(shards / "missing" / "dir"))


def test_push_to_hub_retries_and_keeps_local_copy(tmp_path, monkeypatch):
    import common

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id))
            if len([c for c in calls if c[0] == "upload"]) < 2:
                raise ConnectionError("Hub unreachable")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lines = []
    assert common.push_to_hub(str(tmp_path), "me/kbert-test", lines.append, retries=3, wait_s=0)
    assert [c[0] for c in calls] == ["create", "upload", "create", "upload"]
    assert "attempt 1/3" in lines[0] and "pushed" in lines[-1]
    calls.clear()
    monkeypatch.setattr(FakeApi, "upload_folder", lambda self, **kw: (_ for _ in ()).throw(OSError("down")))
    lines.clear()
    assert not common.push_to_hub(str(tmp_path), "me/kbert-test", lines.append, retries=2, wait_s=0)
    assert "export is safe" in lines[-1] and os.path.isdir(tmp_path)
    assert not any("hf_secret_token_value" in line for line in lines)


def test_bf16_precision_runs_on_cpu_close_to_fp32(shards, monkeypatch):
    """--train.precision bf16 (autocast over fp32 weights, Muon's orthogonalisation in bf16),
    with the residual stream in fp32 or bf16, trains on CPU and starts where the fp32 run starts."""
    monkeypatch.chdir(shards)
    args = base_args(shards, "p", steps=2) + ["--train.val_every", "0", "--train.save_every", "0"]
    runs = {name: losses(trainer.main(args + extra)["history"]) for name, extra in (
        ("fp32", []), ("bf16", ["--train.precision", "bf16"]),
        ("bf16 residual", ["--train.precision", "bf16", "--model.residual_fp32", "false"]))}
    print({k: [f"{x:.4f}" for x in v] for k, v in runs.items()})
    for name in ("bf16", "bf16 residual"):
        assert abs(runs[name][0] - runs["fp32"][0]) < 0.05 and all(map(math.isfinite, runs[name]))
    assert runs["bf16"] != runs["fp32"] and runs["bf16 residual"] != runs["bf16"]  # each option took effect


def test_bad_inputs_fail_clearly(shards, monkeypatch, capsys):
    monkeypatch.chdir(shards)
    with pytest.raises(SystemExit, match="download_fineweb_edu"):
        trainer.main(base_args(shards, "m") + ["--data.train_files", str(shards / "none_*.bin")])
    with pytest.raises(SystemExit, match=r"unknown option --train.learning_rate.*--train.lr_muon"):
        trainer.parse_args(["--train.learning_rate", "1"])
    with pytest.raises(SystemExit, match="expected true/false"):
        trainer.parse_args(["--train.compile", "maybe"])
    with pytest.raises(SystemExit, match="expected int"):
        trainer.parse_args(["--train.steps", "ten"])
    with pytest.raises(SystemExit, match="multiple of 128"):
        trainer.parse_args(["--data.seq_len", "100"])
    with pytest.raises(SystemExit, match="precision must be auto, bf16 or fp32"):
        trainer.parse_args(["--train.precision", "fp16"])
    with pytest.raises(SystemExit, match="unknown model preset"):
        trainer.parse_args(["--model.preset", "giant"])
    assert trainer.parse_args(["--train.compile", "False"]).train.compile is False
    raw = open(shards / "syn_train_000002.bin", "rb").read()
    open(shards / "syn_train_000002.bin", "wb").write(raw[:-10])
    with pytest.raises(ShardError, match="syn_train_000002.bin"):
        trainer.main(base_args(shards, "m"))


def test_demo_builds_the_embedded_corpus_and_learns(tmp_path, monkeypatch, tok):
    """`python trainer.py --demo`, shortened: the pydoc corpus is built on first use
    (train and validation documents disjoint) and the validation loss falls."""
    monkeypatch.chdir(tmp_path)
    out = trainer.main(["--demo", "--train.steps", "20", "--train.val_every", "10", "--train.save_every", "0"])
    train = open_shard(str(tmp_path / "data/pydoc/pydoc_train_000001.bin"))
    val = open_shard(str(tmp_path / "data/pydoc/pydoc_val_000000.bin"))
    print(f"pydoc corpus: {len(train):,} train and {len(val):,} validation tokens")
    assert len(train) > 400_000 and len(val) > 16_384
    split = lambda toks: {tuple(d) for d in np.split(np.asarray(toks), np.flatnonzero(np.asarray(toks) == CLS_ID)[1:])}
    assert not split(train) & split(val)
    vals = [h["loss"] for h in out["history"] if "acc" in h]
    print("demo val_loss:", [f"{v:.3f}" for v in vals])
    assert len(vals) == 2 and vals[-1] < 7.5 and np.log(50257) > vals[-1]
    assert re.search(r"val_loss:\d+\.\d+", open(out["log"]).read())
