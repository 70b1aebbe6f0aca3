"""finetuner.py: span recovery, packing, overfitting runs, export/reload, bad inputs, schedules."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import evals
import finetuner
import trainer
from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def squad_dev():
    return str(shared_path("data", "squad_v2", "validation.jsonl"))


def test_gold_answers_recoverable_from_token_windows(squad_dev, tok):
    rows = [json.loads(line) for line in open(squad_dev)]
    answerable = [r for r in rows if r["answers"]["text"]]
    feats = finetuner.squad_features(answerable, tok, finetuner.FinetuneConfig(), squad_dev)
    recovered = {}
    for f in feats:
        if f["start"] > 0:
            s, e = f["start"] - f["ctx0"], f["end"] - f["ctx0"]
            assert 0 < f["start"] <= f["end"] < len(f["ids"]) - 1
            recovered.setdefault(f["qid"], f["context"][f["spans"][s][0]:f["spans"][e][1]].strip())
    exact = np.mean([recovered.get(r["id"]) == r["answers"]["text"][0] for r in answerable])
    normalized = np.mean([r["id"] in recovered and evals.normalize_answer(recovered[r["id"]]) ==
                          evals.normalize_answer(r["answers"]["text"][0]) for r in answerable])
    covered = len(recovered) / len(answerable)
    print(f"{len(answerable)} answerable questions, {len(feats)} windows: answer inside a window {covered:.4f}, "
          f"exact text recovered {exact:.4f}, normalized match {normalized:.4f}")
    assert covered == 1.0 and exact > 0.98 and normalized > 0.99
    assert max(len(f["ids"]) for f in feats) <= 384


def test_squad_windows_see_every_context_token_and_overlap_by_doc_stride(tok, tmp_path, monkeypatch):
    """A question longer than max_query_len and a context of thousands of tokens: the windows
    cover every context token, consecutive windows share exactly doc_stride tokens (Hugging
    Face's meaning), the answer is labelled in every window that holds it, and a doc_stride
    that leaves a window no room to advance is refused."""
    sentences = [f"The river passes mill number {i} on its way to the sea." for i in range(300)]
    sentences.insert(250, "The oldest mill was built by Thomas Greene in 1847.")
    context, answer = " ".join(sentences), "Thomas Greene"
    row = {"id": "long", "context": context, "question": "Who " + "really " * 100 + "built the oldest mill?",
           "answers": {"text": [answer], "answer_start": [context.index(answer)]}}
    c_ids, spans = tok.encode_with_offsets(context)
    token_at = {sp: i for i, sp in enumerate(spans)}
    a0 = context.index(answer)
    first = min(i for i, (a, b) in enumerate(spans) if b > a0)
    last = max(i for i, (a, b) in enumerate(spans) if a < a0 + len(answer))
    assert len(token_at) == len(spans) > 3000

    def windows(cfg):
        """feats and each window's [lo, hi) range of context token indices"""
        feats = finetuner.squad_features([row], tok, cfg, "long.jsonl")
        ranges = []
        for f in feats:
            lo = token_at[f["spans"][0]]
            hi = lo + len(f["ids"]) - f["ctx0"] - 1
            assert f["ids"][f["ctx0"]:-1] == c_ids[lo:hi] and f["ctx0"] == cfg.max_query_len + 2  # question truncated
            ranges.append((lo, hi))
        seen = np.zeros(len(c_ids), bool)
        for lo, hi in ranges:
            seen[lo:hi] = True
        return feats, ranges, int((~seen).sum())

    results = []  # all printed first, checked after, so a failure shows every case
    for max_len, stride in ((128, 32), (384, 128)):  # context budget 61 and 317 tokens
        cfg = finetuner.FinetuneConfig(squad_max_len=max_len, max_query_len=64, doc_stride=stride)
        feats, ranges, unseen = windows(cfg)
        overlaps = {a_hi - b_lo for (_, a_hi), (b_lo, _) in zip(ranges, ranges[1:])}
        labelled = [f["start"] > 0 for f in feats]
        holds = [lo <= first and last < hi for lo, hi in ranges]
        found = [f["context"][f["spans"][f["start"] - f["ctx0"]][0]:f["spans"][f["end"] - f["ctx0"]][1]].strip()
                 for f in feats if f["start"] > 0]  # stripped as squad_postprocess does: " Thomas" is one BPE token
        print(f"squad_max_len {max_len}, doc_stride {stride}: {len(feats)} windows over {len(c_ids)} context tokens, "
              f"{unseen} unseen, overlaps {sorted(overlaps)}, answer labelled in {len(found)} window(s)")
        results.append((stride, unseen, overlaps, labelled, holds, found))

    too_big = finetuner.FinetuneConfig(squad_max_len=128, max_query_len=64, doc_stride=64)  # budget 61 <= 64
    try:
        feats, _, unseen = windows(too_big)
        refused = ""
        print(f"squad_max_len 128, doc_stride 64: accepted, {len(feats)} windows, {unseen} context tokens unseen")
    except SystemExit as e:
        refused = str(e)
        print(f"squad_max_len 128, doc_stride 64: refused: {refused}")
    for stride, unseen, overlaps, labelled, holds, found in results:
        assert unseen == 0 and overlaps == {stride} and labelled == holds and found and set(found) == {answer}
    assert "--train.doc_stride 64" in refused and "--train.max_query_len" in refused
    monkeypatch.chdir(tmp_path)  # main() must refuse before it writes a log or reads data
    with pytest.raises(SystemExit, match=r"--train.doc_stride 200 .*--train.squad_max_len 256"):
        finetuner.main(["--task", "squad", "--train.squad_max_len", "256", "--train.doc_stride", "200"])
    assert not os.path.exists(tmp_path / "logs")


def test_packed_examples_classify_as_if_alone(tok):
    from model import ClassificationHead, KBERT, ModelConfig

    torch.manual_seed(0)
    enc = KBERT(ModelConfig(preset="tiny"))
    with torch.no_grad():
        for p in enc.parameters():
            if p.ndim == 2:
                p.normal_(std=0.05)
    head = ClassificationHead(64, 3, dropout=0.0)
    torch.nn.init.normal_(head.out.weight)
    rows = [{"premise": f"Sentence number {i} about cats.", "hypothesis": "Cats " * (i % 7 + 1), "label": i % 3} for i in range(12)]
    items = finetuner.glue_examples(rows, "mnli", tok, 128, "mem")
    with torch.no_grad():
        ids, cls_pos, order = finetuner.glue_batch(items, 512, "cpu")
        packed = head(enc(ids).flatten(0, 1)[cls_pos])
        assert ids.shape[0] == 1 and sorted(order) == list(range(12))
        for j, i in enumerate(order):
            ids1, pos1, _ = finetuner.glue_batch([items[i]], 128, "cpu")
            alone = head(enc(ids1).flatten(0, 1)[pos1])
            torch.testing.assert_close(packed[j:j + 1], alone, atol=1e-5, rtol=1e-4)


def run(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return finetuner.main(args)
    finally:
        os.chdir(old)


def test_mnli_overfits_and_reload_gives_same_predictions(tmp_path, tok):
    src = shared_path("data", "glue", "mnli", "validation_matched.jsonl")
    sub = tmp_path / "mnli256.jsonl"
    sub.write_text("".join(open(src).readlines()[:256]))
    out = run(["--task", "mnli", "--train.preset", "tiny", "--train.train_file", str(sub), "--train.eval_files", str(sub),
               "--train.epochs", "30", "--train.lr", "3e-3", "--train.batch_size", "32", "--train.dropout", "0", "--train.pack_len", "512",
               "--train.max_len", "128", "--train.log_every", "60", "--train.run_id", "mnli"], tmp_path)
    acc = out["seeds"][0]["mnli256"]["accuracy"]
    print(f"MNLI 256-example overfit: train accuracy {acc:.2f}%, "
          f"{out['seeds'][0]['train_examples_per_s']:.0f} train examples/s (tiny, CPU)")
    assert acc >= 95
    folder = tmp_path / "finetuned" / "mnli" / "seed0" / "model"
    model, config = finetuner.load_finetuned(str(folder))
    assert config["task"] == "mnli" and config["labels"] == ["entailment", "neutral", "contradiction"]
    items = finetuner.glue_examples([json.loads(line) for line in open(sub)], "mnli", tok, 128, str(sub))
    cfg = finetuner.FinetuneConfig(pack_len=512)
    runner = finetuner.Runner("mnli", cfg, finetuner.common.Dist(0, 0, 1, torch.device("cpu")), print)
    runner.prepare(model)
    outs, _ = runner.predict(model, items)
    saved = [json.loads(line)["prediction"] for line in open(tmp_path / "finetuned" / "mnli" / "seed0" / "predictions_mnli256.jsonl")]
    assert [int(np.argmax(o)) for o in outs] == saved
    # evaluation without training: the saved model, head included, scores what the run scored
    again = run(["--task", "mnli", "--train.base_model", str(folder), "--train.epochs", "0", "--train.eval_files", str(sub),
                 "--train.pack_len", "512", "--train.max_len", "128", "--train.run_id", "mnli-eval"], tmp_path)
    assert again["seeds"][0]["steps"] == 0 and again["seeds"][0]["mnli256"]["accuracy"] == acc
    with pytest.raises(SystemExit, match="--train.epochs 0 evaluates a finetuned model"):
        finetuner.main(["--task", "mnli", "--train.epochs", "0"])


def test_squad_subset_overfits(tmp_path, tok):
    src = shared_path("data", "squad_v2", "validation.jsonl")
    sub = tmp_path / "sq48.jsonl"
    sub.write_text("".join(open(src).readlines()[:48]))
    out = run(["--task", "squad_v2", "--train.preset", "tiny", "--train.train_file", str(sub), "--train.eval_files", str(sub),
               "--train.epochs", "50", "--train.lr", "3e-3", "--train.batch_size", "16", "--train.dropout", "0",
               "--train.log_every", "100", "--train.run_id", "sq"], tmp_path)
    s = out["seeds"][0]["sq48"]
    print(f"SQuAD v2 48-question overfit: exact {s['exact']:.2f} f1 {s['f1']:.2f} (HasAns {s['HasAns_exact']:.2f}, "
          f"NoAns {s['NoAns_exact']:.2f}), best_f1 {s['best_f1']:.2f}")
    assert s["exact"] >= 95 and s["total"] == 48
    pred_dir = tmp_path / "finetuned" / "sq" / "seed0"
    preds = json.load(open(pred_dir / "predictions_sq48.json"))
    na = json.load(open(pred_dir / "na_probs_sq48.json"))
    assert len(preds) == 48 and set(preds) == set(na)
    # the written files reproduce the reported numbers through the official scorer
    gold = evals.load_squad_gold(str(sub))
    assert evals.squad_v2_scores(gold, preds)["exact"] == s["exact"]
    nonnull = json.load(open(pred_dir / "predictions_nonnull_sq48.json"))
    assert evals.squad_v2_scores(gold, nonnull, na, 0.0)["f1"] == s["f1"]


def test_bad_inputs_fail_clearly(tmp_path, tok):
    with pytest.raises(SystemExit, match="unknown task 'mnly'"):
        finetuner.main(["--task", "mnly"])
    with pytest.raises(SystemExit, match="unknown option --train.lrr"):
        finetuner.main(["--task", "mnli", "--train.lrr", "1"])
    with pytest.raises(SystemExit, match=r"missing column\(s\) \['hypothesis'\]"):
        finetuner.glue_examples([{"premise": "a", "label": 0}], "mnli", tok, 64, "x.jsonl")
    with pytest.raises(SystemExit, match="label 3 out of range"):
        finetuner.glue_examples([{"premise": "a", "hypothesis": "b", "label": 3}], "mnli", tok, 64, "x.jsonl")
    with pytest.raises(SystemExit, match="label -1"):
        finetuner.glue_examples([{"premise": "a", "hypothesis": "b", "label": -1}], "mnli", tok, 64, "x.jsonl")
    cfg = finetuner.FinetuneConfig()
    row = {"id": "q1", "context": "Paris is in France.", "question": "Where?", "answers": {"text": ["France"], "answer_start": [12]}}
    assert finetuner.squad_features([row], tok, cfg, "x")[0]["start"] > 0
    with pytest.raises(SystemExit, match="is_impossible but carries an answer"):
        finetuner.squad_features([{**row, "is_impossible": True}], tok, cfg, "x")
    with pytest.raises(SystemExit, match="empty context"):
        finetuner.squad_features([{**row, "context": "  "}], tok, cfg, "x")
    with pytest.raises(SystemExit, match="not in the context"):
        finetuner.squad_features([{**row, "answers": {"text": ["Berlin"], "answer_start": [0]}}], tok, cfg, "x")
    with pytest.raises(SystemExit, match="v1.1 question without an answer"):
        finetuner.squad_features([{**row, "answers": {"text": [], "answer_start": []}}], tok, cfg, "x", v1=True)
    with pytest.raises(SystemExit, match="download_glue"):
        evals.read_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SystemExit, match=r"--task is required: one of cola, .*blimp \(--help lists every option\)"):
        finetuner.main(["--train.lr", "1e-4"])
    with pytest.raises(SystemExit, match="--train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        finetuner.main(["--task", "mnli", "--train.device", "gpu"])


def test_bad_data_files_fail_in_one_line_before_any_output(tmp_path, monkeypatch, tok):
    """An empty or malformed jsonl stops the command before it writes a log, a model or metrics."""
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"premise": f"p {i}", "hypothesis": "h", "label": i % 3}) + "\n" for i in range(8)))
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.jsonl").write_text(good.read_text() + '{"premise": "cut off\n')
    base = ["--task", "mnli", "--train.preset", "tiny", "--train.pack_len", "256", "--train.max_len", "64"]
    cases = {"empty train": (["--train.train_file", "empty.jsonl", "--train.eval_files", "good.jsonl"], r"^empty.jsonl holds no rows"),
             "empty eval": (["--train.train_file", "good.jsonl", "--train.eval_files", "empty.jsonl"], r"^empty.jsonl holds no rows"),
             "malformed": (["--train.train_file", "broken.jsonl", "--train.eval_files", "good.jsonl"],
                           r"^broken.jsonl:9: not a JSON line \(.*\): \{\"premise\": \"cut off$")}
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit, match=message) as e:
            finetuner.main(base + args + ["--train.run_id", name.replace(" ", "-")])
        print(f"{name}: {e.value}")
        assert "\n" not in str(e.value) and not (tmp_path / "logs").exists() and not (tmp_path / "finetuned").exists()
    (tmp_path / "exports").mkdir()  # a local folder of that name: exports/... is a path, not a Hub id
    with pytest.raises(SystemExit, match=r"^--train.base_model exports/does-not-exist: no such folder$"):
        finetuner.main(base + ["--train.train_file", "good.jsonl", "--train.eval_files", "good.jsonl",
                               "--train.base_model", "exports/does-not-exist", "--train.run_id", "missing-model"])


def test_one_vs_two_processes_same_finetuning(tmp_path, tok):
    """torchrun --nproc_per_node=2 (gloo) splits each batch over ranks: same losses and metrics."""
    src = shared_path("data", "glue", "mnli", "validation_matched.jsonl")
    sub = tmp_path / "m64.jsonl"
    sub.write_text("".join(open(src).readlines()[:64]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    logs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29561",
               os.path.join(ROOT, "finetuner.py"), "--task", "mnli", "--train.preset", "tiny", "--train.train_file", str(sub),
               "--train.eval_files", str(sub), "--train.epochs", "2", "--train.lr", "1e-3", "--train.batch_size", "16",
               "--train.log_every", "2", "--train.dropout", "0", "--train.pack_len", "512", "--train.max_len", "128",
               "--train.run_id", f"np{n}", "--train.out_dir", str(tmp_path / "ft")]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "\r" not in r.stdout + r.stderr  # no progress bar when the output is not a terminal
        logs[n] = (re.findall(r"step:\d+/8 loss:([\d.]+)", r.stdout), re.findall(r'"accuracy": ([\d.]+)', r.stdout))
    print("1 process:", logs[1], "\n2 processes:", logs[2])
    assert len(logs[1][0]) == 4 and logs[1] == logs[2]


def write_stsb(path, n=48):
    """n synthetic STS-B rows (regression labels 0..5) as jsonl."""
    rng = np.random.default_rng(0)
    rows = [{"sentence1": f"a cat sat on mat number {i}", "sentence2": "a cat " * int(rng.integers(1, 6)),
             "label": float(rng.uniform(0, 5)), "idx": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


STSB_ARGS = ["--task", "stsb", "--train.preset", "tiny", "--train.epochs", "2", "--train.batch_size", "16",
             "--train.pack_len", "256", "--train.max_len", "64"]


def test_regression_task_muon_optimizer_and_several_seeds(tmp_path, tok):
    """STS-B (one output: regression, Pearson/Spearman) with the Muon option and two seeds
    that end with different metrics: the summary spans exactly those two values."""
    data = write_stsb(tmp_path / "stsb.jsonl")
    out = run(STSB_ARGS + ["--train.train_file", str(data), "--train.eval_files", str(data), "--train.optimizer", "muon",
                           "--train.seeds", "0,1", "--train.run_id", "sts"], tmp_path)
    assert [s["seed"] for s in out["seeds"]] == [0, 1]
    summary = out["summary"]["stsb/pearson"]
    vals = [s["stsb"]["pearson"] for s in out["seeds"]]
    print(f"pearson by seed {vals}, summary {summary}")
    assert vals[0] != vals[1]  # the seeds really differ, so min/max/median below are not one number
    assert summary["n"] == 2 and (summary["min"], summary["max"]) == (min(vals), max(vals)) and summary["min"] < summary["max"]
    assert set(out["seeds"][0]["stsb"]) >= {"pearson", "spearman"}
    preds = [json.loads(line) for line in open(tmp_path / "finetuned" / "sts" / "seed1" / "predictions_stsb.jsonl")]
    assert len(preds) == 48 and isinstance(preds[0]["prediction"], float)
    model, config = finetuner.load_finetuned(str(tmp_path / "finetuned" / "sts" / "seed1" / "model"))
    assert config["task"] == "stsb" and model.head.n_labels == 1


def test_seed_summary_and_median_seed_match_hand_computed_values():
    per_seed = [{"seed": s, "dev": {"acc": a, "f1": f, "eval_examples_per_s": 1e3 + s}}
                for s, a, f in ((0, 80.0, 70.0), (1, 84.0, 75.0), (2, 81.0, 60.0))]
    summary = finetuner.seed_summary(per_seed, ["dev"])
    print(summary)
    assert set(summary) == {"dev/acc", "dev/f1"}  # throughput is not a metric
    # acc: mean 245/3, deviations -5/3, 7/3, -2/3, squares sum to 78/9; population std = sqrt(78/27) = sqrt(26)/3
    assert summary["dev/acc"] == {"median": 81.0, "min": 80.0, "max": 84.0, "std": pytest.approx(np.sqrt(26) / 3), "n": 3}
    # f1: mean 205/3, deviations 5/3, 20/3, -25/3, squares sum to 1050/9; std = sqrt(1050/27)
    assert summary["dev/f1"] == {"median": 70.0, "min": 60.0, "max": 75.0, "std": pytest.approx(np.sqrt(1050 / 27)), "n": 3}
    assert finetuner.median_seed(per_seed, "dev", "acc")["seed"] == 2  # 80 < 81 < 84
    assert finetuner.median_seed(per_seed, "dev", "f1")["seed"] == 0  # 60 < 70 < 75
    four = [{"seed": s, "dev": {"acc": a}} for s, a in ((0, 70.0), (1, 90.0), (2, 80.0), (3, 60.0))]
    assert finetuner.seed_summary(four, ["dev"])["dev/acc"]["median"] == 75.0  # between the middle two
    assert finetuner.median_seed(four, "dev", "acc")["seed"] == 0  # 60 < [70] < 80 < 90: the lower middle one
    assert finetuner.seed_summary(four[:1], ["dev"])["dev/acc"] == {"median": 70.0, "min": 70.0, "max": 70.0, "std": 0.0, "n": 1}


def test_several_seeds_push_the_median_seed_once_with_a_card_of_all(tmp_path, monkeypatch, tok):
    """Three seeds with --train.hf_repo: one push (fake Hub), of the seed with the median
    Pearson, whose card lists every seed's metrics and their median, min and max."""
    import huggingface_hub

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, folder_path, repo_id, **kw):
            uploads.append((os.path.abspath(folder_path), repo_id, open(os.path.join(folder_path, "README.md")).read()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    data = write_stsb(tmp_path / "stsb.jsonl")
    out = run(STSB_ARGS + ["--train.train_file", str(data), "--train.eval_files", str(data), "--train.seeds", "0,1,2",
                           "--train.hf_repo", "me/kbert-stsb", "--train.run_id", "push"], tmp_path)
    root = tmp_path / "finetuned" / "push"
    pearson = {s["seed"]: s["stsb"]["pearson"] for s in out["seeds"]}
    print(f"pearson by seed {pearson}; {len(uploads)} push(es): {[os.path.relpath(u[0], root) for u in uploads]}")
    assert all((root / f"seed{k}" / "model" / "model.safetensors").is_file() for k in (0, 1, 2))
    assert len(set(pearson.values())) == 3
    low, mid, high = sorted(pearson, key=pearson.get)
    assert len(uploads) == 1
    folder, repo, card = uploads[0]
    assert repo == "me/kbert-stsb" and os.path.samefile(folder, root / f"seed{mid}" / "model")
    print(card)
    table = {}  # first cell -> {column: cell}
    lines = [line for line in card.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    assert set(table) == {"0", "1", "2", "median", "min", "max", "std (population)"}
    for k, v in pearson.items():
        assert table[str(k)]["stsb/pearson"] == f"{v:.2f}"
        assert table[str(k)]["stsb/spearman"] == f"{out['seeds'][k]['stsb']['spearman']:.2f}"
    assert [table[r]["stsb/pearson"] for r in ("min", "median", "max")] == [f"{pearson[k]:.2f}" for k in (low, mid, high)]
    assert f"seed {mid}" in card


def test_weight_decay_is_wd_times_schedule_multiplier_whatever_the_lr():
    """composer's DecoupledAdamW semantics: with zero gradients (Adam's and Muon's updates are
    then exactly 0) one step at schedule multiplier 0.25 scales every decayed weight by
    1 - wd * 0.25 = 0.9975, for an lr of 1e-5 and of 0.1 alike. optimizer=muon decays the
    hidden matrices only (as pretraining does); its AdamW weights stay put."""
    wd, mult = 0.01, 0.25
    wrong = []  # all cases printed first, checked after
    for optimizer, lrs in (("adamw", (1e-5, 0.1)), ("muon", (1e-4, 0.05))):
        for lr in lrs:
            cfg = finetuner.FinetuneConfig(preset="tiny", optimizer=optimizer, lr=lr, muon_lr=lr, weight_decay=wd)
            model = finetuner.build_model(cfg, "mnli", 0)
            opt = finetuner.build_ft_optimizer(model, cfg)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult  # what Runner.fit sets at this point of the schedule
            old = {n: p.detach().clone() for n, p in model.named_parameters()}
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            new = dict(model.named_parameters())
            decayed = [n for n, p in old.items() if optimizer == "adamw" or (n.startswith("encoder.blocks.") and p.ndim == 2)]
            factor = sum((new[n] * old[n]).sum().item() for n in decayed) / sum(old[n].square().sum().item() for n in decayed)
            print(f"{optimizer} lr {lr:g}: {len(decayed)} of {len(old)} tensors decayed, scaled by {factor:.8f} (want {1 - wd * mult})")
            for n in old:
                want = old[n] * (1 - wd * mult) if n in decayed else old[n]
                if not torch.allclose(new[n].detach(), want, rtol=1e-6, atol=0):
                    wrong.append(f"{optimizer} lr {lr:g}: {n}")
    assert not wrong, wrong


def test_a_stopped_multi_seed_run_resumes_without_redoing_finished_seeds(tmp_path, monkeypatch, tok):
    """SIGTERM (a real signal to this process) during seed 1's second step of seeds 0,1: the
    step finishes and the run exits 143 naming the command that resumes. That command (a rerun
    with --train.resume auto) does not train seed 0 again but reuses its saved result, trains
    seed 1 from its start to what a run of seed 1 alone gives, and summarizes both."""
    import shlex
    import signal

    data = write_stsb(tmp_path / "stsb.jsonl")
    args = STSB_ARGS + ["--train.train_file", str(data), "--train.eval_files", str(data), "--train.seeds", "0,1",
                        "--train.run_id", "st", "--train.resume", "auto"]
    real_fit, real_loss, fitted, calls = finetuner.Runner.fit, finetuner.Runner.loss_on, [], [0]

    def fit(self, model, items, seed):
        fitted.append(seed)
        return real_fit(self, model, items, seed)

    def loss_on(self, model, items):
        calls[0] += 1
        if calls[0] == 6 + 2:  # 48 rows in batches of 16 for 2 epochs: 6 steps a seed
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, model, items)

    monkeypatch.setattr(finetuner.Runner, "fit", fit)
    monkeypatch.setattr(finetuner.Runner, "loss_on", loss_on)
    with pytest.raises(SystemExit) as e:
        run(args, tmp_path)
    assert e.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    root = tmp_path / "finetuned" / "st"
    line = open(tmp_path / "logs" / "st.txt").read().splitlines()[-1]
    print(line)
    m = re.fullmatch(r"seed:1 step:2/6: stopped by SIGTERM; .* resume with: (.*)", line)
    command = shlex.split(m[1])
    assert command[:2] == ["python", os.path.join(ROOT, "finetuner.py")]
    assert (root / "seed0" / "result.json").is_file() and not (root / "seed1" / "result.json").exists()
    saved = json.load(open(root / "seed0" / "result.json"))["result"]
    with pytest.raises(SystemExit, match=r"seed 0 of run st was finished with other options \(lr 5e-05 -> 0.001\)"):
        run(args + ["--train.lr", "1e-3"], tmp_path)
    fitted.clear()
    out = run(command[2:], tmp_path)
    assert fitted == [1] and out["seeds"][0] == saved and out["summary"]["stsb/pearson"]["n"] == 2
    alone = run(STSB_ARGS + ["--train.train_file", str(data), "--train.eval_files", str(data), "--train.seeds", "1",
                             "--train.run_id", "st1"], tmp_path)["seeds"][0]
    print("seed 1 after the resume:", out["seeds"][1]["stsb"], "\nseed 1 alone:", alone["stsb"])
    assert {k: v for k, v in out["seeds"][1]["stsb"].items() if "per_s" not in k} == \
        {k: v for k, v in alone["stsb"].items() if "per_s" not in k}
    assert "seed:0 was finished by an earlier attempt" in open(tmp_path / "logs" / "st.txt").read()


def test_one_lr_schedule_gives_the_old_finetuner_and_trainer_multipliers():
    """trainer.lr_schedule serves both scripts. The finetuner's multiplier at every step equals
    its old inline formula exactly; the trainer's equals its old one wherever warm-up and
    cool-down do not overlap (where they did, the old one jumped down after the warm-up; the
    decay now starts when the warm-up ends)."""
    def old_finetuner(step, steps, warmup_frac):
        warm = max(1, round(warmup_frac * steps))
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    def old_trainer(step, steps, warmup_frac, cooldown_frac):
        warm, cool = max(1, round(warmup_frac * steps)), round(cooldown_frac * steps)
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, cool)) if step >= steps - cool else 1.0

    checked = {"finetuner": 0, "trainer": 0}
    for steps in (1, 2, 3, 7, 10, 25, 100, 1001):
        for wf in (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0):
            for step in range(steps + 2):
                assert trainer.lr_schedule(step, steps, wf, 1.0) == old_finetuner(step, steps, wf), (step, steps, wf)
                checked["finetuner"] += 1
                for cf in (0.0, 0.1, 0.3, 0.5):
                    if max(1, round(wf * steps)) <= steps - round(cf * steps):
                        assert trainer.lr_schedule(step, steps, wf, cf) == old_trainer(step, steps, wf, cf), (step, steps, wf, cf)
                        checked["trainer"] += 1
    t = trainer.TrainConfig()
    assert [trainer.lr_multiplier(s, t) for s in (0, 186, 187, 13090, 13091, 18699)] == \
        [old_trainer(s, t.steps, t.warmup_frac, t.cooldown_frac) for s in (0, 186, 187, 13090, 13091, 18699)]
    print(f"identical multipliers: {checked}")


def test_betas_are_parsed_in_one_place_with_one_line_errors():
    assert trainer.parse_betas("0.9,0.98", "--train.betas") == (0.9, 0.98)
    assert trainer.parse_betas("0,0.999", "--train.betas") == (0.0, 0.999)
    for bad in ("0.9", "0.9,x", "0.9,1", "-0.1,0.9", "0.9,0.98,0.99", "nan,0.9", ""):
        with pytest.raises(SystemExit) as e:
            trainer.parse_betas(bad, "--train.betas")
        print(e.value)
        assert str(e.value).startswith(f"--train.betas {bad!r}: ") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=r"^--train.adam_betas must be 2 numbers in \[0, 1\), got '0.8;0.95'$"):
        trainer.parse_args(["--train.adam_betas", "0.8;0.95"])  # the option's declared values, checked when parsed


# -- issue 19: every option checked first, floors, progress, learning rates in the log ------------


MNLI_ROWS = [{"premise": f"The car number {i} is parked by the station.", "hypothesis": "A car " * (i % 3 + 1) + "is parked.",
              "label": [0, 0, 1, 2][i % 4], "idx": i} for i in range(8)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_option_has_a_rule_and_a_bad_value_stops_before_any_file(tmp_path, monkeypatch):
    """Issue 19 item 5: every FinetuneConfig field declares its values beside it (common.opt); a
    bad value of each exits with one line naming the option and the value, before a log or a
    folder exists.
    Before, --train.seeds 0,x and --train.batch_size 0 ended in a ValueError and a
    ZeroDivisionError traceback after the log was written."""
    declared = {f.name for f in dataclasses.fields(finetuner.FinetuneConfig) if common.allowed_of(f)}
    monkeypatch.chdir(tmp_path)
    bad = {"base_model": "", "preset": "huge", "data_dir": "", "eval_files": "a/dev.jsonl,b/dev.jsonl",
           "max_train_examples": "-1", "max_eval_examples": "-2", "optimizer": "sgd", "lr": "-1e-5", "head_lr": "inf",
           "muon_lr": "nan", "weight_decay": "1.5", "betas": "0.9", "warmup_frac": "1.5", "epochs": "-1", "batch_size": "0",
           "max_len": "3", "pack_len": "1000", "squad_max_len": "0", "doc_stride": "-1", "max_query_len": "0",
           "max_answer_len": "0", "n_best": "0", "null_threshold": "nan", "dropout": "1", "seeds": "0,x",
           "eval_batch_size": "0", "blimp_pairs": "-1", "out_dir": "", "hf_repo": "not a repo", "run_id": "a/b",
           "resume": "yes", "device": "gpu", "log_every": "0", "progress_every_s": "-1"}
    unchecked = {"train_file", "overwrite", "compile"}  # any path (read before the log), booleans (parsed)
    assert set(bad) == declared and declared | unchecked == {f.name for f in dataclasses.fields(finetuner.FinetuneConfig)}
    for key, value in {**bad, "seeds": "1,1"}.items():
        with pytest.raises(SystemExit) as e:
            finetuner.main(["--task", "mnli", f"--train.{key}", value])
        print(e.value)
        assert str(e.value).startswith(f"--train.{key} ") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_bad_option_or_a_missing_folder_exits_1_with_one_line_and_no_log(tmp_path):
    """Issue 19 items 5 and 8, as a user sees them: exit 1, one line on stderr, nothing on stdout,
    no log. Before: tracebacks for --train.seeds 0,x and --train.batch_size 0; for a base model
    under exports/ in a fresh clone (no exports/ folder), the Hub's LocalEntryNotFoundError, printed
    twice, each time leaving logs/<run_id>.txt behind."""
    cases = {"--train.seeds": ("0,x", "--train.seeds must be distinct integers, got '0,x'"),
             "--train.batch_size": ("0", "--train.batch_size must be >= 1, got 0"),
             "--train.base_model": ("exports/does-not-exist", "--train.base_model exports/does-not-exist: no such folder")}
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    for option, (value, want) in cases.items():
        r = subprocess.run([sys.executable, os.path.join(ROOT, "finetuner.py"), "--task", "mnli", option, value],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        print(f"{option} {value}: exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}")
        assert (r.returncode, r.stdout, r.stderr.strip()) == (1, "", r.stderr.strip().splitlines()[0])
        assert r.stderr.startswith(want) and os.listdir(tmp_path) == []


def test_a_name_that_looks_like_a_path_is_never_asked_of_the_hub(tmp_path, monkeypatch):
    """Issue 19 item 8: exports/..., finetuned/..., ./... and an existing folder's sub-path are
    folders; missing, each is one line, and the Hub is never asked."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    for name in ("exports/does-not-exist", "finetuned/x/seed0/model", "./model", "../model", "mine/model"):
        with pytest.raises(SystemExit, match=f"^--train.base_model {re.escape(name)}: no such folder$"):
            finetuner.main(["--task", "mnli", "--train.base_model", name])
    (tmp_path / "mine" / "model").mkdir()
    with pytest.raises(SystemExit, match="^--train.base_model mine/model: no config.json in it"):
        finetuner.main(["--task", "mnli", "--train.base_model", "mine/model"])
    assert os.listdir(tmp_path) == ["mine"]


def test_classification_metrics_carry_the_majority_floor_and_the_top_prediction_share(tmp_path, tok):
    """Issue 19 item 14: with lr 0 KBERT's classifier (zero output layer) predicts label 0 for
    every example: its accuracy is the majority class's, all of its predictions are one class;
    metrics.json and the log say so next to the accuracy. By hand: labels 0,0,1,2 x 2, majority
    class 0 (entailment) with 4 of 8; MRPC-like F1 of always predicting the majority class 1."""
    data = write_rows(tmp_path / "m.jsonl", MNLI_ROWS)
    out = run(["--task", "mnli", "--train.preset", "tiny", "--train.train_file", data, "--train.eval_files", data,
               "--train.lr", "0", "--train.batch_size", "4", "--train.pack_len", "256", "--train.max_len", "64",
               "--train.run_id", "floor"], tmp_path)
    scores = out["seeds"][0]["m"]
    print(scores)
    assert (scores["accuracy"], scores["majority_accuracy"], scores["top_prediction_share"]) == (50.0, 50.0, 100.0)
    assert scores["majority_class"] == scores["top_prediction"] == "entailment"
    assert json.load(open(tmp_path / "finetuned" / "floor" / "metrics.json"))["seeds"][0]["m"] == scores
    assert '"majority_accuracy": 50.0, "top_prediction_share": 100.0' in open(tmp_path / "logs" / "floor.txt").read()
    floor = evals.majority_floor([1, 0, 1, 1, 1], [1, 1, 0, 1, 0], ("f1", "accuracy", "matthews"))
    # always 1 on gold 1,1,0,1,0: tp 3, fp 2, fn 0 -> F1 6/8; accuracy 3/5; Matthews 0 (a constant predictor)
    assert floor == {"majority_f1": 75.0, "majority_accuracy": 60.0, "majority_matthews": 0.0, "majority_label": 1,
                     "top_prediction_share": 80.0, "top_prediction_label": 1}


def test_the_log_shows_progress_with_eta_and_time_of_day_and_each_group_s_lr(tmp_path, tok):
    """Issue 19 items 15 and 16: progress lines (done/total, elapsed, ETA, time of day) during
    training, evaluation and BLiMP at --train.progress_every_s; the step line starts with the
    time of day and gives each parameter group's learning rate, as trainer.py's does, where it
    gave the schedule's multiplier as lr:."""
    data = write_rows(tmp_path / "m.jsonl", MNLI_ROWS)
    base = ["--task", "mnli", "--train.preset", "tiny", "--train.train_file", data, "--train.eval_files", data,
            "--train.batch_size", "2", "--train.eval_batch_size", "2", "--train.pack_len", "256", "--train.max_len", "64",
            "--train.lr", "1e-3", "--train.head_lr", "2e-3", "--train.warmup_frac", "0.5", "--train.log_every", "3",
            "--train.progress_every_s", "1e-9"]
    run(base + ["--train.run_id", "progress"], tmp_path)
    log = open(tmp_path / "logs" / "progress.txt").read()
    print("\n".join(line for line in log.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)))
    # 4 steps, warm-up 2: multipliers 0.5, 1, 1, 0.5; loss lines at steps 3 and 4, progress lines at 1 and 2
    assert re.search(r"^\d\d:\d\d:\d\d seed:0 step:3/4 loss:\S+ lr_encoder:0.001 lr_head:0.002 examples/s:", log, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d seed:0 step:4/4 loss:\S+ lr_encoder:0.0005 lr_head:0.001 examples/s:", log, re.M)
    assert len(re.findall(r"^\d\d:\d\d:\d\d seed:0 training [12]/4 steps elapsed:\d:\d\d:\d\d eta:\d:\d\d:\d\d$", log, re.M)) == 2
    assert len(re.findall(r"^\d\d:\d\d:\d\d evaluation of m [246]/8 examples elapsed:\S+ eta:\S+$", log, re.M)) == 3
    assert re.search(r"^\d\d:\d\d:\d\d seed:0 m: \{", log, re.M)
    run(base + ["--train.optimizer", "muon", "--train.run_id", "muon"], tmp_path)
    assert re.search(r"step:4/4 loss:\S+ lr_muon:0.001 lr_embed:0.0005 lr_scalar:0.0005 lr_head:0.001 ",
                     open(tmp_path / "logs" / "muon.txt").read())
    rows = [{"UID": f"p{i % 2}", "field": "syntax", "linguistics_term": "t", "pairID": str(i),
             "sentence_good": f"The cat number {i} sleeps.", "sentence_bad": f"The cat number {i} sleep."} for i in range(4)]
    blimp = write_rows(tmp_path / "b.jsonl", rows)
    run(["--task", "blimp", "--train.preset", "tiny", "--train.eval_files", blimp, "--train.eval_batch_size", "4",
         "--train.progress_every_s", "1e-9", "--train.run_id", "bl"], tmp_path)
    lines = re.findall(r"^\d\d:\d\d:\d\d blimp \d+/\d+ masked copies elapsed:\S+ eta:\S+$", open(tmp_path / "logs" / "bl.txt").read(), re.M)
    print(lines)
    assert len(lines) >= 5
