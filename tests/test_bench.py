"""bench/throughput.py works end to end at tiny scale on CPU (the GPU numbers come from a
GPU run; nothing here asserts a speed)."""
import json

import numpy as np
import pytest

from bench import throughput


def test_throughput_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    report = throughput.main(["--bench.device", "cpu", "--bench.presets", "tiny", "--bench.baselines", "none",
                              "--bench.tokens_per_step", "2048", "--bench.kbert_seq_len", "256", "--bench.kbert_micro", "4,8",
                              "--bench.warmup", "1", "--bench.steps", "2", "--bench.out", str(out),
                              "--bench.variants", "residual_fp32=false, softcap=0"])
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["results"]] == ["KBERT-tiny", "KBERT-tiny [residual_fp32=false, softcap=0]"]
    assert len(saved["sweeps"]["KBERT-tiny"]) == 2
    r = report["results"][0]
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert r["tokens_per_step"] == 2048 and r["micro_batch"] in (4, 8)


def test_benchmark_flops_equal_a_hand_count(tmp_path):
    """Rows of 256 tokens that each hold one document of 100 and one of 156 tokens, every
    ordinary token predicted (mask rate 1), windows 64 (local) and 8,192 (global), KBERT-tiny
    (4 layers: 2 local, 2 global; d 64, MLP 256, vocabulary 50,304), 8 rows per step."""
    from data.shards import write_shard
    from model import CLS_ID

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[CLS_ID], rng.integers(0, CLS_ID, n - 1)]) for _ in range(20) for n in (100, 156)]
    write_shard(str(tmp_path / "docs_000000.bin"), np.concatenate(docs))
    report = throughput.main(["--bench.device", "cpu", "--bench.presets", "tiny", "--bench.baselines", "none",
                              "--bench.tokens_per_step", "2048", "--bench.kbert_seq_len", "256", "--bench.kbert_micro", "8",
                              "--bench.warmup", "1", "--bench.steps", "1", "--bench.out", str(tmp_path / "r.json"),
                              "--bench.shards", str(tmp_path / "docs_*.bin"), "--bench.mask_rate", "1.0",
                              "--bench.window_local", "64", "--bench.window_global", "8192"])
    r = report["results"][0]
    matmuls = 6 * (4 * (4 * 64 * 64 + 2 * 64 * 256)) * 2048  # 6 x 196,608 weights x 2,048 tokens
    # attended pairs per row: within the window 64, a document of L tokens has L(2*64 - 1) - 64*63
    # pairs (100: 8,668; 156: 15,780); within 8,192 it has L^2 (10,000; 24,336)
    attention = 12 * 64 * 8 * (2 * (8_668 + 15_780) + 2 * (10_000 + 24_336))
    head = 6 * 64 * 50_304 * (2048 - 16)  # every token but the 16 [CLS] is predicted
    print(f"benchmark FLOPs per step {r['flops_per_step']:,.0f} = matmuls {matmuls:,} + attention {attention:,} + head {head:,}")
    assert r["real_tokens_per_step"] == 2048 and r["mean_doc_len"] == 128
    assert r["flops_per_step"] == matmuls + attention + head


def test_bad_variant_fails_before_timing():
    with pytest.raises(SystemExit, match=r"unknown option --model.residual.*--model.residual_fp32"):
        throughput.main(["--bench.device", "cpu", "--bench.baselines", "none", "--bench.variants", "residual=bf16"])


def test_log_summary_puts_several_runs_validation_side_by_side(tmp_path, monkeypatch, capsys):
    """Two logs (the demo record's and a short one): each summarized, their val_loss in one
    table by step, plotted when matplotlib is there and said so when it is not."""
    import importlib.util
    import os
    import sys

    from bench import log_summary

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "records", "2026-11-29-demo", "demo.log")
    short = tmp_path / "short.txt"
    short.write_text("".join(f"step:{s}/100 loss:6.0 gnorm:1.0 lr_muon:0.04 mask:0.3 windows:64/256 real_tokens:4096 dt:900ms "
                             f"real_tok/s:4551 mfu:n/a mem:n/a\n" for s in (49, 50))
                     + "step:50/100 val_loss:6.5000 val_acc:0.1500 train_time:45000ms real_tokens_seen:204800\n")
    if importlib.util.find_spec("matplotlib"):
        log_summary.main([demo, str(short), "--plot", str(tmp_path / "val.png")])
        assert capsys.readouterr().out.rstrip().endswith(f"plot: {tmp_path / 'val.png'}") and (tmp_path / "val.png").stat().st_size
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed (restored after the test)
    out = log_summary.main([demo, str(short)])
    text = capsys.readouterr().out
    assert set(out) == {"demo", "short"} and out["short"]["median_ms_per_step"] == 900
    assert "\n     50    6.1232    6.5000\n    100    5.9052         -\n" in text and "    300    5.3567         -\n" in text
    assert text.rstrip().endswith("no plot: matplotlib is not installed (pip install matplotlib)")
