"""KBERT masked-language-model pretraining.

    python trainer.py --demo                                  # tiny model, CPU, a few minutes
    torchrun --standalone --nproc_per_node=8 trainer.py       # KBERT-base on FineWeb-EDU 10B
    torchrun ... trainer.py --train.resume checkpoints/RUN_ID # continue a run exactly (its config, plus any options given)
    torchrun ... trainer.py --train.run_id NAME --train.resume auto   # re-queueable: continues NAME, or starts it

Every hyperparameter is a field below, overridable as `--group.key value`.
Sections: hyperparameters -> distributed setup and logging -> data -> masking ->
model and optimizer -> schedules -> checkpoints and export -> training loop.
"""
import collections
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__":  # a Ctrl-C while torch loads (seconds): one line, not an import traceback
    signal.signal(signal.SIGINT, lambda *_: (print("stopped by SIGINT while loading", file=sys.stderr), os._exit(130)))

import numpy as np
import torch

import common
from common import opt
from data.shards import ShardError, open_shard, write_shard
from model import CLS_ID, KBERT, MASK_ID, N_TARGETS, PAD_ID, SEP_ID, ModelConfig, document_ids
from optimizer import MuonAdamW

# ----------------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class TrainConfig:
    # logs/<run_id>.txt, checkpoints/<run_id>/, exports/<run_id>; empty: kbert-<date>-<time>-<random>
    run_id: str = opt("", "empty or a file name")
    seed: int = opt(0, ">= 0")  # model init and MLM masks (masks are keyed to data positions, not ranks)
    steps: int = opt(18_700, ">= 1")  # 18,700 x 524,288 tokens ~ 9.8B: one epoch of FineWeb-EDU 10B
    batch_tokens: int = opt(524_288, ">= 1")  # global tokens per step (64 x 8192), fixed whatever the world size
    micro_batch_seqs: int = opt(8, ">= 1")  # sequences per forward/backward on one device; grad accumulation is derived
    # >0: batch-size warm-up, linear from this to batch_tokens (whole sequences, the same for any world size) ...
    batch_tokens_start: int = opt(0, ">= 0")
    batch_warmup_frac: float = opt(0.0, "in [0, 1]")  # ... over this fraction of the steps
    lr_muon: float = opt(0.02, ">= 0")  # hidden matrices (Muon); Keller Jordan's default scale
    # token embedding = tied MLM head (AdamW). Adam moves each row ~lr per coordinate per step, so
    # logits move ~lr*d_model nats a step: 0.01 cost ~1 nat of loss in paired CPU runs (untied
    # too) and pulled the tied rows toward one direction (docs/studies.md). 0.002*768 is
    # close to the demo's 0.03*64.
    lr_embed: float = opt(0.002, ">= 0")
    lr_scalar: float = opt(0.01, ">= 0")  # gains, residual mixes, skip weights (AdamW)
    # decoupled, on the hidden (Muon) matrices only: each step shrinks them by lr_t x weight_decay. Without it Muon
    # grew them ~sqrt(steps) (CPU frontier: 0.20 -> 0.43 RMS from 4.1M to 16.4M tokens, ~9x ModernBERT's), so one
    # finetuning lr moved them ever less; 0.05 held them at 0.14-0.16 at every budget with the MLM loss no worse
    # (GLUE-small at the best finetuning lr +0.9 at 16.4M tokens, -0.7 at 8.2M, inside the seed ranges:
    # records/2026-12-06-weight-decay). Decay for Muon on long runs as in Moonlight (arXiv:2502.16982)
    weight_decay: float = opt(0.05, ">= 0")
    adam_betas: str = opt("0.8,0.95", "2 numbers in [0, 1)")  # modded-nanogpt's betas for embeddings and scalars
    warmup_frac: float = opt(0.01, "in [0, 1]")  # linear lr warm-up
    cooldown_frac: float = opt(0.3, "in [0, 1]")  # linear decay to 0 over the last 30% (warmup-stable-decay)
    muon_momentum_start: float = opt(0.85, "in [0, 1)")  # Muon momentum warms up 0.85 -> 0.95 (modded-nanogpt)
    muon_momentum_end: float = opt(0.95, "in [0, 1)")  # reached after muon_momentum_warmup_steps
    muon_momentum_warmup_steps: int = opt(300, ">= 0")  # steps of the momentum warm-up
    mask_rate_start: float = opt(0.30, "in (0, 1)")  # fraction of tokens predicted, scheduled linearly (ModernBERT: 0.30) ...
    mask_rate_end: float = opt(0.15, "in (0, 1)")  # ... down to BERT's 0.15
    random_frac_start: float = opt(0.10, "in [0, 1]")  # of the predicted tokens: replaced by a random token ...
    random_frac_end: float = opt(0.02, "in [0, 1]")  # ... down to this
    keep_frac_start: float = opt(0.10, "in [0, 1]")  # ... or left unchanged; the rest become [MASK]
    keep_frac_end: float = opt(0.02, "in [0, 1]")  # ... down to this
    local_window_start: int = opt(128, ">= 1")  # sliding window of local layers (tokens), start -> end ...
    local_window_end: int = opt(128, ">= 1")  # the exported model's local window
    global_window_start: int = opt(1024, ">= 1")  # ... and of global layers (lapp0/kbert grew 1024 -> 8192)
    global_window_end: int = opt(8192, ">= 1")  # the exported model's global window
    window_grow_frac: float = opt(0.5, "in [0, 1]")  # windows reach their end values at this fraction of training
    val_every: int = opt(500, ">= 0")  # steps between validations (and at the end)
    val_tokens: int = opt(4_194_304, ">= 1")  # fixed validation budget, same masks every time
    save_every: int = opt(2000, ">= 0")  # steps between checkpoints (and at the end); 0: only at the end
    keep_checkpoints: int = opt(2, ">= 1")  # newest checkpoints kept per run
    checkpoint_dir: str = opt("checkpoints", "non-empty")  # checkpoints go to checkpoint_dir/<run_id>/step_NNNNNNN.pt
    # a checkpoint file or a checkpoint folder (its newest good file), or "auto": the newest good checkpoint of
    # --train.run_id if it has one, else that run starts fresh, so one command can be re-queued after any
    # interruption. The run continues with the checkpoint's config; options given on the command line override
    # it (the log lists what changed). Read before the other options, by load_checkpoint, which checks it
    resume: str = ""
    # also save when this many minutes passed since the last save, by rank 0's clock (0: off). A crash that
    # sends no signal (a lost node, an OOM kill) then costs at most this much work, for a checkpoint of base
    # that took 4 s to write (1.34 GB on a 2-core CPU, records/2026-11-29-checkpoint-base): ~0.2% of 30 minutes
    save_every_minutes: float = opt(30.0, ">= 0")
    # a bad step: a non-finite loss or gradient, or a loss spike (spike_factor). "stop": stop there, keeping the
    # last good checkpoint; "rollback": reload the last good checkpoint, skip the data trained on since it (up
    # to and including the bad step's batch: the stream moves on, nothing is re-read) and go on
    on_bad_step: str = opt("stop", "stop or rollback")
    spike_factor: float = opt(0.0, "0 or > 1")  # a loss above this x the median of the last spike_window losses is bad; 0: off
    spike_window: int = opt(100, ">= 1")  # losses in that median; spikes are looked for once there are that many
    max_rollbacks: int = opt(3, ">= 0")  # rollbacks per run (counted across resumes); one bad step more stops the run
    export_dir: str = opt("exports", "non-empty")  # Hub-format folder written at the end: exports/<run_id>
    hf_repo: str = opt("", "empty or USER/NAME")  # push the export to this Hub model repo (e.g. USER/kbert-base)
    # torch.compile of the model: "auto" compiles on CUDA, and on CPU for runs of at least 1,000 steps, where
    # the compile (about 20-30 s on 2 cores) is paid back (the 300-step demo is faster eager:
    # records/2026-12-05-cpu-speed); "true" / "false" force it
    compile: str = opt("auto", "auto, true or false")
    # "bf16": bf16 autocast over fp32 weights and Muon's orthogonalisation in bf16; "fp32": neither
    # (a numerics reference, e.g. to tell a precision problem from an optimisation one);
    # auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), where it holds the fp32 loss curve
    # (records/2026-12-05-cpu-speed), fp32 on other CPUs
    precision: str = opt("auto", "auto, bf16 or fp32")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")  # auto: cuda if available
    overwrite: bool = False  # reuse an existing run id, writing over its log, checkpoints and export
    log_every: int = opt(1, ">= 1")  # steps between step lines in the log


@dataclass
class DataConfig:
    # "files": the globs below; "pydoc": the embedded demo corpus (built on first use)
    source: str = opt("files", "files or pydoc")
    # glob of token shards (data/download_fineweb_edu.py, data/tokenize_text.py)
    train_files: str = opt("data/fineweb_edu/finewebedu_train_*.bin", "non-empty")
    # glob of validation shards, disjoint from training
    val_files: str = opt("data/fineweb_edu/finewebedu_val_*.bin", "non-empty")
    seq_len: int = opt(8192, "> 0 and a multiple of 128")  # packed sequence length (multiple of 128 for FlexAttention)
    # end every document with [SEP] (in training and validation rows), as BERT and ModernBERT do: finetuning pairs
    # and BLiMP inputs hold [SEP], whose embedding rows without it never train (bench/frontier.py's kbert-sep arm)
    sep_at_end: bool = False


GROUPS = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig}

# `python trainer.py --demo`: a tiny KBERT on the Python docs that ship with Python, on CPU.
DEMO = {
    "model": dict(preset="tiny"),
    "data": dict(source="pydoc", seq_len=512),
    "train": dict(steps=300, batch_tokens=4096, micro_batch_seqs=8, lr_muon=0.04, lr_embed=0.03, lr_scalar=0.02,
                  warmup_frac=0.02, muon_momentum_warmup_steps=50, local_window_start=64, local_window_end=128,
                  global_window_start=256, global_window_end=512, val_every=50, val_tokens=16384, save_every=100),
}


@dataclass
class Hyperparameters:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


PYDOC_FILES = ("data/pydoc/pydoc_train_*.bin", "data/pydoc/pydoc_val_*.bin")


FLAGS = {"demo": "the CPU demo: the tiny preset on the Python docs that ship with Python, 300 steps of 4,096 "
                 "tokens (trainer.DEMO); options given apply on top of it"}
HIDDEN = ("model.local_window", "model.global_window")  # derived from --train.*_window_end


def cli(argv: list[str]) -> tuple[dict, set]:
    """argv -> (overrides by group, flags); --help prints every option and exits."""
    return common.parse_overrides(argv, GROUPS, FLAGS, HIDDEN, usage=__doc__.split("Sections:")[0].rstrip())


def parse_args(argv: list[str], saved: dict | None = None) -> Hyperparameters:
    """The defaults, then DEMO (--demo), then a resumed checkpoint's config (`saved`), then the
    options given; then the derived fields: the exported model's windows are the ones
    training ends with, and --data.source pydoc fixes the globs."""
    overrides, flags = cli(argv)
    for name in ("local_window", "global_window"):
        if name in overrides["model"]:
            raise SystemExit(f"--model.{name} is derived from the training schedule: set --train.{name}_end instead")
    groups = {}
    for name, cls in GROUPS.items():
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        resumed = {k: v for k, v in (saved or {}).get(name, {}).items() if k in init and (name, k) != ("train", "resume")}
        kwargs = {**(DEMO[name] if "demo" in flags else {}), **resumed, **overrides[name]}
        try:
            groups[name] = cls(**kwargs)
        except ValueError as e:
            raise SystemExit(f"--{name}.*: {e}") from None
        common.check_config(groups[name], name)  # the defaults, --demo's and a checkpoint's values too
    hp = Hyperparameters(**groups)
    check(hp)
    ignored = [k for k in ("train_files", "val_files") if k in overrides["data"]]
    if hp.data.source == "pydoc" and ignored:
        raise SystemExit(f"--data.{ignored[0]} does not apply to --data.source pydoc (the demo's corpus): "
                         "add --data.source files to train on your shards")
    hp.model.local_window, hp.model.global_window = windows_at(hp.train.steps, hp.train, hp.data.seq_len)
    if hp.data.source == "pydoc":
        hp.data.train_files, hp.data.val_files = PYDOC_FILES
    return hp


def check(hp: Hyperparameters):
    """What one field's declared range (opt) cannot say: the checks across fields and the device."""
    t, d = hp.train, hp.data
    if t.batch_tokens % d.seq_len:
        raise SystemExit(f"--train.batch_tokens {t.batch_tokens} must be a multiple of --data.seq_len {d.seq_len}")
    if t.random_frac_start + t.keep_frac_start > 1 or t.random_frac_end + t.keep_frac_end > 1:
        raise SystemExit("--train.random_frac_* + --train.keep_frac_* must not exceed 1")
    common.check_device(t.device)


def config_changes(saved: dict, hp: Hyperparameters) -> list[str]:
    """'group.key: old -> new' for every value of hp that differs from a checkpoint's config."""
    now = common.config_to_dict(hp)
    return [f"{g}.{k}: {saved.get(g, {}).get(k)!r} -> {v!r}" for g, values in now.items() for k, v in values.items()
            if (g, k) != ("train", "resume") and saved.get(g, {}).get(k) != v]


# ----------------------------------------------------------------------------------------
# Data: shards -> documents -> packed fixed-length sequences


def build_pydoc_corpus(folder: str, val_permille: int = 50) -> None:
    """The demo's embedded default: the pydoc topic pages and the module docstrings of the
    standard library that ship with every Python, tokenized once into train/val shards.
    A document goes to validation by a hash of its text, so the splits never overlap. The
    shards are written into folder.tmp<pid>, renamed to folder when both are complete: an
    interrupted build leaves nothing that looks like a corpus."""
    if glob.glob(os.path.join(folder, "pydoc_train_*.bin")) and glob.glob(os.path.join(folder, "pydoc_val_*.bin")):
        return
    import ast
    import sysconfig

    import pydoc_data.topics

    from tokenizer import Tokenizer

    try:
        tok = Tokenizer()  # first: without GPT-2's BPE files nothing else is worth doing
    except RuntimeError as e:
        raise SystemExit(f"the demo corpus needs GPT-2's tokenizer: {e}") from None
    print(f"building the demo corpus in {folder} (first use: the Python docs that ship with Python, ~20 s)", flush=True)
    texts = [t for _, t in sorted(pydoc_data.topics.topics.items())]
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))):
        if "test" in path or "site-packages" in path:
            continue
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if len(text) > 200:
            texts.append(text)
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]  # mix topics and modules
    split = {"train": [], "val": []}
    for text, ids in zip(texts, tok.encode_documents(texts)):
        h = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 1000
        split["val" if h < val_permille else "train"].append(np.array(ids, dtype=np.uint16))
    tmp = f"{folder.rstrip('/')}.tmp{os.getpid()}"
    for stale in glob.glob(f"{folder.rstrip('/')}.tmp*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_shard(os.path.join(tmp, "pydoc_val_000000.bin"), np.concatenate(split["val"]))
        write_shard(os.path.join(tmp, "pydoc_train_000001.bin"), np.concatenate(split["train"]))
        if os.path.isdir(folder):  # an incomplete corpus (one split only)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files and what == "validation":
        raise SystemExit(f"no validation shards match {pattern!r}. data/tokenize_text.py writes PREFIX_val_*.bin from "
                         "the documents whose hash falls under its --val-permille (and from at least one of 2 or more "
                         "documents): rerun it with --restart (and a larger --val-permille) and point --data.val_files at "
                         "PREFIX_val_*.bin, or download FineWeb-EDU's with `python data/download_fineweb_edu.py`.")
    if not files:
        raise SystemExit(f"no {what} shards match {pattern!r}. Download FineWeb-EDU with "
                         "`python data/download_fineweb_edu.py`, tokenize your own text with data/tokenize_text.py "
                         "and point --data.train_files/--data.val_files at it, or run the CPU demo with --demo.")
    return files


class PackedLoader:
    """A deterministic stream of packed sequences of `seq_len` tokens, every row full.

    Documents are taken in order from the shards (shard order reshuffled by the seed every
    epoch) and laid end to end. A document that does not fit in the rest of a row fills it
    and continues at the start of the next row, each piece after the first opening with an
    inserted [CLS] so that it is a document of its own for the attention mask. (Padding the
    rest of the row instead wasted 9-14% of the tokens on real shards.) No token is
    dropped and [PAD] appears only at the end of a finite pass (loop=False). Sequence n of
    the stream is the same for every world size; `state_dict()` is the exact position, so
    a resumed run sees exactly the same data. Every shard's header and token ids are checked
    (against `vocab_size`) when the loader is made."""

    def __init__(self, files: list[str], seq_len: int, seed: int = 0, shuffle: bool = True, loop: bool = True,
                 vocab_size: int = ModelConfig.vocab_size, sep_at_end: bool = False):
        self.files, self.T, self.seed, self.shuffle, self.loop = files, seq_len, seed, shuffle, loop
        self.vocab_size, self.sep_at_end = vocab_size, sep_at_end
        self.epoch, self.file_idx, self.pos, self.cont, self.seq_index = 0, 0, 0, False, 0
        self.sep_owed = False  # sep_at_end: a document's tokens all placed, its [SEP] not yet (it opens the next row)
        self.exhausted = False  # with loop=False: the single pass is over
        self._loaded = None  # (path, tokens memmap, document start positions)
        for f in files:  # every header and token id up front, naming the bad file (one read of each shard)
            open_shard(f, vocab_size)

    def _order(self) -> list[str]:
        if not self.shuffle:
            return self.files
        rng = np.random.default_rng([self.seed, self.epoch])
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def _shard(self):
        path = self._order()[self.file_idx]
        if self._loaded is None or self._loaded[0] != path:
            tokens = open_shard(path)
            self._loaded = (path, tokens, np.flatnonzero(tokens == CLS_ID))
        return self._loaded[1], self._loaded[2]

    def _next_piece(self):
        """The current document's remaining tokens (a view; with sep_at_end a copy ending in
        [SEP]) and whether a [CLS] must be inserted in front of them."""
        if self.sep_owed:
            return np.array([SEP_ID], dtype=np.uint16), True
        tokens, starts = self._shard()
        while self.pos >= len(tokens):  # shard exhausted
            if self.file_idx + 1 == len(self.files) and not self.loop:
                self.exhausted = True
                return None, False
            self.file_idx, self.pos, self.cont = self.file_idx + 1, 0, False
            if self.file_idx == len(self.files):
                self.epoch, self.file_idx = self.epoch + 1, 0
            tokens, starts = self._shard()
        nxt = np.searchsorted(starts, self.pos, side="right")
        end = starts[nxt] if nxt < len(starts) else len(tokens)
        need_cls = bool(self.cont or tokens[self.pos] != CLS_ID)  # a split piece or a shard starting mid-document
        piece = tokens[self.pos:end]
        return (np.append(piece, np.uint16(SEP_ID)) if self.sep_at_end else piece), need_cls

    def next_sequence(self) -> np.ndarray:
        T = self.T
        seq = np.full(T, PAD_ID, dtype=np.int32)
        fill = 0
        while fill < T:
            piece, need_cls = self._next_piece()
            if piece is None:  # loop=False and the data are used up: the rest stays [PAD]
                break
            if need_cls:  # a continued piece (or one whose [CLS] is in the previous shard) opens with [CLS]
                seq[fill] = CLS_ID
                fill += 1
            # with one slot left that [CLS] stands alone (a 1-token document) and the piece starts the next row
            take = min(len(piece), T - fill)
            seq[fill:fill + take] = piece[:take]
            fill += take
            if self.sep_owed:  # the piece was a document's [SEP]
                self.sep_owed = self.cont = take == 0
                continue
            real = len(piece) - int(self.sep_at_end)  # the document's own tokens in the piece
            self.pos += min(take, real)
            self.cont = take < len(piece)
            self.sep_owed = self.sep_at_end and take == real
        self.seq_index += 1
        return seq

    def next_batch(self, n: int) -> tuple[np.ndarray, int]:
        """n sequences (n, T) and the stream index of the first one."""
        first = self.seq_index
        return np.stack([self.next_sequence() for _ in range(n)]), first

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "file_idx": int(self.file_idx), "pos": int(self.pos), "cont": bool(self.cont),
                "seq_index": int(self.seq_index), "sep_owed": bool(self.sep_owed),
                "files": [os.path.basename(f) for f in self.files]}

    def load_state_dict(self, s: dict):
        if s["files"] != [os.path.basename(f) for f in self.files]:
            raise SystemExit("the checkpoint was made on other data shards than --data.train_files matches now: "
                             f"{s['files'][:3]}... vs {[os.path.basename(f) for f in self.files][:3]}...")
        self.epoch, self.file_idx, self.pos, self.cont, self.seq_index = s["epoch"], s["file_idx"], s["pos"], s["cont"], s["seq_index"]
        self.sep_owed = s.get("sep_owed", False)


def document_lengths(batch: np.ndarray) -> np.ndarray:
    """Lengths of the real (non-padding) documents of packed rows, as the attention mask
    sees them (model.document_ids)."""
    ids = torch.from_numpy(batch).long()
    docs = document_ids(ids).long() + (ids.size(1) + 1) * torch.arange(ids.size(0))[:, None]  # unique across rows
    _, lengths = torch.unique_consecutive(docs.flatten(), return_counts=True)
    starts = lengths.cumsum(0) - lengths
    return lengths[ids.flatten()[starts] != PAD_ID].numpy()


def attention_pairs(lengths: np.ndarray, window: int) -> int:
    """Number of (query, key) pairs a window-W document mask lets through, summed over
    documents of these lengths (document_lengths of a batch): a document of length L has L^2
    pairs when L <= W, else L(2W - 1) - W(W - 1). The attention term of the FLOP count."""
    L, W = lengths.astype(np.int64), window
    return int(np.where(L <= W, L**2, L * (2 * W - 1) - W * (W - 1)).sum())


# ----------------------------------------------------------------------------------------
# MLM masking on the device, keyed to the data position (not the rank or step)

_M31 = 0x7FFFFFFF


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """A small integer hash on int64 tensors holding values < 2^31 (products stay < 2^62)."""
    for c in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        x = ((x ^ (x >> 15)) * c) & _M31
    return x ^ (x >> 16)


def position_uniforms(positions: torch.Tensor, seed: int, n: int) -> list[torch.Tensor]:
    """n independent uniforms in [0, 1) per global token position (int64 tensor)."""
    hi = _hash31((positions >> 31) + seed * 0x9E3779B + 1)
    base = _hash31((positions & _M31) ^ hi)
    return [_hash31(base ^ _hash31(torch.full_like(base, k + 1))).double().div(2**31).float() for k in range(n)]


def mask_tokens(ids: torch.Tensor, first_seq: int, seed: int, mask_rate: float, random_frac: float, keep_frac: float):
    """ids (B, T) -> (inputs, labels). Positions are `(first_seq + row) * T + col` in the
    global stream, so a token gets the same mask on 1 or N ranks and after a resume.
    Special tokens are never selected; labels are -100 where nothing is predicted."""
    B, T = ids.shape
    rows = torch.arange(first_seq, first_seq + B, device=ids.device, dtype=torch.int64)
    pos = rows[:, None] * T + torch.arange(T, device=ids.device, dtype=torch.int64)[None]
    u_sel, u_kind, u_tok = position_uniforms(pos, seed, 3)
    special = ids >= CLS_ID
    selected = (u_sel < mask_rate) & ~special
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    random_tok = (u_tok * CLS_ID).long().clamp(max=CLS_ID - 1)
    inputs = torch.where(selected & (u_kind >= random_frac + keep_frac), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(selected & (u_kind < random_frac), random_tok, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------
# Model and optimizer


def compute_dtype(precision: str, device_type: str) -> torch.dtype:
    """TrainConfig.precision -> the dtype of autocast and of Muon's orthogonalisation."""
    native = device_type == "cuda" or (device_type == "cpu" and common.native_bf16_cpu())
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and native) else torch.float32


def use_compile(t: TrainConfig, device_type: str) -> bool:
    """TrainConfig.compile -> whether to torch.compile: auto on CUDA, and on CPU from 1,000 steps."""
    if t.compile != "auto":
        return t.compile == "true"
    return device_type == "cuda" or t.steps >= 1000


def parse_betas(text: str, option: str) -> tuple[float, float]:
    """Adam's "b1,b2" from the command line, each in [0, 1), or one line naming the option."""
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise SystemExit(f"{option} {text!r}: expected two numbers in [0, 1) as b1,b2, e.g. 0.9,0.98")
    return betas


def build_optimizer(model: torch.nn.Module, t: TrainConfig, extra_adam: list | None = None) -> MuonAdamW:
    """Muon: 2-D matrices inside the blocks. AdamW: the embedding (= tied MLM head), and
    every gain and scalar. `extra_adam`: (params, lr) of task heads (finetuner). Call after
    the model is on its device (the orthogonalisation dtype depends on it)."""
    named = list(model.named_parameters())
    hidden = [p for n, p in named if n.startswith("blocks.") and p.ndim == 2]
    embed = [p for n, p in named if n.startswith(("embed.", "mlm_head."))]
    taken = {id(p) for p in hidden + embed}
    scalars = [p for _, p in named if id(p) not in taken]
    betas = parse_betas(t.adam_betas, "--train.adam_betas")
    groups = [dict(kind="muon", name="muon", params=hidden, lr=t.lr_muon, momentum=t.muon_momentum_end,
                   weight_decay=t.weight_decay),
              dict(kind="adamw", name="embed", params=embed, lr=t.lr_embed, betas=betas),
              dict(kind="adamw", name="scalar", params=scalars, lr=t.lr_scalar, betas=betas)]
    all_params = list(model.parameters())
    for k, (params, lr) in enumerate(extra_adam or []):
        groups.append(dict(kind="adamw", name=f"extra{k}", params=params, lr=lr, betas=betas))
        all_params += list(params)
    for g in groups:
        g["initial_lr"] = g["lr"]
    ortho_dtype = compute_dtype(t.precision, all_params[0].device.type)
    return MuonAdamW([g for g in groups if g["params"]], params_expected=all_params, ortho_dtype=ortho_dtype)


def training_flops(cfg: ModelConfig, n_tokens: int, n_predicted: int, pairs_local: int, pairs_global: int) -> float:
    """FLOPs of forward + backward (x3 of forward), multiply-add = 2 FLOPs:
    matmuls 6 * N_matmul * tokens, with N_matmul = n_layer * (4 d^2 + 2 d d_mlp);
    attention 12 * d * (attended pairs) per layer (QK^T and PV), local or global pairs;
    MLM head 6 * d * N_TARGETS on predicted tokens only (the ordinary tokens: model.N_TARGETS).
    Norms, rotary and softmax are not counted."""
    d = cfg.d_model
    n_matmul = cfg.n_layer * (4 * d * d + 2 * d * cfg.d_mlp)
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layer))
    attn = 12 * d * (pairs_global * n_global + pairs_local * (cfg.n_layer - n_global))
    return 6 * n_matmul * n_tokens + attn + 6 * d * N_TARGETS * n_predicted


def step_flops(cfg: ModelConfig, batch: np.ndarray, n_predicted: int, windows: tuple[int, int]) -> float:
    """training_flops of one step on packed rows: their real (non-[PAD]) tokens, the attended
    pairs their documents allow under the (local, global) windows, the predicted tokens."""
    lengths = document_lengths(batch)
    return training_flops(cfg, int(lengths.sum()), n_predicted, attention_pairs(lengths, windows[0]),
                          attention_pairs(lengths, windows[1]))


def make_forward(model: KBERT, compile: bool, precision: str = "auto"):
    """forward(inputs, labels, windows, reduction) -> (loss, n_correct, n_predicted), under bf16
    autocast where compute_dtype says so (TrainConfig.precision). With compile, the encoder is
    compiled with static shapes (windows are tensor inputs, so growing them never recompiles);
    on CUDA also the MLM head, with a dynamic number of predicted tokens (on CPU the head is
    model.py's fused loss, eager)."""
    device_type = next(model.parameters()).device.type
    bf16 = compute_dtype(precision, device_type) == torch.bfloat16
    amp = torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
    encoder = model
    if compile:
        encoder = torch.compile(model, dynamic=False, fullgraph=True)
        if device_type == "cuda":
            model.mlm_head_loss = torch.compile(model.mlm_head_loss, dynamic=True)

    def forward(inputs, labels, windows, reduction="mean"):
        with amp:
            return model.mlm_loss(encoder(inputs, windows), labels, reduction)

    return forward


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "GH200": 989e12, "B200": 2250e12}  # dense bf16, vendor


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ----------------------------------------------------------------------------------------
# Schedules: functions of the step (pure, so a resumed run recomputes them exactly)


def lerp(a, b, frac):
    return a + (b - a) * min(max(frac, 0.0), 1.0)


def lr_schedule(step: int, steps: int, warmup_frac: float, cooldown_frac: float) -> float:
    """The learning-rate multiplier of trainer and finetuner: linear warm-up over
    round(warmup_frac x steps) steps (at least 1), then 1, then linear decay to 0 over the last
    round(cooldown_frac x steps) steps (warmup-stable-decay). cooldown_frac 1 decays from the end
    of the warm-up on (the finetuner's warm-up then linear decay); the decay never starts before
    the warm-up has ended."""
    warm = max(1, round(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    decay_from = max(warm, steps - round(cooldown_frac * steps))
    if step >= decay_from:
        return max(0.0, (steps - step) / max(1, steps - decay_from))
    return 1.0


def lr_multiplier(step: int, t: TrainConfig) -> float:
    return lr_schedule(step, t.steps, t.warmup_frac, t.cooldown_frac)


def windows_at(step: int, t: TrainConfig, seq_len: int | None = None) -> tuple[int, int]:
    """Local and global windows, grown linearly and rounded up to 128-token blocks, at most
    seq_len (a window past the sequence attends to nothing more)."""
    frac = step / max(1, t.window_grow_frac * t.steps)

    def grow(a, b):
        w = lerp(a, b, frac)
        w = int(math.ceil(w / 128) * 128) if w >= 128 else int(w)
        return min(w, seq_len) if seq_len else w

    return grow(t.local_window_start, t.local_window_end), grow(t.global_window_start, t.global_window_end)


def masking_at(step: int, t: TrainConfig) -> tuple[float, float, float]:
    frac = step / max(1, t.steps - 1)
    return (lerp(t.mask_rate_start, t.mask_rate_end, frac), lerp(t.random_frac_start, t.random_frac_end, frac),
            lerp(t.keep_frac_start, t.keep_frac_end, frac))


def batch_seqs_at(step: int, t: TrainConfig, seq_len: int) -> int:
    """Sequences in this step's global batch: whole sequences, independent of the world size
    and the micro-batch size (train_step deals them out), so every launch computes one run."""
    full = t.batch_tokens // seq_len
    if t.batch_tokens_start <= 0 or t.batch_warmup_frac <= 0:
        return full
    start = max(1, t.batch_tokens_start // seq_len)
    return max(1, int(lerp(start, full, step / max(1, t.batch_warmup_frac * t.steps))))


# ----------------------------------------------------------------------------------------
# Checkpoints (training state, weights_only loading) and export (safetensors)


def checkpoint_paths(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "step_*.pt")))


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:07d}.pt")


def save_checkpoint(folder: str, run_id: str, step: int, model, opt, loader, tokens_seen: int, hp: Hyperparameters, keep: int, log,
                    extra: dict | None = None) -> str | None:
    """folder/step_NNNNNNN.pt, written atomically by rank 0, the oldest beyond `keep` removed;
    extra: more to record (the spike test's recent losses, the rollbacks). Returns the path
    (None on other ranks)."""
    opt_state = opt.state_dict()  # collective: every rank must call it
    if not log.master:
        return None
    os.makedirs(folder, exist_ok=True)
    state = {"run_id": run_id, "step": step, "tokens_seen": tokens_seen, "model": model.state_dict(), "optimizer": opt_state,
             "loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(), "config": common.config_to_dict(hp), **(extra or {})}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    path = checkpoint_path(folder, step)
    common.atomic_torch_save(state, path)
    older = [p for p in checkpoint_paths(folder) if p != path]  # the one just written always stays
    for old in older[:max(0, len(older) - (keep - 1))]:
        os.remove(old)
    log(f"step:{step} saved checkpoint {path}")
    return path


def checkpoint_bytes(hp: Hyperparameters) -> tuple[int, int]:
    """(a checkpoint, the exported weights) of this model in bytes, counted on the meta device
    (no memory, no time): the fp32 weights, plus Muon's momentum (one per hidden matrix) and
    AdamW's two moments (the rest); the loader state, RNG and config add a few kB."""
    with torch.device("meta"):
        model = KBERT(hp.model)
    opt = build_optimizer(model, hp.train)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix once, as torch.save stores it
    moments = sum((1 if g["kind"] == "muon" else 2) * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return weights + moments, weights


def load_checkpoint(path: str, log) -> dict:
    """A checkpoint file, or a folder's newest checkpoint that loads (a corrupt or partial
    newest file is reported and skipped: the previous good one is used)."""
    candidates = [path] if os.path.isfile(path) else list(reversed(checkpoint_paths(path)))
    if not candidates:
        raise SystemExit(f"--train.resume {path!r}: no checkpoint file there (expected step_*.pt)")
    for p in candidates:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            log(f"resuming from {p} (step {state['step']})")
            return state
        except Exception as e:
            log(f"cannot load checkpoint {p} ({type(e).__name__}: {str(e)[:120]}); trying an older one")
    raise SystemExit(f"--train.resume {path!r}: no loadable checkpoint")


def model_card(hp: Hyperparameters, counts: dict, tokens_seen: int, val: dict | None, command: str, where: str) -> str:
    """The export's README.md: what the model is and how to load it (`where`: its folder or Hub
    id)."""
    val_line = f"{val['loss']:.4f} per predicted token, MLM accuracy {val['acc']:.4f}" if val else "not measured"
    return (f"---\nlibrary_name: transformers\npipeline_tag: fill-mask\ntags: [fill-mask, encoder, kbert]\n---\n"
            f"# KBERT ({hp.model.preset})\n\n"
            f"A BERT-style encoder pretrained with masked language modelling by KBERT's trainer.py.\n\n"
            f"- parameters: {counts['total']:,} ({counts['embedding']:,} embedding, {counts['non_embedding']:,} other)\n"
            f"- tokens seen: {tokens_seen:,} (not counting [PAD])\n- validation loss: {val_line}\n"
            f"- tokenizer: GPT-2 BPE (tiktoken `gpt2`) + [MASK]=50257 [SEP]=50258 [PAD]=50259, [CLS]=50256\n"
            f"- command: `{command}`\n\nTo score it on BLiMP: `python finetuner.py --task blimp --train.base_model {where}` "
            f"(KBERT's repo; the score goes to that run's own metrics.json).\n\n{common.transformers_usage(where)}\n"
            f"In KBERT's repo: `model, config = trainer.load_encoder(\"{where}\")`.\n\n"
            f"## Config\n```json\n{json.dumps(common.config_to_dict(hp), indent=2)}\n```\n")


def export(model, hp, tokens_seen, val, run_id, log, metrics: dict | None = None):
    """exports/<run_id>: a Hugging Face model folder (common.save_pretrained) with the run's
    metrics.json (`metrics` and the folder: final validation loss and accuracy, real tokens,
    FLOPs, training and wall seconds, the config), pushed to --train.hf_repo if given."""
    folder = os.path.join(hp.train.export_dir, run_id)
    config = {"model": hp.model.to_dict(), "tokens_seen": tokens_seen, "val_loss": val["loss"] if val else None,
              "val_acc": val["acc"] if val else None}
    command = " ".join(["trainer.py"] + sys.argv[1:])
    card = model_card(hp, model.param_counts(), tokens_seen, val, command, hp.train.hf_repo or folder)
    common.save_pretrained(folder, model.state_dict(), config, card, max_len=hp.data.seq_len, log=log)
    if metrics is not None:
        path = os.path.join(folder, "metrics.json")
        with open(path, "w") as f:
            json.dump({**metrics, "export": folder}, f, indent=2)
        os.chmod(path, 0o644)
    log(f"exported {folder}")
    if hp.train.hf_repo:
        common.push_to_hub(folder, hp.train.hf_repo, log)
    return folder


def load_encoder(path_or_repo: str, **overrides) -> tuple[KBERT, dict]:
    """A KBERT encoder from an export folder or Hub id (weights only, no training state).
    Returns the model and the export's config (common.load_pretrained); the weights of a task
    head, if any, are returned under config["extra_state"]."""
    config, state = common.load_pretrained(path_or_repo)
    model = KBERT(ModelConfig(**{**config["model"], **overrides}))
    own = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(own, strict=True)
    config["extra_state"] = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    return model, config


# ----------------------------------------------------------------------------------------
# Evaluation: fixed budget, fixed masks, final windows


def validation_batch(files: list[str], hp: Hyperparameters) -> np.ndarray:
    """The fixed validation set: the first val_tokens of the validation shards, packed (read
    once per run)."""
    loader = PackedLoader(files, hp.data.seq_len, shuffle=False, loop=False, vocab_size=hp.model.vocab_size,
                          sep_at_end=hp.data.sep_at_end)  # one pass at most
    seqs = []
    while len(seqs) < max(1, hp.train.val_tokens // hp.data.seq_len) and not loader.exhausted:
        seqs.append(loader.next_sequence())
    return np.stack(seqs)


@torch.no_grad()
def evaluate(forward, batch: np.ndarray, hp, d: common.Dist, windows) -> dict:
    t = hp.train
    n_seqs = len(batch)
    mask_rate, rnd, keep = t.mask_rate_end, t.random_frac_end, t.keep_frac_end
    totals = torch.zeros(3, device=d.device, dtype=torch.float64)  # loss sum, correct, count
    mb = t.micro_batch_seqs
    for i in range(d.rank * mb, n_seqs, d.world * mb):
        ids = torch.from_numpy(batch[i:i + mb]).to(d.device).long()
        inputs, labels = mask_tokens(ids, i, seed=12345, mask_rate=mask_rate, random_frac=rnd, keep_frac=keep)
        loss_sum, correct, count = forward(inputs, labels, windows, "sum")
        totals += torch.stack([loss_sum.double(), correct.double(), torch.tensor(count, device=d.device, dtype=torch.float64)])
    common.all_reduce_sum(totals, d)
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(), "tokens": int((batch != PAD_ID).sum())}


# ----------------------------------------------------------------------------------------
# Training


def nonfinite_report(model: torch.nn.Module, limit: int = 8) -> str:
    """Which tensors hold NaN/inf on this rank after a failed step: gradients of that step
    (where the trouble shows first) and weights after its update."""
    lines = []
    for what, get in (("gradients", lambda p: p.grad), ("weights", lambda p: p)):
        bad = [n for n, p in model.named_parameters() if get(p) is not None and not torch.isfinite(get(p)).all()]
        shown = ", ".join(bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")
        lines.append(f"non-finite {what} (rank-local): {shown or 'none'}")
    return "\n".join(lines)


def set_schedules(opt: MuonAdamW, step: int, t: TrainConfig) -> dict:
    """This step's learning rates (each group's base lr from the config x the schedule) and
    Muon momentum; returns the learning rates by group name."""
    mult = lr_multiplier(step, t)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * mult
        if g["kind"] == "muon":
            g["momentum"] = lerp(t.muon_momentum_start, t.muon_momentum_end, step / max(1, t.muon_momentum_warmup_steps))
    return {g["name"]: g["lr"] for g in opt.param_groups}


def rank_chunks(n_rows: int, micro: int, world: int, rank: int) -> list[tuple[int, int]]:
    """This rank's micro-batches, (first row, end row): the global batch cut into chunks of
    `micro` rows, dealt round-robin over the ranks (a rank may get one fewer, or none)."""
    return [(lo, min(lo + micro, n_rows)) for k, lo in enumerate(range(0, n_rows, micro)) if k % world == rank]


def train_step(model: KBERT, opt: MuonAdamW, forward, batch: np.ndarray, first: int, step: int, t: TrainConfig,
               d: common.Dist, static_rows: bool = False, votes=None) -> dict:
    """One optimizer step over the global batch (n_rows, T) whose first row is sequence
    `first` of the stream. Every rank holds the whole batch and takes its micro-batches; the
    loss is the sum over all predicted tokens of the global batch divided by their number,
    so the step is the same math for any world size and any micro-batch size.
    static_rows: fill a short last micro-batch with [PAD] rows (no labels, no gradient) so a
    compiled model sees one shape. votes: a function giving this rank's (stop, save) votes,
    read just before the step's all-reduce; "stop" and "save" in the result count the ranks
    that voted, the same number on every rank. The gradients stay on the parameters after the step."""
    windows_py = windows_at(step, t, batch.shape[1])
    windows = torch.tensor(windows_py, dtype=torch.int32, device=d.device)
    mask_rate, rnd, keep = masking_at(step, t)
    lrs = set_schedules(opt, step, t)
    cuda = d.device.type == "cuda"
    micro = []
    for lo, hi in rank_chunks(len(batch), t.micro_batch_seqs, d.world, d.rank):
        rows = batch[lo:hi]
        if static_rows and hi - lo < t.micro_batch_seqs:
            rows = np.concatenate([rows, np.full((t.micro_batch_seqs - (hi - lo), rows.shape[1]), PAD_ID, rows.dtype)])
        ids = torch.from_numpy(rows)
        ids = (ids.pin_memory().to(d.device, non_blocking=True) if cuda else ids).long()
        micro.append(mask_tokens(ids, first + lo, t.seed, mask_rate, rnd, keep))
    # the global number of predicted tokens, before any backward: one all-reduce
    n_pred = torch.zeros((), dtype=torch.float64, device=d.device)
    for _, labels in micro:
        n_pred += (labels >= 0).sum()
    n_pred = common.all_reduce_sum(n_pred, d)
    scale = (d.world / n_pred.clamp(min=1)).float()  # x world: the optimizer averages gradients over ranks

    opt.zero_grad(set_to_none=True)  # here, not after the step: a failing step's gradients stay inspectable
    loss_sum = torch.zeros((), device=d.device)
    for inputs, labels in micro:
        loss, _, _ = forward(inputs, labels, windows, "sum")
        (loss * scale).backward()
        loss_sum += loss.detach()
    if not micro:  # a rank without rows (batch warm-up on many ranks) still joins the gradient reduction
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    # this rank's gradient norm (the whole batch's on 1 process); NaN/inf flags a bad step
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    # the loss, how many ranks saw a non-finite gradient and the ranks' votes to stop (a signal)
    # or to save (rank 0's clock), in one all-reduce: every rank then takes the same decisions
    mine = torch.tensor(votes() if votes else (0.0, 0.0), dtype=loss_sum.dtype, device=d.device)
    stats = common.all_reduce_sum(torch.cat([torch.stack([loss_sum, (~grad_norm.isfinite()).float()]), mine]), d)
    loss_total, bad_grad_ranks, stop, save = stats.tolist()  # syncs
    n_pred_value = int(n_pred.item())
    return {"loss": loss_total / max(1, n_pred_value), "grad_norm": grad_norm.item(), "bad_grad_ranks": int(bad_grad_ranks),
            "stop": int(stop), "save": int(save), "n_predicted": n_pred_value, "real_tokens": int((batch != PAD_ID).sum()), "lrs": lrs,
            "windows": windows_py, "mask_rate": mask_rate}


def main(argv: list[str] | None = None) -> dict:
    """run(argv), where a Ctrl-C before the training loop (while the demo corpus is built, the
    shards are scanned, a checkpoint is read) exits 130 in one line instead of a traceback;
    inside the loop the run stops at the end of a step with a checkpoint (common.StopSignals)."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("stopped by SIGINT before the training loop began: nothing of this run was written; "
              "run the command again to start it", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run(argv: list[str]) -> dict:
    """Config, distributed setup, data, the preflight of the output folders and the run's log,
    checked in that order so that bad input fails in one line before anything is written; then
    train(), stopped cleanly by SIGTERM or SIGINT."""
    # a resumed run starts from its checkpoint's config: read the checkpoint before the config
    started = time.monotonic()  # the run's wall time (metrics.json) counts from here
    given = cli(argv)[0]["train"]
    resume = given.get("resume", "")
    if resume and given.get("overwrite"):
        raise SystemExit("--train.overwrite true starts the run id afresh and --train.resume continues it: give one of them")
    notes = []  # what loading the checkpoint found, for the run log
    if resume == "auto":
        if not given.get("run_id"):
            raise SystemExit("--train.resume auto needs --train.run_id NAME: the run to continue, or to start under that name")
        folder = os.path.join(given.get("checkpoint_dir", TrainConfig.checkpoint_dir), given["run_id"])
        resume_state = load_checkpoint(folder, notes.append) if checkpoint_paths(folder) else None
        if resume_state is None:
            notes.append(f"--train.resume auto: run {given['run_id']} has no checkpoint in {folder}: starting it")
    else:
        resume_state = load_checkpoint(resume, notes.append) if resume else None
    hp = parse_args(argv, saved=resume_state["config"] if resume_state else None)
    t, dc = hp.train, hp.data
    if resume_state is not None and resume_state["step"] > t.steps:
        raise SystemExit(f"--train.steps {t.steps} is below the checkpoint's step {resume_state['step']}: "
                         f"give --train.steps above {resume_state['step']} to train on")
    d = common.setup_distributed(t.device)
    run_id = common.agree(t.run_id or (resume_state["run_id"] if resume_state else common.new_run_id("kbert")), d)
    log = common.RunLog(run_id, d.master)
    ckpt_dir, export_dir = os.path.join(t.checkpoint_dir, run_id), os.path.join(t.export_dir, run_id)
    # a re-queued job whose run is done: its last checkpoint is the final step and the export was written (rank 0 looks)
    finished = resume_state is not None and resume_state["step"] == t.steps and common.agree(
        os.path.isfile(os.path.join(export_dir, "config.json")) if d.master else None, d)
    if finished:
        if d.master:
            print(f"run {run_id} is finished: step {t.steps} of {t.steps}, exported to {export_dir}; nothing to do "
                  f"(give --train.steps above {t.steps} to train on)")
        common.cleanup_distributed(d)
        return {"run_id": run_id, "finished": True, "history": [], "val": None, "export": export_dir, "log": log.path}
    overwrite = resume_state is None and t.overwrite  # the run id's old log, checkpoints and export go before anything is written
    if resume_state is None and not t.overwrite:
        # auto without a checkpoint: the run was stopped before its first save and has nothing to lose but
        # its log, which is appended to; an export without checkpoints is a finished run: refused
        taken = [export_dir] if t.resume == "auto" else [log.path, ckpt_dir, export_dir]
        common.refuse_existing_run(run_id, taken, f"resume it with --train.resume auto --train.run_id {run_id}, ", d)

    # data: every shard's header and token ids, before the run's log exists
    if dc.source == "pydoc":
        if d.master:
            build_pydoc_corpus(os.path.dirname(PYDOC_FILES[0]))
        if d.world > 1:
            torch.distributed.barrier()
    try:
        train_files, val_files = shard_files(dc.train_files, "training"), shard_files(dc.val_files, "validation")
        val_batch = validation_batch(val_files, hp)
        loader = PackedLoader(train_files, dc.seq_len, seed=t.seed, vocab_size=hp.model.vocab_size, sep_at_end=dc.sep_at_end)
        if resume_state is not None:
            loader.load_state_dict(resume_state["loader"])
    except ShardError as e:
        raise SystemExit(f"error: {e}") from None

    # preflight: the checkpoints (the ones kept + the one being written) and the export fit where they go
    ckpt_bytes, weight_bytes = checkpoint_bytes(hp)
    n_ckpt = max(2, t.keep_checkpoints + 1 - (0 if overwrite else len(checkpoint_paths(ckpt_dir))))
    common.preflight([(ckpt_dir, n_ckpt * ckpt_bytes, "--train.checkpoint_dir"),
                      (export_dir, weight_bytes, "--train.export_dir")], d)
    # --train.overwrite: every check passed, so the old run's files go now, before this run writes anything (its
    # checkpoints would otherwise be pruned with this run's, and resumed by --train.resume auto)
    removed = [p for p in (ckpt_dir, export_dir, export_dir + ".tmp", export_dir + ".old") if overwrite and os.path.exists(p)]
    if d.master:
        for p in removed:
            shutil.rmtree(p)
    if overwrite and d.world > 1:
        torch.distributed.barrier()

    log.header([os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")],
               common.config_to_dict(hp), d.device, append=resume_state is not None or t.resume == "auto")
    log(f"run {run_id}: world {d.world}, device {d.device}, log {log.path}")
    for note in notes:
        log(note)
    if overwrite:
        log(f"--train.overwrite: a new run {run_id}" + (f"; removed the earlier run's {', '.join(removed)}" if removed else ""))
    if resume_state is not None:
        changes = config_changes(resume_state["config"], hp)
        log("config: the checkpoint's" + ("; changed by the command line: " + "; ".join(changes) if changes else ", unchanged"))
    if d.master and t.resume:
        for partial in glob.glob(os.path.join(ckpt_dir, "step_*.pt.tmp*")):  # left by a write a SIGKILL cut short
            os.remove(partial)
            log(f"removed {partial}, a checkpoint whose write was interrupted")
    resume_cmd = common.resume_command(os.path.abspath(__file__), argv, run_id, d)
    signals = common.StopSignals()
    aborted = f"aborted by a second SIGINT; nothing was saved after the last checkpoint; resume with: {resume_cmd}"
    with common.failures_logged(d, log, aborted), signals:  # from here on an expected failure is logged too
        try:
            out = train(hp, d, log, run_id, loader, val_batch, resume_state, signals, resume_cmd, started)
        except ShardError as e:  # a shard rewritten since the start
            raise SystemExit(f"error: {e}") from None
    if dc.source == "pydoc" and out["export"]:
        log(f"next: the exported model is {out['export']}; fill a [MASK] with it:\n  python -c \"from transformers import "
            f"pipeline; print(pipeline('fill-mask', model='{out['export']}', trust_remote_code=True)"
            f"('Use the [MASK] keyword to define a function.', top_k=3))\"")
    return out


def bad_step(out: dict, recent: collections.deque, t: TrainConfig, world: int) -> str | None:
    """Why a step is bad, or None: a non-finite loss or gradient on any rank, or (spike_factor
    > 0) a loss above spike_factor x the median of the last spike_window losses, once there
    are that many. The values are all-reduced, so every rank decides alike."""
    if not math.isfinite(out["loss"]) or out["bad_grad_ranks"]:
        return f"loss is {out['loss']}, gradients non-finite on {out['bad_grad_ranks']} of {world} ranks"
    if t.spike_factor > 0 and len(recent) >= t.spike_window:
        median = statistics.median(recent)
        if out["loss"] > t.spike_factor * median:
            return (f"loss {out['loss']:.4f} is a spike, above {t.spike_factor:g} x {median:.4f}, the median of the last "
                    f"{t.spike_window} losses")
    return None


def restore(model, opt, state: dict, cuda: bool):
    """A checkpoint's weights, optimizer state (moments and step counts; the lrs are this run's
    config) and RNG: for a resume, and for a rollback."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if cuda and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])


def train(hp: Hyperparameters, d: common.Dist, log, run_id: str, loader: PackedLoader, val_batch: np.ndarray,
          resume_state: dict | None, signals: common.StopSignals | None = None, resume_cmd: str = "",
          started: float | None = None) -> dict:
    """Model, optimizer, the restored state of a resumed run, then the loop: validation and
    checkpoints at their intervals (and on a signal, after which the run stops), one
    train_step per step, a bad step stopping the run or rolled back, the export at the end."""
    t = hp.train
    torch.manual_seed(t.seed)
    model = KBERT(hp.model)
    model.init_weights(seed=t.seed)
    model.to(d.device)
    counts = model.param_counts()
    log(f"model {hp.model.preset}: {counts['total']:,} parameters ({counts['embedding']:,} embedding, "
        f"{counts['non_embedding']:,} non-embedding)")
    opt = build_optimizer(model, t)
    cuda = d.device.type == "cuda"
    compiled = use_compile(t, d.device.type)
    if compiled and not cuda and t.local_window_start > t.local_window_end:
        raise SystemExit("--train.compile on CPU sizes the banded local attention by the last local window: give "
                         "--train.local_window_start <= --train.local_window_end, or --train.compile false")
    forward = make_forward(model, compile=compiled, precision=t.precision)

    step, tokens_seen = 0, 0
    recent = collections.deque(maxlen=t.spike_window)  # the latest training losses: the spike test's median
    rollbacks = []  # {"step", "seqs": [first, end) skipped, "loss", "why"}: saved with checkpoints, so counted per run
    if resume_state is not None:
        # the windows only set the exported model's defaults (a schedule may change them); the rest shapes the weights
        saved, now = resume_state["config"]["model"], common.config_to_dict(hp)["model"]
        differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in ("local_window", "global_window")
                  and saved.get(k) != v]
        if differ:
            raise SystemExit(f"--train.resume: the checkpoint's model differs from this run's ({'; '.join(differ)}); "
                             "drop the --model.* options that change it")
        restore(model, opt, resume_state, cuda)
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        recent.extend(resume_state.get("recent_losses", []))
        rollbacks = list(resume_state.get("rollbacks", []))
    start_step = step  # where the weights were loaded: no validation or save repeated there

    peak = peak_flops(d.device)
    ckpt_dir = os.path.join(t.checkpoint_dir, run_id)
    val, history = None, []
    train_time = 0.0  # seconds spent in training steps, excluding validation and the first (compile) step
    flops = 0.0  # training_flops summed over the steps
    wall_before = 0.0  # wall seconds of the processes this one resumes, up to their last checkpoint
    started = time.monotonic() if started is None else started
    if resume_state is not None:  # a resumed run counts on (checkpoints before these were recorded: from 0)
        train_time, flops = resume_state.get("train_time_s", 0.0), resume_state.get("flops", 0.0)
        wall_before = resume_state.get("wall_time_s", 0.0)
    log("step lines: lr_* are each group's learning rate; real_tokens, real_tok/s and mfu count non-[PAD] tokens")
    last_save = time.monotonic()  # rank 0's clock decides the time-based saves
    # the step of this run's last checkpoint, the state a rollback returns to: the one resumed from when it
    # lies in this run's folder (decided from the options alone: every rank must agree, a save is collective)
    here = os.path.abspath(ckpt_dir)
    resumed_here = resume_state is not None and (t.resume == "auto" or here in (
        os.path.abspath(t.resume), os.path.dirname(os.path.abspath(t.resume))))
    saved_step = start_step if resumed_here else None
    window_start = loader.seq_index  # the first sequence trained on since that state
    stop = save_now = False  # the ranks' votes of the last step

    def votes():  # this rank's (stop, save) votes, read at the end of each step
        due = d.master and t.save_every_minutes > 0 and time.monotonic() - last_save >= 60 * t.save_every_minutes
        return float(signals is not None and signals.requested), float(due)

    while True:
        last = step == t.steps
        if last or (t.val_every and step % t.val_every == 0 and step > start_step):
            model.eval()
            val = evaluate(forward, val_batch, hp, d, model.default_windows(d.device))  # the final windows
            model.train()
            log(f"step:{step}/{t.steps} val_loss:{val['loss']:.4f} val_acc:{val['acc']:.4f} "
                f"train_time:{train_time * 1000:.0f}ms real_tokens_seen:{tokens_seen}")
            history.append({"step": step, **val})
        # with rollback on, a run saves its start: the state a bad step before its first save returns to
        if (last or (t.save_every and step % t.save_every == 0 and step > start_step) or save_now or stop
                or (saved_step is None and t.on_bad_step == "rollback")):
            path = save_checkpoint(ckpt_dir, run_id, step, model, opt, loader, tokens_seen, hp, t.keep_checkpoints, log,
                                   {"recent_losses": list(recent), "rollbacks": rollbacks, "train_time_s": train_time,
                                    "flops": flops, "wall_time_s": wall_before + time.monotonic() - started})
            last_save, saved_step, window_start = time.monotonic(), step, loader.seq_index
        if stop and not last:
            log(f"step:{step} stopped by {signals.name}: saved {path}; resume with: {resume_cmd}")
            raise SystemExit(signals.exit_code)
        if last:
            break

        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch, first = loader.next_batch(batch_seqs_at(step, t, hp.data.seq_len))  # every rank packs the whole batch
        out = train_step(model, opt, forward, batch, first, step, t, d, static_rows=compiled, votes=votes)
        dt = time.perf_counter() - t0
        step += 1
        stop, save_now = out["stop"] > 0, out["save"] > 0
        why = bad_step(out, recent, t, d.world)
        report = nonfinite_report(model) if why and why.startswith("loss is") else ""
        if why and t.on_bad_step == "rollback" and len(rollbacks) < t.max_rollbacks:
            state = load_checkpoint(checkpoint_path(ckpt_dir, saved_step), lambda note: None)
            skipped = [window_start, loader.seq_index]
            rollbacks.append({"step": step, "seqs": skipped, "loss": out["loss"], "why": why})
            log(f"step:{step} {why}: rollback {len(rollbacks)}/{t.max_rollbacks} to step {state['step']}, skipping "
                f"sequences {skipped[0]}-{skipped[1] - 1} of the stream ({skipped[1] - skipped[0]} sequences: the data "
                f"trained on since that state, the bad step's batch included)" + (f"\n{report}" if report else ""))
            restore(model, opt, state, cuda)
            step, tokens_seen = state["step"], state["tokens_seen"]
            recent.clear()
            recent.extend(state.get("recent_losses", []))
            history = [h for h in history if h["step"] <= step]
            # saved at once: a kill right after the rollback resumes past the skipped data, not into it
            start_step, save_now = step, True
            continue
        if why:
            saved = checkpoint_paths(ckpt_dir)
            where = (f"the last good checkpoint {saved[-1]} is kept; resume it with lower learning rates, e.g. "
                     f"--train.resume {ckpt_dir} --train.lr_muon {t.lr_muon / 2:g} --train.lr_embed {t.lr_embed / 2:g} "
                     f"(options given on resume override the checkpoint's config)") if saved else \
                "no checkpoint was saved yet (see --train.save_every)"
            more = (f"; {len(rollbacks)} rollback(s), the most --train.max_rollbacks {t.max_rollbacks} allows"
                    if t.on_bad_step == "rollback" else "; --train.on_bad_step rollback would skip the data and go on")
            log(f"step:{step} {why}: stopping; {where}{more}" + (f"\n{report}" if report else ""))
            raise SystemExit(2)
        recent.append(out["loss"])
        tokens_seen += out["real_tokens"]
        if step > 1 or not compiled:
            train_time += dt
        step_flop = step_flops(hp.model, batch, out["n_predicted"], out["windows"])
        flops += step_flop
        history.append({"step": step, "loss": out["loss"]})
        if d.master and (step % t.log_every == 0 or step == t.steps):
            (wl, wg), real = out["windows"], out["real_tokens"]
            mfu = f"{100 * step_flop / dt / d.world / peak:.1f}%" if peak else "n/a"
            mem = f"{torch.cuda.max_memory_allocated(d.device) / 2**20:.0f}MiB" if cuda else "n/a"
            lrs = " ".join(f"lr_{name}:{lr:.3g}" for name, lr in out["lrs"].items())
            log(f"step:{step}/{t.steps} loss:{out['loss']:.4f} gnorm:{out['grad_norm']:.3f} {lrs} mask:{out['mask_rate']:.3f} "
                f"windows:{wl}/{wg} real_tokens:{real} dt:{dt * 1000:.0f}ms real_tok/s:{real / dt:.0f} mfu:{mfu} mem:{mem}")

    metrics = {"run_id": run_id, "steps": step, "val_loss": val["loss"], "val_acc": val["acc"],
               "val_history": [h for h in history if "acc" in h], "real_tokens": tokens_seen, "flops": flops,
               "train_time_s": train_time, "wall_time_s": wall_before + time.monotonic() - started,
               "rollbacks": len(rollbacks), "log": log.path, "config": common.config_to_dict(hp)}
    folder = export(model, hp, tokens_seen, val, run_id, log, metrics) if d.master else None
    return {"run_id": run_id, "history": history, "val": val, "export": folder, "log": log.path,
            "train_time_s": train_time, "tokens_seen": tokens_seen, "rollbacks": rollbacks, "flops": flops}


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is a KeyboardInterrupt again (main)
    main()
