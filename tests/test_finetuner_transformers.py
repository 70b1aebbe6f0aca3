"""finetuner.py on transformers models (issue 17): tiny random ModernBERT, BERT and DeBERTa-v2
masked LMs, saved with save_pretrained beside KBERT's own tokenizer files (as the benchmark's
baseline arms are), go through the same loop as KBERT: the same examples and windows, a few
steps of GLUE classification, STS-B regression and SQuAD v2 with metrics.json keyed as a KBERT
run's, exports that load back in transformers and evaluate with --train.epochs 0, and BLiMP."""
import functools
import json
import os
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the baselines come from transformers (requirements.txt)")

import common  # noqa: E402
import evals  # noqa: E402
import finetuner  # noqa: E402
import tokenizer  # noqa: E402
from model import CLS_ID, MASK_ID, PAD_ID, SEP_ID  # noqa: E402

TINY = dict(vocab_size=tokenizer.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=512, pad_token_id=PAD_ID)
FAMILIES = {  # name: (masked LM class, config): KBERT's GPT-2 token ids and special ids, no dropout
    "modernbert": ("ModernBertForMaskedLM", lambda: transformers.ModernBertConfig(
        **TINY, cls_token_id=CLS_ID, sep_token_id=SEP_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, local_attention=64)),
    "bert": ("BertForMaskedLM", lambda: transformers.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "deberta": ("DebertaV2ForMaskedLM", lambda: transformers.DebertaV2Config(
        **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, type_vocab_size=0, max_relative_positions=-1, position_buckets=64)),
}
CPU = common.Dist(0, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def families(tmp_path_factory, tok):
    """{family: folder} of tiny random masked LMs with KBERT's tokenizer files."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (cls, config) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(transformers, cls)(config())
        out[name] = str(root / name)
        model.save_pretrained(out[name])
        tokenizer.save_hf_tokenizer(out[name], 512)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny GLUE (MNLI, STS-B), SQuAD v2 and BLiMP files in the Hub schema."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "white"]
    mnli = [{"premise": f"The {colors[i % 4]} car number {i} is parked by the old station.",
             "hypothesis": "A car " * (i % 3 + 1) + "is parked.", "label": [0, 0, 1, 2][i % 4], "idx": i} for i in range(8)]
    stsb = [{"sentence1": f"a cat sat on mat number {i}", "sentence2": "a cat " * (i % 5 + 1), "label": float(rng.uniform(0, 5)),
             "idx": i} for i in range(8)]
    context = " ".join(f"The river passes mill number {i} on its way to the sea." for i in range(12))
    context += " The oldest mill was built by Thomas Greene in 1847."
    squad = [{"id": f"q{i}", "context": context, "question": q, "answers": a} for i, (q, a) in enumerate([
        ("Who built the oldest mill?", {"text": ["Thomas Greene"], "answer_start": [context.index("Thomas Greene")]}),
        ("What color is the sky?", {"text": [], "answer_start": []}),
        ("When was the oldest mill built?", {"text": ["1847"], "answer_start": [context.index("1847")]}),
        ("Who sings the song?", {"text": [], "answer_start": []})])]
    pairs = [("The cat sleeps.", "The cat sleep."), ("Dogs bark loudly.", "Dogs barks loudly."),
             ("She has left.", "She have left."), ("They were here.", "They was here.")]
    blimp = [{"UID": f"p{i % 2}", "field": "syntax", "linguistics_term": "agreement", "pairID": str(i),
              "sentence_good": good, "sentence_bad": bad} for i, (good, bad) in enumerate(pairs)]
    out = {}
    for name, rows in (("mnli", mnli), ("stsb", stsb), ("squad_v2", squad), ("blimp", blimp)):
        out[name] = str(root / f"{name}.jsonl")
        with open(out[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def run(tmp, task, base, data_file, *extra):
    """finetuner.main in tmp on one file (train and eval), a few steps; returns the summary."""
    old = os.getcwd()
    os.chdir(tmp)
    try:
        return finetuner.main(["--task", task, "--train.base_model", base, "--train.train_file", data_file,
                               "--train.eval_files", data_file, "--train.batch_size", "4", "--train.max_len", "64",
                               "--train.pack_len", "128", "--train.squad_max_len", "128", "--train.doc_stride", "32",
                               "--train.log_every", "1", "--train.lr", "1e-3", *extra])
    finally:
        os.chdir(old)


def keys(tree):
    """The nested key structure of a metrics.json (values dropped, lists by their first item)."""
    if isinstance(tree, dict):
        return {k: keys(v) for k, v in tree.items()}
    return [keys(tree[0])] if isinstance(tree, list) and tree else None


@pytest.fixture(scope="module")
def kbert_keys(tmp_path_factory, data, tok):
    """metrics.json's structure for a tiny KBERT run of each task: what a transformers run must match."""
    tmp = tmp_path_factory.mktemp("kbert")
    return {task: keys(run(tmp, task, "none", data[task], "--train.preset", "tiny", "--train.run_id", task))
            for task in ("mnli", "stsb", "squad_v2")}


def test_transformers_tokenizer_gives_kbert_s_examples_and_windows(families, data, tok):
    """KBERT's tokenizer saved as transformers files, through HFTokens: the same GLUE ids under
    longest-first truncation and the same SQuAD windows (question cut to max_query_len, context
    pieces sharing doc_stride tokens, labels, offsets) as tokenizer.py gives KBERT."""
    hf = finetuner.HFTokens(transformers.AutoTokenizer.from_pretrained(families["bert"]), families["bert"])
    assert (hf.prefix, hf.middle, hf.suffix, hf.types) == ([CLS_ID], [SEP_ID], [SEP_ID], None)
    rows = [json.loads(line) for line in open(data["mnli"])]
    for max_len in (12, 64):
        assert finetuner.glue_examples(rows, "mnli", hf, max_len, "m") == finetuner.glue_examples(rows, "mnli", tok, max_len, "m")
    sst = [{"sentence": r["premise"], "label": r["label"] % 2} for r in rows]
    assert finetuner.glue_examples(sst, "sst2", hf, 9, "s") == finetuner.glue_examples(sst, "sst2", tok, 9, "s")
    rows = [json.loads(line) for line in open(data["squad_v2"])]
    cfg = finetuner.FinetuneConfig(squad_max_len=64, max_query_len=5, doc_stride=16)
    mine, theirs = finetuner.squad_features(rows, hf, cfg, "q"), finetuner.squad_features(rows, tok, cfg, "q")
    print(f"{len(mine)} windows of {len(rows)} questions")
    assert len(mine) > 2 * len(rows) and mine == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_finetunes_glue_stsb_and_squad_like_kbert(family, families, data, kbert_keys, tmp_path):
    """A few steps of each task: metrics.json has a KBERT run's keys; the step lines' losses are
    finite; the MNLI export loads back with transformers' auto class and, with --train.epochs 0,
    predicts what the run wrote."""
    base = families[family]
    for task in ("mnli", "stsb", "squad_v2"):
        out = run(tmp_path, task, base, data[task], "--train.run_id", f"{family}-{task}")
        saved = json.load(open(tmp_path / "finetuned" / f"{family}-{task}" / "metrics.json"))
        assert keys(saved) == kbert_keys[task], (family, task)
        assert saved == json.loads(json.dumps(out))
        log = open(tmp_path / "logs" / f"{family}-{task}.txt").read()
        losses = [float(x) for x in re.findall(r"step:\d+/\d+ loss:(\S+)", log)]
        assert len(losses) == out["seeds"][0]["steps"] >= 2 and all(np.isfinite(losses)), (family, task, losses)
        assert "padded to the batch's longest" in log
    folder = str(tmp_path / "finetuned" / f"{family}-mnli" / "seed0" / "model")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.finetuning_task == "mnli" and model.config.id2label[2] == "contradiction"
    again = run(tmp_path, "mnli", folder, data["mnli"], "--train.epochs", "0", "--train.run_id", f"{family}-eval")
    written = [open(tmp_path / "finetuned" / r / "seed0" / "predictions_mnli.jsonl").read() for r in (f"{family}-mnli", f"{family}-eval")]
    print(family, out["seeds"][0]["squad_v2"]["f1"], again["seeds"][0]["mnli"])
    assert written[0] == written[1] and again["seeds"][0]["steps"] == 0


def test_untrained_model_scores_a_hand_count_of_its_own_predictions(families, data, tmp_path):
    """lr 0 leaves BERT as built (its new head random): the accuracy the run reports is the hand
    count of what the exported model, loaded back alone and fed one example at a time through
    its tokenizer, predicts."""
    out = run(tmp_path, "mnli", families["bert"], data["mnli"], "--train.lr", "0", "--train.run_id", "untrained")
    folder = str(tmp_path / "finetuned" / "untrained" / "seed0" / "model")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(data["mnli"])]
    with torch.no_grad():
        pred = [int(model(**hf_tok(r["premise"], r["hypothesis"], truncation=True, max_length=64, return_tensors="pt")).logits.argmax())
                for r in rows]
    right = sum(p == r["label"] for p, r in zip(pred, rows))
    print(f"predictions {pred}, gold {[r['label'] for r in rows]}: {right} of {len(rows)} right")
    assert out["seeds"][0]["mnli"]["accuracy"] == pytest.approx(100 * right / len(rows))


def test_padded_batch_gives_each_example_its_logits_alone(families, data):
    """One example a row, padded to the batch's longest: each example's logits (GLUE) and
    start/end logits (SQuAD windows) equal those of the example alone, for every family."""
    rows = [json.loads(line) for line in open(data["mnli"])]
    squad_rows = [json.loads(line) for line in open(data["squad_v2"])]
    diffs = {}
    for family, base in families.items():
        hf = finetuner.HFTokens(transformers.AutoTokenizer.from_pretrained(base), base)
        for task, items in (("mnli", finetuner.glue_examples(rows, "mnli", hf, 64, "m")),
                            ("squad_v2", finetuner.squad_features(squad_rows, hf, finetuner.FinetuneConfig(squad_max_len=128, doc_stride=32), "q"))):
            torch.manual_seed(0)
            model = finetuner.build_transformers_model(finetuner.FinetuneConfig(base_model=base), task)
            with torch.no_grad():  # random head weights of a visible size
                for p in model.parameters():
                    if p.ndim == 2 and p.shape[0] <= 3:
                        p.normal_()
            runner = finetuner.Runner(task, finetuner.FinetuneConfig(eval_batch_size=8), CPU, print, tokens=hf)
            runner.prepare(model)
            batched = runner.predict(model, items)[0]
            alone = [runner.predict(model, [it])[0][0] for it in items]
            assert len({len(it["ids"]) for it in items}) > 1  # the batch really is padded
            n = [len(it["ids"]) for it in items]  # SQuAD: logits at the window's own positions (the batch pads more)
            diffs[f"{family} {task}"] = max(float(np.abs(np.asarray(b)[..., :k] - np.asarray(a)[..., :k]).max())
                                            for b, a, k in zip(batched, alone, n))
    print("max |batched - alone|:", diffs)
    assert max(diffs.values()) < 1e-5


def test_blimp_on_a_transformers_masked_lm_equals_the_scorer(families, data, tmp_path):
    """--task blimp on ModernBERT: the PLLs it writes are evals.blimp_scores' with the model's
    own tokenizer and mask token, and one sentence's PLL equals masking each token alone."""
    base = families["modernbert"]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        out = finetuner.main(["--task", "blimp", "--train.base_model", base, "--train.eval_files", data["blimp"],
                              "--train.eval_batch_size", "3", "--train.run_id", "bl"])
    finally:
        os.chdir(old)
    preds = [json.loads(line) for line in open(tmp_path / "finetuned" / "bl" / "predictions_blimp.jsonl")]
    model = transformers.AutoModelForMaskedLM.from_pretrained(base).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    rows = evals.read_blimp(data["blimp"])
    direct = evals.blimp_scores(functools.partial(evals.masked_lm_log_probs, model, hf_tok.mask_token_id), rows, hf_tok, 16)
    assert [p["pll_good"] for p in preds] == pytest.approx(direct["pll_good"], abs=1e-5)
    assert out["accuracy"] == direct["accuracy"] and out["pairs"] == 4
    ids = hf_tok.encode(rows[0]["sentence_good"])
    with torch.no_grad():
        total = sum(model(torch.tensor([ids[:i] + [MASK_ID] + ids[i + 1:]])).logits.log_softmax(-1)[0, i, ids[i]].item()
                    for i in range(1, len(ids) - 1))
    print(f"PLL of {rows[0]['sentence_good']!r}: batched {preds[0]['pll_good']:.5f}, alone {total:.5f}")
    assert total == pytest.approx(preds[0]["pll_good"], abs=1e-4)
