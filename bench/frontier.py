"""The frontier: KBERT's recipe against the ModernBERT and BERT recipes at several pretraining
budgets, judged where the mission is judged: finetuned on GLUE tasks, and on BLiMP.

    python -m bench.frontier                              # the CPU frontier: hours on 2 cores, resumable
    python -m bench.frontier --frontier.preset gpu        # one H100, at most 10 minutes (bench/gpu_checks.sh frontier)
    python -m bench.frontier --frontier.preset smoke      # seconds: every stage at toy size (the tests)
    python -m bench.frontier --frontier.stages report     # tables and plots from the stored results

Stages, in order:
  corpus    shards of ../shared's Wikipedia and prose, documents shuffled once (fixed seed) and
            split by a hash of their text into train and a held-out validation set; the
            unigram cross-entropy of the validation masks, counted on the training tokens
  pretrain  every arm at every budget on the same packed rows in the same order, scored on one
            fixed validation set with fixed masks (15% of the ordinary tokens, all [MASK]);
            the baselines' learning rates swept at the smallest budget until the best is
            bracketed, the best one then used at the larger budgets; a second pretraining
            seed at the smallest budget (and at --frontier.seed_budgets) for KBERT (kbert, kbert-wd,
            two ablations) and the best baseline
  blimp     each reported model on BLiMP (all 67 paradigms, `blimp_pairs` each, fp32)
  finetune  each reported model through finetuner.py (in this process), one protocol for every
            arm (KBERT exports and transformers folders alike): CoLA, SST-2, MRPC, STS-B, RTE, 3 seeds;
            then, after every budget, the same at the preset's other finetuning lrs (`lrs`), so
            that each task can report its best lr, the same sweep for every arm; last, where a
            task's best is the sweep's highest lr, the next lr up (`extend`), until it is bracketed
  report    results.json, results.md and plots (GLUE-small, BLiMP and validation loss against
            pretraining FLOPs) in the record folder
  pack      (alone) the preset's data in bench/data/frontier, for a machine without ../shared

Arms (one width and depth per preset; each recipe keeps its own MLP ratio and heads of 64):
  kbert       trainer.py's defaults through trainer.train_step
  kbert-sep   the same, every document ending in [SEP] (BERT and ModernBERT's documents do)
  modernbert  transformers' ModernBertForMaskedLM with its published settings (bench/baselines.py)
  bert        transformers' BertForMaskedLM with its published settings, gradient clipping at 1.0
Ablations of KBERT, on demand (--frontier.arms): kbert-mask30 (ModernBERT's 30% masking throughout),
kbert-nounet (no U-net skips), kbert-wd (weight decay 0.05 on the hidden matrices, the default since
records/2026-12-06-weight-decay; the 2026-12-05 record's kbert runs predate it).
--frontier.budgets plans a subset of the budgets, e.g. `--frontier.arms kbert-nounet --frontier.budgets 1000`;
--frontier.seed_budgets adds the second pretraining seed at larger budgets, e.g. `--frontier.arms
kbert-wd,modernbert --frontier.budgets 2000 --frontier.seed_budgets 2000`. --frontier.floor true adds
each distinct initial model (0 steps), through BLiMP and the whole finetuning sweep: the floor that
shows what pretraining adds downstream, e.g. `--frontier.arms kbert,modernbert,bert --frontier.floor true`.

Resumable: every pretraining, BLiMP and finetuning run stores its result in the record's
runs/ folder when it ends, keyed by its config, the data (the shards' digest) and the code
(a digest of the files that run it; the commit is recorded beside it). Rerunning the same
command skips finished runs and continues the rest; a stored result whose key differs is
refused unless --frontier.on_change keep (use it, its key is recorded) or redo (run again). A
pretraining run (or a rebuild) is refused before its first step if the arm's stored runs trained
with other settings (trainer.py's defaults changed since): one arm, one recipe. An evaluation counts
only for the model it scored: a pretraining run made again runs its evaluations again.
Several processes may work on one record at once (a run is claimed by a lock file), e.g. one
per core: `taskset -c 0 python -m bench.frontier --frontier.threads 1 & taskset -c 1 ...`.
The exported models and the finetuning outputs go to --frontier.work_dir (git-ignored); a model
folder lost with it is pretrained again by --frontier.rebuild true, and used only if it ends
exactly where its stored run ended: on the CPU model and thread count it was made with (other
kernels round otherwise; an AMD EPYC's rebuild of an Intel Xeon's run differed by step 200).
"""
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import torch

import common
import trainer
from bench import baselines
from common import opt
from data.shards import open_shard, write_shard
from model import CLS_ID, KBERT, MASK_ID, PAD_ID, SEP_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class FrontierConfig:
    preset: str = opt("cpu", "cpu, gpu or smoke")  # the sizes in PRESETS
    out: str = ""  # the record folder; empty: records/<date>-<preset>-frontier
    work_dir: str = opt("bench/out/frontier", "non-empty")  # exported models and finetuning outputs (git-ignored)
    corpus: str = opt("data/shards/frontier", "non-empty")  # shard prefix: <corpus>_train_*.bin, <corpus>_val_*.bin
    corpus_files: str = ("../shared/data/wikipedia_en/*.jsonl,../shared/data/fineweb_edu/sample.jsonl,"
                         "../shared/data/prose/python_docs.jsonl,../shared/data/prose/us_presidential_speeches.jsonl")
    val_permille: int = opt(10, "in [1, 999]")  # documents held out for validation (by a hash of their text)
    glue_dir: str = opt("../shared/data", "non-empty")  # holds glue/<task>/{train,validation}.jsonl (finetuner's data_dir)
    blimp_file: str = opt("../shared/data/blimp/blimp.jsonl", "non-empty")
    arms: str = ""  # comma-separated subset of the arms; empty: all
    # comma-separated subset of the preset's budgets (optimizer steps) to plan, e.g. 1000 for an ablation judged at the
    # smallest budget only; empty: all. The report always covers every budget
    budgets: str = ""
    # comma-separated larger budgets (optimizer steps) at which the arms with a second pretraining seed (and the best
    # baseline) get it too, so the record shows a seed's spread there; empty: at the smallest budget only (the report
    # adds every budget where such a run is stored)
    seed_budgets: str = ""
    stages: str = opt("corpus,pretrain,blimp,finetune,report", "non-empty")  # see the module docstring
    on_change: str = opt("refuse", "refuse, keep or redo")  # a stored run made with another config, data or code
    threads: int = opt(0, ">= 0")  # torch threads of this process and its finetuning runs; 0: torch's default
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    # while this file exists (default: PAUSE in the record folder) pretraining waits between steps, off the clock,
    # and no new run starts: a benchmark can have the machine without skewing the runs' wall times
    pause_file: str = ""
    # a finished pretraining run whose model folder is gone (the work folder is not part of the record) is pretrained
    # again before its next evaluation, and must end exactly where its stored result ended (final validation loss,
    # rows and masks); false: that evaluation fails, saying how to remake the model
    rebuild: bool = False
    # also score each model as initialized (0 pretraining steps, the first seed): BLiMP and the whole finetuning sweep,
    # so that the record shows what pretraining adds downstream at all. One per distinct initial model among the arms,
    # named after the first arm of ARMS and ABLATIONS with it (floor_arms: kbert for kbert-wd, -sep and -mask30)
    floor: bool = False
    # keep polling until every planned run (of any stage) is done, e.g. a second process that only finetunes
    # (--frontier.stages blimp,finetune) beside one that pretrains; false: stop when nothing is ready
    wait: bool = False


@dataclasses.dataclass(frozen=True)
class Finetune:
    """One finetuning protocol for every arm (finetuner.py options)."""
    tasks: tuple = ("cola", "sst2", "mrpc", "stsb", "rte")
    seeds: str = "0,1,2"
    lr: float = 1e-4
    # more learning rates, the same for every arm (run after every budget's runs at lr): each task then reports the lr
    # whose median is best, chosen on the dev set it is reported on (as BERT's paper chose its lr). Why: Muon leaves
    # KBERT's hidden matrices ~8x the RMS of ModernBERT's, so one Adam lr moves them ~8x less relative to their size
    # (records/2026-12-05-cpu-frontier/finetune-lr)
    lrs: tuple = ()
    # tried in turn, per model and task, while the best median is the highest lr run so far, so that each task's best
    # is bracketed from above (the same rule for every arm, as the baselines' pretraining sweep is bracketed). Not
    # below: where the lowest lr was best, no lr scored more than ~1 point above the task's majority class
    # (records/2026-12-05-cpu-frontier/README.md)
    extend: tuple = ()
    epochs: float = 3.0
    batch_size: int = 32
    max_train_examples: int = 0  # 0: all; SST-2's 67k examples are capped by sst2_examples
    sst2_examples: int = 20000
    max_len: int = 128
    pack_len: int = 512


@dataclasses.dataclass(frozen=True)
class Preset:
    d_model: int
    n_layer: int
    seq_len: int
    batch_seqs: int  # rows per optimizer step (the same tokens for every arm)
    micro_seqs: int  # rows per forward/backward
    budgets: tuple  # optimizer steps of each budget, doubling
    evals: int  # validation points per run (and at step 0)
    val_seqs: int  # rows of the fixed validation set
    lrs: tuple  # the baselines' sweep at the smallest budget, extended until the best is bracketed
    seeds: tuple  # pretraining seeds at the smallest budget (and at --frontier.seed_budgets)
    blimp_pairs: int  # per paradigm
    finetune: Finetune
    compile: bool  # torch.compile every arm's model (the same for all; compile time reported apart)


PRESETS = {
    # 2 CPU cores (each run on one core, one thread): width 128, 4 layers, 4,096 tokens a step; budgets of 4M, 8M
    # and 16M tokens. At 2M tokens (500 steps) ModernBERT ended at 6.34 (lr 1e-3, the better of the two that
    # finished) against the unigram cross-entropy 6.67, not 0.5 below it (records/2026-12-05-cpu-frontier/README.md)
    "cpu": Preset(d_model=128, n_layer=4, seq_len=512, batch_seqs=8, micro_seqs=8, budgets=(1000, 2000, 4000), evals=10,
                  val_seqs=64, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1), blimp_pairs=100,
                  # 6e-3 because KBERT's best was the top of (2e-4, 6e-4, 2e-3) for SST-2, STS-B and CoLA at every
                  # budget: a shared sweep has to bracket every arm's best, not only the baselines'
                  finetune=Finetune(lr=2e-4, lrs=(6e-4, 2e-3, 6e-3), extend=(2e-2, 6e-2), epochs=2.0, batch_size=32,
                                    sst2_examples=8000, max_len=128, pack_len=128),
                  compile=True),
    # one H100, sized for 10 minutes (an estimate until measured, records/2026-12-05-cpu-frontier/README.md): width
    # 256, 6 layers, 16k tokens a step; finetuning 1 epoch of at most 1,500 examples a task (eager, launch-bound). The
    # finetuning lr sweep runs after everything at lr 2e-4 (a second call of gpu_checks.sh continues into it)
    "gpu": Preset(d_model=256, n_layer=6, seq_len=1024, batch_seqs=16, micro_seqs=16, budgets=(250, 500, 1000), evals=5,
                  val_seqs=64, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1), blimp_pairs=100,
                  finetune=Finetune(lr=2e-4, lrs=(6e-4, 2e-3, 6e-3), extend=(2e-2, 6e-2), epochs=1.0, batch_size=32,
                                    max_train_examples=1500,
                                    sst2_examples=1500, max_len=128, pack_len=128),
                  compile=True),
    "smoke": Preset(d_model=64, n_layer=2, seq_len=128, batch_seqs=4, micro_seqs=2, budgets=(3, 6), evals=1, val_seqs=4,
                    lrs=(1e-3, 3e-3), seeds=(0, 1), blimp_pairs=2,
                    finetune=Finetune(tasks=("rte", "stsb"), seeds="0,1", epochs=1.0, batch_size=8, max_train_examples=16,
                                      max_len=64, pack_len=128), compile=False),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    recipe: str  # kbert | modernbert | bert
    what: str
    sep: bool = False  # documents end with [SEP]
    model: tuple = ()  # KBERT ModelConfig overrides, (key, value) pairs
    train: tuple = ()  # KBERT TrainConfig overrides
    second_seed: bool = False  # a second pretraining seed at the smallest budget (as the best baseline gets) and at
    # --frontier.seed_budgets


ARMS = [
    Arm("kbert", "kbert", "trainer.py's defaults", second_seed=True),
    Arm("kbert-sep", "kbert", "trainer.py's defaults, every document ending in [SEP]", sep=True),
    Arm("modernbert", "modernbert", "transformers' ModernBertForMaskedLM, ModernBERT's published settings"),
    Arm("bert", "bert", "transformers' BertForMaskedLM, BERT's published settings"),
]
VAL_SEED, VAL_MASK_RATE = 12345, 0.15  # the fixed validation masks: 15% of the ordinary tokens, all [MASK]
GLUE_HEADLINE = {"cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "stsb": ("spearman",),
                 "rte": ("accuracy",)}  # GLUE-small: the mean over tasks, MRPC as the mean of its F1 and accuracy

# ----------------------------------------------------------------------------------------
# Corpus: shuffled documents, split by hash, and the unigram reference


def corpus_files(prefix: str) -> tuple[list[str], list[str]]:
    return sorted(glob.glob(f"{prefix}_train_*.bin")), sorted(glob.glob(f"{prefix}_val_*.bin"))


def build_corpus(cfg: FrontierConfig, shard_tokens: int = 4_000_000) -> None:
    """<corpus>_{train,val}_*.bin from cfg.corpus_files: documents in one fixed random order (so
    a budget's tokens sample every source, not the first articles by page id), each
    `<|endoftext|> tokens`, a document held out when a hash of its text falls under
    val_permille (data/tokenize_text.py's rule). Written to a temporary prefix and renamed."""
    sys.path.insert(0, os.path.join(ROOT, "data"))
    from tokenize_text import _encode_batch, is_val

    paths = sorted(p for pat in cfg.corpus_files.split(",") if pat.strip() for p in glob.glob(pat.strip()))
    if not paths:
        raise SystemExit(f"--frontier.corpus_files {cfg.corpus_files!r} matches no file: the corpus is built from "
                         "../shared's Wikipedia and prose (or give your own jsonl files with a \"text\" field)")
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts += [t for t in (json.loads(line).get("text", "") for line in f if line.strip()) if t.strip()]
    order = np.random.default_rng(0).permutation(len(texts))
    tmp = cfg.corpus + f".tmp{os.getpid()}"
    split = {"train": [], "val": []}
    for lo in range(0, len(order), 512):
        batch = [texts[i] for i in order[lo:lo + 512]]
        for text, ids in zip(batch, _encode_batch(batch)):
            split["val" if is_val(text, cfg.val_permille) else "train"].append(ids)
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    written = []
    for name, docs in split.items():
        tokens = np.concatenate(docs)
        for k, lo in enumerate(range(0, len(tokens), shard_tokens)):
            path = f"{tmp}_{name}_{k:06d}.bin"
            write_shard(path, tokens[lo:lo + shard_tokens])
            written.append(path)
    for path in written:
        os.replace(path, path.replace(tmp, cfg.corpus))
    print(f"corpus {cfg.corpus}: {len(split['train'])} train / {len(split['val'])} validation documents from "
          f"{len(paths)} files, {sum(map(len, split['train'])):,} / {sum(map(len, split['val'])):,} tokens")


def digest(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def unigram_reference(train_files: list[str], val_labels: torch.Tensor) -> dict:
    """Cross-entropy of the validation targets under the unigram distribution of the training
    tokens (ordinary tokens only, add-one smoothing): the loss of a model that has learnt word
    frequencies and nothing else."""
    counts = np.zeros(CLS_ID, dtype=np.float64)
    for f in train_files:
        tokens = open_shard(f)
        counts += np.bincount(tokens[tokens < CLS_ID], minlength=CLS_ID)
    p = (counts + 1) / (counts.sum() + CLS_ID)
    targets = val_labels[val_labels >= 0].cpu().numpy()
    return {"unigram_loss": float(-np.log(p[targets]).mean()), "train_tokens": int(counts.sum()), "smoothing": "add-one"}


def pack(cfg: FrontierConfig, P: Preset, dest: str = "bench/data/frontier", limit_mib: float = 40.0) -> None:
    """The preset's data for a machine without ../shared (the GPU one): the corpus cut to what
    the largest budget reads (plus 5%), the validation shard, the finetuning tasks' train files
    cut as the protocol cuts them and their validation files, BLiMP's first blimp_pairs of each
    paradigm, and GPT-2's BPE files for tiktoken; refused above limit_mib."""
    import tokenizer

    train_files, val_files = corpus_files(cfg.corpus)
    need = int(1.05 * max(P.budgets) * P.batch_seqs * P.seq_len)
    tokens = np.concatenate([open_shard(f) for f in train_files])[:need]
    os.makedirs(dest, exist_ok=True)
    write_shard(os.path.join(dest, "frontier_train_000001.bin"), tokens)
    shutil.copyfile(val_files[0], os.path.join(dest, "frontier_val_000000.bin"))
    for task in P.finetune.tasks:
        os.makedirs(os.path.join(dest, "glue", task), exist_ok=True)
        cap = P.finetune.sst2_examples if task == "sst2" else P.finetune.max_train_examples
        with open(os.path.join(cfg.glue_dir, "glue", task, "train.jsonl")) as f:
            rows = [line for line in f if line.strip()][: cap or None]
        open(os.path.join(dest, "glue", task, "train.jsonl"), "w").writelines(rows)
        shutil.copyfile(os.path.join(cfg.glue_dir, "glue", task, "validation.jsonl"),
                        os.path.join(dest, "glue", task, "validation.jsonl"))
    seen = {}
    with open(cfg.blimp_file) as f, open(os.path.join(dest, "blimp.jsonl"), "w") as out:
        for line in f:
            uid = json.loads(line)["UID"]
            seen[uid] = seen.get(uid, 0) + 1
            if seen[uid] <= P.blimp_pairs:
                out.write(line)
    tokenizer.install_offline_bpe(os.path.join(ROOT, "..", "shared", "tokenizers", "gpt2"),
                                  os.path.join(os.path.dirname(dest), "tiktoken"))
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(dest) for n in names) / 2**20
    print(f"packed {dest}: {size:.1f} MiB ({len(tokens):,} training tokens)")
    if size > limit_mib:
        raise SystemExit(f"{dest} holds {size:.1f} MiB, above the {limit_mib:g} MiB a device run carries")


# ----------------------------------------------------------------------------------------
# The data every arm reads: the same packed rows in the same order


class Stream:
    """trainer.PackedLoader's rows, with [SEP] at the end of every document when asked (a
    document's [SEP] follows its last token, in the row where that token lands). Digests of
    what was read are kept, so that a record shows every arm read the same data in the same
    order: of the rows themselves, and of the first `prefix` ordinary tokens (the same for
    arms whose rows differ by their [SEP]s)."""

    def __init__(self, files: list[str], seq_len: int, sep: bool = False, prefix: int | None = None):
        self.loader = trainer.PackedLoader(files, seq_len, seed=0, sep_at_end=sep)
        self.rows, self.ordinary, self.left = hashlib.sha256(), hashlib.sha256(), prefix

    def next_batch(self, n: int) -> tuple[np.ndarray, int]:
        batch, first = self.loader.next_batch(n)
        self.rows.update(batch.astype(np.int32).tobytes())
        ordinary = batch[batch < CLS_ID].astype(np.int32)
        if self.left is not None:
            ordinary, self.left = ordinary[:self.left], max(0, self.left - len(ordinary))
        self.ordinary.update(ordinary.tobytes())
        return batch, first

    def digest(self) -> str:
        return self.rows.hexdigest()[:16]

    def ordinary_digest(self) -> str:
        return self.ordinary.hexdigest()[:16]


def validation_set(val_files: list[str], P: Preset, device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The fixed validation rows and masks every arm is scored on, and their digest."""
    hp = trainer.parse_args(["--data.seq_len", str(P.seq_len), "--train.val_tokens", str(P.val_seqs * P.seq_len)])
    rows = trainer.validation_batch(val_files, hp)
    ids = torch.from_numpy(rows).long().to(device)
    inputs, labels = trainer.mask_tokens(ids, 0, VAL_SEED, VAL_MASK_RATE, 0.0, 0.0)
    assert bool((inputs[labels >= 0] == MASK_ID).all())
    h = hashlib.sha256(inputs.cpu().numpy().tobytes() + labels.cpu().numpy().tobytes()).hexdigest()[:16]
    return inputs, labels, h


# ----------------------------------------------------------------------------------------
# One pretraining run


def kbert_setup(arm: Arm, P: Preset, steps: int, seed: int, device, work: str, name: str):
    """trainer.py's own config (scaled to the preset), optimizer and train_step."""
    argv = ["--model.preset", "tiny", "--model.n_layer", str(P.n_layer), "--model.d_model", str(P.d_model),
            "--model.n_head", str(max(1, P.d_model // 64)), "--model.d_mlp", str(P.d_model * 8 // 3 // 32 * 32),  # base's ratio
            "--data.seq_len", str(P.seq_len), "--train.steps", str(max(steps, 1)), "--train.seed", str(seed),  # 0: a floor
            "--train.batch_tokens", str(P.batch_seqs * P.seq_len), "--train.micro_batch_seqs", str(P.micro_seqs),
            "--train.compile", "true" if P.compile else "false", "--train.export_dir", os.path.join(work, "models"),
            "--train.run_id", name.replace("/", "_")]
    for group, pairs in (("model", arm.model), ("train", arm.train)):
        argv += [x for k, v in pairs for x in (f"--{group}.{k}", str(v))]
    hp = trainer.parse_args(argv)
    model = KBERT(hp.model)
    model.init_weights(seed=seed)
    model.to(device)
    opt = trainer.build_optimizer(model, hp.train)
    compiled = trainer.use_compile(hp.train, device.type)
    forward = trainer.make_forward(model, compile=compiled, precision=hp.train.precision)
    dist = common.Dist(0, 0, 1, device)

    def step(batch: np.ndarray, first: int, i: int) -> tuple[float, float]:
        out = trainer.train_step(model, opt, forward, batch, first, i, hp.train, dist, static_rows=compiled)
        return out["loss"], trainer.step_flops(hp.model, batch, out["n_predicted"], out["windows"])

    @torch.no_grad()
    def masked_loss(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        model.eval()
        loss, _, n = forward(inputs, labels, model.default_windows(device), "sum")
        model.train()
        return loss.item(), n

    def export(val_loss: float, tokens: int) -> str:
        return trainer.export(model, hp, tokens, {"loss": val_loss, "acc": float("nan")}, hp.train.run_id, lambda msg: None)

    return model, step, masked_loss, export, {"config": common.config_to_dict(hp)}


def baseline_setup(arm: Arm, P: Preset, steps: int, lr: float, seed: int, device, work: str, name: str):
    """transformers' model with its published settings (bench/baselines.py), random init."""
    recipe = arm.recipe
    model = baselines.build(recipe, P.d_model, P.n_layer, P.seq_len, seed=seed).to(device)
    model.train()
    opt = baselines.optimizer(model, recipe, lr) if steps else None  # a floor (0 steps) has no lr
    R = baselines.RECIPES[recipe]
    bf16 = trainer.compute_dtype("auto", device.type) == torch.bfloat16
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    fn = torch.compile(baselines.mlm_loss_sum, dynamic=True) if P.compile else baselines.mlm_loss_sum

    def step(batch: np.ndarray, first: int, i: int) -> tuple[float, float]:
        for g in opt.param_groups:
            g["lr"] = lr * baselines.lr_at(recipe, i, steps)
        ids = torch.from_numpy(batch).long().to(device)
        inputs, labels = trainer.mask_tokens(ids, first, seed, *R["mask"])
        n_total = max(1, int((labels >= 0).sum()))
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for lo in range(0, len(batch), P.micro_seqs):  # the loss per predicted token of the whole batch
            with amp:
                s, n = fn(model, recipe, inputs[lo:lo + P.micro_seqs], labels[lo:lo + P.micro_seqs])
            if n:
                (s / n_total).backward()
                loss_sum += s.item()
        if R["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), R["clip"])
        opt.step()
        return loss_sum / n_total, baselines.step_flops(model, recipe, batch, n_total)

    @torch.no_grad()
    def masked_loss(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        model.eval()
        with amp:
            s, n = baselines.mlm_loss_sum(model, recipe, inputs, labels)
        model.train()
        return s.float().item(), n

    def export(val_loss: float, tokens: int) -> str:
        import tokenizer

        folder = os.path.join(work, "models", name)
        model.save_pretrained(folder)
        tokenizer.save_hf_tokenizer(folder, P.seq_len)
        return folder

    return model, step, masked_loss, export, {"lr": lr, "recipe_settings": {k: list(v) if isinstance(v, tuple) else v
                                                                              for k, v in R.items()}}


def recipe(header: dict) -> dict:
    """The settings a pretraining run trained with, as its log's first line gives them (trainer.py's
    whole config for KBERT less the run's own seed, steps, run id and export folder; a baseline's
    published settings, its swept lr apart), flat ("train.weight_decay"). The model's windows are
    clipped to the sequence, as trainer.py has clipped them since 54592b3: the same attention."""
    flat = {}

    def walk(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in ("train.run_id", "train.seed", "train.steps", "train.export_dir"):
                flat[f"{prefix}{k}"] = v

    walk(header.get("config", header.get("recipe_settings", {})), "")
    for k in ("model.local_window", "model.global_window"):
        if k in flat:
            flat[k] = min(flat[k], flat["data.seq_len"])
    return flat


def recipe_change(store, job: dict, header: dict) -> str | None:
    """Why a pretraining run must not be added to (or rebuilt in) its arm, or None: a stored run of
    the same arm that counts was trained with other settings (say trainer.py's defaults changed
    since, as weight_decay did in 5ea40e7), so the new run would put another recipe under the
    arm's name, or a rebuild could not end as stored. Initial models (0 steps) train nothing."""
    if job["steps"] == 0:
        return None
    now = recipe(json.loads(json.dumps(header, default=str)))  # as its log will read
    absent = "<absent>"  # a setting one side does not have (an option added or removed since)
    for path in sorted(glob.glob(store.path(f"pt/{job['arm']}/*"))):
        stored = json.load(open(path))
        made = stored["key"]["job"]
        log = os.path.join(os.path.dirname(store.folder), stored["result"].get("log", ""))
        if (made["steps"] == 0 or not os.path.isfile(log)
                or (store.on_change == "redo" and stored["key"] != store.job_key(made))):  # to be made again anyway
            continue
        with open(log) as f:
            then = recipe(json.loads(f.readline()))
        differ = [f"{k} {then.get(k, absent)!r} (now {now.get(k, absent)!r})"
                  for k in sorted(set(then) | set(now)) if then.get(k, absent) != now.get(k, absent)]
        if differ:
            return (f"{job['arm']}'s stored run {made['name']} (commit {stored.get('commit')}) trained with "
                    f"{', '.join(differ)}: the arm's settings changed since, and {job['name']} would not be made with "
                    "them; run it from a checkout whose settings match, pin the stored values in the arm (its Arm's "
                    "train or model), add the change as an arm of its own (ABLATIONS), or give another --frontier.out")
    return None


def pretrain(job: dict, P: Preset, cfg: FrontierConfig, files: dict, val, device, log_dir: str, store) -> dict:
    """Train one arm on the shared stream for one budget, scoring the fixed validation set
    `evals` times along the way; export the model. Wall and CPU seconds count the training
    steps only; a compiled model's first step (its compile) is counted apart. Refused before
    any step if the arm's stored runs trained with other settings (recipe_change)."""
    arm, steps, seed, lr, name = ARM_BY_NAME[job["arm"]], job["steps"], job["seed"], job.get("lr"), job["name"]
    work = os.path.abspath(cfg.work_dir)
    torch.manual_seed(seed)
    setup = (kbert_setup(arm, P, steps, seed, device, work, name) if arm.recipe == "kbert"
             else baseline_setup(arm, P, steps, lr, seed, device, work, name))
    model, step, masked_loss, export, extra = setup
    why = recipe_change(store, job, extra)
    if why:
        raise RuntimeError(why)
    params = sum(p.numel() for p in model.parameters())
    # the ordinary tokens' digest covers half the smallest budget: every arm reads at least that many
    stream = Stream(files["train"], P.seq_len, sep=arm.sep, prefix=P.budgets[0] * P.batch_seqs * P.seq_len // 2)
    val_inputs, val_labels, _ = val
    val_hash = hashlib.sha256()  # of the validation rows and masks as this run scored them
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name.replace('/', '_')}.txt")
    log = open(log_path, "w")

    def note(msg):
        print(f"[{name}] {msg}", flush=True)
        log.write(msg + "\n")
        log.flush()

    note(json.dumps({"job": job, "params": params, "preset": dataclasses.asdict(P), **extra}, default=str))

    def evaluate() -> float:
        total, count = 0.0, 0
        for lo in range(0, len(val_inputs), P.micro_seqs):
            inputs, labels = val_inputs[lo:lo + P.micro_seqs], val_labels[lo:lo + P.micro_seqs]
            if not curve:
                val_hash.update(inputs.cpu().numpy().tobytes() + labels.cpu().numpy().tobytes())
            s, n = masked_loss(inputs, labels)
            total, count = total + s, count + n
        return total / count

    every = max(1, steps // P.evals)
    curve, tokens, wall, cpu, flops, compile_s = [], 0, 0.0, 0.0, 0.0, 0.0
    for i in range(steps + 1):
        if i % every == 0 or i == steps:
            v = evaluate()
            curve.append({"step": i, "tokens": tokens, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "flops": flops,
                          "val_loss": v})
            note(f"step:{i}/{steps} val_loss:{v:.4f} tokens:{tokens} train_time:{wall:.1f}s load:{os.getloadavg()[0]:.2f}")
            if not math.isfinite(v):
                note("stopping: the validation loss is not finite")
                break
        if i == steps:
            break
        wait_while_paused(cfg)
        batch, first = stream.next_batch(P.batch_seqs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, step_flops = step(batch, first, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i == 0 and P.compile:
            compile_s = dt  # the first step holds the compile: counted apart, for every arm alike
        else:
            wall, cpu = wall + dt, cpu + dc
        tokens += int((batch != PAD_ID).sum())
        flops += step_flops
        if (i + 1) % max(1, steps // 20) == 0:
            note(f"step:{i + 1}/{steps} loss:{loss:.4f} train_time:{wall:.1f}s")
    folder = export(curve[-1]["val_loss"], tokens) if math.isfinite(curve[-1]["val_loss"]) else None
    note(f"exported {folder}")
    log.close()
    return {"params": params, "curve": curve, "final_val_loss": curve[-1]["val_loss"], "tokens": tokens, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "compile_s": round(compile_s, 3), "flops": flops, "model": folder,
            "data_digest": stream.digest(), "ordinary_digest": stream.ordinary_digest(), "val_digest": val_hash.hexdigest()[:16],
            "log": os.path.relpath(log_path, cfg.out),
            "threads": torch.get_num_threads(), **{k: v for k, v in extra.items() if k != "config"}}


# one-change ablations of KBERT's recipe, run on demand (--frontier.arms kbert-mask30,kbert-nounet) and judged, like
# the arms, on the downstream metrics: what in the recipe costs KBERT where a baseline leads
ABLATIONS = [
    # a second pretraining seed for these two: at 4.1M tokens their loss differs from the default's by about what a
    # seed moved the undecayed KBERT's (0.08)
    Arm("kbert-mask30", "kbert", "trainer.py's defaults with ModernBERT's masking: 30% throughout, 10% random, 10% kept",
        train=(("mask_rate_end", 0.3), ("random_frac_end", 0.1), ("keep_frac_end", 0.1)), second_seed=True),
    Arm("kbert-nounet", "kbert", "trainer.py's defaults without the U-net skips", model=(("unet_skips", False),),
        second_seed=True),
    # why, and what it did: trainer.py's weight_decay and records/2026-12-06-weight-decay
    Arm("kbert-wd", "kbert", "decoupled weight decay 0.05 on the hidden matrices (Muon); trainer.py's default since "
        "the records/2026-12-06-weight-decay change, the record's kbert runs have 0", train=(("weight_decay", 0.05),),
        second_seed=True),  # today's default: its own pretraining-seed spread, not the undecayed one's
]
ARM_BY_NAME = {a.name: a for a in ARMS + ABLATIONS}


def rebuild(made: dict, store, P: Preset, cfg: FrontierConfig, files: dict, val, device) -> float:
    """Pretrain a stored run again whose model folder is gone, in a scratch folder, and move the
    model into place only if it ends exactly as stored (final validation loss, rows, masks): its
    stored evaluations then stand. A run stored under another key (kept by --frontier.on_change
    keep) is tried too: the end it must reach is the test, not the key. Returns the seconds it took."""
    job = made["key"]["job"]  # the pretraining job as it was stored, name included
    name = job["name"]
    if made["key"] != store.job_key(job):
        print(f"{name} was made with another code, config or data (commit {made.get('commit')}): its rebuild counts only "
              "if it ends exactly as stored", flush=True)
    scratch = os.path.join(os.path.abspath(cfg.work_dir), "rebuild", name.replace("/", "_"))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"== rebuilding {name}: its model folder {made['result']['model']} is gone", flush=True)
    t0 = time.perf_counter()
    # the record keeps the rebuild's log beside the original's
    again = pretrain(job, P, dataclasses.replace(cfg, work_dir=scratch), files, val, device,
                     os.path.join(cfg.out, "logs", "rebuild"), store)
    stored = made["result"]
    if any(again[k] != stored[k] for k in ("final_val_loss", "data_digest", "val_digest")):
        shutil.rmtree(scratch)
        os.remove(os.path.join(cfg.out, again["log"]))
        raise RuntimeError(f"{name} pretrained again ends at validation loss {again['final_val_loss']!r} (data "
                           f"{again['data_digest']}, masks {again['val_digest']}), not at its stored "
                           f"{stored['final_val_loss']!r} ({stored['data_digest']}, {stored['val_digest']}): its "
                           f"evaluations would not score the model they scored; pretrain it anew: {anew(job, store, P)}")
    os.makedirs(os.path.dirname(stored["model"]), exist_ok=True)
    os.replace(again["model"], stored["model"])
    shutil.rmtree(scratch)
    seconds = round(time.perf_counter() - t0, 3)
    print(f"== rebuilt {name} in {seconds:.0f} s: validation loss {again['final_val_loss']:.6f} as stored", flush=True)
    return seconds


def anew(job: dict, store, P: Preset) -> str:
    """How to pretrain a stored run anew (its stored evaluations then run again): remove its stored
    result, as on_change redo remakes only runs stored under another key than today's."""
    if not job["steps"]:
        return f"remove {store.path(job['name'])} and rerun with --frontier.arms {job['arm']} --frontier.floor true"
    second = f" --frontier.seed_budgets {job['steps']}" if job["seed"] != P.seeds[0] else ""
    return (f"remove {store.path(job['name'])} and rerun with --frontier.arms {job['arm']} "
            f"--frontier.budgets {job['steps']}{second}")


def wait_while_paused(cfg: FrontierConfig):
    """Between steps and runs: wait while the pause file exists (the time is not counted)."""
    path = cfg.pause_file or os.path.join(cfg.out, "PAUSE")
    if os.path.exists(path):
        print(f"paused: {path} exists", flush=True)
        while os.path.exists(path):
            time.sleep(2)
        print("resumed", flush=True)

# ----------------------------------------------------------------------------------------
# BLiMP and finetuning: finetuner.py, the same command for every arm


def run_finetuner(args: list[str], log_path: str) -> dict:
    """finetuner.main(args) in this process (the same command for every arm; `python
    finetuner.py ARGS` runs it alone), its run log copied to log_path; returns its metrics."""
    import finetuner

    try:
        metrics = finetuner.main(args)
    except SystemExit as e:
        raise RuntimeError(f"finetuner.py {' '.join(args)}: {e}") from None
    run_id = args[args.index("--train.run_id") + 1]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    shutil.copyfile(os.path.join("logs", f"{run_id}.txt"), log_path)
    return metrics


def blimp(job: dict, P: Preset, cfg: FrontierConfig, model_dir: str, log_dir: str) -> dict:
    run_id = job["name"].replace("/", "_")
    args = ["--task", "blimp", "--train.base_model", model_dir, "--train.eval_files", os.path.abspath(cfg.blimp_file),
            "--train.blimp_pairs", str(P.blimp_pairs), "--train.run_id", run_id, "--train.overwrite", "true",
            "--train.out_dir", os.path.join(cfg.work_dir, "blimp")]
    m = run_finetuner(args, os.path.join(log_dir, f"{run_id}.txt"))
    return {"accuracy": m["accuracy"], "fields": m.get("fields"), "paradigms": m.get("paradigms"),
            "pairs_per_paradigm": P.blimp_pairs, "log": os.path.relpath(os.path.join(log_dir, f"{run_id}.txt"), cfg.out)}


def finetune(job: dict, P: Preset, cfg: FrontierConfig, model_dir: str, log_dir: str) -> dict:
    F = P.finetune
    task, run_id = job["task"], job["name"].replace("/", "_")
    examples = F.sst2_examples if task == "sst2" else F.max_train_examples
    args = ["--task", task, "--train.base_model", model_dir, "--train.data_dir", os.path.abspath(cfg.glue_dir),
            "--train.seeds", F.seeds, "--train.lr", str(job.get("lr", F.lr)), "--train.epochs", str(F.epochs),
            "--train.batch_size", str(F.batch_size), "--train.max_train_examples", str(examples),
            "--train.max_len", str(F.max_len), "--train.pack_len", str(F.pack_len), "--train.run_id", run_id,
            "--train.resume", "auto", "--train.out_dir", os.path.join(cfg.work_dir, "finetune")]
    m = run_finetuner(args, os.path.join(log_dir, f"{run_id}.txt"))
    per_seed = {}
    for r in m["seeds"]:
        scores = r["validation"]
        per_seed[str(r["seed"])] = {k: scores[k] for k in GLUE_HEADLINE[task]}
    return {"task": task, "lr": job.get("lr", F.lr), "per_seed": per_seed, "summary": m["summary"],
            "log": os.path.relpath(os.path.join(log_dir, f"{run_id}.txt"), cfg.out)}


# ----------------------------------------------------------------------------------------
# The plan: which runs, in what order, from what results


def job_name(arm: str, steps: int, seed: int, lr: float | None) -> str:
    return f"pt/{arm}/s{steps}/seed{seed}" + (f"/lr{lr:g}" if lr is not None else "")


def best_lr(store, arm: Arm, P: Preset, seed: int) -> tuple[float | None, list]:
    """The sweep at the smallest budget: P.lrs, extended by a factor of 3 past whichever end
    holds the best (lowest final validation loss), up to twice each way, so the best is
    bracketed. Returns (best lr or None while runs are missing, the lrs to run)."""
    lrs = sorted(P.lrs)
    for _ in range(4):
        results = {lr: store.result(job_name(arm.name, P.budgets[0], seed, lr)) for lr in lrs}
        if any(r is None for r in results.values()):
            return None, lrs
        loss = {lr: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf for lr, r in results.items()}
        best = min(loss, key=loss.get)
        if best == lrs[0] and lrs[0] / P.lrs[0] > 1 / 9.1:
            lrs = [lrs[0] / 3] + lrs
        elif best == lrs[-1] and lrs[-1] / P.lrs[-1] < 9.1:
            lrs = lrs + [lrs[-1] * 3]
        else:
            return best, lrs
    return best, lrs


def best_baseline(store, arms: list[Arm], P: Preset) -> Arm | None:
    """The baseline recipe whose best learning rate ends lowest at the smallest budget (None
    while a sweep is unfinished): the one that gets a second pretraining seed."""
    found = []
    for arm in arms:
        if arm.recipe != "kbert":
            best, _ = best_lr(store, arm, P, P.seeds[0])
            if best is None:
                return None
            found.append((store.result(job_name(arm.name, P.budgets[0], P.seeds[0], best))["final_val_loss"], arm.name))
    return ARM_BY_NAME[min(found)[1]] if found else None


def plan(cfg: FrontierConfig, P: Preset, arms: list[Arm], store, floors: list[Arm] | None = None) -> list[dict]:
    """Every run the record needs that its inputs allow today, in the order they should run:
    budget by budget (so an interrupted record holds whole budgets), each budget's
    pretraining (the baselines' sweep at the smallest; there and at cfg.seed_budgets, a second seed
    for the KBERT arms with second_seed and the best baseline), then BLiMP and finetuning of its
    reported models; last, the finetuning sweep's extension (finetune_runs). The initial models
    (`floors`; default: floor_arms(arms) with cfg.floor) come first, as a budget of 0 steps.
    A job: {"name", "kind", ..., "after": the runs it needs}."""
    # the finetuning lr sweep runs after every budget's runs at the protocol's lr, its extension upward last
    jobs, sweep, extend = [], [], []
    stages = set(cfg.stages.split(","))

    def evaluations(pt: str):
        nonlocal jobs, sweep, extend
        if "blimp" in stages:
            jobs.append({"name": f"blimp/{pt[3:]}", "kind": "blimp", "pretrained": pt, "after": [pt]})
        if "finetune" in stages:
            jobs += [{"name": ft_name(task, pt), "kind": "finetune", "task": task, "pretrained": pt, "after": [pt]}
                     for task in P.finetune.tasks]
            sweep += [{"name": ft_name(task, pt, lr), "kind": "finetune", "task": task, "pretrained": pt, "lr": lr,
                       "after": [pt]} for lr in P.finetune.lrs for task in P.finetune.tasks]
            extend += [{"name": ft_name(task, pt, lr), "kind": "finetune", "task": task, "pretrained": pt, "lr": lr,
                        "after": [pt]} for task in P.finetune.tasks
                       for lr in list(finetune_runs(store, P, task, pt))[1 + len(P.finetune.lrs):]]

    if floors is None:
        floors = floor_arms(arms) if cfg.floor else []
    for arm in floors:
        name = job_name(arm.name, 0, P.seeds[0], None)
        jobs.append({"name": name, "kind": "pretrain", "arm": arm.name, "steps": 0, "seed": P.seeds[0], "after": []})
        evaluations(name)
    # the sweeps and the record's best baseline (among all its recipes, whichever arms this process plans: once, a
    # process given only bert among the baselines started a second BERT seed), read once from the store
    sweeps = {arm.name: best_lr(store, arm, P, P.seeds[0]) for arm in arms if arm.recipe != "kbert"}
    best_base = best_baseline(store, ARMS, P)
    wanted = budget_list(cfg, P) if cfg.budgets else P.budgets
    seeded = budget_list(cfg, P, "seed_budgets") if cfg.seed_budgets else []
    for b, steps in enumerate(P.budgets):
        if steps not in wanted:
            continue
        reported = []  # pretraining runs of this budget whose models are evaluated
        for arm in arms:
            if arm.recipe == "kbert":
                lr = None
            else:
                lr, lrs = sweeps[arm.name]
                if b == 0:
                    jobs += [{"name": job_name(arm.name, steps, P.seeds[0], x), "kind": "pretrain", "arm": arm.name,
                              "steps": steps, "seed": P.seeds[0], "lr": x, "after": []} for x in lrs]
                if lr is None:
                    continue  # the rest of this arm waits for its sweep
            seeds = [P.seeds[0]]
            if (b == 0 or steps in seeded) and (arm.second_seed or arm == best_base):
                seeds += list(P.seeds[1:])
            for seed in seeds:
                name = job_name(arm.name, steps, seed, lr)
                job = {"name": name, "kind": "pretrain", "arm": arm.name, "steps": steps, "seed": seed, "after": []}
                if lr is not None:
                    job["lr"] = lr
                if name not in {j["name"] for j in jobs}:
                    jobs.append(job)
                reported.append(name)
        for pt in reported:
            evaluations(pt)
    return jobs + sweep + extend


def floor_arms(arms: list[Arm]) -> list[Arm]:
    """One arm per distinct initial model among the arms, named after the first arm of ARMS and
    ABLATIONS with that model, whichever arms a process is given: arms that differ only in training
    or data (kbert-wd, kbert-sep, kbert-mask30) start from kbert's model, and share its floor."""
    models = {(arm.recipe, arm.model) for arm in arms}
    first = {}
    for arm in ARMS + ABLATIONS:
        if (arm.recipe, arm.model) in models:
            first.setdefault((arm.recipe, arm.model), arm)
    return list(first.values())


def budget_list(cfg: FrontierConfig, P: Preset, field: str = "budgets") -> list[int]:
    """--frontier.budgets (or .seed_budgets) as optimizer steps, each one of the preset's budgets."""
    given = getattr(cfg, field)
    try:
        wanted = [int(x) for x in given.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--frontier.{field} {given!r}: give optimizer steps separated by commas, "
                         f"from the {cfg.preset} preset's {','.join(map(str, P.budgets))}") from None
    unknown = sorted(set(wanted) - set(P.budgets))
    if unknown or not wanted:
        raise SystemExit(f"--frontier.{field} {given!r}: {unknown or 'none given'} not among the {cfg.preset} "
                         f"preset's budgets {','.join(map(str, P.budgets))} (optimizer steps)")
    return wanted


def waiting_for_sweep(cfg: FrontierConfig, P: Preset, arms: list[Arm], store) -> list[str]:
    """The baselines for which --frontier.budgets plans nothing: their lr sweep at the smallest
    budget is unfinished and that budget is not among the ones given."""
    if not cfg.budgets or P.budgets[0] in budget_list(cfg, P):
        return []
    return [arm.name for arm in arms if arm.recipe != "kbert" and best_lr(store, arm, P, P.seeds[0])[0] is None]


def stored_seed_budgets(store, P: Preset) -> list[int]:
    """The budgets past the smallest at which a second pretraining seed is stored, so that a report
    plans (counts, core-hours) what its tables show, whatever --frontier.seed_budgets it is given."""
    return [steps for steps in P.budgets[1:]
            if any(glob.glob(store.path(f"pt/*/s{steps}/seed{seed}*")) for seed in P.seeds[1:])]


def ft_name(task: str, pt: str, lr: float | None = None) -> str:
    """A finetuning run's name: at the protocol's lr (None) ft/<task>/<pretraining run>, in the sweep .../flr<lr>."""
    return f"ft/{task}/{pt[3:]}" + (f"/flr{lr:g}" if lr is not None else "")


# ----------------------------------------------------------------------------------------
# Stored results: keyed by config, data and code; claimed by lock files


# what a run's result depends on, by kind: these files, and the functions of this one that run it (so an edit of
# the report or the scheduling does not count as a new code); the key holds their digest, the commit is recorded
CODE_FILES = {"pretrain": ("model.py", "optimizer.py", "trainer.py", "common.py", "data/shards.py", "bench/baselines.py"),
              "eval": ("model.py", "finetuner.py", "evals.py", "tokenizer.py", "hf_kbert.py", "common.py", "trainer.py",
                       "optimizer.py")}
CODE_FUNCTIONS = {"pretrain": ("Stream", "validation_set", "kbert_setup", "baseline_setup", "pretrain"),
                  "eval": ("run_finetuner", "blimp", "finetune")}


def code_digest(kind: str) -> str:
    import inspect

    h = hashlib.sha256()
    for name in CODE_FILES[kind]:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            h.update(name.encode() + open(path, "rb").read())
    for name in CODE_FUNCTIONS[kind]:
        h.update(inspect.getsource(globals()[name]).encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    files = sorted({f for names in CODE_FILES.values() for f in names} | {"bench/frontier.py"})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], capture_output=True, text=True, cwd=ROOT).stdout
    return out + ("+uncommitted" if dirty.strip() else "")


class Store:
    """runs/<job>.json in the record folder: {"key", "result", "commit", "run" (a stamp of this
    try), "finished", and for an evaluation "pretrained_run" (its model's stamp)}; a job is
    claimed by runs/<job>.lock (its pid), so that several processes can share a record."""

    def __init__(self, folder: str, key: dict, on_change: str):
        self.folder, self.key, self.on_change = os.path.join(folder, "runs"), key, on_change
        os.makedirs(self.folder, exist_ok=True)

    def path(self, name: str, ext: str = ".json") -> str:
        return os.path.join(self.folder, name.replace("/", "__") + ext)

    def job_key(self, job: dict) -> dict:
        """The key a job's result is stored under, as JSON reads it back (tuples become lists): the
        record's config and data, the code its kind runs, the job itself."""
        kind = "pretrain" if job["kind"] == "pretrain" else "eval"
        key = {**self.key, "config": self.key["config"][kind], "code": self.key["code"][kind]}
        return json.loads(json.dumps({**key, "job": {k: v for k, v in job.items() if k not in ("after",)}}))

    def load(self, name: str) -> dict | None:
        p = self.path(name)
        return json.load(open(p)) if os.path.isfile(p) else None

    def status(self, job: dict) -> str:
        """'done', 'todo', or 'redo' (stored under another key and on_change redo, or an evaluation
        of a model since pretrained again). A stored result under another key with on_change refuse
        stops the program."""
        stored = self.load(job["name"])
        if stored is None:
            return "todo"
        if "pretrained" in job and self.stale(stored, job):
            return "redo"
        key = self.job_key(job)
        if stored["key"] == key or self.on_change == "keep":
            return "done"
        if self.on_change == "redo":
            return "redo"
        differ = [k for k in ("config", "data", "code", "job") if stored["key"].get(k) != key.get(k)]
        raise SystemExit(f"{self.path(job['name'])} was made with another {', '.join(differ)} (stored at commit "
                         f"{stored.get('commit')}): rerun with --frontier.on_change keep to use it as it is (its key is "
                         "recorded), --frontier.on_change redo to run it again, or give another --frontier.out")

    def stale(self, stored: dict, job: dict) -> bool:
        """Whether a stored evaluation scored another model than the one its pretraining run holds
        now (that run was made again, e.g. with on_change redo): it counts under no on_change.
        Evaluations stored before their model's stamp was kept: stale if they finished before it."""
        pt = self.load(job["pretrained"])
        if pt is None:
            return False  # no model yet: the job waits for its pretraining anyway
        if "pretrained_run" in stored:
            return stored["pretrained_run"] != self.stamp(pt)
        return stored["finished"] < pt["finished"]

    @staticmethod
    def stamp(stored: dict) -> str:
        """A stored run's stamp: its own, or when it finished if it was stored before stamps."""
        return stored.get("run", stored["finished"])

    def result(self, name: str) -> dict | None:
        """A finished run's result, if it counts under this key (or --frontier.on_change keep)."""
        stored = self.load(name)
        if stored is None or self.status({**stored["key"]["job"], "name": name}) != "done":
            return None
        return stored["result"]

    def claim(self, name: str) -> bool:
        lock = self.path(name, ".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self.locked(name):
                return False  # a live process works on it
            self.release(name)  # left by a process that died
            return self.claim(name)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def release(self, name: str):
        try:
            os.remove(self.path(name, ".lock"))
        except FileNotFoundError:
            pass

    def locked(self, name: str) -> bool:
        """Held by a live process (a lock left by a process that died, say a stopped rebuild, is not)."""
        try:
            text = open(self.path(name, ".lock")).read()
            if text:  # empty: a claim between creating the file and writing its pid, held
                os.kill(int(text), 0)
            return True
        except PermissionError:  # alive, but another user's: still its run
            return True
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False

    def save(self, job: dict, result: dict, model_stamp: str | None = None):
        """Stores a finished run; an evaluation with model_stamp, the stamp of the model it read
        (taken when it read the model folder)."""
        tmp = self.path(job["name"]) + f".tmp{os.getpid()}"
        record = {"key": self.job_key(job), "commit": git_commit(), "run": uuid.uuid4().hex[:16],
                  "finished": datetime.datetime.now().isoformat(timespec="seconds"), "result": result}
        if "pretrained" in job:  # which model it scored
            record["pretrained_run"] = model_stamp
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, self.path(job["name"]))
        if os.path.exists(self.path(job["name"], ".failed")):  # an earlier try's failure, now superseded
            os.remove(self.path(job["name"], ".failed"))


# ----------------------------------------------------------------------------------------
# Report: one entry per arm and budget, tables, plots


def glue_small(ft: dict) -> dict | None:
    """Per finetuning seed: the mean over tasks of each task's headline (MRPC: mean of F1 and
    accuracy); then median, min and max over seeds. None until every task is in."""
    seeds = sorted(set.intersection(*(set(r["per_seed"]) for r in ft.values()))) if ft else []
    if not seeds:
        return None
    per_seed = {s: float(np.mean([headline(t, r["per_seed"][s]) for t, r in ft.items()])) for s in seeds}
    vals = list(per_seed.values())
    return {"per_seed": per_seed, "median": float(np.median(vals)), "min": min(vals), "max": max(vals)}


def headline(task: str, scores: dict) -> float:
    """One finetuning seed's headline score on a task (MRPC: the mean of F1 and accuracy)."""
    return float(np.mean([scores[m] for m in GLUE_HEADLINE[task]]))


def task_median(task: str, per_seed: dict) -> float:
    """The median over finetuning seeds of a task's headline."""
    return float(np.median([headline(task, r) for r in per_seed.values()]))


def finetune_runs(store, P: Preset, task: str, pt: str) -> dict:
    """The finetuning lrs of one task on one pretrained model, each with its stored result (None
    while not run): the protocol's lr and the sweep, then P.finetune.extend's lrs one at a time
    while the best median so far is the highest lr run (each waits for the ones below it)."""
    runs = {lr: store.result(ft_name(task, pt, None if lr == P.finetune.lr else lr)) for lr in (P.finetune.lr, *P.finetune.lrs)}
    for lr in P.finetune.extend:
        if any(r is None for r in runs.values()):
            break
        medians = {x: task_median(task, r["per_seed"]) for x, r in runs.items()}
        if max(medians, key=medians.get) != max(runs):  # max keeps the first of equals
            break
        runs[lr] = store.result(ft_name(task, pt, lr))
    return runs


def best_finetune_lr(store, P: Preset, task: str, pt: str) -> dict | None:
    """The finetuning sweep of one task on one pretrained model: {"lr", "per_seed", "medians",
    "open"} of the lr whose median is best (the first of equals, the protocol's lr first); None
    until every lr of the sweep has finished. The extension's lr planned last and not run (say, its
    model folder was lost) leaves the best as it stands, with "open": that lr."""
    runs = finetune_runs(store, P, task, pt)
    done = {lr: r for lr, r in runs.items() if r is not None}
    if len(done) < 1 + len(P.finetune.lrs):
        return None
    medians = {lr: task_median(task, r["per_seed"]) for lr, r in done.items()}
    best = max(medians, key=lambda lr: medians[lr])  # max keeps the first of equals
    return {"lr": best, "per_seed": runs[best]["per_seed"], "medians": medians,
            "open": None if len(done) == len(runs) else max(runs)}


def crossing(curve: list[dict], target: float, key: str) -> float | None:
    """The first `key` (tokens or wall_s) at which the validation loss reaches `target`,
    linearly interpolated between evaluations; None if it never does."""
    if curve and curve[0]["val_loss"] <= target:
        return curve[0][key]
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= target:
            frac = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[key] + frac * (b[key] - a[key])
    return None


def summarize(store: Store, P: Preset, arms: list[Arm], unigram: dict) -> list[dict]:
    entries = []

    def add(arm: Arm, steps: int, seed: int, lr: float | None, sweep: list):
        name = job_name(arm.name, steps, seed, lr)
        pt = store.result(name)
        if pt is None:
            return
        ft = {t: r for t in P.finetune.tasks if (r := store.result(ft_name(t, name))) is not None}
        bl = store.result(f"blimp/{name[3:]}")
        # the finetuning lr sweep: each task at its best lr, once every lr of every task has finished
        best = {t: b for t in P.finetune.tasks if (b := best_finetune_lr(store, P, t, name)) is not None}
        sweep_cols = {"tasks_best": best, "glue_small_best": glue_small(best) if len(best) == len(
            P.finetune.tasks) else None} if P.finetune.lrs else {}
        entries.append({
            "arm": arm.name, "recipe": arm.recipe, "what": arm.what, "budget_steps": steps, "seed": seed, "lr": lr,
            "params": pt["params"], "tokens": pt["tokens"], "flops": pt["flops"], "wall_s": pt["wall_s"],
            "cpu_s": pt["cpu_s"], "compile_s": pt.get("compile_s", 0.0), "final_val_loss": pt["final_val_loss"],
            "unigram_loss": unigram["unigram_loss"],
            "past_unigram": pt["final_val_loss"] <= unigram["unigram_loss"] - 0.5,
            "tasks": {t: r["per_seed"] for t, r in ft.items()}, "glue_small": glue_small(ft) if len(ft) == len(
                P.finetune.tasks) else None, "blimp": bl["accuracy"] if bl else None, "sweep": sweep,
            "curve": pt["curve"], "data_digest": pt["data_digest"], "val_digest": pt["val_digest"],
            "log": pt["log"], "threads": pt.get("threads"), "cpu": pt.get("cpu"), **sweep_cols})

    for arm in floor_arms(arms):  # the initial models (--frontier.floor), where they were scored
        add(arm, 0, P.seeds[0], None, [])
    for arm in arms:
        lr, sweep = None, []
        if arm.recipe != "kbert":
            lr, lrs = best_lr(store, arm, P, P.seeds[0])
            if lr is None:
                continue  # its sweep is unfinished: nothing of this arm is reported yet
            sweep = [{"lr": x, "final_val_loss": (store.result(job_name(arm.name, P.budgets[0], P.seeds[0], x)) or
                                                  {}).get("final_val_loss")} for x in lrs]
        for steps in P.budgets:
            for seed in P.seeds:  # the second seed where it was run (the smallest budget, and --frontier.seed_budgets)
                add(arm, steps, seed, lr, sweep)
    # per budget and pretraining seed: where each curve reaches the best baseline's final loss
    for steps, seed in {(e["budget_steps"], e["seed"]) for e in entries if e["budget_steps"]}:
        at = [e for e in entries if e["budget_steps"] == steps and e["seed"] == seed]
        base = [e for e in at if e["recipe"] != "kbert" and math.isfinite(e["final_val_loss"])]
        if not base:
            continue
        best = min(base, key=lambda e: e["final_val_loss"])
        for e in at:
            e["best_baseline"] = {"arm": best["arm"], "final_val_loss": best["final_val_loss"], "tokens": best["tokens"],
                                  "wall_s": best["wall_s"]}
            tok, wall = crossing(e["curve"], best["final_val_loss"], "tokens"), crossing(e["curve"], best["final_val_loss"], "wall_s")
            e["tokens_to_best_baseline"] = tok
            e["wall_s_to_best_baseline"] = wall
            e["token_ratio"] = tok / best["tokens"] if tok is not None else None
            e["wall_apart"] = wall_apart(e, best)  # other threads or another cpu: the wall times do not compare
            e["wall_ratio"] = wall / best["wall_s"] if wall is not None and best["wall_s"] and not e["wall_apart"] else None
    return entries


def wall_apart(e: dict, base: dict) -> str | None:
    """Why a run's wall time does not compare with its baseline's (other threads or another cpu,
    where both runs stored them), or None."""
    differ = [f"{k} {e[k]} against {base[k]}" for k in ("threads", "cpu") if e.get(k) and base.get(k) and e[k] != base[k]]
    return ", ".join(differ) or None


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def task_cell(e: dict, task: str) -> str:
    """A task's median at the protocol's finetuning lr -> its best median over the sweep (that lr;
    "top" when it is the highest lr run, so the task's best is not bracketed; "<lr> not run" when
    the extension planned that lr and it has not run)."""
    per, best = e["tasks"].get(task), e.get("tasks_best", {}).get(task)
    cell = fmt(task_median(task, per) if per else None, ".1f")
    if best:
        medians = {float(lr): m for lr, m in best["medians"].items()}  # results.json stores the lrs as strings
        notes = ["top"] * (best["lr"] == max(medians)) + ([f"{best['open']:g} not run"] if best.get("open") else [])
        cell += f" -> {medians[best['lr']]:.1f} ({', '.join([format(best['lr'], 'g'), *notes])})"
    return cell


def glue_cell(g: dict | None, none="-") -> str:
    """GLUE-small's median [min, max] over finetuning seeds."""
    return f"{g['median']:.1f} [{g['min']:.1f}, {g['max']:.1f}]" if g else none


def ratio_cell(e: dict) -> str:
    """Tokens / wall time to the best baseline's final loss, as a fraction of the baseline's."""
    if not e["budget_steps"]:
        return "- (no pretraining)"
    if "token_ratio" not in e:
        return "- (no baseline of this seed)"
    wall = f"- ({e['wall_apart']})" if e.get("wall_apart") else fmt(e["wall_ratio"], ".2f", "never")
    return f"{fmt(e['token_ratio'], '.2f', 'never')} / {wall}"


def blimp_cell(e: dict, none="-") -> str:
    return fmt(100 * e["blimp"] if e["blimp"] is not None else None, ".1f", none)


def loss_note(e: dict, bar: str) -> str:
    """What a final loss cell adds: an initial model, or a run not past the unigram bar."""
    if not e["budget_steps"]:
        return " (initialization)"
    return "" if e["past_unigram"] else f" (not past {bar})"


def md_rows(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] +
                     ["| " + " | ".join(cells) + " |" for cells in rows])


def table(entries: list[dict]) -> str:
    tasks = sorted({t for e in entries for t in e["tasks"]}, key=list(GLUE_HEADLINE).index)
    swept = any("tasks_best" in e for e in entries)  # the finetuning lr sweep: a column and each task's best next to it
    head = ["arm", "budget (tokens)", "seed", "lr", "FLOPs", "wall s", "final val loss", "x best baseline tokens / wall",
            "GLUE-small median [min, max]"] + (["GLUE-small, best finetuning lr per task"] if swept else []) + [
            "BLiMP %"] + [f"{t} (median{' -> best (its lr)' if swept else ''})" for t in tasks]
    lines = [md_rows(head, [[
        e["arm"], f"{e['tokens']:,}", str(e["seed"]), fmt(e["lr"], "g", "defaults" if e["budget_steps"] else "- (initialization)"),
        f"{e['flops']:.3g}", f"{e['wall_s']:.0f}", f"{e['final_val_loss']:.3f}" + loss_note(e, "unigram - 0.5"),
        ratio_cell(e), glue_cell(e["glue_small"]), *([glue_cell(e.get("glue_small_best"))] if swept else []),
        blimp_cell(e), *[task_cell(e, t) for t in tasks]]
        for e in sorted(entries, key=lambda e: (e["budget_steps"], e["seed"], e["arm"]))])]
    if swept:
        lines += ["", "Each task's cell: its median at the protocol's finetuning lr -> its best median over the finetuning "
                  "lr sweep (that lr; \"top\": the highest lr run, so the task's best is not bracketed; \"<lr> not run\": "
                  "the sweep's extension upward planned that lr, which has not run)."]
    return "\n".join(lines)


def short_table(entries: list[dict], arms: list[Arm], lr: float, tasks=("sst2", "stsb")) -> str:
    """The short table README.md shows: budgets in order, arms in the order --frontier.arms names them."""
    rank = {a.name: i for i, a in enumerate(arms)}
    head = ["arm", "tokens", "pretraining seed", "lr or settings", "final val loss",
            "tokens / wall to the best baseline's final loss",
            f"GLUE-small, finetuning lr {lr:g}", "GLUE-small, best finetuning lr per task", "BLiMP %",
            *[f"{t} ({lr:g} -> best, its lr)" for t in tasks]]
    rows = []
    for e in sorted(entries, key=lambda e: (e["budget_steps"], rank.get(e["arm"], len(rank)), e["arm"], e["seed"])):
        arm = ARM_BY_NAME.get(e["arm"], Arm(e["arm"], e["recipe"], ""))  # a KBERT arm's lr cell: its overrides
        overrides = ["[SEP] ends each document"] * arm.sep + [f"{k} {v}" for k, v in arm.model + arm.train]
        settings = ("initialization (no pretraining)" if not e["budget_steps"] else fmt(e["lr"], "g") if e["lr"] is not None
                    else ", ".join(overrides) or "defaults")
        ratio = ratio_cell(e) if e["recipe"] == "kbert" else (
            "(the baseline)" if e["arm"] == e.get("best_baseline", {}).get("arm") else "-")
        rows.append([
            e["arm"], f"{e['tokens'] / 1e6:.1f}M" if e["tokens"] >= 1e6 else f"{e['tokens']:,}", str(e["seed"]), settings,
            f"{e['final_val_loss']:.3f}" + loss_note(e, "the bar"), ratio,
            glue_cell(e["glue_small"], "not run"), glue_cell(e.get("glue_small_best"), "not run"), blimp_cell(e, "not run"),
            *[task_cell(e, t) for t in tasks]])
    return md_rows(head, rows)


def floor_table(entries: list[dict], arms: list[Arm], lr: float) -> str:
    """Each arm against its model as initialized (its floor: floor_arms), budget by budget: GLUE-small
    at the protocol's lr and at each task's best, BLiMP. A budget's values are its pretraining seeds."""
    tokens = {e["budget_steps"]: e["tokens"] for e in entries if e["budget_steps"]}  # a budget's tokens, its column
    budgets = sorted(tokens)
    metrics = {f"GLUE-small at {lr:g}": lambda e: (e["glue_small"] or {}).get("median"),
               "GLUE-small, best lr per task": lambda e: (e.get("glue_small_best") or {}).get("median"),
               "BLiMP %": lambda e: None if e["blimp"] is None else 100 * e["blimp"]}

    def cell(arm: str, steps: int, value) -> str:
        runs = sorted((e for e in entries if e["arm"] == arm and e["budget_steps"] == steps), key=lambda e: e["seed"])
        return ", ".join(fmt(value(e), ".1f", "not run") for e in runs) or "-"

    head = ["arm"] + [f"{m}: initialization / " + " / ".join(f"{tokens[b] / 1e6:.1f}M" for b in budgets)
                      for m in metrics]
    rows = []
    for a in arms:
        if any(e["arm"] == a.name for e in entries):
            floor = floor_arms([a])[0].name
            rows.append([a.name] + [" / ".join([cell(floor, 0, value)] + [cell(a.name, b, value) for b in budgets])
                                    for value in metrics.values()])
    return md_rows(head, rows)


def plot(entries: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("glue_small", "GLUE-small (median of finetuning seeds)"), ("blimp", "BLiMP accuracy %"),
               ("final_val_loss", "validation loss (fixed masks)")]
    if any(e.get("glue_small_best") for e in entries):
        metrics.insert(1, ("glue_small_best", "GLUE-small, best finetuning lr per task"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.7 * len(metrics), 5))
    colors = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(e["arm"] for e in entries))}  # one per arm in every panel
    for ax, (key, label) in zip(axes, metrics):

        def val(e):
            v = e.get(key)
            if key.startswith("glue_small"):
                return v["median"] if v else None
            return 100 * v if key == "blimp" and v is not None else v

        for arm in colors:
            pts = sorted([e for e in entries if e["arm"] == arm], key=lambda e: e["flops"])
            for e in pts:  # the initial model (0 FLOPs, off a log axis): a dotted line, not on the loss panel
                if not e["budget_steps"] and key != "final_val_loss" and val(e) is not None:
                    ax.axhline(val(e), ls=":", color=colors[arm], label=f"{arm}, no pretraining")
            xs, ys, lo, hi = [], [], [], []
            for steps in sorted({e["budget_steps"] for e in pts} - {0}):
                group = [e for e in pts if e["budget_steps"] == steps]
                vals = [val(e) for e in group if val(e) is not None]
                if key.startswith("glue_small"):  # the bars: finetuning seeds' range (and pretraining seeds' where there are two)
                    vals += [x for e in group if e.get(key) for x in (e[key]["min"], e[key]["max"])]
                if not vals:
                    continue
                main = val(group[0]) if val(group[0]) is not None else float(np.median(vals))
                xs.append(np.mean([e["flops"] for e in group]))
                ys.append(main)
                lo.append(main - min(vals))
                hi.append(max(vals) - main)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, lw=2.5 if arm == "kbert" else 1.5, label=arm,
                            color=colors[arm])
        ax.set_xscale("log")
        ax.set_xlabel("pretraining FLOPs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
            break
    fig.suptitle("bars: range over seeds (finetuning seeds; where there are two pretraining seeds, both)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def core_hours(store: Store, jobs: list[dict]) -> dict:
    """Per arm: the core-hours its finished runs took (wall time from setup to stored result, compile
    and validation included, times the run's threads; runs stored without them used one), by kind."""
    hours = {}
    for j in jobs:
        r = store.load(j["name"])
        if r is None or "elapsed_s" not in r["result"]:
            continue
        _, arm, budget, *_ = (j["name"] if j["kind"] == "pretrain" else j["pretrained"]).split("/")  # pt/<arm>/s<steps>/...
        arm += " (initialization)" if budget == "s0" else ""  # a floor's hours apart from its arm's pretrained models'
        per = hours.setdefault(arm, {"pretrain": 0.0, "blimp": 0.0, "finetune": 0.0})
        per[j["kind"]] += r["result"]["elapsed_s"] * (r["result"].get("threads") or 1) / 3600
    return hours


def report(store: Store, jobs: list[dict], P: Preset, arms: list[Arm], cfg: FrontierConfig, header: dict, unigram: dict):
    entries = summarize(store, P, arms, unigram)
    done = {j["name"] for j in jobs if store.load(j["name"]) is not None}
    hours = core_hours(store, jobs)
    out = {**header, "unigram": unigram, "runs_done": len(done), "runs_planned": len(jobs), "core_hours": hours,
           "entries": [{k: v for k, v in e.items() if k != "curve"} | {"curve": e["curve"]} for e in entries]}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    floor = ("Against the floor: each arm's model as initialized and pretrained (medians over the finetuning seeds; a "
             f"budget's values are its pretraining seeds):\n\n{floor_table(entries, arms, P.finetune.lr)}\n\n"
             if any(not e["budget_steps"] for e in entries) else "")
    md = (f"`{header['command']}`, code {header['code']['pretrain']} (pretraining) / {header['code']['eval']} (evaluation), "
          f"commit {header['commit']}, {header['device']}, torch "
          f"{header['torch']}, transformers {header['transformers']}\n\nUnigram cross-entropy of the validation masks "
          f"(counted on the {unigram['train_tokens']:,} training tokens, {unigram['smoothing']}): "
          f"{unigram['unigram_loss']:.3f}; every run must end at least 0.5 below it. {len(done)} of {len(jobs)} planned runs "
          f"finished.\n\n{table(entries)}\n\nThe same, short (README.md's table):\n\n"
          f"{short_table(entries, arms, P.finetune.lr)}\n\n{floor}Core-hours of the finished runs (each run's wall time "
          f"times its threads; pretraining includes the learning-rate sweep):\n\n| arm | pretraining | BLiMP | finetuning | total |\n"
          f"|---|---|---|---|---|\n" + "".join(f"| {a} | {h['pretrain']:.2f} | {h['blimp']:.2f} | {h['finetune']:.2f} | "
                                              f"{sum(h.values()):.2f} |\n" for a, h in hours.items()))
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        plot(entries, os.path.join(cfg.out, "frontier.png"))
    except ImportError:
        print("matplotlib is not installed: no frontier.png (pip install matplotlib)")
    return out


# ----------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides, _ = common.parse_overrides(argv, {"frontier": FrontierConfig}, usage=__doc__.split("Stages,")[0].rstrip())
    cfg = FrontierConfig(**overrides["frontier"])
    common.check_config(cfg, "frontier")
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - {"corpus", "pack", "pretrain", "blimp", "finetune", "report"})
    if unknown:
        raise SystemExit(f"--frontier.stages: unknown {unknown}; choose from corpus, pack, pretrain, blimp, finetune, report")
    P = PRESETS[cfg.preset]
    for field in ("budgets", "seed_budgets"):
        if getattr(cfg, field):
            budget_list(cfg, P, field)  # a bad list stops here, before any work
    arms = ARMS
    if cfg.arms:
        wanted = [a.strip() for a in cfg.arms.split(",") if a.strip()]
        unknown = sorted(set(wanted) - set(ARM_BY_NAME))
        if unknown:
            raise SystemExit(f"--frontier.arms: unknown {unknown}; choose from {', '.join(ARM_BY_NAME)}")
        arms = [ARM_BY_NAME[a] for a in wanted]
    try:
        import transformers
    except ImportError:
        raise SystemExit("the baselines need transformers: pip install -r requirements.txt") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    cfg.out = cfg.out or os.path.join("records", f"{datetime.date.today().isoformat()}-{cfg.preset}-frontier")
    os.makedirs(cfg.out, exist_ok=True)

    train_files, val_files = corpus_files(cfg.corpus)
    if not train_files or not val_files:
        if "corpus" not in stages:
            raise SystemExit(f"no corpus at {cfg.corpus}_{{train,val}}_*.bin: add the corpus stage (--frontier.stages)")
        build_corpus(cfg)
        train_files, val_files = corpus_files(cfg.corpus)
    files = {"train": train_files, "val": val_files}
    if "pack" in stages:
        return pack(cfg, P)
    val = validation_set(val_files, P, device)
    unigram = unigram_reference(train_files, val[1])
    # a run's key: what shapes its result (its own steps, seed and lr are in its job; the budgets, sweep and
    # seeds of the preset only decide which runs there are)
    preset = {k: v for k, v in dataclasses.asdict(P).items() if k not in ("budgets", "lrs", "seeds")}
    # the finetuning sweep's extra lrs (and its extension) are in each of their jobs, not in the key (the runs at lr
    # keep theirs)
    evaluation = {"finetune": {k: v for k, v in preset.pop("finetune").items() if k not in ("lrs", "extend")},
                  "blimp_pairs": preset.pop("blimp_pairs"), "glue_dir": cfg.glue_dir, "blimp_file": cfg.blimp_file}
    key = {"config": {"pretrain": preset, "eval": evaluation},
           "data": digest(train_files + val_files), "code": {"pretrain": code_digest("pretrain"), "eval": code_digest("eval")}}
    store = Store(cfg.out, key, cfg.on_change)
    header = {"command": "python -m bench.frontier " + " ".join(argv), "commit": git_commit(), "code": key["code"],
              "data": key["data"], "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "preset": dataclasses.asdict(P), "config": dataclasses.asdict(cfg),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu: {common.hardware_summary(device)}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "val": {"rows": len(val[0]), "masked_tokens": int((val[1] >= 0).sum()), "digest": val[2]}}
    print(json.dumps({k: header[k] for k in ("command", "commit", "code", "data", "device")}, indent=1), flush=True)

    idle = waiting_for_sweep(cfg, P, arms, store)
    if idle:
        print(f"{', '.join(idle)}: nothing planned at --frontier.budgets {cfg.budgets}, because the learning-rate sweep "
              f"at the smallest budget ({P.budgets[0]} steps) is unfinished; add {P.budgets[0]} to --frontier.budgets "
              "(or run it in another process with --frontier.wait true here)", flush=True)
    log_dir = os.path.join(cfg.out, "logs")
    failed = set()  # runs that raised in this process: reported, left for the next invocation
    while True:
        jobs = [j for j in plan(cfg, P, arms, store) if j["kind"] in stages]
        pending = [j for j in jobs if store.status(j) != "done" and j["name"] not in failed]
        ready = [j for j in pending if all(store.result(a) is not None and not store.locked(a) and a not in failed
                                           for a in j["after"])
                 and not store.locked(j["name"])]  # a finished run locked: another process rebuilds its model
        if not ready:
            unfinished = cfg.wait and any(store.status(j) != "done" for j in plan(cfg, P, arms, store))
            if unfinished or any(store.locked(n) for j in pending for n in [j["name"], *j["after"]]):
                print(f"waiting for runs that other processes hold or will make ({len(pending)} to go)", flush=True)
                time.sleep(30)
                continue
            break
        job = ready[0]
        wait_while_paused(cfg)
        if not store.claim(job["name"]):
            continue
        try:
            t0 = time.perf_counter()
            print(f"== {job['name']} ({len(pending)} runs to go)", flush=True)
            stamp, rebuilt_s = None, None
            if job["kind"] == "pretrain":
                result = pretrain(job, P, cfg, files, val, device, log_dir, store)
            else:
                made = store.load(job["pretrained"])  # its model, and the stamp its result will carry
                model_dir, stamp = made["result"]["model"], store.stamp(made)
                if not os.path.isdir(model_dir):  # models live in the work folder, which a record does not carry
                    if not cfg.rebuild:
                        raise OSError(f"{job['pretrained']}'s model folder {model_dir} is gone (--frontier.work_dir is "
                                      "not part of the record): add --frontier.rebuild true to pretrain it again as it was "
                                      f"made, or pretrain it anew ({anew(made['key']['job'], store, P)}), which runs its "
                                      "stored evaluations again too")
                    if not store.claim(job["pretrained"]):  # another process is rebuilding it: this run waits
                        continue
                    try:
                        rebuilt_s = rebuild(made, store, P, cfg, files, val, device)
                    except RuntimeError:
                        failed.add(job["pretrained"])  # not remade: its other evaluations are not tried here either
                        raise
                    finally:
                        store.release(job["pretrained"])
                    t0 = time.perf_counter()  # the evaluation's own time; the rebuild's is stored beside it
                if job["kind"] == "blimp":
                    result = blimp(job, P, cfg, model_dir, os.path.join(log_dir, "blimp"))
                else:
                    result = finetune(job, P, cfg, model_dir, os.path.join(log_dir, "finetune"))
            result["elapsed_s"] = round(time.perf_counter() - t0, 3)
            # what the run's wall time was measured on: a record may be built across machines and thread counts
            result.setdefault("threads", torch.get_num_threads())
            result.setdefault("cpu", common.cpu_name())
            if rebuilt_s is not None:
                result["rebuilt_model_s"] = rebuilt_s
            store.save(job, result, stamp)
        except (RuntimeError, ValueError, OSError) as e:  # one failed run must not stop an unattended record
            failed.add(job["name"])
            print(f"!! {job['name']} failed: {type(e).__name__}: {e}", flush=True)
            with open(store.path(job["name"], ".failed"), "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
        finally:
            store.release(job["name"])
    if failed:
        print(f"{len(failed)} run(s) failed (runs/*.failed): {sorted(failed)}; rerun the command to retry them")
    # the whole record: every budget, and a second seed wherever --frontier.seed_budgets or a stored run puts one
    seeded = set(budget_list(cfg, P, "seed_budgets") if cfg.seed_budgets else []) | set(stored_seed_budgets(store, P))
    # and the initial models the record holds (or --frontier.floor plans)
    floors = [a for a in floor_arms(arms) if cfg.floor or store.result(job_name(a.name, 0, P.seeds[0], None))]
    jobs = plan(dataclasses.replace(cfg, stages="pretrain,blimp,finetune", budgets="",
                                    seed_budgets=",".join(map(str, sorted(seeded)))), P, arms, store, floors)
    return report(store, jobs, P, arms, cfg, header, unigram) if "report" in stages else {"jobs": jobs}


if __name__ == "__main__":
    main()
