"""bench/compare_recipes.py: every arm at smoke scale on the same tokens, the outputs it
writes, and the pieces of its summary against hand-made values."""
import json

import numpy as np
import pytest
import torch

from bench import compare_recipes as C
from data.shards import write_shard
from model import CLS_ID, PAD_ID

pytest.importorskip("transformers", reason="the baselines come from transformers (requirements.txt)")


def test_crossing_interpolates_the_first_time_a_curve_reaches_the_target():
    curve = [{"tokens": 0, "wall_s": 0, "val_loss": 10.0}, {"tokens": 100, "wall_s": 2, "val_loss": 6.0},
             {"tokens": 200, "wall_s": 4, "val_loss": 4.0}, {"tokens": 300, "wall_s": 6, "val_loss": 5.0}]
    assert C.crossing(curve, 5.0, "tokens") == 150 and C.crossing(curve, 5.0, "wall_s") == 3
    assert C.crossing(curve, 6.0, "tokens") == 100 and C.crossing(curve, 3.9, "tokens") is None


def test_document_masks_keep_documents_apart_and_restart_positions():
    ids = torch.tensor([[CLS_ID, 5, 6, CLS_ID, 7, 8, 9, PAD_ID]])
    mask, pos = C.document_masks(ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert mask[0, 0, 1].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[0, 0, 7].tolist() == [False] * 7 + [True]  # [PAD] only sees [PAD]
    local, _ = C.document_masks(ids, local=1)
    assert local[0, 0, 4].tolist() == [False, False, False, True, True, True, False, False]


def test_smoke_scale_runs_every_arm_on_the_same_tokens(tmp_path, tok):
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[CLS_ID], rng.integers(0, 50000, int(rng.integers(20, 300)))]) for _ in range(80)]
    write_shard(str(tmp_path / "t_train_000001.bin"), np.concatenate(docs[:60]))
    write_shard(str(tmp_path / "t_val_000000.bin"), np.concatenate(docs[60:]))
    pairs = [("The cat sleeps.", "The cat sleep."), ("Dogs bark loudly.", "Dogs barks loudly."),
             ("She has left.", "She have left."), ("They were here.", "They was here.")]
    with open(tmp_path / "blimp.jsonl", "w") as f:
        for i, (good, bad) in enumerate(pairs):
            f.write(json.dumps({"UID": f"p{i % 2}", "field": "syntax", "linguistics_term": "agreement", "pairID": str(i),
                                "sentence_good": good, "sentence_bad": bad}) + "\n")
    out = tmp_path / "out"
    report = C.main(["--compare.scale", "smoke", "--compare.train_files", str(tmp_path / "t_train_*.bin"),
                     "--compare.val_files", str(tmp_path / "t_val_*.bin"), "--compare.blimp_file", str(tmp_path / "blimp.jsonl"),
                     "--compare.out", str(out)])
    arms = report["arms"]
    saved = json.loads((out / "results.json").read_text())
    print(open(out / "results.md").read())
    assert [a["name"].split("-lr")[0] for a in saved["arms"]] == [a.name for a in C.arms_for(128)]
    assert {a["recipe"] for a in arms} == {"kbert", "modernbert", "bert", "ablation"}
    S = C.SCALES["smoke"]
    for a in arms:
        for key in ("name", "recipe", "params", "tokens", "wall_s", "final_val_loss", "tokens_to_best_baseline", "blimp"):
            assert key in a, (a["name"], key)
        assert a["tokens"] == S.steps * S.batch_seqs * S.seq_len  # full rows: every arm saw the same real tokens
        assert np.isfinite(a["final_val_loss"]) and 0 <= a["blimp"] <= 1 and a["flops"] > 0
        assert [c["step"] for c in a["curve"]] == [0, S.steps]
        assert len(a["sweep"]) == (len(S.lrs) if a["name"].split("-lr")[0] in ("modernbert", "bert", "adamw") else 1)
        assert a["final_val_loss"] == min(s["final_val_loss"] for s in a["sweep"])
        for log in a["logs"]:
            assert "val_loss:" in (out / log).read_text()
    # the validation set is scored before any step: untrained models sit near ln(50,304) = 10.83
    assert all(abs(a["curve"][0]["val_loss"] - np.log(50304)) < 1.5 for a in arms)
    best = min(a["final_val_loss"] for a in arms if a["recipe"] in ("modernbert", "bert"))
    assert all(a["best_baseline_loss"] == best for a in arms)
    pytest.importorskip("matplotlib", reason="the plot is a benchmark-only dependency")
    assert (out / "curves.png").stat().st_size > 10_000
