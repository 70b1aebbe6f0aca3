#!/usr/bin/env bash
# The CPU measurements behind README's speed figures, in one script (records/2026-12-05-cpu-speed):
#   steps       trainer.py's step time (median of the step lines' dt past step 10, bench/log_summary.py) at the demo's
#               width (tiny: d 64) and the frontier's (d 128, 4 layers, 8 rows of 512), eager and compiled, bf16 and
#               fp32; with REV=<commit> the same trainer command at that commit too (the "before")
#   throughput  bench/throughput.py: KBERT eager and compiled against ModernBERT eager and compiled at equal width,
#               depth and rows (the frontier's and the demo's), with a torch.profiler table of KBERT's step
#   demo        `python trainer.py --demo` from a fresh clone (corpus build included), /usr/bin/time -v; with
#               REV=<commit> that commit's demo as well
#   curves      the demo and a 500-step frontier-width run in bf16 and in fp32: their validation curves side by side
#   bash bench/cpu_checks.sh [steps throughput demo curves]     # OUT=... (default bench/out/cpu), REV=fe68c2f
# Inputs: the frontier's shards (python -m bench.frontier --frontier.stages corpus) for the frontier-width runs, GPT-2's
# BPE files where tiktoken finds them (TIKTOKEN_CACHE_DIR). Nothing else should run on the machine meanwhile.
set -u
OUT=${OUT:-bench/out/cpu}; mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(pwd)
SHARDS=${SHARDS:-$REPO/data/shards/frontier}
RUN=$(mktemp -d "${TMPDIR:-/tmp}/kbert-cpu-checks.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200; python3 -c "import torch, transformers; print('torch', torch.__version__, \
'threads', torch.get_num_threads(), 'transformers', transformers.__version__)"; git log -1 --format='commit %h %cd'; date -u; } > "$OUT/env.txt"
SECTIONS=${*:-steps throughput demo curves}
WIDE=(--model.preset tiny --model.n_layer 4 --model.d_model 128 --model.n_head 2 --model.d_mlp 320 --data.seq_len 512
      --data.train_files "${SHARDS}_train_*.bin" --data.val_files "${SHARDS}_val_*.bin" --train.batch_tokens 4096
      --train.micro_batch_seqs 8 --train.save_every 0 --train.overwrite true --train.export_dir "$RUN/ex" --train.checkpoint_dir "$RUN/ck")

steps_run() {  # steps_run DIR NAME ARGS...: 60 steps, no validation; the median step time past step 10
  local dir=$1 name=$2; shift 2
  (cd "$dir" && python3 trainer.py "$@" --train.steps 60 --train.val_every 0 --train.run_id "cpu-$name" > "$OUT/steps-$name.txt" 2>&1)
  echo "$name: $(python3 -m bench.log_summary "$OUT/steps-$name.txt" --skip 10 2>&1 | grep -o -m1 'median_ms_per_step:[0-9.]*')"
}

clone_at() {  # clone_at REV DIR: a fresh clone of this repository at REV
  git clone -q "$REPO" "$2" && git -C "$2" checkout -q "$1"
}

for section in $SECTIONS; do case $section in
steps)
  echo "== trainer step times (60 steps, median past step 10)"
  for w in demo wide; do
    if [ $w = demo ]; then args=(--demo --train.save_every 0 --train.overwrite true --train.export_dir "$RUN/ex" --train.checkpoint_dir "$RUN/ck"); else args=("${WIDE[@]}"); fi
    steps_run "$REPO" "$w-bf16-eager" "${args[@]}" --train.precision bf16 --train.compile false
    steps_run "$REPO" "$w-bf16-compiled" "${args[@]}" --train.precision bf16 --train.compile true
    steps_run "$REPO" "$w-fp32-eager" "${args[@]}" --train.precision fp32 --train.compile false
    if [ -n "${REV:-}" ]; then
      [ -d "$RUN/before" ] || clone_at "$REV" "$RUN/before"
      steps_run "$RUN/before" "$w-fp32-eager-$REV" "${args[@]}"
    fi
  done ;;
throughput)
  echo "== bench/throughput.py: KBERT vs ModernBERT at equal width, depth and rows"
  for w in 128 64; do
    python3 -m bench.throughput --bench.device cpu --bench.presets tiny --bench.width $w --bench.layers 4 \
      --bench.baselines modernbert --bench.baseline_size match --bench.tokens_per_step 4096 --bench.kbert_seq_len 512 \
      --bench.kbert_micro 8 --bench.compile false,true --bench.baseline_compile false,true --bench.warmup 3 --bench.steps 10 \
      --bench.shards "${SHARDS}_train_*.bin" --bench.profile true --bench.out "$OUT/throughput-d$w.json" > "$OUT/throughput-d$w.txt" 2>&1
    tail -6 "$OUT/throughput-d$w.txt"
  done ;;
demo)
  echo "== python trainer.py --demo from a fresh clone"
  for rev in HEAD ${REV:-}; do
    rm -rf "$RUN/demo" && clone_at "$rev" "$RUN/demo"
    (cd "$RUN/demo" && /usr/bin/time -v python3 trainer.py --demo > "$OUT/demo-$rev.log" 2> "$OUT/demo-$rev.time")
    echo "$rev: $(grep -E 'Elapsed' "$OUT/demo-$rev.time" | sed 's/.*: //') wall, user $(grep 'User time' "$OUT/demo-$rev.time" | sed 's/.*: //') s, system $(grep 'System time' "$OUT/demo-$rev.time" | sed 's/.*: //') s; $(grep -E '^step:300/300 val' "$OUT/demo-$rev.log")"
  done ;;
curves)
  echo "== bf16 against fp32: the demo, and 500 steps at the frontier's width"
  for p in bf16 fp32; do
    python3 trainer.py --demo --train.precision $p --train.run_id cpu-curve-demo-$p --train.save_every 0 --train.overwrite true \
      --train.export_dir "$RUN/ex" --train.checkpoint_dir "$RUN/ck" > "$OUT/curve-demo-$p.txt" 2>&1
    python3 trainer.py "${WIDE[@]}" --train.precision $p --train.steps 500 --train.val_every 50 --train.val_tokens 32768 \
      --train.run_id cpu-curve-wide-$p > "$OUT/curve-wide-$p.txt" 2>&1
  done
  for w in demo wide; do
    echo "$w:"; paste <(grep -o 'step:[0-9]*/[0-9]* val_loss:[0-9.]*' "$OUT/curve-$w-bf16.txt") \
      <(grep -o 'val_loss:[0-9.]*' "$OUT/curve-$w-fp32.txt") | sed 's/^/  bf16 /; s/\t/   fp32 /'
  done ;;
*) echo "unknown section $section: choose from steps throughput demo curves"; exit 2 ;;
esac; done
true
