"""The evaluations: GLUE metrics, the official SQuAD v2.0 scorer, BLiMP by pseudo-log-likelihood.

    python finetuner.py --score-squad DATA_FILE PRED_FILE [--na-prob-file F] [--na-prob-thresh T]

finetuner.py scores its runs with these, bench/ scores its models with them, and a notebook
can import them alone: they need numpy, torch and model.py's special token ids, nothing of
training. The SQuAD v2 scorer reproduces the official evaluate-v2.0.py to the last digit; BLiMP
scores any masked LM that reads token ids through a log_probs_fn.
Sections: GLUE metrics -> SQuAD scorer -> jsonl readers -> BLiMP scorer.
"""
import collections
import json
import math
import os
import re
import statistics
import string
import sys
import typing

import numpy as np
import torch
from tqdm import tqdm

from model import CLS_ID, KBERT, MASK_ID, PAD_ID, SEP_ID

# ----------------------------------------------------------------------------------------
# GLUE metrics


def accuracy(pred, gold) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_binary(pred, gold) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = np.sum((pred == 1) & (gold == 1))
    fp, fn = np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, tn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 0) & (gold == 0))
    fp, fn = np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    denom = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def majority_floor(pred, gold, metrics) -> dict:
    """The floor beside a classifier's scores: majority_<metric> for each metric, the score of
    always predicting the evaluated split's most frequent gold label (majority_label; a tie goes
    to the lower label), in percent as the metrics are reported (Matthews' is 0 for any constant
    predictor); and top_prediction_share, the percentage of examples given the classifier's most
    frequent prediction (top_prediction_label): 100 when it predicts one class for everything."""
    labels, counts = np.unique(np.asarray(gold), return_counts=True)
    majority = int(labels[np.argmax(counts)])
    out = {f"majority_{m}": 100 * METRICS[m]([majority] * len(gold), gold) for m in metrics}
    values, counts = np.unique(np.asarray(pred), return_counts=True)
    return {**out, "majority_label": majority, "top_prediction_share": 100 * float(counts.max()) / len(pred),
            "top_prediction_label": int(values[np.argmax(counts)])}


# ----------------------------------------------------------------------------------------
# The official SQuAD v2.0 metric (same arithmetic, same order of summation as evaluate-v2.0.py)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def squad_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    g, p = _tokens(gold), _tokens(pred)
    if not g or not p:
        return int(g == p)
    same = sum((collections.Counter(g) & collections.Counter(p)).values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(g)
    return (2 * precision * recall) / (precision + recall)


def load_squad_gold(path: str) -> collections.OrderedDict:
    """id -> list of gold answer texts ([] = unanswerable), in file order, from the official
    nested JSON (`{"data": [...]}`) or Hub-schema jsonl (`answers: {text, answer_start}`)."""
    gold = collections.OrderedDict()
    if path.endswith(".jsonl"):
        for n, row in enumerate(read_jsonl(path), 1):
            if "id" not in row or "answers" not in row or "text" not in row["answers"]:
                raise SystemExit(f"{path}: row {n}: a SQuAD row needs 'id' and 'answers': {{'text': [...]}} (got {sorted(row)})")
            gold[row["id"]] = list(row["answers"]["text"])
        return gold
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for article in data["data"]:
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    gold[qa["id"]] = [a["text"] for a in qa["answers"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not the official SQuAD JSON ({type(e).__name__}: {e}); expected "
                         "{'data': [{'paragraphs': [{'qas': [{'id', 'answers': [{'text'}]}]}]}]} or a Hub-schema .jsonl") from None
    return gold


def squad_v2_scores(gold: dict, preds: dict, na_probs: dict | None = None, na_prob_thresh: float = 1.0) -> dict:
    """What evaluate-v2.0.py prints (exact, f1, total, HasAns_*, NoAns_*, and best_* with a
    na-prob file), as percentages."""
    has_ans = {qid: bool(answers) for qid, answers in gold.items()}
    # a question without a prediction is scored as an empty answer ("no answer"), what the
    # official script means by its "Missing prediction" note (it then fails on a KeyError)
    preds = {qid: preds.get(qid, "") for qid in gold}
    if na_probs is not None:
        na_probs = {qid: na_probs.get(qid, 0.0) for qid in gold}
    exact_raw, f1_raw = {}, {}
    for qid, answers in gold.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        exact_raw[qid] = max(squad_exact(a, preds[qid]) for a in golds)
        f1_raw[qid] = max(squad_f1(a, preds[qid]) for a in golds)
    probs = na_probs if na_probs is not None else {k: 0.0 for k in preds}

    def threshold(scores):
        return {qid: (float(not has_ans[qid]) if probs[qid] > na_prob_thresh else s) for qid, s in scores.items()}

    exact, f1 = threshold(exact_raw), threshold(f1_raw)

    def summary(qids=None):
        if not qids:
            total = len(exact)
            return [("exact", 100.0 * sum(exact.values()) / total), ("f1", 100.0 * sum(f1.values()) / total), ("total", total)]
        total = len(qids)
        return [("exact", 100.0 * sum(exact[k] for k in qids) / total), ("f1", 100.0 * sum(f1[k] for k in qids) / total),
                ("total", total)]

    out = collections.OrderedDict(summary())
    for prefix, qids in (("HasAns", [k for k, v in has_ans.items() if v]), ("NoAns", [k for k, v in has_ans.items() if not v])):
        if qids:
            out.update((f"{prefix}_{k}", v) for k, v in summary(qids))
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            best, thresh = _best_threshold(preds, raw, na_probs, has_ans)
            out[f"best_{name}"], out[f"best_{name}_thresh"] = best, thresh
    return dict(out)


def _best_threshold(preds, scores, na_probs, has_ans):
    """Sweep the na-prob threshold in ascending order starting from 'predict nothing'."""
    score = best = sum(1 for k in has_ans if not has_ans[k])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        diff = scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
        score += diff
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def score_squad_cli(argv: list[str]):
    """`python finetuner.py --score-squad DATA_FILE PRED_FILE [--na-prob-file F] [--na-prob-thresh T]`"""
    import argparse

    ap = argparse.ArgumentParser(prog="finetuner.py --score-squad", description="Official SQuAD v2.0 scores.")
    ap.add_argument("data_file", help="official dev JSON or Hub-schema jsonl")
    ap.add_argument("pred_file", help="JSON {id: answer text or ''}")
    ap.add_argument("--na-prob-file", "-n", default=None)
    ap.add_argument("--na-prob-thresh", "-t", type=float, default=1.0)
    args = ap.parse_args(argv)
    for p in (args.data_file, args.pred_file, args.na_prob_file):
        if p and not os.path.isfile(p):
            raise SystemExit(f"--score-squad: file {p} does not exist")
    gold = load_squad_gold(args.data_file)
    preds = read_json_object(args.pred_file, str, "{question id: answer text, '' for no answer}")
    if not preds.keys() & gold.keys():  # scored as all empty answers, this would print the no-answer share as F1
        raise SystemExit(f"{args.pred_file}: none of its {len(preds):,} question ids is one of the {len(gold):,} in "
                         f"{args.data_file} ({', '.join(list(preds)[:3]) or 'no ids'} there; {', '.join(list(gold)[:3])} "
                         f"here): predictions for another data file?")
    na_probs = read_json_object(args.na_prob_file, (int, float), "{question id: no-answer probability}") \
        if args.na_prob_file else None
    for what, path, got, fill in (("prediction", args.pred_file, preds, "an empty answer"),
                                  ("no-answer probability", args.na_prob_file, na_probs, "0")):
        missing = [q for q in gold if got is not None and q not in got]
        if missing:
            print(f"{len(missing):,} of {len(gold):,} question ids have no {what} in {path}, e.g. {missing[0]}; "
                  f"they are scored with {fill}", file=sys.stderr)
    print(json.dumps(squad_v2_scores(gold, preds, na_probs, args.na_prob_thresh), indent=2))


def read_json_object(path: str, value_type, shape: str) -> dict:
    """A JSON file holding one object whose values are value_type, or one line saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not JSON ({e}); expected {shape}") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: a JSON {type(obj).__name__}, expected an object {shape}")
    bad = next((k for k, v in obj.items() if not isinstance(v, value_type) or isinstance(v, bool)), None)
    if bad is not None:
        raise SystemExit(f"{path}: the value of {bad!r} is {obj[bad]!r}; expected {shape}")
    return obj

# ----------------------------------------------------------------------------------------
# jsonl readers: GLUE and SQuAD files (Hub schema), BLiMP


def read_jsonl(path: str) -> list[dict]:
    """The rows of a jsonl file (one JSON object a line); a bad line or an empty file exits
    with one line naming the file and the line."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist. Fetch the data with `python data/download_glue.py TASK` or "
                         "`python data/download_squad.py`, or pass --train.train_file/--train.eval_files")
    rows = [row for _, row in jsonl_objects(path)]
    if not rows:
        raise SystemExit(f"{path} holds no rows: an empty file?")
    return rows


def jsonl_objects(path: str):
    """(line number, object) for each non-blank line; a line that is not a JSON object exits
    with one line naming the file and the line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg.removesuffix(' at')}, column {e.colno}): "
                                 f"{line.strip()[:80]}") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{path}:{n}: expected a JSON object, got {line.strip()[:80]}")
            yield n, row


BLIMP_KEYS = ("UID", "field", "linguistics_term", "pairID", "sentence_good", "sentence_bad")


def read_blimp(path: str, pairs_per_paradigm: int = 0) -> list[dict]:
    """BLiMP rows, the first pairs_per_paradigm of each paradigm (UID) in file order (0: all)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist. Fetch BLiMP with `python data/download_blimp.py`, "
                         "or pass --train.eval_files PATH")
    rows, seen = [], collections.Counter()
    for n, row in jsonl_objects(path):
        if not (all(k in row for k in BLIMP_KEYS) and all(
                isinstance(row[k], str) and row[k].strip() for k in ("UID", "field", "sentence_good", "sentence_bad"))):
            raise SystemExit(f"{path}:{n}: a BLiMP row has the keys {', '.join(BLIMP_KEYS)}, with UID, field "
                             f"and both sentences non-empty strings; got {json.dumps(row)[:200]}")
        seen[row["UID"]] += 1
        if not pairs_per_paradigm or seen[row["UID"]] <= pairs_per_paradigm:
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no BLiMP pairs in it")
    return rows


# ----------------------------------------------------------------------------------------
# BLiMP scorer: pseudo-log-likelihoods of minimal pairs
# BLiMP (Warstadt et al., TACL 2020): 67 paradigms x 1,000 pairs of a good and a bad sentence.
# An encoder scores a sentence by its pseudo-log-likelihood (Salazar et al., ACL 2020, "Masked
# Language Model Scoring"): mask each token in turn and add the log-probability of the true
# one. The model comes in as a function, so KBERT and any transformers masked LM are scored by
# the same code (kbert_log_probs, masked_lm_log_probs), each with its own tokenizer's ids.


class Specials(typing.NamedTuple):
    """A tokenizer's special ids as pll_scores uses them: a sentence is cls tokens sep; the
    masked token is replaced by mask; rows are padded with pad; no id of `special` is scored."""
    cls: int
    sep: int
    mask: int
    pad: int
    special: frozenset


KBERT_SPECIALS = Specials(CLS_ID, SEP_ID, MASK_ID, PAD_ID, frozenset((CLS_ID, MASK_ID, SEP_ID, PAD_ID)))


def specials_of(tok) -> Specials:
    """The special ids of KBERT's Tokenizer or of a transformers tokenizer (same attribute names)."""
    if tok.mask_token_id is None:
        raise SystemExit(f"{type(tok).__name__} has no mask token: BLiMP's pseudo-log-likelihoods need a masked LM's tokenizer")
    return Specials(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, frozenset(tok.all_special_ids))


@torch.no_grad()
def pll_scores(log_probs_fn, sentences: list[list[int]], batch_rows: int = 64, device="cpu",
               specials: Specials = KBERT_SPECIALS, progress=None) -> list[float]:
    """Pseudo-log-likelihood of each sentence `[CLS] tokens [SEP]` (a tokenizer's encode: KBERT's
    ids by default; a transformers tokenizer's with its specials_of). Each ordinary (non-special)
    token gets a copy of the sentence of its own with it replaced by [MASK]; the copies of many
    sentences fill batches of batch_rows rows, right-padded with [PAD].
    log_probs_fn(ids (B, T), attention_mask (B, T) bool, False at the padding) returns
    log-probabilities (B, T, V), or (B, V) at each row's [MASK] only, which spares the
    vocabulary head the other positions. Sums are taken in float64. progress(done, total), if
    given, is called with the copies scored after each batch."""
    cls, sep, mask, pad, special = specials
    copies = []  # (sentence, masked position), shortest sentences first so that a batch pads little
    for s in sorted(range(len(sentences)), key=lambda s: len(sentences[s])):
        ids = sentences[s]
        if len(ids) < 2 or ids[0] != cls or ids[-1] != sep or mask in ids or pad in ids:
            raise ValueError(f"sentence {s}: expected [CLS] tokens [SEP] without [MASK] or [PAD], got {ids}")
        copies += [(s, i) for i in range(1, len(ids) - 1) if ids[i] not in special]  # no inner [SEP]
    totals = [0.0] * len(sentences)
    for k in tqdm(range(0, len(copies), batch_rows), desc="pll", unit="batch", leave=False, disable=None):
        chunk = copies[k:k + batch_rows]
        lengths = np.array([len(sentences[s]) for s, _ in chunk])
        ids = np.full((len(chunk), lengths.max()), pad, dtype=np.int64)
        for r, (s, _) in enumerate(chunk):
            ids[r, :len(sentences[s])] = sentences[s]
        real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        rows, pos = np.arange(len(chunk)), np.array([i for _, i in chunk])
        target = torch.from_numpy(ids[rows, pos]).to(device)
        ids[rows, pos] = mask
        ids = torch.from_numpy(ids).to(device)
        out = log_probs_fn(ids, torch.from_numpy(real).to(device))
        if out.dim() == 3:  # every position: keep each row's masked one
            out = out[torch.from_numpy(rows).to(device), torch.from_numpy(pos).to(device)]
        if out.shape[0] != len(chunk):
            raise ValueError(f"log_probs_fn returned {tuple(out.shape)} for {len(chunk)} rows with one [MASK] each")
        for (s, _), v in zip(chunk, out.gather(1, target[:, None])[:, 0].double().tolist()):
            totals[s] += v
        if progress is not None:
            progress(k + len(chunk), len(copies))
    return totals


def blimp_accuracy(rows: list[dict], good: list[float], bad: list[float]) -> dict:
    """Accuracy per paradigm (UID), its mean over the paradigms (the headline, as the BLiMP
    authors report it) and over each field's paradigms, as fractions like the authors' results
    file. A pair is right when good > bad strictly, so a tie is wrong: BLiMP asks for a higher
    probability for the good sentence, and Salazar et al.'s BLiMP accuracy counts
    `float(scores[2*i]) > float(scores[2*i+1])` (awslabs/mlm-scoring, examples/lingacc-blimp/accuracy.py)."""
    right, field = collections.defaultdict(list), {}
    for row, g, b in zip(rows, good, bad, strict=True):
        right[row["UID"]].append(g > b)
        field[row["UID"]] = row["field"].replace("/", "_")  # BLiMP's principle_A_case_2 says "syntax/semantics"
    paradigms = {uid: sum(r) / len(r) for uid, r in right.items()}
    by_field = collections.defaultdict(list)
    for uid, acc in paradigms.items():
        by_field[field[uid]].append(acc)
    return {"accuracy": statistics.fmean(paradigms.values()),
            "fields": {f: statistics.fmean(accs) for f, accs in sorted(by_field.items())},
            "paradigms": paradigms, "pairs": len(rows)}


def blimp_scores(log_probs_fn, rows: list[dict], tok, batch_rows: int = 64, device="cpu", progress=None) -> dict:
    """blimp_accuracy of rows (read_blimp) under log_probs_fn, plus every pair's PLLs. tok is
    KBERT's Tokenizer or the model's transformers tokenizer: its encode(text) gives the ids."""
    pll = pll_scores(log_probs_fn, [tok.encode(r[k]) for r in rows for k in ("sentence_good", "sentence_bad")],
                     batch_rows, device, specials_of(tok), progress)
    return {**blimp_accuracy(rows, pll[0::2], pll[1::2]), "pll_good": pll[0::2], "pll_bad": pll[1::2]}


@torch.no_grad()
def kbert_log_probs(model: KBERT, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """pll_scores' log_probs_fn for KBERT: log-probabilities (N, V) at the N [MASK] positions
    of ids (B, T) in row order, the vocabulary head run at those positions only. attention_mask
    is not needed: a run of [PAD] is a document of its own, which no real token attends to."""
    return model.mlm_logits(model(ids)[ids == MASK_ID]).log_softmax(-1)


@torch.no_grad()
def masked_lm_log_probs(model, mask_id: int, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """pll_scores' log_probs_fn for a transformers masked LM (AutoModelForMaskedLM), with
    functools.partial(masked_lm_log_probs, model, tokenizer.mask_token_id): log-probabilities
    (N, V) at the N mask positions of ids (B, T), in row order, in float32."""
    logits = model(input_ids=ids, attention_mask=attention_mask.long()).logits
    return logits[ids == mask_id].float().log_softmax(-1)
