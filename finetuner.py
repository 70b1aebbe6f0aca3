"""Finetune KBERT, or any transformers encoder, on GLUE and SQuAD (v2.0 and v1.1) and evaluate
it; score a masked LM on BLiMP.

    torchrun --standalone --nproc_per_node=8 finetuner.py --task mnli --train.base_model USER/kbert-base
    python finetuner.py --task squad_v2 --train.base_model exports/RUN_ID
    python finetuner.py --task mnli --train.base_model answerdotai/ModernBERT-base   # a transformers model
    python finetuner.py --task mnli --train.seeds 0,1,2 --train.run_id NAME --train.resume auto  # re-queueable
    python finetuner.py --task blimp --train.base_model exports/RUN_ID [--train.blimp_pairs 100]
    python finetuner.py --score-squad DATA_FILE PRED_FILE [--na-prob-file F] [--na-prob-thresh T]

Data are local files in the Hub schema (data/download_glue.py, data/download_squad.py,
data/download_blimp.py). GLUE examples are packed several to a row with document masks
(each read at its own [CLS]); SQuAD questions become 384-token windows that share 128
context tokens with the next. Metrics are the ones the literature reports, computed by
evals.py (GLUE metrics, the official SQuAD v2 scorer, BLiMP's pseudo-log-likelihoods), which
`--score-squad` runs alone. BLiMP needs no training.
A transformers model (a folder or Hub id that is not a KBERT export) runs through the same
loop: same examples, truncation, batches and order per seed, optimizer groups, schedule,
metrics, seeds, exports; it keeps its own tokenizer and task head (AutoModelFor...), and each
GLUE example gets a row of its own, padded to the batch's longest (an example sees only
itself either way).
Sections: tasks -> hyperparameters -> data -> model -> training and evaluation -> main.
"""
import collections
import dataclasses
import datetime
import difflib
import functools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import common
from common import opt
import evals
import trainer
from model import CLS_ID, KBERT, PAD_ID, PRESETS, SEP_ID, ClassificationHead, ModelConfig, SpanHead
from optimizer import MuonAdamW, decoupled_decay

# ----------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    text_fields: tuple  # one field (single sentence) or two (pair)
    n_labels: int  # 1: regression
    eval_splits: tuple
    metrics: tuple  # first one is the headline


GLUE = {
    "cola": Task(("sentence",), 2, ("validation",), ("matthews",)),
    "sst2": Task(("sentence",), 2, ("validation",), ("accuracy",)),
    "mrpc": Task(("sentence1", "sentence2"), 2, ("validation",), ("f1", "accuracy")),
    "qqp": Task(("question1", "question2"), 2, ("validation",), ("f1", "accuracy")),
    "stsb": Task(("sentence1", "sentence2"), 1, ("validation",), ("pearson", "spearman")),
    "mnli": Task(("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched"), ("accuracy",)),
    "qnli": Task(("question", "sentence"), 2, ("validation",), ("accuracy",)),
    "rte": Task(("sentence1", "sentence2"), 2, ("validation",), ("accuracy",)),
    "wnli": Task(("sentence1", "sentence2"), 2, ("validation",), ("accuracy",)),
}
SQUAD = ("squad_v2", "squad")  # v2.0 (with unanswerable questions) and v1.1
LABEL_NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
               "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"],
               "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
               "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"], "stsb": ["similarity"]}


# ----------------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class FinetuneConfig:
    base_model: str = opt("none", "non-empty")  # folder or Hub id: a KBERT export or any transformers model; "none": random KBERT (tests)
    preset: str = opt("base", " or ".join(PRESETS))  # model preset when base_model is none
    data_dir: str = opt("data", "non-empty")  # GLUE: data/glue/<task>/<split>.jsonl; SQuAD: data/squad/<task>/<split>.jsonl;
    # BLiMP: data/blimp/blimp.jsonl
    train_file: str = ""  # override the training file
    eval_files: str = opt("", "empty or files with distinct names")  # override the evaluation files (comma-separated, named by their stem)
    max_train_examples: int = opt(0, ">= 0")  # use the first N training examples (0: all)
    max_eval_examples: int = opt(0, ">= 0")  # evaluate the first N examples of each eval file (0: all)
    optimizer: str = opt("adamw", "adamw or muon")  # "adamw" (the usual recipe) or "muon" (Muon on hidden matrices, AdamW elsewhere)
    lr: float = opt(5e-5, ">= 0")  # ModernBERT's MNLI choice (sweep 1e-5..8e-5)
    head_lr: float = opt(0.0, ">= 0")  # 0: same as lr
    muon_lr: float = opt(0.002, ">= 0")  # hidden matrices when optimizer=muon
    weight_decay: float = opt(5e-6, "in [0, 1)")  # ModernBERT's MNLI choice, with its semantics (composer's DecoupledAdamW): each step
    # shrinks a weight by weight_decay x the schedule multiplier (lr_t / lr), whatever the lr. adamw decays every
    # parameter; muon only the hidden matrices (embeddings, gains and head not at all, as in pretraining)
    betas: str = opt("0.9,0.98", "2 numbers in [0, 1)")  # ModernBERT's finetuning betas
    warmup_frac: float = opt(0.1, "in [0, 1]")  # linear warm-up, then linear decay to 0
    # passes over the training examples (ModernBERT's MNLI: 1); 0: no training, evaluate base_model, a model
    # finetuned on this task (finetuned/<run_id>/seed<k>/model)
    epochs: float = opt(1.0, ">= 0")
    batch_size: int = opt(64, ">= 1")  # examples (GLUE) or windows (SQuAD) per step, over all ranks (ModernBERT/DeBERTa MNLI: 64)
    max_len: int = opt(256, ">= 5")  # GLUE tokens per example (longest-first truncation); SQuAD uses squad_max_len
    pack_len: int = opt(1024, "> 0 and a multiple of 128")  # GLUE row length into which examples are packed (multiple of 128)
    squad_max_len: int = opt(384, "> 0 and a multiple of 128")  # window length (question + context)
    doc_stride: int = opt(128, ">= 0")  # context tokens shared by consecutive windows (HF run_qa's meaning); must be below the
    # context budget squad_max_len - max_query_len - 3, or the windows could not advance
    max_query_len: int = opt(64, ">= 1")  # SQuAD question tokens kept (the rest truncated)
    max_answer_len: int = opt(30, ">= 1")  # tokens
    n_best: int = opt(20, ">= 1")  # start/end candidates per window
    null_threshold: float = opt(0.0, "finite")  # predict no answer when null score - best span score > this (HF run_qa: 0)
    dropout: float = opt(0.1, "in [0, 1)")  # classifier and block dropout
    seeds: str = opt("0", "distinct integers")  # comma-separated: one run per seed, median and spread reported, the median seed pushed
    eval_batch_size: int = opt(64, ">= 1")  # examples (GLUE), windows (SQuAD) or masked sentence copies (BLiMP) per forward
    blimp_pairs: int = opt(0, ">= 0")  # BLiMP pairs per paradigm, the first N of each in file order so that every model sees the
    # same pairs; 0: all 1,000. With 100, the mean over paradigms has a binomial standard error of at most 0.6 points
    out_dir: str = opt("finetuned", "non-empty")  # predictions, metrics and the model: finetuned/<run_id>/
    hf_repo: str = opt("", "empty or USER/NAME")  # push the median seed's model (its card lists every seed's metrics) to this Hub repo
    run_id: str = opt("", "empty or a file name")  # logs/<run_id>.txt and out_dir/<run_id>/; empty: ft-<task>-<date>-<time>-<random>
    overwrite: bool = False  # reuse an existing run id, writing over its log and outputs
    # "auto": continue --train.run_id (or start it): the seeds it finished are not redone, their saved results go
    # into the summary; a seed that was stopped midway starts over (a seed is minutes to an hour of work)
    resume: str = opt("", "empty or auto")
    compile: bool = False  # CUDA only. Off by default: on torch 2.11 inductor failed to build the fused BlockMask +
    # FlexAttention kernel at finetuning shapes (Triton "XBLOCK is not defined"); eager FlexAttention is correct.
    # The block lists are now built without a sort (model.block_lists); whether that cures it is untested on a GPU
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")  # auto (cuda if available), cpu, cuda or cuda:N
    log_every: int = opt(20, ">= 1")  # steps between loss lines in the log
    # seconds between progress lines (done/total, elapsed, ETA, time of day) in training, evaluation and BLiMP, so that
    # a run off a terminal (no progress bar) shows it is alive; 0: none
    progress_every_s: float = opt(30.0, ">= 0")


GROUPS = {"train": FinetuneConfig}
# options that name, place or launch a run without changing a seed's result
RUN_OPTIONS = ("seeds", "run_id", "resume", "overwrite", "hf_repo", "log_every", "progress_every_s", "device", "out_dir")


# ----------------------------------------------------------------------------------------
# Checks: every option's rule, applied before the log or any file is written


def parse_seeds(text: str) -> list[int]:
    """--train.seeds "0,1,2" -> [0, 1, 2]: distinct integers, or one line."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--train.seeds {text!r}: must be distinct integers, comma-separated (0,1,2)")
    return seeds


def check(cfg: FinetuneConfig, task: str) -> None:
    """Every option against the values its field declares (opt), then the rules that join
    options: the first that fails exits 1 with one line, before the log or any file exists.
    What needs the base model's config.json (check_base_model) or the data files is checked
    next, still before the log."""
    common.check_config(cfg, "train")
    common.check_device(cfg.device)  # CUDA asked for where there is none
    if cfg.resume == "auto" and (not cfg.run_id or task == "blimp"):
        raise SystemExit("--train.resume auto needs --train.run_id NAME (the run to continue)" if task != "blimp" else
                         "--train.resume does not apply to --task blimp (one pass, nothing to resume): drop it")
    if task == "blimp":
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise SystemExit("--task blimp scores on one process (one GPU holds it): run it with python, not torchrun")
        return
    if cfg.epochs == 0 and cfg.base_model == "none":
        raise SystemExit("--train.epochs 0 evaluates a finetuned model: give it as --train.base_model "
                         "(finetuned/<run_id>/seed<k>/model); otherwise --train.epochs must be > 0")
    if cfg.max_len > cfg.pack_len:
        raise SystemExit(f"--train.max_len {cfg.max_len} must not exceed --train.pack_len {cfg.pack_len}")
    if task in SQUAD:
        check_doc_stride(cfg)


# ----------------------------------------------------------------------------------------
# Data


class HFTokens:
    """A transformers model's own fast tokenizer in the finetuner's terms (tokenizer.Tokenizer's,
    for KBERT): pairs with the model's special tokens and longest-first truncation to max_len
    (the rule tokenizer.py follows), segment ids where the model reads them, ordinary ids and
    their character offsets (offset_mapping) for SQuAD windows, and where a pair puts its
    special tokens (prefix a middle b suffix), read from the tokenizer's own encoding of one."""

    def __init__(self, tok, name: str):
        if not tok.is_fast:
            raise SystemExit(f"--train.base_model {name}: its tokenizer ({type(tok).__name__}) is not a fast one; the "
                             "finetuner needs a fast tokenizer's offset_mapping (tokenizer.json)")
        self.tok, self.name = tok, name
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0  # masked out either way
        enc = tok("a", "b")
        seq, ids = enc.sequence_ids(), enc["input_ids"]
        a0, b0 = seq.index(0), seq.index(1)
        a1, b1 = len(seq) - seq[::-1].index(0), len(seq) - seq[::-1].index(1)
        self.prefix, self.middle, self.suffix = ids[:a0], ids[a1:b0], ids[b1:]
        types = enc["token_type_ids"] if "token_type_ids" in tok.model_input_names else None
        # segment ids of (prefix, a token, middle, b token, suffix), or None: the model reads none
        self.types = None if types is None else (types[:a0], types[a0], types[a1:b0], types[b0], types[b1:])

    def pairs(self, texts: list[str], pairs: list[str] | None, max_len: int) -> list[dict]:
        """{"ids"} (and "types") of each text or text pair, as the tokenizer's own call gives them."""
        enc = self.tok(texts, pairs, truncation="longest_first", max_length=max_len)
        if self.types is None:
            return [{"ids": ids} for ids in enc["input_ids"]]
        return [{"ids": ids, "types": types} for ids, types in zip(enc["input_ids"], enc["token_type_ids"])]

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], [tuple(span) for span in enc["offset_mapping"]]

    def window_types(self, n_question: int, n_context: int) -> list[int]:
        prefix, a, middle, b, suffix = self.types
        return prefix + [a] * n_question + middle + [b] * n_context + suffix


def glue_examples(rows: list[dict], task: str, tok, max_len: int, path: str) -> list[dict]:
    """Each row checked, then encoded by tok: KBERT's Tokenizer, or HFTokens for a transformers
    model. Items: {"ids", "label", "idx"}, plus "types" where the model reads segment ids."""
    spec = GLUE[task]
    out, texts = [], []
    for n, row in enumerate(rows):
        missing = [k for k in (*spec.text_fields, "label") if k not in row]
        if missing:
            raise SystemExit(f"{path} row {n}: missing column(s) {missing}; {task} needs {list(spec.text_fields) + ['label']}")
        label = row["label"]
        if spec.n_labels > 1 and label != -1 and not (isinstance(label, int) and 0 <= label < spec.n_labels):
            raise SystemExit(f"{path} row {n}: label {label!r} out of range for {task} (0..{spec.n_labels - 1})")
        if label == -1:
            raise SystemExit(f"{path} row {n}: label -1 (a test split without labels) cannot be used here")
        texts.append([row[k] for k in spec.text_fields])
        out.append({"label": float(label) if spec.n_labels == 1 else int(label), "idx": row.get("idx", n)})
    if isinstance(tok, HFTokens):
        encoded = tok.pairs([t[0] for t in texts], [t[1] for t in texts] if len(spec.text_fields) > 1 else None, max_len) \
            if texts else []
    else:
        encoded = [{"ids": tok.encode(t[0], t[1] if len(t) > 1 else None, max_len=max_len)} for t in texts]
    return [{**e, **o} for e, o in zip(encoded, out)]


def padded_batch(items: list[dict], pad_id: int, device) -> dict:
    """A transformers model's batch: one example (GLUE) or window (SQuAD) a row, right-padded to
    the longest -> input_ids, attention_mask and, where the items carry them, token_type_ids (B, T)."""
    T = max(len(it["ids"]) for it in items)
    ids = np.full((len(items), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), T), dtype=np.int64)
    types = np.zeros((len(items), T), dtype=np.int64) if "types" in items[0] else None
    for r, it in enumerate(items):
        ids[r, :len(it["ids"])] = it["ids"]
        mask[r, :len(it["ids"])] = 1
        if types is not None:
            types[r, :len(it["ids"])] = it["types"]
    batch = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types).to(device)
    return batch


def pack_rows(examples: list[dict], pack_len: int) -> list[list[int]]:
    """First-fit packing of examples (each starting with [CLS]) into rows of pack_len;
    returns, per row, the indices of the examples it holds, in order."""
    rows, space = [], []
    for i, ex in enumerate(examples):
        n = len(ex["ids"])
        if n > pack_len:
            raise ValueError(f"example of {n} tokens does not fit --train.pack_len {pack_len}")
        for r, s in enumerate(space):
            if n <= s:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(pack_len - n)
    return rows


def glue_batch(examples: list[dict], pack_len: int, device, round_rows: bool = False):
    """Pack examples into rows -> ids (R, pack_len), flat [CLS] positions (N,) and the example
    order those positions follow. round_rows pads R to a power of two with [PAD] rows, so a
    compiled model sees few distinct shapes."""
    rows = pack_rows(examples, pack_len)
    n_rows = 1 << (len(rows) - 1).bit_length() if round_rows else len(rows)
    ids = np.full((n_rows, pack_len), PAD_ID, dtype=np.int64)
    cls_pos, order = [], []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            seq = examples[i]["ids"]
            ids[r, at:at + len(seq)] = seq
            cls_pos.append(r * pack_len + at)
            order.append(i)
            at += len(seq)
    return torch.from_numpy(ids).to(device), torch.tensor(cls_pos, device=device), order


def check_doc_stride(cfg: FinetuneConfig, n_special: int = 3):
    """The longest question leaves squad_max_len - max_query_len - n_special (KBERT: [CLS], 2 x
    [SEP]) context tokens per window; consecutive windows share doc_stride of them, so they must
    be fewer."""
    budget = cfg.squad_max_len - cfg.max_query_len - n_special
    if budget <= cfg.doc_stride:
        raise SystemExit(f"--train.doc_stride {cfg.doc_stride} (the overlap of consecutive windows) must be below the "
                         f"context budget {budget} = --train.squad_max_len {cfg.squad_max_len} - --train.max_query_len "
                         f"{cfg.max_query_len} - {n_special}; lower doc_stride or max_query_len, or raise squad_max_len")


def squad_features(rows: list[dict], tok, cfg: FinetuneConfig, path: str, v1: bool = False) -> list[dict]:
    """Windows `[CLS] question [SEP] context piece [SEP]` of squad_max_len tokens, each
    context piece sharing doc_stride tokens with the next (Hugging Face run_qa's stride), so
    every context token is in some window. Labels: token indices of the answer's first and
    last tokens, or 0 ([CLS]) when the question is unanswerable or the answer is not
    entirely inside the window. With HFTokens (a transformers model) the special tokens are
    that tokenizer's, laid out as it lays out a pair, and each window carries its segment ids
    where the model reads them; the windows, the stride and the labels follow the same rule."""
    prefix, middle, suffix = (tok.prefix, tok.middle, tok.suffix) if isinstance(tok, HFTokens) else ([CLS_ID], [SEP_ID], [SEP_ID])
    if len(prefix) != 1 or len(suffix) != 1:  # the no-answer score is read at position 0, the context ends before the last
        raise SystemExit(f"--train.base_model {tok.name}: its tokenizer lays a pair out as {len(prefix)} special token(s), "
                         f"a, {len(middle)}, b, {len(suffix)}; SQuAD windows need one before the question and one at the end")
    n_special = len(prefix) + len(middle) + len(suffix)
    check_doc_stride(cfg, n_special)
    feats, encoded = [], {}  # a context is shared by many questions: tokenize it once
    for n, row in enumerate(rows):
        for k in ("id", "context", "question", "answers"):
            if k not in row:
                raise SystemExit(f"{path} row {n}: missing column {k!r} (SQuAD rows need id, context, question, answers)")
        context, answers = row["context"], row["answers"]
        if row.get("is_impossible") and answers["text"]:
            raise SystemExit(f"{path} row {n} (id {row['id']}): marked is_impossible but carries an answer; "
                             "an unanswerable question must have empty answers")
        if len(answers["text"]) != len(answers["answer_start"]):
            raise SystemExit(f"{path} row {n} (id {row['id']}): answers.text and answers.answer_start differ in length")
        if not context.strip():
            raise SystemExit(f"{path} row {n} (id {row['id']}): empty context")
        if v1 and len(answers["text"]) == 0:
            raise SystemExit(f"{path} row {n}: SQuAD v1.1 question without an answer")
        q_ids = tok.encode_ordinary(row["question"])[: cfg.max_query_len]
        if context not in encoded:
            encoded[context] = tok.encode_with_offsets(context)
        c_ids, spans = encoded[context]
        budget = cfg.squad_max_len - len(q_ids) - n_special
        first = last = None  # the answer's first and last context tokens
        if answers["text"]:
            text, start_char = answers["text"][0], answers["answer_start"][0]
            if not text.strip():
                raise SystemExit(f"{path} row {n} (id {row['id']}): empty answer text; an unanswerable question has no answers")
            if context[start_char:start_char + len(text)] != text:
                start_char = context.find(text)
                if start_char < 0:
                    raise SystemExit(f"{path} row {n} (id {row['id']}): answer {text!r} is not in the context")
            end_char = start_char + len(text)
            first = next(i for i, sp in enumerate(spans) if sp[1] > start_char)
            last = next(i for i in reversed(range(len(spans))) if spans[i][0] < end_char)
        step = budget - cfg.doc_stride  # >= 1: a question of at most max_query_len leaves at least the checked budget
        offset = 0
        while True:
            piece = slice(offset, min(offset + budget, len(c_ids)))
            ids = prefix + q_ids + middle + c_ids[piece] + suffix
            ctx0 = len(prefix) + len(q_ids) + len(middle)  # index of the first context token in the window
            start = end = 0
            if first is not None and piece.start <= first <= last < piece.stop:  # the whole answer is inside
                start, end = ctx0 + first - piece.start, ctx0 + last - piece.start
            feats.append({"qid": row["id"], "ids": ids, "start": start, "end": end, "ctx0": ctx0,
                          "spans": spans[piece], "context": context})
            if isinstance(tok, HFTokens) and tok.types is not None:
                feats[-1]["types"] = tok.window_types(len(q_ids), piece.stop - piece.start)
            if piece.stop >= len(c_ids):
                break
            offset += step
    return feats


def squad_batch(feats: list[dict], length: int, device, n_rows: int = 0):
    """Windows -> ids (R, length), valid positions ([CLS] and context), start/end labels;
    R = max(len(feats), n_rows), extra rows all [PAD] (a fixed shape for a compiled model)."""
    R = max(len(feats), n_rows)
    ids = np.full((R, length), PAD_ID, dtype=np.int64)
    valid = np.zeros((R, length), dtype=bool)
    for r, f in enumerate(feats):
        ids[r, :len(f["ids"])] = f["ids"]
        valid[r, 0] = True
        valid[r, f["ctx0"]:len(f["ids"]) - 1] = True
    starts = torch.tensor([f["start"] for f in feats], device=device)  # labels for the real rows only
    ends = torch.tensor([f["end"] for f in feats], device=device)
    return torch.from_numpy(ids).to(device), torch.from_numpy(valid).to(device), starts, ends


def squad_postprocess(feats: list[dict], start_logits: list[np.ndarray], end_logits: list[np.ndarray], cfg) -> tuple[dict, dict]:
    """Per question: the best span over its windows (n-best starts x ends, start <= end,
    length <= max_answer_len), mapped back to the exact context characters, and the no-answer
    score diff = min over windows of the [CLS] score - the best span score."""
    best = {}  # qid -> (score, text)
    null = {}
    for f, s, e in zip(feats, start_logits, end_logits):
        qid, n_ids = f["qid"], len(f["ids"])
        null[qid] = min(null.get(qid, math.inf), float(s[0] + e[0]))
        lo, hi = f["ctx0"], n_ids - 1  # context token positions [lo, hi)
        if hi <= lo:
            continue
        cs, ce = s[lo:hi], e[lo:hi]
        top_s = np.argsort(-cs)[:cfg.n_best]
        top_e = np.argsort(-ce)[:cfg.n_best]
        for i in top_s:
            for j in top_e:
                if j < i or j - i + 1 > cfg.max_answer_len:
                    continue
                score = float(cs[i] + ce[j])
                if qid not in best or score > best[qid][0]:
                    a, b = f["spans"][i][0], f["spans"][j][1]
                    best[qid] = (score, f["context"][a:b].strip())
    preds, diffs = {}, {}
    for qid in null:
        score, text = best.get(qid, (-math.inf, ""))
        diffs[qid] = null[qid] - score if math.isfinite(score) else math.inf
        preds[qid] = text
    return preds, diffs


# ----------------------------------------------------------------------------------------
# Model: KBERT encoder + task head, or a transformers model with its own head


class TaskModel(torch.nn.Module):
    """The encoder and its task head, saved and loaded together (the Runner calls each)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head


def read_base_config(name: str) -> tuple[str, dict]:
    """("kbert" or "transformers", config.json) of --train.base_model: "kbert" for none and KBERT
    exports (model_type kbert, or the old format's architecture KBERT), "transformers" for any
    other model folder or Hub repo. A name that looks like a path (common.looks_like_path) is a
    path: a missing folder is one line, never a question to the Hub."""
    if name == "none":
        return "kbert", {}
    if common.looks_like_path(name):
        if not os.path.isdir(name):
            raise SystemExit(f"--train.base_model {name}: no such folder")
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--train.base_model {name}: no config.json in it; give an export or a save_pretrained folder")
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, "config.json")
        except Exception as e:
            raise SystemExit(f"--train.base_model {name}: not a local folder, and its config.json could not be fetched "
                             f"from the Hugging Face Hub ({type(e).__name__}); for a folder write ./{name}") from None
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--train.base_model {name}: config.json is not JSON ({e})") from None
    return ("kbert" if config.get("model_type") == "kbert" or config.get("architecture") == "KBERT" else "transformers"), config


def finetuned_on(kind: str, config: dict) -> str | None:
    """The task a finetuned model's config.json names (None: not finetuned here)."""
    return config.get("finetuning_task") if kind == "transformers" else config.get("kbert", config).get("task")


def build_encoder(cfg: FinetuneConfig, seed: int) -> KBERT:
    """The pretrained encoder (base_model), or a random one of cfg.preset (base_model none)."""
    if cfg.base_model == "none":
        encoder = KBERT(ModelConfig(preset=cfg.preset, dropout=cfg.dropout))
        encoder.init_weights(seed=seed)
        return encoder
    try:
        return trainer.load_encoder(cfg.base_model, dropout=cfg.dropout)[0]
    except FileNotFoundError as e:  # a missing folder or an unreachable Hub id: the message says which
        raise SystemExit(f"--train.base_model: {e}") from None


def build_model(cfg: FinetuneConfig, task: str, seed: int, kind: str = "kbert"):
    """A new head on the pretrained (or random) encoder; with --train.epochs 0, the finetuned
    export base_model as it is, head included, to be evaluated. kind "transformers": the model
    with transformers' own head (build_transformers_model)."""
    torch.manual_seed(seed)
    if kind == "transformers":
        return build_transformers_model(cfg, task)
    if cfg.epochs == 0:
        model, config = load_finetuned(cfg.base_model)
        if config.get("task") != task:
            raise SystemExit(f"--train.epochs 0 evaluates a model finetuned on {task}, but {cfg.base_model} was "
                             f"finetuned on {config.get('task')!r}")
        return model
    encoder = build_encoder(cfg, seed)
    return TaskModel(encoder, make_head(task, encoder.cfg.d_model, cfg.dropout))


def make_head(task: str, d_model: int, dropout: float = 0.1):
    return SpanHead(d_model) if task in SQUAD else ClassificationHead(d_model, GLUE[task].n_labels, dropout)


def build_transformers_model(cfg: FinetuneConfig, task: str):
    """transformers' own head on base_model, in float32 (bf16 autocast on CUDA, as for KBERT):
    AutoModelForSequenceClassification with the task's labels (STS-B: one output, problem type
    regression) or AutoModelForQuestionAnswering; a new head starts from torch's RNG, seeded by
    build_model. The dropout is the model config's own. With --train.epochs 0, base_model is a
    model finetuned on this task and loads with its head."""
    import transformers

    if task in SQUAD:
        return transformers.AutoModelForQuestionAnswering.from_pretrained(cfg.base_model, dtype=torch.float32)
    labels = LABEL_NAMES[task]
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        cfg.base_model, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if len(labels) == 1 else "single_label_classification")


def encoder_and_head(model) -> tuple[list, list]:
    """The parameters of the encoder and of the task head: a TaskModel's two parts, or a
    transformers model's base model (BERT's pooler included) and the rest (its head)."""
    if isinstance(model, TaskModel):
        return list(model.encoder.parameters()), list(model.head.parameters())
    encoder = {id(p) for p in model.base_model.parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) in encoder], [p for p in params if id(p) not in encoder]


def build_ft_optimizer(model, cfg: FinetuneConfig) -> MuonAdamW:
    """AdamW on the encoder (lr) and the head (head_lr) with decoupled weight decay, for KBERT and
    transformers models alike; optimizer muon (KBERT only): trainer's groups plus the head."""
    betas = trainer.parse_betas(cfg.betas, "--train.betas")
    head_lr = cfg.head_lr or cfg.lr
    if cfg.optimizer == "muon":  # trainer's groups: weight decay on the Muon matrices only
        if not isinstance(model, TaskModel):
            raise SystemExit("--train.optimizer muon splits KBERT's own parameter names; a transformers model takes adamw")
        t = trainer.TrainConfig(lr_muon=cfg.muon_lr, lr_embed=cfg.lr, lr_scalar=cfg.lr,
                                weight_decay=decoupled_decay(cfg.weight_decay, cfg.muon_lr), adam_betas=cfg.betas)
        opt = trainer.build_optimizer(model.encoder, t, extra_adam=[(list(model.head.parameters()), head_lr)])
        for g in opt.param_groups:
            g["name"] = "head" if g["name"] == "extra0" else g["name"]
        return opt
    if cfg.optimizer != "adamw":
        raise SystemExit(f"--train.optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    encoder, head = encoder_and_head(model)
    groups = [dict(kind="adamw", name="encoder", params=encoder, lr=cfg.lr, betas=betas, eps=1e-6,
                   weight_decay=decoupled_decay(cfg.weight_decay, cfg.lr)),
              dict(kind="adamw", name="head", params=head, lr=head_lr, betas=betas, eps=1e-6,
                   weight_decay=decoupled_decay(cfg.weight_decay, head_lr))]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return MuonAdamW(groups, params_expected=list(model.parameters()))


def model_card(task: str, cfg: FinetuneConfig, metrics_md: str, transformers: bool = False) -> str:
    if transformers:
        cls = "AutoModelForQuestionAnswering" if task in SQUAD else "AutoModelForSequenceClassification"
        return (f"---\nlibrary_name: transformers\ntags: [{task}]\n---\n# {cfg.base_model} finetuned on {task}\n\n"
                f"Finetuned by KBERT's finetuner.py (transformers' own {cls} head). Labels: "
                f"{LABEL_NAMES.get(task, ['start', 'end'])}.\n\n```python\nfrom transformers import AutoTokenizer, {cls}\n\n"
                f"model = {cls}.from_pretrained(\"path/to/this/folder\")\n"
                f"tok = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```\n\n## Metrics\n{metrics_md}\n\n"
                f"## Command\n`finetuner.py {' '.join(sys.argv[1:])}`\n")
    head = "span" if task in SQUAD else "classification"
    return (f"---\nlibrary_name: transformers\ntags: [kbert, {task}]\n---\n# KBERT finetuned on {task}\n\n"
            f"Base model: `{cfg.base_model}`. Labels: {LABEL_NAMES.get(task, ['start', 'end'])}.\n\n"
            f"{common.transformers_usage(cfg.hf_repo or 'path/to/this/folder', head)}\n"
            f"In KBERT's repo: `model, config = finetuner.load_finetuned(FOLDER)`.\n\n## Metrics\n"
            f"{metrics_md}\n\n## Command\n`finetuner.py {' '.join(sys.argv[1:])}`\n")


def seeds_table(per_seed: list[dict], summary: dict) -> str:
    """Markdown: one row per seed, then median, min, max and std, one column per split/metric."""
    cols = [(name, *name.rsplit("/", 1)) for name in summary]  # (name, split, metric)
    lines = ["| seed | " + " | ".join(name for name, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r[split][k]:.2f}" for _, split, k in cols) + " |" for r in per_seed]
    lines += [f"| {label} | " + " | ".join(f"{summary[name][stat]:.2f}" for name, _, _ in cols) + " |"
              for label, stat in (("median", "median"), ("min", "min"), ("max", "max"), ("std (population)", "std"))]
    return "\n".join(lines)


def export_finetuned(model: TaskModel, task: str, metrics: dict, folder: str, cfg: FinetuneConfig, log):
    """One seed's model with a card of its own metrics (run_task rewrites the median seed's card):
    a Hugging Face folder for AutoModelForSequenceClassification (GLUE) or
    AutoModelForQuestionAnswering (SQuAD), see common.save_pretrained."""
    state = dict(model.encoder.state_dict())
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    config = {"model": model.encoder.cfg.to_dict(), "task": task, "head": "span" if task in SQUAD else "classification",
              "labels": LABEL_NAMES.get(task, ["start", "end"]), "base_model": cfg.base_model, "metrics": metrics}
    card = model_card(task, cfg, f"```json\n{json.dumps(metrics, indent=2)}\n```")
    common.save_pretrained(folder, state, config, card, max_len=cfg.squad_max_len if task in SQUAD else cfg.max_len, log=log)
    log(f"saved finetuned model to {folder}")


def export_transformers(model, tok, task: str, metrics: dict, folder: str, cfg: FinetuneConfig, log):
    """One seed's transformers model: save_pretrained of the model (finetuning_task set) and of its
    tokenizer, and a card; loads with AutoModelForSequenceClassification/AutoModelForQuestionAnswering.
    Written into folder.tmp and renamed, as common.save_pretrained does."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.finetuning_task = task
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(task, cfg, f"```json\n{json.dumps(metrics, indent=2)}\n```", transformers=True))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log(f"saved finetuned model to {folder}")


def load_finetuned(folder: str) -> tuple[TaskModel, dict]:
    try:
        encoder, config = trainer.load_encoder(folder)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    task = config.get("task")
    if task not in GLUE and task not in SQUAD:
        raise SystemExit(f"{folder}: config.json names no finetuned task")
    head = make_head(task, encoder.cfg.d_model)
    head.load_state_dict(config.pop("extra_state"))
    return TaskModel(encoder, head), config


def seed_summary(per_seed: list[dict], splits) -> dict:
    """"split/metric" -> median, min, max, std and n over the seeds' results (throughput and
    threshold entries left out). std is the population one (divides by n): the spread of
    these seeds, defined for a single seed too."""
    out = {}
    for split in splits:
        keys = [k for k, v in per_seed[0][split].items() if isinstance(v, (int, float)) and "per_s" not in k and "thresh" not in k]
        for k in keys:
            vals = [r[split][k] for r in per_seed]
            out[f"{split}/{k}"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                   "std": statistics.pstdev(vals), "n": len(vals)}
    return out


def median_seed(per_seed: list[dict], split: str, metric: str) -> dict:
    """The result of the seed with the median metric; for an even count the lower of the two
    middle ones, so the model pushed never scores above the median it is reported with."""
    return sorted(per_seed, key=lambda r: r[split][metric])[(len(per_seed) - 1) // 2]


# ----------------------------------------------------------------------------------------
# Training and evaluation


def clock() -> str:
    """The time of day that starts every step, progress and result line of the finetuner's log."""
    return datetime.datetime.now().strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line every every_s seconds (none with 0): what, done/total, elapsed time and an
    ETA at the rate so far, with the time of day. For runs off a terminal, where the progress
    bars are off and a long pass would otherwise print nothing for minutes."""

    def __init__(self, log, what: str, unit: str, every_s: float):
        self.log, self.what, self.unit, self.every_s = log, what, unit, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int):
        now = time.perf_counter()
        if not self.every_s or not 0 < done < total or now - self.last < self.every_s:
            return
        self.last, elapsed = now, now - self.t0
        self.log(f"{clock()} {self.what} {done}/{total} {self.unit} elapsed:{duration(elapsed)} "
                 f"eta:{duration(elapsed / done * (total - done))}")


class Runner:
    """One finetuning run (one seed) of one task, on 1 or N ranks. The model is KBERT's TaskModel
    (GLUE examples packed into rows, SQuAD windows of squad_max_len) or, with `tokens` (HFTokens),
    a transformers model fed one example or window a row, padded to the batch's longest."""

    def __init__(self, task, cfg, d: common.Dist, log, signals: common.StopSignals | None = None, resume_cmd: str = "",
                 tokens: HFTokens | None = None):
        self.task, self.cfg, self.d, self.log = task, cfg, d, log
        self.signals, self.resume_cmd = signals, resume_cmd
        self.tokens, self.hf = tokens, tokens is not None
        self.cuda = d.device.type == "cuda"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    def prepare(self, model):
        """Compile KBERT's encoder on CUDA (static shapes: GLUE rows of pack_len, SQuAD windows);
        a transformers model runs as it is."""
        self.compiled = self.cuda and self.cfg.compile and not self.hf
        self.fixed_rows = -(-self.cfg.batch_size // self.d.world) if self.compiled else 0
        if not self.hf:
            self.encoder_fn = torch.compile(model.encoder, dynamic=False) if self.compiled else model.encoder

    def encode(self, model, ids):
        with self.amp:
            return self.encoder_fn(ids)

    def hf_outputs(self, model, batch_items, **labels):
        """A transformers model's forward on batch_items (padded_batch), with its own loss when
        labels are given (labels=..., or start_positions=/end_positions=)."""
        batch = padded_batch(batch_items, self.tokens.pad_id, self.d.device)
        with self.amp:
            return model(**batch, **labels)

    def loss_on(self, model, batch_items):
        if self.hf:  # transformers' own loss: mean cross-entropy (start and end for SQuAD) or MSE
            as_tensor = lambda key, dtype: torch.tensor([it[key] for it in batch_items], device=self.d.device, dtype=dtype)
            if self.task in SQUAD:
                out = self.hf_outputs(model, batch_items, start_positions=as_tensor("start", torch.long),
                                      end_positions=as_tensor("end", torch.long))
            else:
                out = self.hf_outputs(model, batch_items, labels=as_tensor(
                    "label", torch.float32 if GLUE[self.task].n_labels == 1 else torch.long))
            return out.loss.float() * len(batch_items)
        if self.task in SQUAD:
            n = len(batch_items)
            ids, valid, s, e = squad_batch(batch_items, self.cfg.squad_max_len, self.d.device, self.fixed_rows)
            with self.amp:
                start, end = model.head(self.encode(model, ids))
            return SpanHead.loss(start[:n], end[:n], s, e, valid[:n]) * n
        ids, cls_pos, order = glue_batch(batch_items, self.cfg.pack_len, self.d.device, self.compiled)
        h = self.encode(model, ids)
        with self.amp:
            logits = model.head(h.flatten(0, 1)[cls_pos])
        dtype = torch.float32 if GLUE[self.task].n_labels == 1 else torch.long
        labels = torch.tensor([batch_items[i]["label"] for i in order], device=self.d.device, dtype=dtype)
        return model.head.loss(logits, labels) * len(batch_items)

    def stop_if_asked(self, where: str):
        """After a step (or a seed): if a rank got SIGTERM/SIGINT, every rank stops here (one
        small all-reduce, so all ranks agree) with the command that resumes."""
        if self.signals is None:
            return
        asked = self.signals.requested
        if self.d.world > 1:
            asked = common.all_reduce_sum(torch.tensor([float(asked)], device=self.d.device), self.d).item() > 0
        if asked:
            self.log(f"{where}: stopped by {self.signals.name}; the finished seeds are saved (seed<k>/result.json and "
                     f"model), an unfinished one starts over; resume with: {self.resume_cmd}")
            raise SystemExit(self.signals.exit_code)

    def fit(self, model, train_items, seed):
        cfg, d = self.cfg, self.d
        self.prepare(model)
        steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
        steps = max(1, round(cfg.epochs * steps_per_epoch))
        opt = build_ft_optimizer(model, cfg)
        rng = np.random.default_rng(seed)
        order = []
        model.train()
        t0, seen = time.perf_counter(), 0
        progress = Progress(self.log, f"seed:{seed} training", "steps", cfg.progress_every_s)
        for step in range(steps):
            if len(order) < cfg.batch_size:
                order += list(rng.permutation(len(train_items)))
            batch = [train_items[i] for i in order[:cfg.batch_size]]
            del order[:cfg.batch_size]
            mult = trainer.lr_schedule(step, steps, cfg.warmup_frac, 1.0)  # warm-up, then linear decay to 0
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
            mine = batch[d.rank::d.world]  # this rank's share; loss scaled so the all-reduced mean is the global mean
            loss = self.loss_on(model, mine) * d.world / len(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(batch)
            self.stop_if_asked(f"seed:{seed} step:{step + 1}/{steps}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                lv = common.all_reduce_sum(loss.detach().float(), d).item() / d.world
                if not math.isfinite(lv):
                    raise SystemExit(f"step {step + 1}: loss is {lv}; lower --train.lr")
                dt = time.perf_counter() - t0
                lrs = " ".join(f"lr_{g['name']}:{g['lr']:.3g}" for g in opt.param_groups)  # this step's, as trainer.py logs
                self.log(f"{clock()} seed:{seed} step:{step + 1}/{steps} loss:{lv:.4f} {lrs} examples/s:{seen / dt:.1f}")
            else:
                progress(step + 1, steps)
        return {"steps": steps, "train_examples_per_s": seen / (time.perf_counter() - t0)}

    @torch.no_grad()
    def predict(self, model, items, what: str = "evaluation"):
        """Outputs for items (this rank's share, gathered on every rank): class logits /
        regression values for GLUE, (start, end) logits per window for SQuAD."""
        model.eval()
        d, bs = self.d, self.cfg.eval_batch_size
        mine = list(range(d.rank, len(items), d.world))
        outs = {}
        t0 = time.perf_counter()
        progress = Progress(self.log, what, "examples" if self.task in GLUE else "windows", self.cfg.progress_every_s)
        # a progress bar on a terminal only: redirected to a file its carriage returns garble the log
        for k in tqdm(range(0, len(mine), bs), desc="eval", disable=None if d.master else True, leave=False):
            progress(k, len(mine))
            idx = mine[k:k + bs]
            batch = [items[i] for i in idx]
            if self.hf:
                out = self.hf_outputs(model, batch)
                if self.task in SQUAD:
                    for i, si, ei in zip(idx, out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()):
                        outs[i] = (si, ei)
                else:
                    for i, logits in zip(idx, out.logits.float().cpu().numpy()):
                        outs[i] = logits
            elif self.task in SQUAD:
                ids, valid, _, _ = squad_batch(batch, self.cfg.squad_max_len, d.device, bs if self.compiled else 0)
                with self.amp:
                    s, e = model.head(self.encode(model, ids))
                for i, si, ei in zip(idx, s.float().cpu().numpy(), e.float().cpu().numpy()):
                    outs[i] = (si, ei)
            else:
                ids, cls_pos, order = glue_batch(batch, self.cfg.pack_len, d.device, self.compiled)
                h = self.encode(model, ids)
                with self.amp:
                    logits = model.head(h.flatten(0, 1)[cls_pos]).float().cpu().numpy()
                for j, o in enumerate(order):
                    outs[idx[o]] = logits[j]
        rate = len(mine) / max(1e-9, time.perf_counter() - t0)
        if d.world > 1:
            gathered = [None] * d.world
            torch.distributed.all_gather_object(gathered, outs)
            outs = {k: v for part in gathered for k, v in part.items()}
        model.train()
        return [outs[i] for i in range(len(items))], rate * d.world

    def evaluate(self, model, split_name, rows, items, out_dir):
        outs, rate = self.predict(model, items, f"evaluation of {split_name}")
        if self.task in SQUAD:
            preds, diffs = squad_postprocess(items, [o[0] for o in outs], [o[1] for o in outs], self.cfg)
            gold = collections.OrderedDict((r["id"], list(r["answers"]["text"])) for r in rows)
            finite = {q: (v if math.isfinite(v) else 1e9) for q, v in diffs.items()}
            # one scoring pass: the headline at the fixed threshold (none for v1.1, where every
            # question has an answer) and best_* from the official threshold sweep
            thresh = math.inf if self.task == "squad" else self.cfg.null_threshold
            scores = evals.squad_v2_scores(gold, preds, finite, thresh)
            scores["headline_threshold"] = None if self.task == "squad" else thresh  # v1.1: no null answers
            thresholded = {q: ("" if finite[q] > thresh else p) for q, p in preds.items()}
            if self.d.master:
                os.makedirs(out_dir, exist_ok=True)
                json.dump(thresholded, open(os.path.join(out_dir, f"predictions_{split_name}.json"), "w"))
                json.dump(preds, open(os.path.join(out_dir, f"predictions_nonnull_{split_name}.json"), "w"))
                json.dump(finite, open(os.path.join(out_dir, f"na_probs_{split_name}.json"), "w"))
        else:
            spec = GLUE[self.task]
            gold = [it["label"] for it in items]
            pred = [float(o[0]) for o in outs] if spec.n_labels == 1 else [int(np.argmax(o)) for o in outs]
            scores = {m: 100 * evals.METRICS[m](pred, gold) for m in spec.metrics}
            if spec.n_labels > 1:  # the floor a small model's numbers stand on: a constant predictor's
                floor = evals.majority_floor(pred, gold, spec.metrics)
                majority, top = floor.pop("majority_label"), floor.pop("top_prediction_label")
                scores.update(floor, majority_class=LABEL_NAMES[self.task][majority], top_prediction=LABEL_NAMES[self.task][top])
            if self.d.master:
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, f"predictions_{split_name}.jsonl"), "w") as f:
                    for it, p in zip(items, pred):
                        f.write(json.dumps({"idx": it["idx"], "prediction": p, "label": it["label"]}) + "\n")
        scores["eval_examples_per_s"] = rate
        return scores


def task_files(task: str, cfg: FinetuneConfig) -> tuple[str, dict]:
    folder = os.path.join(cfg.data_dir, "squad" if task in SQUAD else "glue", task)
    train = cfg.train_file or os.path.join(folder, "train.jsonl")
    if cfg.eval_files:
        evals = {os.path.splitext(os.path.basename(p))[0]: p for p in cfg.eval_files.split(",")}
    else:
        splits = ("validation",) if task in SQUAD else GLUE[task].eval_splits
        evals = {s: os.path.join(folder, f"{s}.jsonl") for s in splits}
    return train, evals


def start_run(prefix: str, cfg: FinetuneConfig, d: common.Dist, resumable: bool = True) -> tuple[str, common.RunLog, str]:
    """The run id (the same on every rank), its log (not written yet) and output folder; an
    existing run's id is refused unless --train.overwrite or --train.resume auto."""
    run_id = common.agree(cfg.run_id or common.new_run_id(prefix), d)
    log, out_root = common.RunLog(run_id, d.master), os.path.join(cfg.out_dir, run_id)
    if not cfg.overwrite and cfg.resume != "auto":
        hint = f"continue it with --train.resume auto --train.run_id {run_id}, " if resumable else ""
        common.refuse_existing_run(run_id, [log.path, out_root], hint, d)
    return run_id, log, out_root


def export_bytes(cfg: FinetuneConfig) -> int:
    """The size of one seed's exported model: the base model's weights file, or the preset's
    fp32 weights counted on the meta device; 0 (unknown) for a Hub id."""
    if cfg.base_model == "none":
        with torch.device("meta"):
            return sum(p.numel() * p.element_size() for p in KBERT(ModelConfig(preset=cfg.preset)).parameters())
    path = os.path.join(cfg.base_model, "model.safetensors")
    return os.path.getsize(path) if os.path.isfile(path) else 0


def check_base_model(task: str, cfg: FinetuneConfig, kind: str, config: dict):
    """What base_model's config.json decides before anything is written: with --train.epochs 0 it
    must be finetuned on this task; a transformers model takes adamw, runs uncompiled and must
    have positions for the longest sequence."""
    if cfg.epochs == 0 and finetuned_on(kind, config) != task:
        raise SystemExit(f"--train.epochs 0 evaluates a model finetuned on {task}, but {cfg.base_model} was "
                         f"finetuned on {finetuned_on(kind, config)!r}")
    if kind != "transformers":
        return
    if cfg.optimizer != "adamw":
        raise SystemExit(f"--train.optimizer {cfg.optimizer}: Muon's groups are KBERT's parameter names; "
                         f"{cfg.base_model} is a transformers model: use adamw")
    if cfg.compile:
        raise SystemExit(f"--train.compile true applies to KBERT; {cfg.base_model} (a transformers model) runs uncompiled")
    longest, option = (cfg.squad_max_len, "squad_max_len") if task in SQUAD else (cfg.max_len, "max_len")
    if longest > config.get("max_position_embeddings", longest):
        raise SystemExit(f"--train.{option} {longest} is longer than {cfg.base_model}'s max_position_embeddings "
                         f"{config['max_position_embeddings']}")


def load_tokenizer(name: str):
    """A transformers model's own tokenizer (AutoTokenizer), or one line saying why not."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise SystemExit(f"--train.base_model {name}: its tokenizer does not load with AutoTokenizer "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def transformers_note(name: str, config: dict) -> str:
    """The log's account of how a transformers model is finetuned here, next to KBERT."""
    import transformers

    return (f"base model {name}: transformers {'/'.join(config.get('architectures') or [config.get('model_type', '?')])} "
            f"(transformers {transformers.__version__}). Shared with KBERT: the files and examples, the truncation rule, "
            f"batches and their order per seed, AdamW groups (encoder, head) with decoupled weight decay, the schedule, "
            f"metrics, SQuAD windows and postprocessing, exports. Its own: tokenizer, task head and loss, dropout (its "
            f"config's; --train.dropout is KBERT's). Rows: one example or window each, padded to the batch's longest "
            f"(KBERT packs GLUE examples into rows with document masks; an example sees only itself either way). "
            f"float32 weights, bf16 autocast on CUDA")


def run_task(task: str, cfg: FinetuneConfig, argv: list[str] | None = None) -> dict:
    """The options (check), the base model's kind and the data first (bad input fails in one line
    before anything is written), the preflight of the output folder, then the log and one
    finetuning run per seed, stopped cleanly by SIGTERM or SIGINT. base_model is KBERT (an
    export, or none) or any transformers model (read_base_config): the same loop runs both."""
    check(cfg, task)
    kind, base_config = read_base_config(cfg.base_model)
    check_base_model(task, cfg, kind, base_config)
    d = common.setup_distributed(cfg.device)
    run_id, log, out_root = start_run(f"ft-{task}", cfg, d)
    if kind == "transformers":
        tok = HFTokens(load_tokenizer(cfg.base_model), cfg.base_model)
    else:
        from tokenizer import Tokenizer

        tok = Tokenizer()
    train_path, eval_paths = task_files(task, cfg)
    train_rows = evals.read_jsonl(train_path)[: cfg.max_train_examples or None] if cfg.epochs else []  # epochs 0: evaluate only
    eval_rows = {s: evals.read_jsonl(p)[: cfg.max_eval_examples or None] for s, p in eval_paths.items()}
    if task in SQUAD:
        v1 = task == "squad"
        train_items = squad_features(train_rows, tok, cfg, train_path, v1=v1)
        eval_items = {s: squad_features(r, tok, cfg, eval_paths[s], v1=v1) for s, r in eval_rows.items()}
    else:
        train_items = glue_examples(train_rows, task, tok, cfg.max_len, train_path)
        eval_items = {s: glue_examples(r, task, tok, cfg.max_len, eval_paths[s]) for s, r in eval_rows.items()}
    n_seeds = len(parse_seeds(cfg.seeds))
    common.preflight([(out_root, n_seeds * export_bytes(cfg), "--train.out_dir")], d)  # each seed's model
    log.header([os.path.abspath(__file__), os.path.abspath(evals.__file__)], {"task": task, **common.config_to_dict(cfg)},
               d.device, append=cfg.resume == "auto")
    log(f"task {task}: {len(train_items)} training items from {train_path}; "
        + ", ".join(f"{s}: {len(v)}" for s, v in eval_items.items()))
    if kind == "transformers":
        log(transformers_note(cfg.base_model, base_config))
    resume_cmd = common.resume_command(os.path.abspath(__file__), sys.argv[1:] if argv is None else argv, run_id, d)
    aborted = f"aborted by a second SIGINT; finished seeds are kept; resume with: {resume_cmd}"
    with common.failures_logged(d, log, aborted), common.StopSignals() as signals:  # an expected failure is logged too
        runner = Runner(task, cfg, d, log, signals, resume_cmd, tokens=tok if kind == "transformers" else None)
        summary = finetune(task, cfg, d, log, run_id, out_root, train_items, eval_rows, eval_items, runner)
    return summary


def finetune(task, cfg, d, log, run_id, out_root, train_items, eval_rows, eval_items, runner) -> dict:
    """Every seed: build, fit, evaluate on every split, save (seed<k>/result.json last: the
    seed is finished); then the summary over seeds and the median seed's card (pushed with
    --train.hf_repo). With --train.resume auto a seed with a result.json is not redone."""
    seeds = parse_seeds(cfg.seeds)
    # what a finished seed's result depends on: an earlier attempt's seed is reused only if these match
    config = {k: v for k, v in common.config_to_dict(cfg).items() if k not in RUN_OPTIONS}
    per_seed = []
    for seed in seeds:
        done = os.path.join(out_root, f"seed{seed}", "result.json")
        earlier = common.agree(json.load(open(done)) if d.master and cfg.resume == "auto" and os.path.isfile(done) else None, d)
        if earlier is not None:
            differ = [f"{k} {earlier['config'].get(k)!r} -> {v!r}" for k, v in config.items() if earlier["config"].get(k) != v]
            if differ:
                raise SystemExit(f"--train.resume auto: seed {seed} of run {run_id} was finished with other options "
                                 f"({'; '.join(differ)}): give them back, or start another --train.run_id")
            log(f"seed:{seed} was finished by an earlier attempt: its results ({done}) and model are reused")
            per_seed.append(earlier["result"])
            continue
        model = build_model(cfg, task, seed, "transformers" if runner.hf else "kbert").to(d.device)
        if cfg.epochs:
            fit = runner.fit(model, train_items, seed)
        else:
            runner.prepare(model)
            fit = {"steps": 0}
        result = {"seed": seed, **fit}
        for split, items in eval_items.items():
            result[split] = runner.evaluate(model, split, eval_rows[split], items, os.path.join(out_root, f"seed{seed}"))
            log(f"{clock()} seed:{seed} {split}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                                for k, v in result[split].items()}))
        per_seed.append(result)
        if d.master:
            folder = os.path.join(out_root, f"seed{seed}", "model")
            if runner.hf:
                export_transformers(model, runner.tokens.tok, task, result, folder, cfg, log)
            else:
                export_finetuned(model, task, result, folder, cfg, log)
            with open(done + ".tmp", "w") as f:
                json.dump({"result": result, "config": config}, f, indent=2)
            os.replace(done + ".tmp", done)
        runner.stop_if_asked(f"seed:{seed} finished")  # a signal during evaluation or export stops here
    summary = {"task": task, "run_id": run_id, "seeds": per_seed, "summary": seed_summary(per_seed, eval_items)}
    for name, s in summary["summary"].items():
        log(f"{name}: median {s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f}, std {s['std']:.2f}, n={s['n']})")
    if d.master:
        os.makedirs(out_root, exist_ok=True)
        json.dump(summary, open(os.path.join(out_root, "metrics.json"), "w"), indent=2)
        log(f"metrics: {os.path.join(out_root, 'metrics.json')}")
        # one model per repo: the median seed by the headline (the first split's first metric:
        # Task.metrics[0] for GLUE, exact for SQuAD), its card holding every seed's numbers
        split = next(iter(eval_items))
        metric = next(iter(per_seed[0][split]))
        chosen = median_seed(per_seed, split, metric)
        folder = os.path.join(out_root, f"seed{chosen['seed']}", "model")
        with open(os.path.join(folder, "README.md"), "w") as f:
            middle = " (the lower of the two middle seeds)" if len(seeds) % 2 == 0 else ""
            f.write(model_card(task, cfg, f"{len(seeds)} seed(s). This is seed {chosen['seed']}, the median by {split}/{metric}"
                                          f"{middle}.\n\n{seeds_table(per_seed, summary['summary'])}", transformers=runner.hf))
        log(f"seed {chosen['seed']} has the median {split}/{metric} ({chosen[split][metric]:.2f}): {folder}")
        if cfg.hf_repo:
            common.push_to_hub(folder, cfg.hf_repo, log)
    return summary


def run_blimp(cfg: FinetuneConfig) -> dict:
    """Score a masked LM on BLiMP, no training: KBERT (kbert_log_probs) or any transformers masked
    LM (AutoModelForMaskedLM with its own tokenizer and mask token, masked_lm_log_probs), through
    the same evals.blimp_scores, in float32. Writes out_dir/<run_id>/metrics.json (mean accuracy
    over paradigms, per field and per paradigm) and predictions_blimp.jsonl (each pair's PLLs)."""
    check(cfg, "blimp")
    kind, _ = read_base_config(cfg.base_model)
    d = common.setup_distributed(cfg.device)
    run_id, log, out_root = start_run("blimp", cfg, d, resumable=False)
    from tokenizer import Tokenizer

    path = cfg.eval_files or os.path.join(cfg.data_dir, "blimp", "blimp.jsonl")
    rows = evals.read_blimp(path, cfg.blimp_pairs)
    # float32, no autocast: bf16 log-probabilities would decide close pairs by rounding
    if kind == "transformers":  # any masked LM with its own tokenizer and mask token
        from transformers import AutoModelForMaskedLM

        tok = load_tokenizer(cfg.base_model)
        mask_id = evals.specials_of(tok).mask
        model = AutoModelForMaskedLM.from_pretrained(cfg.base_model, dtype=torch.float32).to(d.device).eval()
        log_probs = functools.partial(evals.masked_lm_log_probs, model, mask_id)
    else:
        tok = Tokenizer()
        model = build_encoder(cfg, parse_seeds(cfg.seeds)[0]).to(d.device).eval()  # the seed: base_model none only
        log_probs = functools.partial(evals.kbert_log_probs, model)
    log.header([os.path.abspath(__file__), os.path.abspath(evals.__file__)], {"task": "blimp", **common.config_to_dict(cfg)},
               d.device)
    if kind == "transformers":
        log(f"base model {cfg.base_model}: transformers {type(model).__name__}, its own tokenizer and mask token, float32")
    t0 = time.perf_counter()
    progress = Progress(log, "blimp", "masked copies", cfg.progress_every_s)
    result = evals.blimp_scores(log_probs, rows, tok, cfg.eval_batch_size, d.device, progress)
    dt = time.perf_counter() - t0
    good, bad = result.pop("pll_good"), result.pop("pll_bad")
    metrics = {"task": "blimp", "run_id": run_id, "base_model": cfg.base_model, "data": path,
               "pairs_per_paradigm": cfg.blimp_pairs, **result, "sentences_per_s": 2 * len(rows) / dt}
    for uid, acc in result["paradigms"].items():
        log(f"blimp {uid}: {acc:.4f}", console=False)
    log(f"blimp accuracy:{result['accuracy']:.4f} paradigms:{len(result['paradigms'])} pairs:{len(rows)} "
        + " ".join(f"{f}:{a:.4f}" for f, a in result["fields"].items()) + f" sentences/s:{2 * len(rows) / dt:.0f} time:{dt:.1f}s")
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "predictions_blimp.jsonl"), "w") as f:
        for row, g, b in zip(rows, good, bad):
            f.write(json.dumps({"UID": row["UID"], "pairID": row["pairID"], "pll_good": g, "pll_bad": b}) + "\n")
    json.dump(metrics, open(os.path.join(out_root, "metrics.json"), "w"), indent=2)
    log(f"metrics: {os.path.join(out_root, 'metrics.json')}")
    return metrics


# ----------------------------------------------------------------------------------------
# Main


TASKS = [*GLUE, *SQUAD, "blimp"]
USAGE = __doc__.split("Data are")[0].rstrip() + "\n\n--task is one of " + ", ".join(TASKS) + "."


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--score-squad"]:
        return evals.score_squad_cli(argv[1:])
    rest, task = list(argv), None
    if "--task" in rest:
        i = rest.index("--task")
        if i + 1 >= len(rest):
            raise SystemExit(f"--task needs a value: one of {', '.join(TASKS)}")
        task = rest.pop(i + 1)
        rest.pop(i)
        if task not in TASKS:
            near = difflib.get_close_matches(task, TASKS, n=1)
            raise SystemExit(f"unknown task {task!r}" + (f"; did you mean {near[0]}?" if near else "")
                             + f" (one of {', '.join(TASKS)})")
    overrides, _ = common.parse_overrides(rest, GROUPS, usage=USAGE)  # --help prints every option and exits
    if task is None:
        raise SystemExit(f"--task is required: one of {', '.join(TASKS)} (--help lists every option)")
    cfg = FinetuneConfig(**overrides["train"])
    return run_blimp(cfg) if task == "blimp" else run_task(task, cfg, argv)


if __name__ == "__main__":
    main()
