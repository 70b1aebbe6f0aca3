"""Training-step throughput of KBERT against Hugging Face ModernBERT-base and BERT-base,
in one process on one GPU, at the same number of real tokens per step; on CPU, KBERT eager and
compiled against ModernBERT eager and compiled at the same width, depth and rows.

    python -m bench.throughput                                  # GPU: KBERT-base vs ModernBERT-base vs BERT-base
    python -m bench.throughput --bench.device cpu --bench.presets tiny --bench.width 128 --bench.layers 4 \\
        --bench.baselines modernbert --bench.baseline_size match --bench.tokens_per_step 4096 --bench.kbert_seq_len 512 \\
        --bench.kbert_micro 8 --bench.compile false,true --bench.baseline_compile false,true   # CPU, the frontier's width
    python -m bench.throughput --bench.device cpu --bench.presets tiny --bench.baselines none \\
        --bench.tokens_per_step 2048 --bench.kbert_seq_len 256 --bench.kbert_micro 4 --bench.steps 2  # CPU smoke

A step is the real training step: forward, backward and optimizer step (KBERT:
trainer.train_step itself, compiled forward and MuonAdamW; baselines: their own MLM loss and
fused AdamW), with compile and warm-up excluded, CUDA-synchronised, median over `steps`. Each
model gets the best of a small sweep of micro-batch sizes; gradient accumulation keeps tokens
per step equal. Tokens/s and FLOPs count real tokens: KBERT's rows are packed full (no [PAD]),
the baselines' rows are full random ids (with --bench.baseline_size match: KBERT's own packed
rows, read by the baselines as one sequence a row, without document masks: their fastest
path, so the ratio is conservative for KBERT). Precision: trainer.compute_dtype's auto for
every model (bf16 autocast on CUDA and on CPUs with native bf16).

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
from bench import baselines
from common import opt
from model import CLS_ID, KBERT, ModelConfig


@dataclasses.dataclass
class BenchConfig:
    presets: str = "base"  # KBERT presets to time, comma-separated
    variants: str = ""  # KBERT model-config variants timed besides each preset's default, ";"-separated,
    # each a comma-separated key=value list of ModelConfig fields, e.g. "residual_fp32=false"
    baselines: str = "modernbert,bert"  # "none" to skip; needs transformers
    tokens_per_step: int = opt(131072, ">= 1")  # real tokens per optimizer step, the same for every model
    kbert_seq_len: int = opt(8192, "> 0 and a multiple of 128")  # KBERT packs documents into rows of this length
    kbert_micro: str = "8,16"  # rows per forward/backward, swept
    modernbert_seq_len: int = 1024  # ModernBERT's main pretraining length
    modernbert_micro: str = "64,128"
    bert_seq_len: int = 512
    bert_micro: str = "128,256"
    mask_rate: float = opt(0.3, "in (0, 1]")  # predicted fraction for every model
    window_local: int = opt(128, ">= 1")  # KBERT windows during the timing (the end-of-training values)
    window_global: int = opt(8192, ">= 1")
    shards: str = ""  # glob of token shards for real document lengths; empty: synthetic lengths
    mean_doc_len: int = opt(1000, ">= 2")  # synthetic documents: geometric lengths with this mean
    warmup: int = opt(3, ">= 0")  # untimed steps (compile happens here)
    steps: int = opt(10, ">= 1")  # timed steps (median reported)
    width: int = opt(0, ">= 0")  # >0: KBERT's d_model (heads of 64, base's MLP ratio), overriding the preset's ...
    layers: int = opt(0, ">= 0")  # ... and n_layer; with baseline_size match, the baselines' too
    baseline_size: str = opt("base", "base or match")  # "base": ModernBERT-base / BERT-base; "match": KBERT's width, depth and rows
    compile: str = "auto"  # torch.compile KBERT: "true", "false", "false,true" (time both), auto: on CUDA only ...
    baseline_compile: str = "auto"  # ... and the baselines (their compile can take minutes)
    threads: int = opt(0, ">= 0")  # torch CPU threads; 0: torch's default
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    profile: bool = False  # torch.profiler table of KBERT's step (first preset)
    out: str = "bench/results.json"
    time_budget_s: float = opt(0.0, ">= 0")  # >0: after the first micro-batch of every model, sweep further only within this budget


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device) -> float:
    """Measured dense matmul rate in the training dtype (trainer.compute_dtype's auto): 8192^3 on
    CUDA, 2048^3 on CPU (FLOP/s)."""
    n, dtype = (8192 if device.type == "cuda" else 2048), trainer.compute_dtype("auto", device.type)
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
                profile: bool = False, compile: bool = True) -> dict:
    """KBERT's step is trainer.train_step itself (masking, micro-batches, loss normalisation,
    MuonAdamW), at a fixed point of the schedules: cfg's mask rate and windows."""
    T = cfg.kbert_seq_len
    rows_per_step = cfg.tokens_per_step // T
    model = KBERT(model_cfg).to(device)
    t = trainer.TrainConfig(micro_batch_seqs=micro, mask_rate_start=cfg.mask_rate, mask_rate_end=cfg.mask_rate,
                            local_window_start=cfg.window_local, local_window_end=cfg.window_local,
                            global_window_start=cfg.window_global, global_window_end=cfg.window_global)
    opt = trainer.build_optimizer(model, t)
    forward = trainer.make_forward(model, compile=compile)
    dist = common.Dist(rank=0, local_rank=0, world=1, device=device)
    data = kbert_batches(cfg, 2 * rows_per_step)  # two steps' worth of distinct batches, rotated
    halves = [data[:rows_per_step], data[rows_per_step:]]
    outs, state = [None, None], {"i": 0}

    def step():
        k = state["i"] % 2
        outs[k] = trainer.train_step(model, opt, forward, halves[k], k * rows_per_step, t.steps // 2, t, dist,
                                     static_rows=compile)
        state["i"] += 1

    dt, mem = time_steps(step, cfg, device)
    # per-step means over the batches the timing rotated through, in real (non-[PAD]) tokens
    seen = [(h, o) for h, o in zip(halves, outs) if o is not None]
    real = sum(o["real_tokens"] for _, o in seen) / len(seen)
    flops = sum(trainer.step_flops(model.cfg, h, o["n_predicted"], o["windows"]) for h, o in seen) / len(seen)
    result = {"model": label, "params": model.param_counts()["total"], "tokens_per_step": cfg.tokens_per_step,
              "real_tokens_per_step": real, "seq_len": T, "micro_batch": micro, "ms_per_step": dt * 1000,
              "tokens_per_s": real / dt, "flops_per_step": flops, "mfu": flops / dt / peak,
              "peak_mem_gib": mem, "mean_doc_len": float(trainer.document_lengths(data).mean()), "compiled": compile,
              "precision": str(trainer.compute_dtype("auto", device.type)).removeprefix("torch.")}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        cuda = device.type == "cuda"
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(3):
                step()
            sync(device)
        result["profile"] = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total",
                                                      row_limit=25)
    return result


# ----------------------------------------------------------------------------------------
# Hugging Face baselines (random init, their fastest available attention; bench/baselines.py)


def bench_hf(name: str, micro: int, seq_len: int, cfg: BenchConfig, device, peak: float, compile: bool = True) -> dict:
    """A baseline's own training step (its MLM loss through its forward, AdamW) on full rows:
    base size on random ids, or (baseline_size match) KBERT's width and depth on KBERT's rows."""
    if cfg.baseline_size == "match":
        ref = kbert_config(cfg, cfg.presets.split(",")[0])
        model, impl = baselines.build(name, ref.d_model, ref.n_layer, seq_len).to(device), "sdpa"
    else:
        model, impl = baselines.base_model(name, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd, compiled = (torch.compile(model), True) if compile else (model, False)
    accum = cfg.tokens_per_step // (micro * seq_len)
    g = torch.Generator(device="cpu").manual_seed(0)
    V = model.config.vocab_size
    rows = torch.from_numpy(kbert_batches(cfg, 2 * accum * micro)).long() if cfg.baseline_size == "match" else None
    batches = []
    for k in range(2 * accum):
        ids = rows[k * micro:(k + 1) * micro] if rows is not None else torch.randint(5, V - 1, (micro, seq_len), generator=g)
        pick = (torch.rand(micro, seq_len, generator=g) < cfg.mask_rate) & (ids < CLS_ID)
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        batches.append((ids.to(device), labels.to(device), torch.ones_like(ids, device=device)))
    bf16 = trainer.compute_dtype("auto", device.type) == torch.bfloat16
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
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
    flops = baselines.unpacked_flops(model, name, seq_len, cfg.tokens_per_step, n_pred)
    size = "base" if cfg.baseline_size != "match" else f"d{model.config.hidden_size}x{model.config.num_hidden_layers}"
    label = {"modernbert": "ModernBERT", "bert": "BERT"}[name] + f"-{size} (HF)" + (" compiled" if compiled else " eager")
    result = {"model": label, "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": cfg.tokens_per_step,
              "seq_len": seq_len, "micro_batch": micro, "ms_per_step": dt * 1000, "tokens_per_s": cfg.tokens_per_step / dt,
              "flops_per_step": flops, "mfu": flops / dt / peak, "peak_mem_gib": mem, "attention": impl, "compiled": compiled,
              "precision": "bfloat16" if bf16 else "float32"}
    return result


def kbert_config(cfg: BenchConfig, preset: str, **overrides) -> ModelConfig:
    """A preset, with --bench.width / --bench.layers (heads of 64, base's MLP ratio) on top."""
    if cfg.width:
        overrides = {"d_model": cfg.width, "n_head": max(1, cfg.width // 64), "d_mlp": cfg.width * 8 // 3 // 32 * 32,
                     **overrides}
    if cfg.layers:
        overrides = {"n_layer": cfg.layers, **overrides}
    return ModelConfig(preset=preset, **overrides)


# ----------------------------------------------------------------------------------------


def compile_modes(value: str, option: str, device) -> list[bool]:
    """"auto" (CUDA: compiled, CPU: eager), "true", "false" or "false,true" -> the modes to time."""
    modes = [device.type == "cuda" if v.strip() == "auto" else common._convert(v.strip(), bool, option)
             for v in value.split(",") if v.strip()]
    if not modes:
        raise SystemExit(f"--{option} needs auto, true, false or a list such as false,true")
    return modes


def best_of(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else runs[0]


def summarize(sweeps: dict) -> list[dict]:
    """Best micro-batch per model, with the tokens/s ratio to ModernBERT-base."""
    results = [best_of(runs) for runs in sweeps.values() if runs]
    ref = max((r for r in results if r["model"].startswith("ModernBERT") and "error" not in r),
              key=lambda r: r["tokens_per_s"], default=None)  # ModernBERT at its best (eager or compiled)
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
    common.check_config(cfg, "bench")
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device == "cuda" else "cpu")
    if cfg.tokens_per_step % cfg.kbert_seq_len:
        raise SystemExit("--bench.tokens_per_step must be a multiple of --bench.kbert_seq_len")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kbert_modes = compile_modes(cfg.compile, "bench.compile", device)
    base_modes = compile_modes(cfg.baseline_compile, "bench.baseline_compile", device)
    # "" is each preset's default; a typo in a variant fails here, before any GPU time is spent
    variants = {v: parse_variant(v) for v in [""] + [v.strip() for v in cfg.variants.split(";") if v.strip()]}
    peak = matmul_peak(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
            common.hardware_summary(device).splitlines()[1])
    print(f"device {name}, torch {torch.__version__}, measured matmul peak {peak / 1e12:.1f} TFLOP/s")
    # one entry per (model, micro-batch); every model's first size runs, the rest of the sweep
    # only while the time budget lasts (compiles dominate a short GPU run)
    jobs = []
    kbert_micros = [int(m) for m in cfg.kbert_micro.split(",") if (cfg.tokens_per_step // cfg.kbert_seq_len) % int(m) == 0]
    variant_jobs = []  # timed after the baselines: a killed run still has the ratio to ModernBERT
    for preset in cfg.presets.split(","):
        for v, overrides in variants.items():
            try:
                model_cfg = kbert_config(cfg, preset, **overrides)
            except ValueError as e:
                raise SystemExit(f"--bench.presets / --bench.variants, {preset} {v}: {e}") from None
            for compiled in kbert_modes:
                size = f" d{model_cfg.d_model}x{model_cfg.n_layer}" if cfg.width or cfg.layers else ""
                label = (f"KBERT-{preset}{size}" + (f" [{v}]" if v else "")
                         + ((" compiled" if compiled else " eager") if len(kbert_modes) > 1 else ""))
                profile = cfg.profile and not jobs and not v  # the first preset's default, first micro-batch
                (variant_jobs if v else jobs).append((label, [
                    (label, bench_kbert, label, m, cfg, device, peak, model_cfg, profile and k == 0, compiled)
                    for k, m in enumerate(kbert_micros)]))
    if cfg.baselines != "none":
        if importlib.util.find_spec("transformers") is None:
            raise SystemExit("--bench.baselines needs `pip install transformers` (benchmark only), or pass --bench.baselines none")
        for base in cfg.baselines.split(","):
            if cfg.baseline_size == "match":  # KBERT's rows and micro-batches
                seq, micros = cfg.kbert_seq_len, kbert_micros
            else:
                seq = getattr(cfg, f"{base}_seq_len")
                micros = [int(m) for m in getattr(cfg, f"{base}_micro").split(",") if cfg.tokens_per_step % (int(m) * seq) == 0]
            for compiled in base_modes:
                jobs.append((f"{base} compiled:{compiled}", [(base, bench_hf, base, m, seq, cfg, device, peak, compiled)
                                                            for m in micros]))
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
