"""Medians of trainer.py run logs' step lines, past the warm-up, and their validation curves:

    python -m bench.log_summary logs/RUN_ID.txt --skip 10
    python -m bench.log_summary logs/A.txt logs/B.txt --plot bench/out/val_loss.png

prints, for each log, steps, median real (non-[PAD]) tokens/s, ms/step and MFU over the steps
after the first `skip` (compile and learning-rate warm-up), the first and last loss, the
largest gradient norm and whether the run stopped on a non-finite value. With several logs
(or --plot) it also prints their validation losses side by side, one column per log, and
plots them against real tokens seen and training seconds (matplotlib; without it, the table
alone and a line saying there is no plot)."""
import argparse
import os
import re
import statistics

# real_tok/s since commit f5f2771; tok/s (which counted [PAD]) before it
STEP = re.compile(r"^step:(\d+)/\d+ loss:(\S+) gnorm:(\S+) .* dt:(\d+)ms (?:real_)?tok/s:(\d+) mfu:(\S+) mem:(\S+)")
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_acc:(\S+) train_time:(\d+)ms (?:real_)?tokens_seen:(\d+)")


def summarize(path: str, skip: int = 0) -> dict:
    rows, stopped = [], None
    with open(path) as f:
        for line in f:
            m = STEP.match(line)
            if m:
                step, loss, gnorm, dt, tps, mfu, mem = m.groups()
                rows.append(dict(step=int(step), loss=float(loss), gnorm=float(gnorm), dt_ms=int(dt), tokens_per_s=int(tps),
                                 mfu=float(mfu.rstrip("%")) if mfu.endswith("%") else None, mem=mem))
            elif line.startswith("step:") and "stopping;" in line:  # (the code at the top of the log has the phrase too)
                stopped = line.strip()
    if not rows:
        raise SystemExit(f"{path}: no step lines (step:N/M loss:... dt:...ms real_tok/s:... mfu:...) in this file")
    timed = [r for r in rows if r["step"] > skip] or rows
    mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
    return {"steps": len(rows), "timed_steps": f"{timed[0]['step']}-{timed[-1]['step']}",
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "median_ms_per_step": statistics.median(r["dt_ms"] for r in timed),
            "median_mfu_pct": statistics.median(mfus) if mfus else None,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "max_gnorm": max(r["gnorm"] for r in rows),
            "peak_mem": rows[-1]["mem"], "stopped": stopped}


def validation(path: str) -> list[dict]:
    """The log's validation lines: step, loss, accuracy, training seconds, real tokens seen
    (a resumed run's log holds each of its processes' lines; a step validated twice keeps the last)."""
    found = {}
    with open(path) as f:
        for line in f:
            if m := VAL.match(line):
                step, loss, acc, ms, tokens = m.groups()
                found[int(step)] = dict(step=int(step), loss=float(loss), acc=float(acc), train_s=int(ms) / 1000, tokens=int(tokens))
    return [found[s] for s in sorted(found)]


def validation_table(curves: dict[str, list[dict]]) -> str:
    """One row per validated step, one val_loss column per log ('-' where a log has none)."""
    names = list(curves)
    by_step = {name: {v["step"]: v["loss"] for v in vals} for name, vals in curves.items()}
    steps = sorted({s for losses in by_step.values() for s in losses})
    width = max(8, *(len(n) for n in names))
    lines = ["step".rjust(7) + "".join(n.rjust(width + 2) for n in names)]
    for s in steps:
        lines.append(f"{s:7d}" + "".join((f"{by_step[n][s]:.4f}" if s in by_step[n] else "-").rjust(width + 2) for n in names))
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: str) -> str:
    """val_loss against real tokens seen (left) and training seconds (right), one line per log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, vals in curves.items():
        axes[0].plot([v["tokens"] for v in vals], [v["loss"] for v in vals], marker=".", label=name)
        axes[1].plot([v["train_s"] for v in vals], [v["loss"] for v in vals], marker=".", label=name)
    axes[0].set(xlabel="real tokens seen", ylabel="val_loss")
    axes[1].set(xlabel="train_time (s)")
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="trainer.py logs (logs/RUN_ID.txt)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP steps (compile, warm-up)")
    ap.add_argument("--plot", default=None, help="where to write the validation plot (default with several logs: "
                                                 "bench/out/val_loss.png)")
    a = ap.parse_args(argv)
    names = [os.path.splitext(os.path.basename(p))[0] for p in a.logs]
    if len(set(names)) < len(names):  # the same run id twice: name them by their place on the command line
        names = [f"{i + 1}:{name}" for i, name in enumerate(names)]
    out = {}
    for name, path in zip(names, a.logs):
        out[name] = summarize(path, a.skip)
        print((f"{name} " if len(a.logs) > 1 else "") + " ".join(f"{k}:{v}" for k, v in out[name].items()))
    if len(a.logs) > 1 or a.plot:
        curves = {name: validation(path) for name, path in zip(names, a.logs)}
        print("\nval_loss by step:\n" + validation_table(curves))
        print(plot(curves, a.plot or "bench/out/val_loss.png"))
    return out


if __name__ == "__main__":
    main()
