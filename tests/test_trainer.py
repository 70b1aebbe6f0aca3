"""Pretraining pipeline: shards, packing loader, masking, 1 vs 2 processes, resume,
export/load, bad inputs; runs that survive signals, kills and bad steps."""
import collections
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import tokenizer
import trainer
from bench import log_summary
from data.shards import ShardError, open_shard, read_header, write_shard
from model import CLS_ID, MASK_ID, PAD_ID, PRESETS, SEP_ID, KBERT, ModelConfig, document_ids

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


def write_synthetic_shards(folder):
    """Two small train shards (the second starting mid-document) and one val shard."""
    docs = synthetic_docs(120, seed=0)
    flat = np.concatenate(docs)
    cut = len(flat) // 2 + 7
    write_shard(str(folder / "syn_train_000001.bin"), flat[:cut])
    write_shard(str(folder / "syn_train_000002.bin"), flat[cut:])
    write_shard(str(folder / "syn_val_000000.bin"), np.concatenate(synthetic_docs(30, seed=1, start=45000)))
    return folder


@pytest.fixture
def shards(tmp_path):
    return write_synthetic_shards(tmp_path)


def base_args(tmp, run_id, steps=6):
    return ["--model.preset", "tiny", "--data.train_files", f"{tmp}/syn_train_*.bin", "--data.val_files", f"{tmp}/syn_val_*.bin",
            "--data.seq_len", "128", "--train.batch_tokens", "1024", "--train.micro_batch_seqs", "2", "--train.steps", str(steps),
            "--train.val_every", "3", "--train.val_tokens", "1024", "--train.save_every", "3",
            "--train.checkpoint_dir", f"{tmp}/ck", "--train.export_dir", f"{tmp}/ex", "--train.run_id", run_id,
            "--train.local_window_start", "32", "--train.global_window_start", "64", "--train.global_window_end", "128",
            "--train.precision", "fp32"]  # the numerics reference: exact comparisons whatever the CPU (auto is bf16 on some)


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
    """Rows are full: a document that does not fit fills the row and continues in the next one
    behind an inserted [CLS]; no [PAD] in a looping stream, every token once and in order."""
    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    source = np.concatenate([np.asarray(open_shard(f)) for f in files])
    loader = trainer.PackedLoader(files, seq_len=128, seed=3, shuffle=False)
    seqs = []
    while loader.epoch == 0:
        seqs.append(loader.next_sequence())
    seqs = np.stack(seqs)
    padding = (seqs == PAD_ID).mean()
    print(f"padding fraction {padding:.4f} over {len(seqs)} sequences of 128 (synthetic documents of 2-300 tokens)")
    assert loader.seq_index == len(seqs)
    assert (seqs[:, 0] == CLS_ID).all()  # every row starts a document
    assert padding == 0
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
    # a finite pass (validation) pads its last row only, and stops there
    once = trainer.PackedLoader(files, seq_len=128, shuffle=False, loop=False)
    rows = []
    while not once.exhausted:
        rows.append(once.next_sequence())
    rows = np.stack(rows)
    assert not (rows[:-1] == PAD_ID).any() and (rows[-1] == PAD_ID).any()
    assert np.array_equal(rows[(rows != CLS_ID) & (rows != PAD_ID)], src)


def test_loader_fills_rows_of_real_shards(tmp_path, tok):
    """< 1% [PAD] in 8,192-token rows of real prose (bench/packing.py measures the same on any
    shards); only the last row of the finite pass holds [PAD]."""
    from bench import packing
    from conftest import shared_path

    texts = [json.loads(line)["text"] for name in ("fineweb_edu/sample.jsonl", "prose/us_presidential_speeches.jsonl")
             for line in open(shared_path("data", *name.split("/")))]
    write_shard(str(tmp_path / "prose_000000.bin"), np.concatenate(tok.encode_documents(texts)))
    r = packing.measure([str(tmp_path / "prose_000000.bin")], 8192)
    print(f"real prose ({r['source_documents']} documents, {r['tokens']:,} tokens): [PAD] {100 * r['pad_fraction']:.3f}% "
          f"({100 * r['pad_fraction_before_last_row']:.3f}% before the last row), {r['rows']} rows")
    assert r["pad_fraction"] < 0.01 and r["pad_fraction_before_last_row"] == 0


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
    assert ((inputs[sel] < CLS_ID) | (inputs[sel] == MASK_ID)).all()  # a random replacement is never a special token
    # the same global rows get the same masks however the batch is split across ranks
    part_in, part_lab = trainer.mask_tokens(ids[10:20], 1010, seed=7, mask_rate=0.3, random_frac=0.1, keep_frac=0.1)
    assert torch.equal(part_in, inputs[10:20]) and torch.equal(part_lab, labels[10:20])
    other, _ = trainer.mask_tokens(ids, 1000, seed=8, mask_rate=0.3, random_frac=0.1, keep_frac=0.1)
    assert not torch.equal(other, inputs)


def test_random_replacement_never_reaches_special_ids(monkeypatch):
    """At the top of the uniform range (u -> 1, which float32 rounds to exactly 1.0) a random
    replacement must still be an ordinary GPT-2 id, < 50,256 ([CLS])."""
    top = torch.tensor(1 - 2**-30, dtype=torch.float64).float()  # == 1.0 in float32
    monkeypatch.setattr(trainer, "position_uniforms", lambda pos, seed, n: [torch.zeros(pos.shape), torch.zeros(pos.shape),
                                                                              torch.full(pos.shape, top.item())])
    ids = torch.randint(0, CLS_ID, (2, 64))
    inputs, labels = trainer.mask_tokens(ids, 0, seed=0, mask_rate=0.5, random_frac=0.5, keep_frac=0.0)
    assert (labels == ids).all()  # every position selected, every one replaced at random
    print("replacement ids at u = 1.0:", inputs.unique().tolist())
    assert (inputs < CLS_ID).all() and (inputs == CLS_ID - 1).all()


def test_schedules():
    t = trainer.TrainConfig(steps=100, warmup_frac=0.1, cooldown_frac=0.5, local_window_start=64, local_window_end=256,
                            global_window_start=1024, global_window_end=8192, window_grow_frac=0.5)
    assert trainer.lr_multiplier(0, t) == pytest.approx(0.1) and trainer.lr_multiplier(30, t) == 1.0
    assert trainer.lr_multiplier(75, t) == pytest.approx(0.5) and trainer.lr_multiplier(99, t) == pytest.approx(0.02)
    assert trainer.windows_at(0, t) == (64, 1024) and trainer.windows_at(50, t) == (256, 8192)
    assert all(w % 128 == 0 for w in trainer.windows_at(20, t))
    assert trainer.masking_at(99, t)[0] == pytest.approx(t.mask_rate_end)
    t2 = trainer.TrainConfig(steps=100, batch_tokens=1 << 19, batch_tokens_start=1 << 17, batch_warmup_frac=0.2)
    sizes = [trainer.batch_seqs_at(s, t2, 8192) for s in (0, 5, 10, 20, 50)]
    assert sizes == [16, 28, 40, 64, 64]  # whole sequences on the straight line 16 -> 64, whatever the world size


def test_windows_are_clipped_to_the_sequence_length(shards):
    """At --data.seq_len 512 the base schedule's windows (128 -> 128 local, 1024 -> 8192 global)
    stop at 512: in the schedule, the step line's windows and the exported config (once
    windows:128/8192 and global_window 8192)."""
    hp = trainer.parse_args(["--model.preset", "tiny", "--data.seq_len", "512", "--train.batch_tokens", "4096"])
    assert (hp.model.local_window, hp.model.global_window) == (128, 512)
    assert trainer.windows_at(0, hp.train, 512) == (128, 512) and trainer.windows_at(0, hp.train) == (128, 1024)
    hp = trainer.parse_args(base_args(shards, "w") + ["--train.global_window_start", "1024", "--train.global_window_end", "8192"])
    model = KBERT(hp.model)
    batch, first = trainer.PackedLoader(sorted(map(str, shards.glob("syn_train_*.bin"))), 128).next_batch(2)
    out = trainer.train_step(model, trainer.build_optimizer(model, hp.train), trainer.make_forward(model, compile=False), batch,
                             first, 0, hp.train, common.Dist(0, 0, 1, torch.device("cpu")))
    assert out["windows"] == (32, 128) and hp.model.global_window == 128


def test_the_card_has_no_blimp_line_the_trainer_cannot_fill():
    """The pretraining card once carried '- BLiMP: not measured', which trainer.py never fills:
    it now says how to measure it instead."""
    hp = trainer.parse_args(["--model.preset", "tiny"])
    card = trainer.model_card(hp, KBERT(hp.model).param_counts(), 1000, {"loss": 5.0, "acc": 0.2}, "trainer.py", "exports/x")
    assert "- BLiMP" not in card and "validation loss: 5.0000" in card
    assert "To score it on BLiMP: `python finetuner.py --task blimp --train.base_model exports/x`" in card


def test_metrics_json_sums_flops_and_tokens_over_a_resumed_run(shards, monkeypatch):
    """exports/<run_id>/metrics.json: the final validation, real tokens, FLOPs (training_flops of
    every step, counted on across a resume), times, config and export path; a run stopped at
    step 1 and resumed gives the uninterrupted run's tokens and FLOPs."""
    monkeypatch.chdir(shards)
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *args: None)
    small = ["--train.val_every", "0", "--train.batch_tokens", "256", "--train.val_tokens", "256", "--train.save_every", "0"]
    whole = trainer.main(base_args(shards, "m2", steps=2) + small)
    m = json.load(open(shards / "ex" / "m2" / "metrics.json"))
    assert m["export"] == whole["export"] and m["val_loss"] == whole["val"]["loss"] and m["val_acc"] == whole["val"]["acc"]
    assert m["real_tokens"] == whole["tokens_seen"] == 512 and m["flops"] == whole["flops"] and m["steps"] == 2
    assert m["config"]["train"]["steps"] == 2 and m["log"] == "logs/m2.txt" and 0 < m["train_time_s"] <= m["wall_time_s"]
    hp = trainer.parse_args(base_args(shards, "m2", steps=2) + small)  # the reference count: the same two batches
    loader, ref = trainer.PackedLoader(sorted(map(str, shards.glob("syn_train_*.bin"))), 128), 0.0
    for step in range(2):
        batch, first = loader.next_batch(2)
        _, labels = trainer.mask_tokens(torch.from_numpy(batch).long(), first, 0, *trainer.masking_at(step, hp.train))
        ref += trainer.step_flops(hp.model, batch, int((labels >= 0).sum()), trainer.windows_at(step, hp.train, 128))
    assert m["flops"] == ref
    trainer.main(base_args(shards, "m1", steps=1) + small)
    trainer.main(base_args(shards, "m1", steps=2) + small + ["--train.resume", "auto"])
    m1 = json.load(open(shards / "ex" / "m1" / "metrics.json"))
    assert (m1["real_tokens"], m1["flops"], m1["val_loss"]) == (m["real_tokens"], m["flops"], m["val_loss"])


def test_rank_chunks_deal_every_row_once():
    for n_rows, micro, world in ((8, 2, 1), (8, 2, 2), (5, 2, 2), (1, 2, 2), (24, 8, 8), (7, 3, 4)):
        chunks = [trainer.rank_chunks(n_rows, micro, world, r) for r in range(world)]
        rows = sorted(i for per_rank in chunks for lo, hi in per_rank for i in range(lo, hi))
        assert rows == list(range(n_rows)) and all(0 < hi - lo <= micro for c in chunks for lo, hi in c)
    assert trainer.rank_chunks(5, 2, 2, 0) == [(0, 2), (4, 5)] and trainer.rank_chunks(5, 2, 2, 1) == [(2, 4)]
    assert trainer.rank_chunks(1, 2, 2, 1) == []  # an idle rank during batch warm-up


# -- the training step --------------------------------------------------------------------


def step_setup(shards, micro, n_rows=8, seed=0, dtype=torch.float32, **train):
    """A tiny model, its optimizer and one global batch of the synthetic shards (documents of
    uneven length, so micro-batches predict different numbers of tokens)."""

    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    batch, first = trainer.PackedLoader(files, 128, seed=seed).next_batch(n_rows)
    t = trainer.TrainConfig(**{"micro_batch_seqs": micro, "steps": 10, **train})
    model = KBERT(ModelConfig(preset="tiny", local_window=32, global_window=128))
    model.init_weights(seed=seed)
    with torch.no_grad():  # non-zero output projections: every matrix gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    model.to(dtype)
    return model, trainer.build_optimizer(model, t), batch, first, t, common.Dist(0, 0, 1, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_is_independent_of_the_micro_batch_size(shards, dtype):
    """The loss is normalised by the predicted tokens of the whole batch, so cutting the same
    8 rows into micro-batches of 1, 2 or 8 gives the same gradient: to 1e-6 in fp32 (1e-4 for
    the scalar gains, whose gradients cancel a lot), to 1e-12 for every parameter in fp64."""
    grads, losses_seen, counts = {}, {}, {}
    for micro in (8, 2, 1):
        model, opt, batch, first, t, d = step_setup(shards, micro, dtype=dtype)
        forward = trainer.make_forward(model, compile=False, precision="fp32")
        out = trainer.train_step(model, opt, forward, batch, first, 5, t, d)
        grads[micro] = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses_seen[micro] = out["loss"]
        counts[micro] = [int((trainer.mask_tokens(torch.from_numpy(batch[i:i + 1]).long(), first + i, t.seed,
                                                 *trainer.masking_at(5, t))[1] >= 0).sum()) for i in range(8)]
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    flat = {m: torch.cat([g.flatten() for g in grads[m].values()]) for m in grads}
    whole = {m: rel(flat[m], flat[8]) for m in (1, 2)}
    matrices = {m: max(rel(grads[m][n], grads[8][n]) for n in grads[8] if grads[8][n].ndim == 2) for m in (1, 2)}
    gains = {m: max(rel(grads[m][n], grads[8][n]) for n in grads[8] if grads[8][n].ndim < 2) for m in (1, 2)}
    print(f"predicted tokens per row {counts[8]}; loss {losses_seen}; relative gradient difference to micro-batch 8: "
          f"whole gradient {whole}, worst matrix {matrices}, worst gain {gains}")
    assert len(set(counts[8])) > 1  # the micro-batches do differ in predicted tokens
    assert all(torch.count_nonzero(g) for g in grads[8].values())
    if dtype == torch.float64:
        assert max(whole.values()) < 1e-12 and max(matrices.values()) < 1e-12 and max(gains.values()) < 1e-12
    else:
        assert max(whole.values()) < 1e-6 and max(matrices.values()) < 1e-6
        # the scalar gains' gradients are sums over every position with much cancellation (their
        # norms are ~1e-3 of the embedding's): fp32 rounding alone leaves ~1e-5 there
        assert max(gains.values()) < 1e-4
    assert losses_seen[1] == pytest.approx(losses_seen[8], rel=1e-6)


@pytest.mark.slow
def test_compiled_and_eager_training_agree_over_20_steps(shards):
    """--train.compile on CPU (the encoder through inductor's C++ backend): 20 training steps
    from the same weights over the same batches give the eager run's losses to fp32 tolerance
    (the windows grow meanwhile: a tensor input, so they do not recompile)."""
    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    losses = {}
    for compile in (False, True):
        torch._dynamo.reset()
        model, opt, _, _, t, d = step_setup(shards, micro=4, n_rows=4, steps=20)
        loader = trainer.PackedLoader(files, 128, seed=0)
        forward = trainer.make_forward(model, compile=compile, precision="fp32")
        losses[compile] = []
        for step in range(20):
            batch, first = loader.next_batch(4)
            out = trainer.train_step(model, opt, forward, batch, first, step, t, d, static_rows=compile)
            losses[compile].append(out["loss"])
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))
    print(f"eager {[round(x, 5) for x in losses[False][::5]]}, compiled {[round(x, 5) for x in losses[True][::5]]}; "
          f"worst relative difference over 20 steps {worst:.1e}")
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-6)  # the same forward, to rounding
    # then fp32 rounding differences (another summation order) pass through 20 Muon updates: 3.4e-4 and 5.2e-4
    # in two runs (inductor's reductions are not bit-reproducible across runs)
    assert worst < 2e-3 and len(set(losses[False])) == 20


def test_static_rows_pad_a_short_micro_batch_without_changing_the_step(shards):
    """The compiled path fills a short last micro-batch with [PAD] rows (one shape for the
    compiler): the loss and the updated weights are those of the unpadded step."""
    outs, weights = {}, {}
    for static in (False, True):
        model, opt, batch, first, t, d = step_setup(shards, micro=2, n_rows=5)
        forward = trainer.make_forward(model, compile=False, precision="fp32")
        outs[static] = trainer.train_step(model, opt, forward, batch, first, 5, t, d, static_rows=static)
        weights[static] = [p.detach().clone() for p in model.parameters()]
    diff = max((a - b).abs().max().item() for a, b in zip(weights[False], weights[True]))
    print(f"5 rows in micro-batches of 2, padded vs not: loss {outs[False]['loss']:.6f} / {outs[True]['loss']:.6f}, "
          f"max weight difference {diff:.1e}")
    assert outs[False]["loss"] == pytest.approx(outs[True]["loss"], rel=1e-6) and diff < 1e-6
    assert outs[False]["n_predicted"] == outs[True]["n_predicted"]


def test_resume_with_new_learning_rates_uses_them(shards, monkeypatch):
    """A resume command's learning rates take effect: the resumed step equals a fresh optimizer
    loaded with the checkpoint's state and run at the new rates, not the old run's step."""

    monkeypatch.chdir(shards)
    trainer.main(base_args(shards, "lr", steps=6) + ["--train.val_every", "0"])
    ckpt = shards / "ck" / "lr" / "step_0000003.pt"
    low = {"lr_muon": 0.004, "lr_embed": 0.0005, "lr_scalar": 0.002}
    resumed = trainer.main(["--train.resume", str(ckpt), "--train.run_id", "lr-low", "--train.save_every", "1",
                            "--train.keep_checkpoints", "5"] + [f"--train.{k}={v}" for k, v in low.items()])
    after = torch.load(shards / "ck" / "lr-low" / "step_0000004.pt", weights_only=True)["model"]

    def one_step_from_checkpoint(**lrs):
        state = torch.load(ckpt, weights_only=True)
        hp = trainer.parse_args([], saved=state["config"])
        t = dataclasses.replace(hp.train, **lrs)
        model = KBERT(hp.model)
        model.load_state_dict(state["model"])
        opt = trainer.build_optimizer(model, t)  # a fresh optimizer at these rates ...
        opt.load_state_dict(state["optimizer"])  # ... loaded with the checkpoint's state
        loader = trainer.PackedLoader(trainer.shard_files(hp.data.train_files, "training"), hp.data.seq_len, seed=t.seed)
        loader.load_state_dict(state["loader"])
        batch, first = loader.next_batch(trainer.batch_seqs_at(3, t, hp.data.seq_len))
        forward = trainer.make_forward(model, compile=False, precision=t.precision)
        trainer.train_step(model, opt, forward, batch, first, 3, t, common.Dist(0, 0, 1, torch.device("cpu")))
        return model.state_dict()

    fresh_low, old_rates = one_step_from_checkpoint(**low), one_step_from_checkpoint()
    diff_low = max((after[k] - fresh_low[k]).abs().max().item() for k in after)
    diff_old = max((after[k] - old_rates[k]).abs().max().item() for k in after)
    print(f"resumed step 4 vs fresh optimizer at the new rates: max abs diff {diff_low:.2e}; "
          f"vs the checkpoint's rates: {diff_old:.2e}")
    assert diff_low == 0 and diff_old > 1e-4
    text = open(resumed["log"]).read()
    assert "train.lr_muon: 0.02 -> 0.004" in text and "train.lr_embed: 0.002 -> 0.0005" in text
    assert re.search(r"^step:4/6 loss:\S+ gnorm:\S+ lr_muon:0.004 lr_embed:0.0005 lr_scalar:0.002 ", text, re.M)


def test_default_weight_decay_shrinks_only_the_muon_matrices_by_lr_times_wd():
    """trainer.py's default decay (0.05, records/2026-12-06-weight-decay) against the same step
    without it: the hidden matrices end lr x wd x their old value lower, everything else equal."""
    t = trainer.TrainConfig()
    assert t.weight_decay == 0.05
    torch.manual_seed(0)
    first = KBERT(ModelConfig(preset="tiny", local_window=32, global_window=128))
    grads = {n: torch.randn_like(p) for n, p in first.named_parameters()}
    after = {}
    for wd in (t.weight_decay, 0.0):
        model = KBERT(ModelConfig(preset="tiny", local_window=32, global_window=128))
        model.load_state_dict(first.state_dict())
        opt = trainer.build_optimizer(model, dataclasses.replace(t, weight_decay=wd))
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        after[wd] = dict(model.named_parameters())
    muon = {id(p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    hidden = {n for n, p in model.named_parameters() if id(p) in muon}
    assert hidden == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2} != set()
    for n, p0 in first.named_parameters():
        expected = t.lr_muon * t.weight_decay * p0.detach() if n in hidden else torch.zeros_like(p0)
        torch.testing.assert_close(after[0.0][n] - after[t.weight_decay][n], expected, atol=1e-6, rtol=1e-4)


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
    # the preflight's size estimate (weights, Muon momentum, AdamW moments) against a real checkpoint
    estimate, real = trainer.checkpoint_bytes(trainer.parse_args(base_args(shards, "full")))[0], os.path.getsize(ck / "step_0000006.pt")
    print(f"checkpoint of tiny: {real:,} bytes on disk, {estimate:,} estimated")
    assert abs(real - estimate) < 0.01 * real
    open(ck / "step_0000009.pt", "wb").write(b"garbage from an interrupted write")
    notes = []
    state = trainer.load_checkpoint(str(ck), notes.append)
    assert state["step"] == 6 and "step_0000009.pt" in notes[0]
    with pytest.raises(SystemExit, match=r"^--train.steps 4 is below the checkpoint's step 6: give --train.steps above 6"):
        trainer.main(["--train.resume", str(ck), "--train.steps", "4", "--train.run_id", "shorter"])
    # the window schedule only sets the exported model's defaults: changing it on resume is allowed
    grown = trainer.main(["--train.resume", str(ck / "step_0000003.pt"), "--train.run_id", "grown", "--train.steps", "4",
                          "--train.global_window_end", "256"])
    assert grown["history"][-1]["step"] == 4


WORKER = os.path.join(ROOT, "tests", "trainer_worker.py")


def worker_args(tmp, run_id):
    """6 steps with the batch-size warm-up on (1, 3, 5, 7, 7, 7 sequences in micro-batches of 2:
    on 2 processes rank 1 idles at step 1, and from step 2 on one rank holds a short last
    micro-batch); validation at 3 and 6; checkpoints only on a signal and at the end."""
    return base_args(tmp, run_id, steps=6) + ["--train.save_every", "0", "--train.batch_tokens", "896",
                                              "--train.batch_tokens_start", "128", "--train.batch_warmup_frac", "0.5"]


def launch(tmp, args, nproc, **env):
    """tests/trainer_worker.py (trainer.main; under torchrun for nproc > 1), output merged and
    read as it comes."""
    cmd = [sys.executable, WORKER] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29583", WORKER]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env}
    return subprocess.Popen(cmd + args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, pattern: str) -> str:
    """The output up to the first line matching pattern (the run goes on meanwhile)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(pattern, line):
            return "".join(seen)
    raise AssertionError(f"the run ended before a line {pattern!r}:\n{''.join(seen)[-3000:]}")


def finish(proc, code: int = 0) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """run(nproc) -> (history with exact losses, output): worker_args run to the end, once per
    process count; the reference of the 1-vs-2-process test and of the interrupted runs."""
    cache = {}

    def run(nproc):
        if nproc not in cache:
            tmp = write_synthetic_shards(tmp_path_factory.mktemp(f"uninterrupted{nproc}"))
            out = finish(launch(tmp, worker_args(tmp, "ref"), nproc, KBERT_HISTORY=str(tmp / "history.json")))
            cache[nproc] = json.load(open(tmp / "history.json")), out
        return cache[nproc]

    return run


def test_one_vs_two_processes_same_losses(uninterrupted):
    """With the batch-size warm-up on (worker_args), 1 and 2 processes run the same batches and
    reach the same training and validation losses."""
    runs, tokens = {}, {}
    for n in (1, 2):
        history, out = uninterrupted(n)
        runs[n] = [h["loss"] for h in history]
        tokens[n] = [int(v) for v in re.findall(r"^step:\d+/6 loss:.* real_tokens:(\d+)", out, re.M)]
    print("1 process:  ", runs[1], tokens[1])
    print("2 processes:", runs[2], tokens[2])
    assert tokens[1] == tokens[2] == [128, 384, 640, 896, 896, 896]
    assert len(runs[1]) == 8 and np.allclose(runs[1], runs[2], rtol=0, atol=2e-4)


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
    text = open(shards / "logs" / "nan.txt").read()
    assert "loss is nan" in text and "--train.lr_muon 0.01 --train.lr_embed 0.001 (options given on resume" in text


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
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "hf_kbert.py", "metrics.json", "model.py", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]  # a Hugging Face folder (tests/test_export.py)
    card = open(os.path.join(folder, "README.md")).read()
    assert "tokens seen: 2,048" in card and "validation loss" in card and "trust_remote_code=True" in card
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
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        trainer.load_encoder(str(shards / "missing" / "dir"))
    with pytest.raises(FileNotFoundError, match="neither"):
        trainer.load_encoder("not/a/hub/id")


def test_bf16_precision_runs_on_cpu_close_to_fp32(shards, monkeypatch):
    """--train.precision bf16 (autocast over fp32 weights, Muon's orthogonalisation in bf16),
    with the residual stream in fp32 or bf16, trains on CPU and starts where the fp32 run starts."""
    monkeypatch.chdir(shards)
    args = base_args(shards, "p", steps=2) + ["--train.val_every", "0", "--train.save_every", "0", "--train.overwrite", "true"]
    runs = {name: losses(trainer.main(args + extra)["history"]) for name, extra in (
        ("fp32", ["--train.precision", "fp32"]), ("bf16", ["--train.precision", "bf16"]),
        ("bf16 residual", ["--train.precision", "bf16", "--model.residual_fp32", "false"]))}
    print({k: [f"{x:.4f}" for x in v] for k, v in runs.items()})
    for name in ("bf16", "bf16 residual"):
        assert abs(runs[name][0] - runs["fp32"][0]) < 0.05 and all(map(math.isfinite, runs[name]))
    assert runs["bf16"] != runs["fp32"] and runs["bf16 residual"] != runs["bf16"]  # each option took effect


def test_bad_inputs_fail_clearly(shards, monkeypatch, capsys):
    monkeypatch.chdir(shards)
    with pytest.raises(SystemExit, match="download_fineweb_edu"):
        trainer.main(base_args(shards, "m") + ["--data.train_files", str(shards / "none_*.bin")])
    with pytest.raises(SystemExit, match=r"^unknown option --train.learning_rate \(--help lists every option\)$"):
        trainer.parse_args(["--train.learning_rate", "1"])
    with pytest.raises(SystemExit, match=r"^unknown option --train.lr; did you mean --train.lr_muon or --train.lr_embed or "
                                         r"--train.lr_scalar\? \(--help lists every option\)$"):
        trainer.parse_args(["--train.lr", "1"])
    with pytest.raises(SystemExit, match=r"did you mean --train.steps\?"):
        trainer.parse_args(["--trian.steps", "1"])
    with pytest.raises(SystemExit, match="expected true/false"):
        trainer.parse_args(["--train.overwrite", "maybe"])
    with pytest.raises(SystemExit, match="compile must be auto, true or false"):
        trainer.parse_args(["--train.compile", "maybe"])
    with pytest.raises(SystemExit, match="expected int"):
        trainer.parse_args(["--train.steps", "ten"])
    with pytest.raises(SystemExit, match="multiple of 128"):
        trainer.parse_args(["--data.seq_len", "100"])
    with pytest.raises(SystemExit, match="precision must be auto, bf16 or fp32"):
        trainer.parse_args(["--train.precision", "fp16"])
    with pytest.raises(SystemExit, match=r"--model.preset must be tiny, small, base or large, got .giant."):
        trainer.parse_args(["--model.preset", "giant"])
    with pytest.raises(SystemExit, match=r"^--train.device must be auto, cpu, cuda or cuda:N, got 'gpu'$"):
        trainer.parse_args(["--train.device", "gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--train.device cuda: CUDA is not available"):
            trainer.parse_args(["--train.device", "cuda"])
    with pytest.raises(SystemExit, match="--data.train_files does not apply to --data.source pydoc"):
        trainer.parse_args(["--demo", "--data.train_files", "mine_*.bin"])
    assert trainer.parse_args(["--demo", "--data.seq_len", "256"]).data.seq_len == 256  # other --data.* are honoured
    assert trainer.parse_args(["--train.overwrite", "False"]).train.overwrite is False
    assert not (shards / "logs" / "m.txt").exists()  # nothing was started: no log left behind


# a value that each option of trainer.py does not allow (out of its range, malformed, or derived)
BAD_VALUES = {
    "train.run_id": "a/b", "train.seed": "-1", "train.steps": "0", "train.batch_tokens": "0", "train.micro_batch_seqs": "0",
    "train.batch_tokens_start": "-8", "train.batch_warmup_frac": "1.5", "train.lr_muon": "-0.1", "train.lr_embed": "fast",
    "train.lr_scalar": "-1", "train.weight_decay": "-0.1", "train.adam_betas": "0.9", "train.warmup_frac": "2",
    "train.cooldown_frac": "-0.3", "train.muon_momentum_start": "1", "train.muon_momentum_end": "1.5",
    "train.muon_momentum_warmup_steps": "-1", "train.mask_rate_start": "0", "train.mask_rate_end": "1",
    "train.random_frac_start": "-0.1", "train.random_frac_end": "1.1", "train.keep_frac_start": "2", "train.keep_frac_end": "-1",
    "train.local_window_start": "0", "train.local_window_end": "-128", "train.global_window_start": "0",
    "train.global_window_end": "1.5", "train.window_grow_frac": "1.1", "train.val_every": "-1", "train.val_tokens": "0",
    "train.save_every": "-1", "train.keep_checkpoints": "-1", "train.checkpoint_dir": "", "train.resume": "no/such/run",
    "train.save_every_minutes": "-5", "train.on_bad_step": "skip", "train.spike_factor": "0.5", "train.spike_window": "0",
    "train.max_rollbacks": "-1", "train.export_dir": "", "train.hf_repo": "kbert-base", "train.compile": "maybe",
    "train.precision": "fp16", "train.device": "gpu", "train.overwrite": "maybe", "train.log_every": "0",
    "data.source": "web", "data.train_files": "", "data.val_files": " ", "data.seq_len": "100", "data.sep_at_end": "maybe",
    "model.preset": "giant", "model.n_layer": "-1", "model.d_model": "-64", "model.n_head": "-2", "model.d_mlp": "-1",
    "model.vocab_size": "50257", "model.local_window": "64", "model.global_window": "512", "model.global_every": "0",
    "model.rope_base": "0", "model.attn_scale": "-0.12", "model.softcap": "-1", "model.tie_embeddings": "maybe",
    "model.unet_skips": "maybe", "model.value_residual": "maybe", "model.dropout": "1", "model.residual_fp32": "maybe",
}


def test_every_option_out_of_range_fails_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Each field of TrainConfig, DataConfig and ModelConfig given a value it does not allow:
    one line naming the option (exit 1), before the demo corpus, a log, a checkpoint folder or
    an export is written. Also as a real process, for the value that once failed at step 1."""
    assert set(BAD_VALUES) == set(common.valid_keys(trainer.GROUPS)), "a new option needs a bad value here"
    assert all(common.allows(dataclasses.fields(ModelConfig)[0].metadata["allowed"], p) for p in PRESETS)
    monkeypatch.chdir(tmp_path)
    for key, value in BAD_VALUES.items():
        with pytest.raises(SystemExit) as e:
            trainer.main(["--demo", f"--{key}", value])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and f"--{key}" in e.value.code, (key, e.value.code)
        assert capsys.readouterr() == ("", ""), key
    print(trainer.main.__name__, "refused", len(BAD_VALUES), "values, e.g.:", e.value.code)
    assert not os.listdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^--train.adam_betas must be 2 numbers in \[0, 1\), got '0.9,x'$"):
        trainer.main(["--demo", "--train.adam_betas", "0.9,x"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "trainer.py"), "--demo", "--train.adam_betas", "0.9"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "--train.adam_betas must be 2 numbers in [0, 1), got '0.9'\n")
    assert not os.listdir(tmp_path)


def test_keep_checkpoints_below_one_is_refused_before_anything_is_saved(shards, monkeypatch):
    """--train.keep_checkpoints -1 once deleted every checkpoint it had logged as saved and
    exited 0 with an empty folder; 0 kept them all."""
    monkeypatch.chdir(shards)
    for keep in ("-1", "0"):
        with pytest.raises(SystemExit, match=rf"^--train.keep_checkpoints must be >= 1, got {keep}$"):
            trainer.main(base_args(shards, "keep") + ["--train.keep_checkpoints", keep])
    assert not any((shards / name).exists() for name in ("logs", "ck", "ex"))


def test_help_lists_every_option_with_its_default_and_description(capsys):
    with pytest.raises(SystemExit) as e:
        trainer.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  --(\S+)( .*)?\n(?=(      \S)?)", text, re.M)
    listed = [o[0] for o in options]
    assert listed == common.valid_keys(trainer.GROUPS, trainer.HIDDEN) + ["demo"]  # grouped, in field order
    assert all(o[2] for o in options), [o[0] for o in options if not o[2]]  # every option has a description
    assert "--model.local_window" not in text  # derived from the schedule: rejected as an option
    assert "  --train.lr_muon float (>= 0; default: 0.02)\n      hidden matrices (Muon)" in text
    assert "  --train.overwrite bool (default: False)\n" in text and "  --train.compile str (auto, true or false; default: 'auto')\n" in text and "  --model.dropout float (in [0, 1); default: 0.0)\n" in text


def test_a_bad_shard_fails_in_one_line_without_a_log(shards):
    """A truncated shard, a random-bytes one and one with an id past the vocabulary, run as
    users run it: exit 1, one line on stderr naming the file (and the bad id), no traceback, no
    log of a run that never started."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    raw = open(shards / "syn_train_000002.bin", "rb").read()
    ids = np.asarray(open_shard(str(shards / "syn_train_000002.bin"))).copy()
    ids[1234] = 50304  # one id past the vocabulary, deep in the shard
    write_shard(str(shards / "vocab.bin"), ids)
    for name, data in (("truncated", raw[:-10]), ("random", np.random.default_rng(0).bytes(5000)),
                       ("vocabulary", open(shards / "vocab.bin", "rb").read())):
        open(shards / "syn_train_000002.bin", "wb").write(data)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "trainer.py")] + base_args(shards, name), cwd=shards, env=env,
                           capture_output=True, text=True, timeout=120)
        print(f"{name} shard -> exit {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert "syn_train_000002.bin" in r.stderr and not (shards / "logs" / f"{name}.txt").exists()
    assert "token id 50304 at position 1234 is not below the vocabulary size 50304" in r.stderr


def test_run_ids_are_unique_and_an_existing_run_is_not_overwritten(shards, monkeypatch):

    assert len({common.new_run_id("kbert") for _ in range(100)}) == 100  # one second, 100 different ids
    monkeypatch.chdir(shards)
    args = base_args(shards, "same", steps=1) + ["--train.val_every", "0"]
    trainer.main(args)
    before = {p: p.read_bytes() for p in [shards / "logs" / "same.txt", *(shards / "ck" / "same").iterdir()]}
    with pytest.raises(SystemExit, match=r"run id 'same' is taken \(logs/same.txt, .*ck/same.*\): choose another "
                                         r"--train.run_id, resume it with --train.resume auto --train.run_id same, or pass --train.overwrite true"):
        trainer.main(args)
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing touched
    trainer.main(args + ["--train.overwrite", "true"])
    assert open(shards / "logs" / "same.txt").read().count("==> config <==") == 1  # a fresh log, not an appended one
    # resuming a run continues its log and checkpoints; an error after the log exists is recorded in it
    with pytest.raises(SystemExit, match=r"the checkpoint.s model differs from this run.s \(d_model 64 -> 128; head_dim 32 -> 64\)"):
        trainer.main(["--train.resume", str(shards / "ck" / "same"), "--train.steps", "2", "--model.d_model", "128"])
    assert "differs from this run's" in open(shards / "logs" / "same.txt").read().splitlines()[-1]


def test_overwrite_removes_the_old_run_before_writing_so_auto_resume_continues_the_new_one(shards, monkeypatch):
    """A 4-step run (checkpoints 2 and 4), overwritten by a 1-step one, then re-queued with
    --train.resume auto: the overwrite removes the old checkpoints and export before it writes,
    so its own checkpoint survives and the resume continues it (once, the old files sorted
    after the new one: the new checkpoint was pruned as soon as it was saved and the resume
    went on from the old run's step 4)."""
    monkeypatch.chdir(shards)
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *args: None)  # the export's tokenizer files: 1-2 s
    ck = shards / "ck" / "ow"
    small = ["--train.val_every", "0", "--train.batch_tokens", "256", "--train.val_tokens", "256"]
    args = lambda steps, *more: base_args(shards, "ow", steps=steps) + small + list(more)
    trainer.main(args(4, "--train.save_every", "2"))
    assert sorted(os.listdir(ck)) == ["step_0000002.pt", "step_0000004.pt"]
    out = trainer.main(args(1, "--train.save_every", "0", "--train.overwrite", "true"))
    assert sorted(os.listdir(ck)) == ["step_0000001.pt"]
    assert json.load(open(shards / "ex" / "ow" / "config.json"))["kbert"]["tokens_seen"] == out["tokens_seen"]
    log = open(out["log"]).read()
    assert log.count("==> config <==") == 1 and f"removed the earlier run's {ck}, {shards}/ex/ow" in log
    more = trainer.main(args(3, "--train.save_every", "0", "--train.resume", "auto"))
    assert [h["step"] for h in more["history"] if "acc" not in h] == [2, 3]
    assert f"resuming from {ck}/step_0000001.pt (step 1)" in open(out["log"]).read()
    with pytest.raises(SystemExit, match=r"^--train.overwrite true starts the run id afresh and --train.resume continues it"):
        trainer.main(args(8, "--train.overwrite", "true", "--train.resume", "auto"))


def test_a_finished_run_requeued_says_so_and_does_nothing(shards, monkeypatch, capsys):
    """--train.resume auto on a run that reached its last step and exported: one line, exit 0,
    nothing validated, saved, exported or pushed again (once it did the end over again)."""
    monkeypatch.chdir(shards)
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *args: None)
    small = ["--train.val_every", "0", "--train.batch_tokens", "256", "--train.val_tokens", "256", "--train.resume", "auto"]
    args = base_args(shards, "done", steps=1) + small
    trainer.main(args)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.rglob("*") if p.is_file()}
    capsys.readouterr()
    out = trainer.main(args + ["--train.hf_repo", "nobody/never-pushed"])
    assert out["finished"] and out["export"] == f"{shards}/ex/done"
    assert capsys.readouterr().out == (f"run done is finished: step 1 of 1, exported to {shards}/ex/done; nothing to do "
                                       "(give --train.steps above 1 to train on)\n")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.rglob("*") if p.is_file()} == files
    more = trainer.main(base_args(shards, "done", steps=2) + small)
    assert [h["step"] for h in more["history"] if "acc" not in h] == [2]  # a larger --train.steps trains on


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
    # resumed without --demo: the checkpoint's config (the demo corpus, the tiny model) carries over
    more = trainer.main(["--train.resume", f"checkpoints/{out['run_id']}", "--train.steps", "22", "--train.val_every", "0"])
    assert [h["step"] for h in more["history"] if "acc" not in h] == [21, 22] and more["run_id"] == out["run_id"]


def test_ctrl_c_before_the_loop_exits_130_in_one_line_and_leaves_no_half_built_corpus(shards, monkeypatch, capsys, tok):
    """Ctrl-C (a KeyboardInterrupt in the main thread) while the demo corpus is written, after
    its first shard, and during the start-up shard scan: exit 130, one line on stderr, no
    traceback, no corpus folder, no temporary folder, no log (once: a traceback, and a
    validation shard alone in data/pydoc)."""
    import sysconfig

    demo = shards / "demo"
    os.makedirs(demo)
    monkeypatch.chdir(demo)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(demo / "no_stdlib")})  # pydoc topics only: fast
    real_write = trainer.write_shard

    def write_then_interrupt(path, tokens):
        real_write(path, tokens)
        raise KeyboardInterrupt

    line = ("stopped by SIGINT before the training loop began: nothing of this run was written; run the command again to "
            "start it\n")
    monkeypatch.setattr(trainer, "write_shard", write_then_interrupt)
    with pytest.raises(SystemExit) as e:
        trainer.main(["--demo"])
    assert e.value.code == 130 and capsys.readouterr().err == line
    assert os.listdir(demo) == ["data"] and os.listdir(demo / "data") == []
    monkeypatch.setattr(trainer, "write_shard", real_write)
    monkeypatch.setattr(trainer, "open_shard", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "scan"))
    assert e.value.code == 130 and capsys.readouterr().err == line
    assert os.listdir(demo) == ["data"] and not any((shards / name).exists() for name in ("logs", "ck", "ex"))


def test_missing_gpt2_bpe_files_fail_the_demo_in_one_line_that_says_what_to_do(tmp_path):
    """A first `python trainer.py --demo` with an empty tiktoken cache and no network (a proxy
    that refuses): one line naming where the files come from and how to install them offline,
    nothing written (once: a multi-line traceback)."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    os.makedirs(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "trainer.py"), "--demo"], cwd=tmp_path / "run", env=env,
                       capture_output=True, text=True, timeout=120)
    print(r.stderr)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"the demo corpus needs GPT-2's tokenizer: cannot load GPT-2's BPE files: they are not in "
                               f"{tmp_path}/empty_cache and tiktoken could not download them (")
    assert f"from {tokenizer.BPE_URL}" in r.stderr and "tokenizer.install_offline_bpe('DIR', '.cache/tiktoken')" in r.stderr
    assert os.listdir(tmp_path / "run") == []


# -- runs that survive: signals, kills mid-write, automatic resume, bad steps, preflight -----

def stopped_at(out: str, signame: str) -> tuple[int, list[str]]:
    """The step a signal stopped the run at and the resume command it printed."""
    m = re.search(rf"^step:(\d+) stopped by {signame}: saved \S+; resume with: (.+)$", out, re.M)
    assert m, out[-3000:]
    return int(m[1]), shlex.split(m[2])


def test_sigterm_then_sigkill_mid_checkpoint_then_auto_resume_gives_identical_losses(shards, uninterrupted):
    """One command re-queued after two interruptions, as a preempted job lives:
    1. SIGTERM at a random step (a real process, a real signal): the step finishes, a checkpoint
       is saved and the run exits 143 with a line naming the command that resumes;
    2. that command, SIGKILLed halfway through writing its next checkpoint: the previous one
       stays loadable, the partial file never takes a checkpoint's name;
    3. the same command again: it resumes from the SIGTERM checkpoint, removes the partial file
       and finishes with losses bit-identical to an uninterrupted run's."""
    args = worker_args(shards, "job") + ["--train.resume", "auto"]
    k = random.randint(1, 3)
    p = launch(shards, args, 1)
    wait_for(p, rf"step:{k}/6 loss:")
    p.send_signal(signal.SIGTERM)
    stopped, command = stopped_at(finish(p, 128 + signal.SIGTERM), "SIGTERM")
    print(f"SIGTERM sent after step {k}'s line: stopped at step {stopped}; resume with {shlex.join(command)}")
    assert k <= stopped < 6 and command[:2] == ["python", os.path.join(ROOT, "trainer.py")]
    same = worker_args(shards, "job")
    i = same.index("--train.run_id")
    del same[i:i + 2]
    assert command[2:] == same + ["--train.resume", "auto", "--train.run_id", "job"]  # the same options, the run id last

    p = launch(shards, command[2:], 1, KBERT_HALF_SAVE="1")
    partial = wait_for(p, "half-written checkpoint ").split("half-written checkpoint ")[-1].strip()
    p.kill()
    finish(p, -signal.SIGKILL)
    ck = shards / "ck" / "job"
    assert sorted(os.listdir(ck)) == [f"step_{stopped:07d}.pt", os.path.basename(partial)] and ".pt.tmp" in partial
    assert trainer.load_checkpoint(str(ck), print)["step"] == stopped

    out = finish(launch(shards, command[2:], 1, KBERT_HISTORY=str(shards / "history.json")))
    assert f"resuming from {ck}/step_{stopped:07d}.pt (step {stopped})" in out and f"removed {partial}, " in out
    assert not os.path.exists(partial)
    resumed, reference = json.load(open(shards / "history.json")), uninterrupted(1)[0]
    print("uninterrupted:", [(h["step"], h["loss"]) for h in reference if "acc" not in h])
    print("resumed:      ", [(h["step"], h["loss"]) for h in resumed if "acc" not in h])
    assert resumed == [h for h in reference if h["step"] > stopped]  # train and validation losses, to the bit
    log = open(shards / "logs" / "job.txt").read()
    assert log.count("==> config <==") == 3 and "--train.resume auto: run job has no checkpoint" in log  # appended


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resumes_identically(shards, uninterrupted):
    """SIGTERM to the torchrun parent, as `kill PID` or a scheduler gives it: torchrun forwards
    it to both ranks (then waits 30 s, --shutdown_timeout, before SIGKILL), they agree on
    the step to stop at, rank 0 saves, and the printed command resumes on 2 processes with
    the losses of an uninterrupted 2-process run."""
    k = random.randint(1, 3)
    p = launch(shards, worker_args(shards, "job2") + ["--train.resume", "auto"], 2)
    wait_for(p, rf"step:{k}/6 loss:")
    p.send_signal(signal.SIGTERM)
    out = finish(p, 1)  # torchrun itself exits 1 with its SignalException; the ranks exited 143
    stopped, command = stopped_at(out, "SIGTERM")
    print(f"SIGTERM sent after step {k}'s line: stopped at step {stopped}; resume with {shlex.join(command)}")
    assert k <= stopped < 6 and command[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "trainer.py")]
    assert "Sending process" in out and "closing signal SIGTERM" in out  # torchrun's forwarding
    finish(launch(shards, command[4:], 2, KBERT_HISTORY=str(shards / "history.json")))
    resumed, reference = json.load(open(shards / "history.json")), uninterrupted(2)[0]
    print("uninterrupted:", [(h["step"], h["loss"]) for h in reference if "acc" not in h])
    print("resumed:      ", [(h["step"], h["loss"]) for h in resumed if "acc" not in h])
    assert resumed == [h for h in reference if h["step"] > stopped]


def test_rollback_skips_the_bad_window_and_keeps_the_stream_exact(shards, monkeypatch):
    """The batch that starts at sequence 32 (step 5) makes a gradient NaN. With
    --train.on_bad_step rollback the run reloads the step-3 checkpoint, skips sequences 24-39
    (what it trained on since that checkpoint, the bad batch included), logs it and finishes.
    The batches it trained on are those of a fresh loader that skips the same rows; a resume
    from its next checkpoint continues that stream with the same losses. With the rollbacks
    used up, a bad step stops the run."""
    monkeypatch.chdir(shards)
    real_step, trained = trainer.train_step, {}

    def step_with_a_bad_batch(model, opt, forward, batch, first, step, *args, **kwargs):
        hook = model.blocks[1].mlp.fc.weight.register_hook(lambda g: torch.full_like(g, math.nan)) if first == 32 else None
        try:
            out = real_step(model, opt, forward, batch, first, step, *args, **kwargs)
        finally:
            if hook:
                hook.remove()
        trained[step + 1] = batch.copy()  # a redone step replaces the undone one
        return out

    monkeypatch.setattr(trainer, "train_step", step_with_a_bad_batch)
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *args: None)  # the exports' tokenizer files: 1-2 s each
    args = base_args(shards, "rb", steps=8) + ["--train.val_every", "0", "--train.on_bad_step", "rollback",
                                               "--train.max_rollbacks", "1"]
    out = trainer.main(args)
    log = open(out["log"]).read()
    line = re.search(r"^step:5 loss is .*$", log, re.M)[0]
    print(line)
    assert re.fullmatch(r"step:5 loss is [\d.]+, gradients non-finite on 1 of 1 ranks: rollback 1/1 to step 3, skipping "
                        r"sequences 24-39 of the stream \(16 sequences: .*\)", line)
    assert "non-finite gradients (rank-local): blocks.1.mlp.fc.weight" in log
    assert [r["seqs"] for r in out["rollbacks"]] == [[24, 40]] and out["rollbacks"][0]["step"] == 5
    assert [h["step"] for h in out["history"] if "acc" not in h] == list(range(1, 9)) and out["tokens_seen"] == 8 * 1024
    files = sorted(str(p) for p in shards.glob("syn_train_*.bin"))
    fresh = trainer.PackedLoader(files, 128, seed=0)
    expected = [fresh.next_batch(8)[0] for _ in range(3)]
    fresh.next_batch(16)  # the skipped rows
    expected += [fresh.next_batch(8)[0] for _ in range(5)]
    assert all(np.array_equal(trained[s], expected[s - 1]) for s in range(1, 9))
    ck = shards / "ck" / "rb"
    state = torch.load(ck / "step_0000006.pt", weights_only=True)
    assert state["loader"]["seq_index"] == 64 and state["rollbacks"] == out["rollbacks"]
    more = trainer.main(["--train.resume", str(ck / "step_0000006.pt"), "--train.run_id", "rb-resumed"])
    print("rolled-back run:", losses(out["history"])[-2:], "resumed from its step 6:", losses(more["history"]))
    assert losses(more["history"]) == losses(out["history"])[-2:] and more["rollbacks"] == out["rollbacks"]
    trainer.main(["--train.resume", "auto", "--train.run_id", "rb", "--train.checkpoint_dir", str(shards / "ck"),
                  "--train.steps", "9"])  # the rollback state is
    resumed = open(out["log"]).read().split("resuming from")[-1]  # the checkpoint resumed from, not rewritten
    assert "step:8 saved" not in resumed and "step:9 saved" in resumed
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "rb0", steps=5) + ["--train.val_every", "0", "--train.on_bad_step", "rollback",
                                                          "--train.max_rollbacks", "0"])
    assert e.value.code == 2
    assert "stopping; the last good checkpoint" in open(shards / "logs" / "rb0.txt").read()
    assert "0 rollback(s), the most --train.max_rollbacks 0 allows" in open(shards / "logs" / "rb0.txt").read()


def test_a_loss_spike_is_a_bad_step_once_the_window_is_full():
    t = trainer.TrainConfig(spike_factor=2.0, spike_window=4)
    recent = collections.deque([5.0, 4.0, 6.0], maxlen=4)

    def why(loss, grad_ranks=0):
        return trainer.bad_step({"loss": loss, "bad_grad_ranks": grad_ranks}, recent, t, 1)

    assert why(100.0) is None  # 3 losses: no median yet
    recent.append(4.5)  # median of 4, 4.5, 5, 6 = 4.75
    assert why(9.5) is None and why(9.51) == "loss 9.5100 is a spike, above 2 x 4.7500, the median of the last 4 losses"
    assert why(math.inf).startswith("loss is inf") and why(3.0, grad_ranks=1).endswith("non-finite on 1 of 1 ranks")
    assert trainer.bad_step({"loss": 1e9, "bad_grad_ranks": 0}, recent, trainer.TrainConfig(), 1) is None  # off by default
    with pytest.raises(SystemExit, match=r"^--train.spike_factor must be 0 or > 1, got 0.5$"):
        trainer.parse_args(["--train.spike_factor", "0.5"])
    with pytest.raises(SystemExit, match="on_bad_step must be stop or rollback"):
        trainer.parse_args(["--train.on_bad_step", "skip"])


def test_time_based_checkpoints_and_auto_resume_needs_a_run_id(shards, monkeypatch):
    """Rank 0's clock asks for a save once save_every_minutes passed: with a tiny interval,
    after every step. --train.resume auto without a run id fails in one line."""
    monkeypatch.chdir(shards)
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *args: None)  # the export's tokenizer files: 1-2 s
    trainer.main(base_args(shards, "timed", steps=3) + ["--train.val_every", "0", "--train.save_every", "0",
                                                       "--train.save_every_minutes", "1e-9", "--train.keep_checkpoints", "5"])
    assert sorted(os.listdir(shards / "ck" / "timed")) == ["step_0000001.pt", "step_0000002.pt", "step_0000003.pt"]
    with pytest.raises(SystemExit, match=r"^--train.resume auto needs --train.run_id NAME"):
        trainer.main(["--train.resume", "auto"])


def test_a_second_sigint_aborts_at_once_with_the_resume_command(shards, monkeypatch):
    """The KeyboardInterrupt a second Ctrl-C raises (common.StopSignals) mid-step: exit 130 at
    once, nothing saved, the log says so and names the command; the handlers are restored."""
    monkeypatch.chdir(shards)
    real_step = trainer.train_step

    def interrupted(*args, **kwargs):
        if args[5] == 1:  # the second step
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "abort") + ["--train.val_every", "0"])
    assert e.value.code == 130 and signal.getsignal(signal.SIGTERM) == before
    assert not (shards / "ck" / "abort").exists()
    assert re.search(r"^aborted by a second SIGINT; nothing was saved after the last checkpoint; resume with: python "
                     r"\S+trainer.py .* --train.resume auto --train.run_id abort$", open(shards / "logs" / "abort.txt").read(), re.M)


def test_preflight_refuses_unwritable_or_full_folders_before_anything_is_written(shards, monkeypatch):
    """A checkpoint folder under a regular file (tests run as root, whom chmod does not stop)
    and a disk without room for the checkpoints: one line each, within the first seconds, and
    nothing written (no log, no folders)."""
    monkeypatch.chdir(shards)
    (shards / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"^preflight: cannot write to \S+/a_file/ck/pf \(Not a directory\): fix it or "
                                         r"choose another --train.checkpoint_dir$"):
        trainer.main(base_args(shards, "pf") + ["--train.checkpoint_dir", str(shards / "a_file" / "ck")])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10**7))
    with pytest.raises(SystemExit) as e:
        trainer.main(base_args(shards, "pf"))
    print(e.value.code)
    ckpt, weights = trainer.checkpoint_bytes(trainer.parse_args(base_args(shards, "pf")))
    assert e.value.code == (f"preflight: 0.01 GB free where this run will write {(3 * ckpt + weights) / 1e9:.2f} GB "
                            f"(--train.checkpoint_dir {shards}/ck/pf: {3 * ckpt / 1e9:.2f} GB; --train.export_dir "
                            f"{shards}/ex/pf: {weights / 1e9:.2f} GB): free some space or point the option elsewhere")
    assert not any((shards / name).exists() for name in ("logs", "ck", "ex"))
