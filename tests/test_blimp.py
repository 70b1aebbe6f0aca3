"""BLiMP by pseudo-log-likelihood: the scorer against hand-computed PLLs and accuracies, the
masking and padding it feeds a model, the data reader and download script, and the
`finetuner.py --task blimp` command against a direct call of the scorer."""
import collections
import functools
import json
import os

import pytest
import torch

import common
import evals
import finetuner
import trainer
from conftest import shared_path
from model import CLS_ID, KBERT, MASK_ID, PAD_ID, SEP_ID, ModelConfig

V = 16  # the toy model's vocabulary: ordinary ids below it


def toy_log_probs(calls, ids, attention_mask):
    """log p(token t at position i of a row with n real tokens) = -(t + 10 i + n): any masked
    copy's score is a number written down by hand (not normalized; the scorer needs no more).
    Records each row's real tokens, and checks the rows are what a model should see."""
    B, T = ids.shape
    assert attention_mask.dtype == torch.bool and torch.equal(attention_mask, ids != PAD_ID)
    assert torch.equal((ids == MASK_ID).sum(1), torch.ones(B, dtype=torch.long))  # one [MASK] a row
    n = attention_mask.sum(1)
    for r in range(B):
        assert not attention_mask[r, n[r]:].any()  # padding only after the sentence
        calls.append(tuple(ids[r, :n[r]].tolist()))
    t, i = torch.arange(V), torch.arange(T)
    return -(t[None, None, :] + 10 * i[None, :, None] + n[:, None, None]).float()


C, S = CLS_ID, SEP_ID
SENTENCES = {  # name: (ids, PLL by hand: the sum over masked positions i of -(t_i + 10 i + len))
    "s1": ([C, 3, 5, S], -(3 + 10 + 4) - (5 + 20 + 4)),  # -46
    "s2": ([C, 5, 3, S], -(5 + 10 + 4) - (3 + 20 + 4)),  # -46: the same tokens swapped, a tie with s1
    "s3": ([C, 1, 2, S], -(1 + 10 + 4) - (2 + 20 + 4)),  # -41
    "s4": ([C, 4, 4, S], -(4 + 10 + 4) - (4 + 20 + 4)),  # -46
    "s5": ([C, 2, S], -(2 + 10 + 3)),  # -15
    "s6": ([C, 1, 1, 1, S], -(1 + 10 + 5) - (1 + 20 + 5) - (1 + 30 + 5)),  # -78
    "s7": ([C, 9, S, 1, S], -(9 + 10 + 5) - (1 + 30 + 5)),  # -60: the inner [SEP] is never masked
    "s8": ([C, 6, 6, 6, 6, 6, S], -sum(6 + 10 * i + 7 for i in range(1, 6))),  # -215
}
PAIRS = [  # (UID, field, good, bad)
    ("p1", "syntax", "s1", "s2"),  # tie: wrong
    ("p1", "syntax", "s3", "s4"),  # right
    ("p1", "syntax", "s5", "s6"),  # right
    ("p2", "syntax", "s6", "s5"),  # wrong
    ("p2", "syntax", "s7", "s8"),  # right
    ("p3", "syntax/semantics", "s4", "s3"),  # wrong; BLiMP's one "syntax/semantics" counts as syntax_semantics
]


def test_pll_and_accuracy_by_hand():
    names = list(SENTENCES)
    sentences = [SENTENCES[k][0] for k in names]
    expected = [float(SENTENCES[k][1]) for k in names]
    assert expected == [-46, -46, -41, -46, -15, -78, -60, -215]
    for batch_rows in (1, 3, 64):  # a sentence's copies split over batches, or all in one
        calls = []
        assert evals.pll_scores(functools.partial(toy_log_probs, calls), sentences, batch_rows) == expected
        # every ordinary token masked exactly once, in a copy of its own; never [CLS], [SEP] or [PAD]
        want = collections.Counter(tuple(MASK_ID if j == i else t for j, t in enumerate(ids))
                                   for ids in sentences for i, t in enumerate(ids) if t < CLS_ID)
        assert collections.Counter(calls) == want and len(calls) == 19
    def at_mask(ids, attention_mask):  # log-probabilities (B, V) at the [MASK]s only, as kbert_log_probs returns
        return toy_log_probs([], ids, attention_mask)[ids == MASK_ID]

    assert evals.pll_scores(at_mask, sentences, 3) == expected
    # the padding is real: with 64 rows, sentences of 3 to 7 tokens share one batch
    assert {len(c) for c in calls} == {3, 4, 5, 7}

    pll = dict(zip(names, expected))
    rows = [{"UID": u, "field": f, "linguistics_term": "x", "pairID": str(k)} for k, (u, f, _, _) in enumerate(PAIRS)]
    out = evals.blimp_accuracy(rows, [pll[g] for *_, g, _ in PAIRS], [pll[b] for *_, b in PAIRS])
    assert out["paradigms"] == {"p1": 2 / 3, "p2": 1 / 2, "p3": 0.0}
    assert out["accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # the mean over paradigms, not over pairs (3/6)
    assert out["fields"] == {"syntax": pytest.approx((2 / 3 + 1 / 2) / 2), "syntax_semantics": 0.0}
    assert out["pairs"] == 6

    with pytest.raises(ValueError, match=r"sentence 1: expected \[CLS\] tokens \[SEP\]"):
        evals.pll_scores(at_mask, [[C, 1, S], [1, 2, S]], 4)
    with pytest.raises(ValueError, match="one \\[MASK\\] each"):
        evals.pll_scores(lambda ids, am: at_mask(ids, am)[:1], [[C, 1, 2, S]], 4)  # 1 row of log-probs for 2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def blimp_row(uid, k, field="syntax"):
    return {"UID": uid, "field": field, "linguistics_term": "t", "pairID": str(k),
            "sentence_good": f"Good {uid} {k}.", "sentence_bad": f"Bad {uid} {k}."}


def test_read_blimp_sample_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [blimp_row("a", k) for k in range(5)] + [blimp_row("b", k) for k in range(2)])
    got = evals.read_blimp(path, 3)  # the first 3 of each paradigm in file order
    assert [(r["UID"], r["pairID"]) for r in got] == [("a", "0"), ("a", "1"), ("a", "2"), ("b", "0"), ("b", "1")]
    assert len(evals.read_blimp(path, 0)) == 7
    missing = str(tmp_path / "none.jsonl")
    with pytest.raises(SystemExit, match=f"{missing} does not exist.*python data/download_blimp.py"):
        evals.read_blimp(missing)
    lines = open(path).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"UID": "a", "field": '] + lines[2:]) + "\n")
    with pytest.raises(SystemExit, match=f"{bad}:3: not a JSON line"):
        evals.read_blimp(str(bad))
    row = blimp_row("a", 9)
    del row["sentence_bad"]
    bad.write_text("\n".join(lines[:1] + ["", json.dumps(row)]) + "\n")
    with pytest.raises(SystemExit, match=f"{bad}:3: a BLiMP row has the keys"):
        evals.read_blimp(str(bad))


def test_download_blimp_with_a_fake_hub(tmp_path, monkeypatch):
    """The download script's own logic, offline: fakes stand at the datasets boundary, with the
    Hub's schema (pair_id an int, extra columns)."""
    import datasets

    import download_blimp

    hub = {uid: {"train": [{"sentence_good": f"Good {k}.", "sentence_bad": f"Bad {k}.", "field": "syntax",
                            "linguistics_term": "island_effects", "UID": uid, "simple_LM_method": True,
                            "one_prefix_method": False, "two_prefix_method": False, "lexically_identical": True,
                            "pair_id": k} for k in range(3)]} for uid in ("adjunct_island", "wh_island")}
    loads = []

    def fake_load_dataset(name, config=None):
        loads.append((name, config))
        if config == "broken":
            raise ConnectionError("no route to host")
        return hub[config]

    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name: list(hub))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "blimp" / "blimp.jsonl"
    download_blimp.main(["--out", str(out)])
    assert loads == [("nyu-mll/blimp", "adjunct_island"), ("nyu-mll/blimp", "wh_island")]
    got = [json.loads(line) for line in open(out)]
    assert got[4] == {"UID": "wh_island", "field": "syntax", "linguistics_term": "island_effects", "pairID": "1",
                      "sentence_good": "Good 1.", "sentence_bad": "Bad 1."}
    assert len(got) == 6 and all(list(r) == list(evals.BLIMP_KEYS) for r in got)
    assert len(evals.read_blimp(str(out), 2)) == 4
    download_blimp.main(["--out", str(out)])  # present: skipped
    assert len(loads) == 2

    hub["broken"] = None
    other = tmp_path / "other.jsonl"
    with pytest.raises(SystemExit, match="could not load nyu-mll/blimp: ConnectionError"):
        download_blimp.main(["--out", str(other)])
    assert not other.exists() and not os.path.exists(str(other) + ".tmp")


def test_blimp_command_on_a_tiny_export_equals_the_scorer(tmp_path, tok, monkeypatch):
    src = shared_path("data", "blimp", "blimp.jsonl")
    with open(src) as f:
        lines = f.readlines()
    sub = tmp_path / "blimp3x4.jsonl"
    sub.write_text("".join(line for k in (0, 1000, 30000) for line in lines[k:k + 4]))  # 3 paradigms, 4 pairs each
    torch.manual_seed(0)
    enc = KBERT(ModelConfig(preset="tiny"))
    with torch.no_grad():  # random non-zero output projections, so that context matters
        for p in enc.parameters():
            if p.ndim == 2:
                p.normal_(std=0.05)
    folder = str(tmp_path / "export")
    common.save_pretrained(folder, enc.state_dict(), {"architecture": "KBERT", "model": enc.cfg.to_dict()}, "tiny")

    monkeypatch.chdir(tmp_path)
    out = finetuner.main(["--task", "blimp", "--train.base_model", folder, "--train.eval_files", str(sub),
                          "--train.blimp_pairs", "3", "--train.eval_batch_size", "16", "--train.run_id", "bl"])
    saved = json.load(open(tmp_path / "finetuned" / "bl" / "metrics.json"))
    assert saved == json.loads(json.dumps(out))
    assert saved["pairs"] == 9 and saved["pairs_per_paradigm"] == 3 and len(saved["paradigms"]) == 3
    assert set(saved["paradigms"].values()) <= {0, 1 / 3, 2 / 3, 1}
    assert saved["accuracy"] == pytest.approx(sum(saved["paradigms"].values()) / 3)
    preds = [json.loads(line) for line in open(tmp_path / "finetuned" / "bl" / "predictions_blimp.jsonl")]
    assert "blimp accuracy:" in open(tmp_path / "logs" / "bl.txt").read()

    model, _ = trainer.load_encoder(folder)
    model.eval()
    rows = evals.read_blimp(str(sub), 3)
    direct = evals.blimp_scores(functools.partial(evals.kbert_log_probs, model), rows, tok, 16)
    assert [p["pll_good"] for p in preds] == direct["pll_good"] and [p["pll_bad"] for p in preds] == direct["pll_bad"]
    assert {k: saved[k] for k in ("accuracy", "paradigms", "fields", "pairs")} == \
        {k: direct[k] for k in ("accuracy", "paradigms", "fields", "pairs")}

    # the batched, padded PLL against one unpadded row per masked token, every vocabulary logit
    # computed (a (B, T, V) log_probs_fn): padding must not leak into the sentence
    with torch.no_grad():
        for k, text in enumerate((rows[0]["sentence_good"], rows[0]["sentence_bad"])):
            ids = tok.encode(text)
            total = 0.0
            for i in range(1, len(ids) - 1):
                x = torch.tensor([ids[:i] + [MASK_ID] + ids[i + 1:]])
                total += model.mlm_logits(model(x)).log_softmax(-1)[0, i, ids[i]].item()
            assert total == pytest.approx(preds[0]["pll_bad" if k else "pll_good"], abs=1e-4)
