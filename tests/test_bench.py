"""bench/throughput.py works end to end at tiny scale on CPU (the GPU numbers come from a
GPU run; nothing here asserts a speed)."""
import json

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
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["flops_per_step"] > 6 * 196_000 * 2048
    assert r["tokens_per_step"] == 2048 and r["micro_batch"] in (4, 8)


def test_bad_variant_fails_before_timing():
    with pytest.raises(SystemExit, match=r"unknown option --model.residual.*--model.residual_fp32"):
        throughput.main(["--bench.device", "cpu", "--bench.baselines", "none", "--bench.variants", "residual=bf16"])
