"""Training-step throughput of KBERT against Hugging Face ModernBERT-base and BERT-base,
in one process on one GPU, at the same number of real tokens per step.

    python -m bench.throughput                                  # GPU: KBERT-base vs ModernBERT-base vs BERT-base
    python -m bench.throughput --bench.device cpu --bench.presets tiny --bench.baselines none \\
        --bench.tokens_per_step 2048 --bench.kbert_seq_len 256 --bench.kbert_micro 4 --bench.steps 2  # CPU smoke

A step is the real training step: forward, backward and optimizer step (KBERT:
trainer.train_step itself, compiled forward and MuonAdamW; baselines: their own MLM loss and
fused AdamW), with compile and warm-up excluded, CUDA-synchronised, median over `steps`. Each
model gets the best of a small sweep of micro-batch sizes; gradient accumulation keeps tokens
per step equal. Tokens/s and FLOPs count real tokens: KBERT's rows are packed full (no [PAD]),
the baselines' rows are full random ids.

FLOPs per step (multiply-add = 2, forward + backward = 3 x forward), counted for the work
each model's design does:
  6 x (non-embedding linear weights) x tokens             the matmuls of all layers
  + 12 x d x (attended query/key pairs) per layer          QK^T and PV; documents, windows,
                                                           local/global layers counted exactly
  + 6 x d x V x (positions sent through the vocab head)   KBERT and ModernBERT (sparse
                                                           prediction): predicted tokens only;
                                                           BERT: every position
Each model's timing rotates over two steps' worth of batches; FLOPs per step are the mean
over them. MFU = FLOPs / time / (bf16 matmul rate measured on this card, 8192^3). transformers is an
optional import for this script only.
"""
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import common
import trainer
from model import CLS_ID, KBERT, ModelConfig


@dataclasses.dataclass
class BenchConfig:
    presets: str = "base"  # KBERT presets to time, comma-separated
    variants: str = ""  # KBERT model-config variants timed besides each preset's default, ";"-separated,
    # each a comma-separated key=value list of ModelConfig fields, e.g. "residual_fp32=false"
    baselines: str = "modernbert,bert"  # "none" to skip; needs transformers
    tokens_per_step: int = 131072  # real tokens per optimizer step, the same for every model
    kbert_seq_len: int = 8192  # KBERT packs documents into rows of this length
    kbert_micro: str = "8,16"  # rows per forward/backward, swept
    modernbert_seq_len: int = 1024  # ModernBERT's main pretraining length
    modernbert_micro: str = "64,128"
    bert_seq_len: int = 512
    bert_micro: str = "128,256"
    mask_rate: float = 0.3  # predicted fraction for every model
    window_local: int = 128  # KBERT windows during the timing (the end-of-training values)
    window_global: int = 8192
    shards: str = ""  # glob of token shards for real document lengths; empty: synthetic lengths
    mean_doc_len: int = 1000  # synthetic documents: geometric lengths with this mean
    warmup: int = 3  # untimed steps (compile happens here)
    steps: int = 10  # timed steps (median reported)
    compile: bool = True  # torch.compile KBERT (always, on CUDA) ...
    baseline_compile: bool = True  # ... and the baselines (their compile can take minutes)
    device: str = "auto"
    profile: bool = False  # torch.profiler table of KBERT's step (first preset)
    out: str = "bench/results.json"
    time_budget_s: float = 0.0  # >0: after the first micro-batch of every model, sweep further only within this budget


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device) -> float:
    """Measured dense matmul rate: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (FLOP/s)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def time_steps(step_fn, cfg: BenchConfig, device) -> tuple[float, float]:
    """(median seconds per step, peak memory GiB) after cfg.warmup untimed steps."""
    for _ in range(cfg.warmup):
        step_fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), mem


# ----------------------------------------------------------------------------------------
# KBERT


def kbert_batches(cfg: BenchConfig, n_rows: int, seed: int = 0) -> np.ndarray:
    T = cfg.kbert_seq_len
    if cfg.shards:
        loader = trainer.PackedLoader(trainer.shard_files(cfg.shards, "benchmark"), T, seed=seed)
        return loader.next_batch(n_rows)[0]
    rng = np.random.default_rng(seed)
    rows = np.empty((n_rows, T), dtype=np.int32)
    for r in range(n_rows):
        fill = 0
        while fill < T:
            L = min(T - fill, int(rng.geometric(1 / cfg.mean_doc_len)) + 1)
            rows[r, fill] = CLS_ID
            rows[r, fill + 1:fill + L] = rng.integers(0, CLS_ID, L - 1)
            fill += L
    return rows


def parse_variant(variant: str) -> dict:
    """"residual_fp32=false,softcap=0" -> ModelConfig overrides (typed; unknown keys rejected)."""
    argv = [f"--model.{kv.strip()}" for kv in variant.split(",") if kv.strip()]
    return common.parse_overrides(argv, {"model": ModelConfig})[0]["model"]


def bench_kbert(label: str, micro: int, cfg: BenchConfig, device, peak: float, model_cfg: ModelConfig,
                profile: bool = False) -> dict:
    """KBERT's step is trainer.train_step itself (masking, micro-batches, loss normalisation,
    MuonAdamW), at a fixed point of the schedules: cfg's mask rate and windows."""
    T = cfg.kbert_seq_len
    rows_per_step = cfg.tokens_per_step // T
    model = KBERT(model_cfg).to(device)
    t = trainer.TrainConfig(micro_batch_seqs=micro, mask_rate_start=cfg.mask_rate, mask_rate_end=cfg.mask_rate,
                            local_window_start=cfg.window_local, local_window_end=cfg.window_local,
                            global_window_start=cfg.window_global, global_window_end=cfg.window_global)
    opt = trainer.build_optimizer(model, t)
    forward = trainer.make_forward(model, compile=cfg.compile and device.type == "cuda")
    dist = common.Dist(rank=0, local_rank=0, world=1, device=device)
    data = kbert_batches(cfg, 2 * rows_per_step)  # two steps' worth of distinct batches, rotated
    halves = [data[:rows_per_step], data[rows_per_step:]]
    outs, state = [None, None], {"i": 0}

    def step():
        k = state["i"] % 2
        outs[k] = trainer.train_step(model, opt, forward, halves[k], k * rows_per_step, t.steps // 2, t, dist)
        state["i"] += 1

    dt, mem = time_steps(step, cfg, device)
    # per-step means over the batches the timing rotated through, in real (non-[PAD]) tokens
    seen = [(h, o) for h, o in zip(halves, outs) if o is not None]
    real = sum(o["real_tokens"] for _, o in seen) / len(seen)
    flops = sum(trainer.step_flops(model.cfg, h, o["n_predicted"], o["windows"]) for h, o in seen) / len(seen)
    result = {"model": label, "params": model.param_counts()["total"], "tokens_per_step": cfg.tokens_per_step,
              "real_tokens_per_step": real, "seq_len": T, "micro_batch": micro, "ms_per_step": dt * 1000,
              "tokens_per_s": real / dt, "flops_per_step": flops, "mfu": flops / dt / peak,
              "peak_mem_gib": mem, "mean_doc_len": float(trainer.document_lengths(data).mean())}
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(device)
        result["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    return result


# ----------------------------------------------------------------------------------------
# Hugging Face baselines (random init, bf16 autocast, their fastest available attention)


def hf_model(name: str, device):
    import transformers

    if name == "modernbert":
        config = transformers.ModernBertConfig()  # the defaults are ModernBERT-base
        config.sparse_prediction = True  # the vocab head only on predicted tokens, as in its pretraining
        cls, impls = transformers.ModernBertForMaskedLM, ("flash_attention_2", "sdpa")
    else:
        config = transformers.BertConfig()  # bert-base-uncased shape
        cls, impls = transformers.BertForMaskedLM, ("sdpa",)
    for impl in impls:
        try:
            return cls._from_config(config, attn_implementation=impl).to(device), impl
        except Exception as e:  # flash-attn not installed, ...
            print(f"{name}: attention {impl} unavailable ({type(e).__name__}: {str(e)[:100]})")
    raise RuntimeError(f"no attention implementation of {name} loads")


def hf_flops(model, name: str, seq_len: int, tokens: int, n_pred: int) -> float:
    cfg = model.config
    V, d = cfg.vocab_size, cfg.hidden_size
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != V)
    n_seqs = tokens // seq_len
    if name == "modernbert":
        layer_types = getattr(cfg, "layer_types", None)  # transformers >= 5; older: global_attn_every_n_layers
        n_global = (sum(t == "full_attention" for t in layer_types) if layer_types else
                    sum(1 for i in range(cfg.num_hidden_layers) if i % cfg.global_attn_every_n_layers == 0))
        w = cfg.local_attention // 2 + 1  # |i - j| <= local_attention / 2
        local_pairs = seq_len * (2 * w - 1) - w * (w - 1)
        pairs = n_seqs * (n_global * seq_len**2 + (cfg.num_hidden_layers - n_global) * local_pairs)
        head_rows = n_pred
    else:
        pairs = n_seqs * cfg.num_hidden_layers * seq_len**2
        head_rows = tokens
    return 6 * linear * tokens + 12 * d * pairs + 6 * d * V * head_rows


def bench_hf(name: str, micro: int, seq_len: int, cfg: BenchConfig, device, peak: float) -> dict:
    model, impl = hf_model(name, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = model
    compiled = False
    if cfg.baseline_compile and device.type == "cuda":
        fwd, compiled = torch.compile(model), True
    accum = cfg.tokens_per_step // (micro * seq_len)
    g = torch.Generator(device="cpu").manual_seed(0)
    V = model.config.vocab_size
    batches = []
    for _ in range(2 * accum):
        ids = torch.randint(5, V - 1, (micro, seq_len), generator=g)
        labels = torch.where(torch.rand(micro, seq_len, generator=g) < cfg.mask_rate, ids, torch.full_like(ids, -100))
        batches.append((ids.to(device), labels.to(device), torch.ones_like(ids, device=device)))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    state = {"i": 0}

    def step():
        for _ in range(accum):
            ids, labels, att = batches[state["i"] % len(batches)]
            state["i"] += 1
            with amp:
                loss = fwd(input_ids=ids, attention_mask=att, labels=labels).loss
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        dt, mem = time_steps(step, cfg, device)
    except Exception as e:
        if not compiled:
            raise
        print(f"{name}: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); timing eager")
        fwd, compiled = model, False
        dt, mem = time_steps(step, cfg, device)
    n_pred = sum(int((b[1] >= 0).sum()) for b in batches) / 2
    flops = hf_flops(model, name, seq_len, cfg.tokens_per_step, n_pred)
    label = {"modernbert": "ModernBERT-base (HF)", "bert": "BERT-base (HF)"}[name]
    result = {"model": label, "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": cfg.tokens_per_step,
              "seq_len": seq_len, "micro_batch": micro, "ms_per_step": dt * 1000, "tokens_per_s": cfg.tokens_per_step / dt,
              "flops_per_step": flops, "mfu": flops / dt / peak, "peak_mem_gib": mem, "attention": impl, "compiled": compiled}
    return result


# ----------------------------------------------------------------------------------------


def best_of(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else runs[0]


def summarize(sweeps: dict) -> list[dict]:
    """Best micro-batch per model, with the tokens/s ratio to ModernBERT-base."""
    results = [best_of(runs) for runs in sweeps.values() if runs]
    ref = next((r for r in results if r["model"].startswith("ModernBERT") and "error" not in r), None)
    for r in results:
        if ref and "error" not in r:
            r["vs_modernbert"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return results


def attempt(name: str, fn, *args):
    """fn(label_or_baseline, micro, ...) or an error row naming the model and micro-batch."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        return {"model": name, "error": "out of memory", "micro_batch": args[1]}
    except Exception as e:  # a baseline or variant that does not run here must not lose the other rows
        import traceback

        traceback.print_exc()
        return {"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}", "micro_batch": args[1]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None):
    overrides, _ = common.parse_overrides(sys.argv[1:] if argv is None else argv, {"bench": BenchConfig})
    cfg = BenchConfig(**overrides["bench"])
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    if cfg.tokens_per_step % cfg.kbert_seq_len:
        raise SystemExit("--bench.tokens_per_step must be a multiple of --bench.kbert_seq_len")
    # "" is each preset's default; a typo in a variant fails here, before any GPU time is spent
    variants = {v: parse_variant(v) for v in [""] + [v.strip() for v in cfg.variants.split(";") if v.strip()]}
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, measured matmul peak {peak / 1e12:.1f} TFLOP/s")
    # one entry per (model, micro-batch); every model's first size runs, the rest of the sweep
    # only while the time budget lasts (compiles dominate a short GPU run)
    jobs = []
    kbert_micros = [int(m) for m in cfg.kbert_micro.split(",") if (cfg.tokens_per_step // cfg.kbert_seq_len) % int(m) == 0]
    variant_jobs = []  # timed after the baselines: a killed run still has the ratio to ModernBERT
    for preset in cfg.presets.split(","):
        for v, overrides in variants.items():
            label = f"KBERT-{preset}" + (f" [{v}]" if v else "")
            try:
                model_cfg = ModelConfig(preset=preset, **overrides)
            except ValueError as e:
                raise SystemExit(f"--bench.presets / --bench.variants, {label}: {e}") from None
            profile = cfg.profile and not jobs and not v  # the first preset's default, first micro-batch
            (variant_jobs if v else jobs).append((label, [
                (label, bench_kbert, label, m, cfg, device, peak, model_cfg, profile and k == 0)
                for k, m in enumerate(kbert_micros)]))
    if cfg.baselines != "none":
        if importlib.util.find_spec("transformers") is None:
            raise SystemExit("--bench.baselines needs `pip install transformers` (benchmark only), or pass --bench.baselines none")
        for base in cfg.baselines.split(","):
            seq = getattr(cfg, f"{base}_seq_len")
            micros = [int(m) for m in getattr(cfg, f"{base}_micro").split(",") if cfg.tokens_per_step % (int(m) * seq) == 0]
            jobs.append((base, [(base, bench_hf, base, m, seq, cfg, device, peak) for m in micros]))
    jobs += variant_jobs
    t_start = time.perf_counter()
    sweeps = {name: [] for name, _ in jobs}
    report = {"device": name, "torch": torch.__version__, "matmul_peak_flops": peak, "config": dataclasses.asdict(cfg),
              "results": [], "sweeps": sweeps, "command": " ".join(["python -m bench.throughput"] + (sys.argv[1:] if argv is None else argv))}
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    for rnd in range(max(len(j) for _, j in jobs)):
        for job_name, job_list in jobs:
            if rnd < len(job_list):
                if rnd > 0 and cfg.time_budget_s and time.perf_counter() - t_start > cfg.time_budget_s:
                    print(f"time budget spent: skipping {job_name} micro-batch {job_list[rnd][3]}")
                    continue
                sweeps[job_name].append(attempt(*job_list[rnd]))
                print(json.dumps({k: v for k, v in sweeps[job_name][-1].items() if k != "profile"}, default=str), flush=True)
                report["results"] = summarize(sweeps)
                with open(cfg.out, "w") as f:  # after every measurement: a killed run keeps what it measured
                    json.dump(report, f, indent=2, default=str)
    results = report["results"]
    for runs in sweeps.values():
        for r in runs:
            if "profile" in r:
                print(f"profile of {r['model']} (micro-batch {r['micro_batch']}), 3 steps:\n{r.pop('profile')}")
    print(f"\n{'model':36} {'params':>8} {'tok/step':>9} {'micro':>6} {'tokens/s':>10} {'ms/step':>8} {'MFU':>6} {'mem GiB':>8} {'vs MB':>6}")
    for r in results:
        if "error" in r:
            print(f"{r.get('model', '?'):36} error: {r['error']}")
            continue
        print(f"{r['model']:36} {r['params'] / 1e6:7.1f}M {r['tokens_per_step']:9d} {r['micro_batch']:6d} "
              f"{r['tokens_per_s']:10.0f} {r['ms_per_step']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_mem_gib']:8.1f} "
              f"{r.get('vs_modernbert', float('nan')):6.2f}")
    print(f"(written to {cfg.out})")
    return report


if __name__ == "__main__":
    main()
