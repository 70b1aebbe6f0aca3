"""Medians of a trainer.py run log's step lines, past the warm-up:

    python -m bench.log_summary logs/RUN_ID.txt --skip 10

prints steps, median real (non-[PAD]) tokens/s, ms/step and MFU over the steps after the
first `skip` (compile and learning-rate warm-up), the first and last loss, the largest gradient
norm and whether the run stopped on a non-finite value."""
import argparse
import re
import statistics

# real_tok/s since commit f5f2771; tok/s (which counted [PAD]) before it
STEP = re.compile(r"^step:(\d+)/\d+ loss:(\S+) gnorm:(\S+) .* dt:(\d+)ms (?:real_)?tok/s:(\d+) mfu:(\S+) mem:(\S+)")


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP steps (compile, warm-up)")
    a = ap.parse_args()
    print(" ".join(f"{k}:{v}" for k, v in summarize(a.log, a.skip).items()))
