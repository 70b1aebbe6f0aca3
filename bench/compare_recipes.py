"""Equal-token comparison of KBERT's recipe with the ModernBERT and BERT recipes, one-change
ablations of KBERT, validation loss on fixed masks and BLiMP.

    python -m bench.compare_recipes --compare.scale cpu     # every arm and sweep point, 2 CPU cores, ~90 min
    python -m bench.compare_recipes --compare.scale gpu     # `small`-like width on one H100/H200, ~8 min
    python -m bench.compare_recipes --compare.scale smoke   # a few steps of every arm (the test suite)

Every arm trains on the same packed rows of the same shards in the same order
(trainer.PackedLoader: documents end to end, a document that does not fit continues in the
next row behind an inserted [CLS]), with the same token ids (GPT-2 BPE + KBERT's specials,
vocabulary 50,304). Documents are kept apart the same way for every arm: KBERT by its
document masks; the Hugging Face models by a block-diagonal 4-D attention mask built from
the same [CLS] boundaries (transformers accepts it for BERT and, per layer type, for
ModernBERT; a packed document then gives the same outputs as the document alone), with
BERT's absolute positions restarting at each document.

Arms (the width and depth of the scale; each recipe keeps its own MLP ratio and heads of 64):
  kbert             trainer.py's defaults (Muon + AdamW, masking 30% -> 15%, windows, U-net, ...)
  modernbert        transformers.ModernBertForMaskedLM: GeGLU (1.5 d), local (128) / global
                    every 3rd layer, no biases, sparse prediction; AdamW betas (0.9, 0.98),
                    eps 1e-6, decoupled weight decay 1e-5, 30% masking, warm-up 10% then
                    stable then linear decay over the last 30% (ModernBERT's trapezoid)
  bert              transformers.BertForMaskedLM (GELU MLP 4 d, dropout 0.1 as published); AdamW
                    betas (0.9, 0.999), eps 1e-6, weight decay 0.01, 15% masking (80/10/10),
                    warm-up 10% then linear decay to 0
  adamw             KBERT with AdamW (ModernBERT's settings) in place of Muon for the hidden matrices
  no-unet, no-value-residual, constant-mask-30, untied-head, full-attention: KBERT with one change
The baselines and the AdamW ablation are trained at every learning rate of the scale's
sweep; the best (lowest final validation loss) is reported with the sweep beside it.

Evaluation, the same for every arm: validation loss per masked token on a fixed held-out set
(the first rows of the validation shards) with fixed masks (15% of the ordinary tokens, all
[MASK], the same positions whatever the arm trained with), every `eval_every` steps; at the
end, BLiMP by pseudo-log-likelihood (finetuner.blimp_scores) for each arm's best run.
Outputs in --compare.out (default records/<date>-<scale>-compare/): logs/ (one per run),
results.json, results.md (the table) and curves.png (matplotlib, a benchmark-only import).
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

import common
import finetuner
import trainer
from model import CLS_ID, KBERT, MASK_ID, PAD_ID, SEP_ID, document_ids
from optimizer import MuonAdamW

# ----------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class CompareConfig:
    scale: str = "cpu"  # cpu | gpu | smoke (sizes below)
    train_files: str = "data/shards/prose_train_*.bin"  # data/tokenize_text.py shards, split by document hash
    val_files: str = "data/shards/prose_val_*.bin"
    arms: str = ""  # comma-separated subset of the arms; empty: all
    blimp_file: str = "data/blimp/blimp.jsonl"  # python data/download_blimp.py; "none": skip BLiMP
    out: str = ""  # empty: records/<date>-<scale>-compare
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0: torch's default


@dataclasses.dataclass(frozen=True)
class Scale:
    d_model: int
    n_layer: int
    seq_len: int
    batch_seqs: int  # rows per optimizer step (the same tokens for every arm)
    micro_seqs: int  # rows per forward/backward
    steps: int
    eval_every: int
    val_seqs: int  # rows of the fixed validation set
    blimp_pairs: int  # per paradigm (0: all 1,000)
    lrs: tuple  # the sweep of the baselines and the AdamW ablation
    log_every: int = 10


SCALES = {
    # 2 CPU cores: 0.74M tokens per run (1.3 s per KBERT step, 0.9 ModernBERT, 2.9 BERT), 15 runs and
    # 9 BLiMP passes in 87 minutes on a 2-core AMD EPYC (records/2026-11-29-cpu-compare)
    "cpu": Scale(d_model=128, n_layer=4, seq_len=512, batch_seqs=8, micro_seqs=8, steps=180, eval_every=20,
                 val_seqs=32, blimp_pairs=100, lrs=(3e-4, 1e-3, 3e-3)),
    # one H100/H200: near the `small` preset, ~6.5M tokens per run, the whole comparison in ~8 minutes
    "gpu": Scale(d_model=512, n_layer=12, seq_len=1024, batch_seqs=32, micro_seqs=32, steps=200, eval_every=25,
                 val_seqs=64, blimp_pairs=1000, lrs=(3e-4, 1e-3, 3e-3), log_every=25),
    "smoke": Scale(d_model=64, n_layer=2, seq_len=128, batch_seqs=4, micro_seqs=2, steps=3, eval_every=3,
                   val_seqs=4, blimp_pairs=2, lrs=(1e-3, 3e-3), log_every=1),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    recipe: str  # kbert | modernbert | bert | ablation
    what: str
    model: tuple = ()  # KBERT ModelConfig overrides, (key, value) pairs
    train: tuple = ()  # KBERT TrainConfig overrides
    sweep: bool = False  # trained at every lr of the scale's sweep
    adamw: bool = False  # AdamW in place of Muon


def arms_for(seq_len: int) -> list[Arm]:
    return [
        Arm("kbert", "kbert", "trainer.py's defaults"),
        Arm("modernbert", "modernbert", "HF ModernBertForMaskedLM, ModernBERT's AdamW settings, 30% masking", sweep=True),
        Arm("bert", "bert", "HF BertForMaskedLM, BERT's AdamW settings, 15% masking", sweep=True),
        Arm("adamw", "ablation", "AdamW (ModernBERT's settings) in place of Muon", sweep=True, adamw=True),
        Arm("no-unet", "ablation", "no U-net skips", model=(("unet_skips", False),)),
        Arm("no-value-residual", "ablation", "no value residual", model=(("value_residual", False),)),
        Arm("constant-mask-30", "ablation", "masking 30% throughout", train=(("mask_rate_end", 0.3),)),
        Arm("untied-head", "ablation", "MLM head untied from the embedding", model=(("tie_embeddings", False),)),
        Arm("full-attention", "ablation", "every layer attends to its whole document",
            train=tuple((f"{k}_window_{e}", seq_len) for k in ("local", "global") for e in ("start", "end"))),
    ]


VAL_SEED, VAL_MASK_RATE = 12345, 0.15  # the fixed validation masks: 15% of ordinary tokens, all [MASK]

# ----------------------------------------------------------------------------------------
# Data: the same packed rows for every arm


def document_masks(ids: torch.Tensor, local: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) rows -> bool attention mask (B, 1, T, T) of same-document pairs (and, with
    `local`, |i - j| <= local, ModernBERT's sliding window of 2 * local tokens) and the
    positions within each document (B, T), restarting at every [CLS]."""
    docs = document_ids(ids)
    mask = docs[:, :, None] == docs[:, None, :]
    if local is not None:
        i = torch.arange(ids.size(1), device=ids.device)
        mask = mask & ((i[:, None] - i[None, :]).abs() <= local)
    starts = torch.cat([torch.ones_like(docs[:, :1], dtype=torch.bool), docs[:, 1:] != docs[:, :-1]], dim=1)
    idx = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return mask[:, None], idx - first


# ----------------------------------------------------------------------------------------
# KBERT arms: trainer.py's own config, optimizer and step


def kbert_setup(arm: Arm, S: Scale, lr: float | None, device: torch.device):
    argv = ["--model.preset", "tiny", "--model.n_layer", str(S.n_layer), "--model.d_model", str(S.d_model),
            "--model.n_head", str(S.d_model // 64), "--model.d_mlp", str(S.d_model * 8 // 3 // 32 * 32),  # base's ratio
            "--data.seq_len", str(S.seq_len), "--train.steps", str(S.steps),
            "--train.batch_tokens", str(S.batch_seqs * S.seq_len), "--train.micro_batch_seqs", str(S.micro_seqs)]
    for group, pairs in (("model", arm.model), ("train", arm.train)):
        argv += [x for k, v in pairs for x in (f"--{group}.{k}", str(v))]
    hp = trainer.parse_args(argv)
    model = KBERT(hp.model)
    model.init_weights(seed=hp.train.seed)
    model.to(device)
    opt = trainer.build_optimizer(model, hp.train)
    if arm.adamw:  # the Muon group becomes AdamW with ModernBERT's settings at the swept lr
        groups = [dict(kind="adamw", name=g["name"], params=g["params"], lr=lr if g["kind"] == "muon" else g["initial_lr"],
                       betas=(0.9, 0.98) if g["kind"] == "muon" else g["betas"], eps=1e-6 if g["kind"] == "muon" else g["eps"],
                       weight_decay=1e-5 / lr if g["kind"] == "muon" else g["weight_decay"]) for g in opt.param_groups]
        for g in groups:
            g["initial_lr"] = g["lr"]
        opt = MuonAdamW(groups, params_expected=list(model.parameters()), ortho_dtype=opt.ortho_dtype)
    forward = trainer.make_forward(model, compile=device.type == "cuda", precision=hp.train.precision)
    dist = common.Dist(0, 0, 1, device)

    def step(batch: np.ndarray, first: int, i: int) -> tuple[float, float]:
        out = trainer.train_step(model, opt, forward, batch, first, i, hp.train, dist, static_rows=device.type == "cuda")
        return out["loss"], trainer.step_flops(hp.model, batch, out["n_predicted"], out["windows"])

    @torch.no_grad()
    def masked_loss(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        model.eval()
        loss, _, n = forward(inputs, labels, model.default_windows(device), "sum")
        model.train()
        return loss.item(), n

    @torch.no_grad()
    def log_probs(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = finetuner.kbert_log_probs(model, ids, attention_mask).float()
        model.train()
        return out

    n_linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2)
    return model, step, masked_loss, log_probs, n_linear


# ----------------------------------------------------------------------------------------
# Hugging Face baselines, as users run them (random init, their own losses)


def hf_model(recipe: str, S: Scale):
    import transformers

    common_ids = dict(vocab_size=50304, pad_token_id=PAD_ID)
    if recipe == "modernbert":
        cfg = transformers.ModernBertConfig(
            hidden_size=S.d_model, intermediate_size=S.d_model * 3 // 2, num_hidden_layers=S.n_layer,
            num_attention_heads=S.d_model // 64, max_position_embeddings=S.seq_len, local_attention=128,
            layer_types=["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(S.n_layer)],
            cls_token_id=CLS_ID, sep_token_id=SEP_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID,
            sparse_prediction=True, **common_ids)
        return transformers.ModernBertForMaskedLM(cfg)
    cfg = transformers.BertConfig(hidden_size=S.d_model, num_hidden_layers=S.n_layer, num_attention_heads=S.d_model // 64,
                                  intermediate_size=4 * S.d_model, max_position_embeddings=S.seq_len, **common_ids)
    return transformers.BertForMaskedLM(cfg)


RECIPES = {  # optimizer, masking and lr schedule of each baseline (see the docstring)
    "modernbert": dict(betas=(0.9, 0.98), eps=1e-6, decoupled_wd=1e-5, wd=0.0, mask=(0.30, 0.1, 0.1), warmup=0.1, cooldown=0.3),
    "bert": dict(betas=(0.9, 0.999), eps=1e-6, decoupled_wd=0.0, wd=0.01, mask=(0.15, 0.1, 0.1), warmup=0.1, cooldown=0.9),
}


def hf_setup(recipe: str, S: Scale, lr: float, device: torch.device):
    torch.manual_seed(0)
    model = hf_model(recipe, S).to(device)
    model.train()
    R = RECIPES[recipe]
    # ModernBERT's DecoupledAdamW shrinks weights by wd x (lr_t / lr) per step: torch's AdamW
    # shrinks by lr_t x weight_decay, so weight_decay = wd / lr gives the same
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=R["betas"], eps=R["eps"],
                            weight_decay=R["decoupled_wd"] / lr if R["decoupled_wd"] else R["wd"])
    sched = trainer.TrainConfig(steps=S.steps, warmup_frac=R["warmup"], cooldown_frac=R["cooldown"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    local = model.config.local_attention // 2 if recipe == "modernbert" else None
    V = model.config.vocab_size

    def call(inputs, labels):
        full, pos = document_masks(inputs)
        if recipe == "modernbert":  # per layer type: the block-diagonal mask, and within the sliding window
            mask = {"full_attention": full, "sliding_attention": document_masks(inputs, local)[0]}
            return model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        return model(input_ids=inputs, attention_mask=full, position_ids=pos, labels=labels).loss

    def step(batch: np.ndarray, first: int, i: int) -> tuple[float, float]:
        for g in opt.param_groups:
            g["lr"] = lr * trainer.lr_multiplier(i, sched)
        ids = torch.from_numpy(batch).long().to(device)
        inputs, labels = trainer.mask_tokens(ids, first, 0, *R["mask"])
        n_total = max(1, int((labels >= 0).sum()))
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for lo in range(0, len(batch), S.micro_seqs):  # HF's loss is a mean: weigh each micro-batch by its tokens
            lab = labels[lo:lo + S.micro_seqs]
            n = int((lab >= 0).sum())
            if not n:
                continue
            with amp:
                loss = call(inputs[lo:lo + S.micro_seqs], lab)
            (loss * n / n_total).backward()
            loss_sum += loss.item() * n
        opt.step()
        return loss_sum / n_total, hf_step_flops(model, recipe, batch, n_total)

    @torch.no_grad()
    def masked_loss(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        model.eval()
        n = int((labels >= 0).sum())
        with amp:
            loss = call(inputs, labels).float().item() * n
        model.train()
        return loss, n

    @torch.no_grad()
    def log_probs(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """finetuner.pll_scores' log_probs_fn: (N, V) at the [MASK] positions, one sentence per row."""
        model.eval()
        full = (attention_mask[:, :, None] & attention_mask[:, None, :])[:, None]
        with amp:
            if recipe == "modernbert":
                mask = {"full_attention": full, "sliding_attention": full & document_masks(ids, local)[0]}
                h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = model.decoder(model.head(h[ids == MASK_ID]))
            else:
                h = model.bert(input_ids=ids, attention_mask=full).last_hidden_state
                logits = model.cls(h[ids == MASK_ID])
        model.train()
        return logits.float().log_softmax(-1)

    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != V)
    return model, step, masked_loss, log_probs, n_linear


def hf_step_flops(model, recipe: str, batch: np.ndarray, n_predicted: int) -> float:
    """Training FLOPs counted as trainer.training_flops does: 6 x linear weights x real tokens,
    12 x d x the pairs each layer's mask lets through, 6 x d x V x the rows sent through the
    vocabulary head (ModernBERT: predicted tokens, sparse prediction; BERT: every position)."""
    cfg = model.config
    lengths = trainer.document_lengths(batch)
    tokens = int(lengths.sum())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != cfg.vocab_size)
    if recipe == "modernbert":
        windows = [10**9 if t == "full_attention" else cfg.local_attention // 2 + 1 for t in cfg.layer_types]
    else:
        windows = [10**9] * cfg.num_hidden_layers
    pairs = sum(trainer.attention_pairs(lengths, w) for w in windows)
    head_rows = n_predicted if recipe == "modernbert" else batch.size
    return 6 * linear * tokens + 12 * cfg.hidden_size * pairs + 6 * cfg.hidden_size * cfg.vocab_size * head_rows


# ----------------------------------------------------------------------------------------
# One run: train on the shared stream, evaluate on the fixed set


def run(arm: Arm, lr: float | None, S: Scale, cfg: CompareConfig, val: tuple, device, log_dir: str) -> dict:
    name = arm.name + (f"-lr{lr:g}" if lr is not None else "")
    setup = hf_setup(arm.recipe, S, lr, device) if arm.recipe in RECIPES else kbert_setup(arm, S, lr, device)
    model, step, masked_loss, log_probs, n_linear = setup
    params = sum(p.numel() for p in model.parameters())
    loader = trainer.PackedLoader(trainer.shard_files(cfg.train_files, "training"), S.seq_len, seed=0)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.txt")
    with open(log_path, "w") as f:
        f.write(json.dumps({"arm": dataclasses.asdict(arm), "lr": lr, "scale": dataclasses.asdict(S), "params": params,
                            "non_embedding_linear": n_linear, "train_files": cfg.train_files}) + "\n")

    def note(msg):
        print(f"[{name}] {msg}", flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    def evaluate() -> float:
        inputs, labels = val
        total, count = 0.0, 0
        for lo in range(0, len(inputs), S.micro_seqs):
            s, n = masked_loss(inputs[lo:lo + S.micro_seqs], labels[lo:lo + S.micro_seqs])
            total, count = total + s, count + n
        return total / count

    # train_s: wall seconds in training steps (evaluation excluded); cpu_s: the process's CPU seconds in
    # them, which other work on a shared machine inflates far less than the wall time
    curve, tokens, train_s, cpu_s, flops = [], 0, 0.0, 0.0, 0.0
    for i in range(S.steps + 1):
        if i % S.eval_every == 0 or i == S.steps:
            v = evaluate()
            curve.append({"step": i, "tokens": tokens, "wall_s": round(train_s, 3), "cpu_s": round(cpu_s, 3), "flops": flops,
                          "val_loss": v})
            note(f"step:{i}/{S.steps} val_loss:{v:.4f} tokens:{tokens} train_time:{train_s:.1f}s "
                 f"load:{os.getloadavg()[0]:.2f}")  # the machine's load average: other work skews train_time
            if not math.isfinite(v):
                note("stopping: the validation loss is not finite")
                break
        if i == S.steps:
            break
        batch, first = loader.next_batch(S.batch_seqs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, step_flops = step(batch, first, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        tokens += int((batch != PAD_ID).sum())
        flops += step_flops
        if (i + 1) % S.log_every == 0:
            note(f"step:{i + 1}/{S.steps} loss:{loss:.4f} train_time:{train_s:.1f}s")
    return {"name": name, "arm": arm.name, "lr": lr, "params": params, "curve": curve, "log": log_path,
            "final_val_loss": curve[-1]["val_loss"], "tokens": tokens, "wall_s": round(train_s, 3), "cpu_s": round(cpu_s, 3),
            "flops": flops,
            "log_probs": log_probs}


# ----------------------------------------------------------------------------------------
# Summary: best lr per arm, tokens and wall time to reach the best baseline, table, plot


def crossing(curve: list[dict], target: float, key: str) -> float | None:
    """The first `key` (tokens or wall_s) at which the validation loss reaches `target`,
    linearly interpolated between evaluations; None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return a[key]
            frac = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[key] + frac * (b[key] - a[key])
    return curve[0][key] if curve and curve[0]["val_loss"] <= target else None


def summarize(results: list[dict]) -> list[dict]:
    baselines = [r for r in results if r["recipe"] in RECIPES and math.isfinite(r["final_val_loss"])]
    target = min((r["final_val_loss"] for r in baselines), default=None)
    for r in results:
        r["best_baseline_loss"] = target
        r["tokens_to_best_baseline"] = crossing(r["curve"], target, "tokens") if target is not None else None
        r["wall_s_to_best_baseline"] = crossing(r["curve"], target, "wall_s") if target is not None else None
    return results


def table(results: list[dict]) -> str:
    def fmt(x, spec):
        return "never" if x is None else format(x, spec)

    lines = ["| arm | recipe | lr | params | tokens | FLOPs | wall s (CPU s) | final val loss | tokens to best baseline "
             "| wall s to best baseline | BLiMP | lr sweep (final val loss) |", "|---" * 12 + "|"]
    for r in results:
        sweep = ", ".join(f"{s['lr']:g}: {s['final_val_loss']:.3f}" for s in r["sweep"]) if len(r["sweep"]) > 1 else ""
        blimp = f"{100 * r['blimp']:.1f}" if r["blimp"] is not None else "-"
        lines.append(f"| {r['name']} | {r['recipe']} | {r['lr'] if r['lr'] is not None else 'defaults'} | "
                     f"{r['params'] / 1e6:.2f}M | {r['tokens']:,} | {r['flops']:.3g} | {r['wall_s']:.0f} ({r['cpu_s']:.0f}) | "
                     f"{r['final_val_loss']:.4f} | {fmt(r['tokens_to_best_baseline'], ',.0f')} | "
                     f"{fmt(r['wall_s_to_best_baseline'], '.0f')} | {blimp} | {sweep} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        style = "-" if r["recipe"] != "ablation" else ":"
        width = 2.5 if r["recipe"] == "kbert" else 1.5
        for ax, key in zip(axes, ("tokens", "wall_s")):
            ax.plot([c[key] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], style, lw=width, label=r["name"])
    target = results[0]["best_baseline_loss"]
    for ax, xlabel in zip(axes, ("tokens", "training wall seconds")):
        if target is not None:
            ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss per masked token (fixed 15% masks)")
        ax.set_ylim(top=min(11.0, max(c["val_loss"] for r in results for c in r["curve"][1:] if math.isfinite(c["val_loss"]))))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides, _ = common.parse_overrides(argv, {"compare": CompareConfig})
    cfg = CompareConfig(**overrides["compare"])
    if cfg.scale not in SCALES:
        raise SystemExit(f"--compare.scale must be one of {', '.join(SCALES)}, got {cfg.scale!r}")
    S = SCALES[cfg.scale]
    arms = arms_for(S.seq_len)
    if cfg.arms:
        wanted = [a.strip() for a in cfg.arms.split(",") if a.strip()]
        unknown = sorted(set(wanted) - {a.name for a in arms})
        if unknown:
            raise SystemExit(f"--compare.arms: unknown arm(s) {unknown}; choose from {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in wanted]
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("the baselines need transformers: pip install -r requirements.txt") from None
    blimp_rows = None
    if cfg.blimp_file != "none":
        blimp_rows = finetuner.read_blimp(cfg.blimp_file, S.blimp_pairs)
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.out or os.path.join("records", f"{datetime.date.today().isoformat()}-{cfg.scale}-compare")
    os.makedirs(out, exist_ok=True)

    # the fixed validation set and masks, shared by every arm
    val_rows = trainer.validation_batch(trainer.shard_files(cfg.val_files, "validation"),
                                        trainer.parse_args(["--data.seq_len", str(S.seq_len),
                                                            "--train.val_tokens", str(S.val_seqs * S.seq_len)]))
    ids = torch.from_numpy(val_rows).long().to(device)
    val = trainer.mask_tokens(ids, 0, VAL_SEED, VAL_MASK_RATE, 0.0, 0.0)
    assert bool((val[0][val[1] >= 0] == MASK_ID).all())
    tok = None
    if blimp_rows is not None:
        from tokenizer import Tokenizer

        tok = Tokenizer()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = {"command": "python -m bench.compare_recipes " + " ".join(argv), "commit": commit,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "config": dataclasses.asdict(cfg),
              "scale": dataclasses.asdict(S), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "val": {"rows": len(val_rows), "masked_tokens": int((val[1] >= 0).sum())}}
    print(json.dumps(header, indent=2), flush=True)

    results, t_start = [], time.perf_counter()
    for arm in arms:
        runs = [run(arm, lr, S, cfg, val, device, os.path.join(out, "logs")) for lr in (S.lrs if arm.sweep else [None])]
        best = min(runs, key=lambda r: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf)
        blimp = None
        if blimp_rows is not None and math.isfinite(best["final_val_loss"]):
            t0 = time.perf_counter()
            scored = finetuner.blimp_scores(best["log_probs"], blimp_rows, tok, device=device)
            blimp = scored["accuracy"]
            print(f"[{best['name']}] BLiMP {100 * blimp:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append({**{k: v for k, v in best.items() if k != "log_probs"}, "recipe": arm.recipe, "what": arm.what,
                        "blimp": blimp, "sweep": [{"lr": r["lr"], "final_val_loss": r["final_val_loss"]} for r in runs],
                        "logs": [os.path.relpath(r["log"], out) for r in runs]})
        summarize(results)
        report = {**header, "elapsed_s": round(time.perf_counter() - t_start), "arms": results}
        with open(os.path.join(out, "results.json"), "w") as f:  # after every arm: a killed run keeps what it measured
            json.dump(report, f, indent=2, default=str)
        del runs, best
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"`{header['command']}` at commit {commit}, {header['date']}, {header['device']}\n\n{table(results)}\n")
    print(table(results))
    try:
        plot(results, os.path.join(out, "curves.png"))
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
