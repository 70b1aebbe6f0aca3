"""evals.py: the official SQuAD v2 scorer against the official script's outputs (its own
function and `finetuner.py --score-squad`), bad prediction files, the GLUE metrics by hand.
BLiMP's scorer is tested in test_blimp.py."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import evals
from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ["bert_single", "nlnet_single", "bidaf_elmo_single"]


@pytest.fixture(scope="module")
def squad_dev():
    return str(shared_path("data", "squad_v2", "validation.jsonl"))


def test_scorer_equals_official_outputs(squad_dev):
    pred_dir = shared_path("data", "squad_v2", "predictions")
    official = json.load(open(pred_dir / "official_scores.json"))
    gold = evals.load_squad_gold(squad_dev)
    for name in SYSTEMS:
        mine = evals.squad_v2_scores(gold, json.load(open(pred_dir / f"{name}.json")))
        assert mine == official[name] and list(mine) == list(official[name]), name  # to the last digit, same keys
    na = json.load(open(pred_dir / "bert_single.na_probs.json"))
    mine = evals.squad_v2_scores(gold, json.load(open(pred_dir / "bert_single.json")), na)
    assert mine == official["bert_single+na_probs"]


def test_score_squad_command_and_official_json_format(squad_dev, tmp_path):
    pred_dir = shared_path("data", "squad_v2", "predictions")
    official = json.load(open(pred_dir / "official_scores.json"))
    # the official nested JSON format, rebuilt from the jsonl rows
    rows = [json.loads(line) for line in open(squad_dev)]
    data = {"version": "v2.0", "data": [{"title": "all", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                          "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]}]}
    nested = tmp_path / "dev-v2.0.json"
    nested.write_text(json.dumps(data))
    cmd = [sys.executable, os.path.join(ROOT, "finetuner.py"), "--score-squad", str(nested), str(pred_dir / "bert_single.json"),
           "--na-prob-file", str(pred_dir / "bert_single.na_probs.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == official["bert_single+na_probs"]
    r = subprocess.run(cmd[:4] + [str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing.json does not exist" in r.stderr


def test_glue_metrics_match_hand_computed_values():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert evals.accuracy(pred, gold) == pytest.approx(0.6)
    assert evals.f1_binary(pred, gold) == pytest.approx(2 / 3)
    assert evals.matthews(pred, gold) == pytest.approx(1 / 6)
    assert evals.matthews([1, 1], [1, 1]) == 0.0  # degenerate: defined as 0
    x, y = [1, 2, 3, 4], [2, 4, 5, 4]
    assert evals.pearson(x, y) == pytest.approx(3.5 / np.sqrt(23.75))
    assert evals.spearman(x, y) == pytest.approx(3 / np.sqrt(22.5))  # tied ranks averaged
    assert evals.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


def test_score_squad_command_on_bad_or_partial_predictions(squad_dev, tmp_path):
    """Not JSON, a JSON list, or predictions for half the questions: one line on stderr each;
    missing predictions are scored as empty answers, so the scores are those of the file with
    "" for every missing id."""
    pred_dir = shared_path("data", "squad_v2", "predictions")
    preds = json.load(open(pred_dir / "bert_single.json"))
    half = dict(list(preds.items())[::2])
    (tmp_path / "half.json").write_text(json.dumps(half))
    (tmp_path / "list.json").write_text(json.dumps(list(preds.values())))
    (tmp_path / "text.json").write_text("these are not predictions")
    cmd = [sys.executable, os.path.join(ROOT, "finetuner.py"), "--score-squad", squad_dev]
    for name, want in (("text.json", "text.json: not JSON"), ("list.json", "list.json: a JSON list, expected an object")):
        r = subprocess.run(cmd + [str(tmp_path / name)], capture_output=True, text=True, timeout=120)
        print(f"{name}: exit {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 1 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + [str(tmp_path / "half.json")], capture_output=True, text=True, timeout=120)
    print(f"half.json: exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"5,936 of 11,873 question ids have no prediction in {tmp_path / 'half.json'}, e.g. ")
    # by hand: a missing id scores 1 when the question has no answer, else 0 (the empty answer);
    # the predicted half is a complete file of its own questions, where the scorer equals the official one
    gold, got = evals.load_squad_gold(squad_dev), json.loads(r.stdout)
    scored = evals.squad_v2_scores({q: gold[q] for q in half}, half)
    no_answer_missing = sum(not gold[q] for q in gold if q not in half)
    for key in ("exact", "f1"):
        want = (scored[key] * len(half) + 100 * no_answer_missing) / len(gold)
        assert got["total"] == len(gold) and math.isclose(got[key], want, rel_tol=1e-12), (key, got[key], want)


def test_score_squad_refuses_predictions_that_match_no_question(tmp_path):
    """Issue 19 item 9: a predictions file none of whose ids is a question of the data file
    (another data file's predictions, or none at all) is refused: exit 1, one line naming ids of
    both files. Before, every question was scored as unanswered: the no-answer share (F1 50.07
    on the SQuAD v2 dev set, 50.0 here) was printed and the command exited 0."""
    rows = [{"id": f"q{i}", "context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France"], "answer_start": [12]} if i % 2 else {"text": [], "answer_start": []}}
            for i in range(6)]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, preds, want in (("other.json", {f"other{i}": "France" for i in range(6)}, "none of its 6 question ids"),
                              ("empty.json", {}, "none of its 0 question ids")):
        (tmp_path / name).write_text(json.dumps(preds))
        with pytest.raises(SystemExit) as e:
            evals.score_squad_cli([str(data), str(tmp_path / name)])
        print(e.value)
        assert want in str(e.value) and "\n" not in str(e.value) and "q0, q1, q2 here" in str(e.value)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "finetuner.py"), "--score-squad", str(data),
                        str(tmp_path / "other.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "(other0, other1, other2 there; q0, q1, q2 here)" in r.stderr
    (tmp_path / "half.json").write_text(json.dumps({"q1": "France", "other": "x"}))  # one id in common: scored as before
    r = subprocess.run([sys.executable, os.path.join(ROOT, "finetuner.py"), "--score-squad", str(data),
                        str(tmp_path / "half.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["total"] == 6
