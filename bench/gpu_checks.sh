#!/usr/bin/env bash
# Every GPU measurement of the project in one script, sized to run in under 10 minutes. Writes
# its reports under $OUT (or bench/out/); checkpoints, exports and finetuned models of the runs
# go to a fresh temporary folder per invocation.
#   bash bench/gpu_checks.sh                           # trainer bench stability (time limits: 560 s)
#   bash bench/gpu_checks.sh tests finetune            # any sections, in the order given
# Inputs (git-ignored; GPU_DATA=bench/data by default), prepared where the network or the text is:
#   python data/tokenize_text.py --files 'TEXT/*.jsonl' --out bench/data/prose --val-permille 50   # token shards
#   cp MNLI_ROWS.jsonl bench/data/mnli.jsonl                                                      # finetune section
#   python -m bench.frontier --frontier.preset gpu --frontier.stages pack                         # frontier section (<= 40 MiB)
#   python -c "import tokenizer; tokenizer.install_offline_bpe('GPT2_BPE_DIR', 'bench/data/tiktoken')"
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
DATA=${GPU_DATA:-bench/data}
RUN=$(mktemp -d "${TMPDIR:-/tmp}/kbert-gpu-checks.XXXXXX")
trap 'rm -rf "$RUN"' EXIT  # the runs' checkpoints and exports (GBs at base size); the reports stay in $OUT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TIKTOKEN_CACHE_DIR=$PWD/$DATA/tiktoken
echo "run folder $RUN"
SECTIONS=${*:-trainer bench stability}
{ nvidia-smi; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1

base_run() {  # base_run RUN_ID STEPS TIMEOUT_S [overrides...]: KBERT-base, 65,536 tokens per step, $DATA's shards
  local id=$1 steps=$2 limit=$3; shift 3
  timeout "$limit" python3 trainer.py --model.preset base --data.train_files "$DATA/prose_train_*.bin" \
    --data.val_files "$DATA/prose_val_*.bin" --train.steps "$steps" --train.batch_tokens 65536 --train.micro_batch_seqs 8 \
    --train.val_every 0 --train.val_tokens 65536 --train.save_every 0 --train.run_id "$id" \
    --train.export_dir "$RUN/export" --train.checkpoint_dir "$RUN/ck" "$@" > "$OUT/$id.txt" 2>&1
  grep -E "^step:(1|2|3|5|7|10|15|20|50|100)/|val_loss|stopping|non-finite|Error|error" "$OUT/$id.txt" | cut -c1-160
  python3 -m bench.log_summary "$OUT/$id.txt" --skip 10 | tee "$OUT/$id.summary.txt"
}

for section in $SECTIONS; do case $section in
tests)
  echo "== GPU tests (flex vs sdpa in bf16, no recompiles, step time)"
  timeout 200 python3 -m pytest tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "KBERT|passed|failed|Error" ;;
trainer)
  # real (non-[PAD]) tokens/s and MFU over steps 11-100 (10 warm-up steps, compile in step 1)
  echo "== trainer.py, KBERT-base defaults, 100 steps x 65,536 tokens"
  base_run gpu-base 100 150 --train.warmup_frac 0.1 ;;
stability)
  # the H200 run of commit b05c3bc (2026-11-26) went NaN at step 7 with lr_embed 0.01 (then the default) and
  # 3 warm-up steps. Same settings in bf16 (autocast, Muon's orthogonalisation) and all-fp32: a NaN only in bf16
  # points at precision
  echo "== stability: --train.lr_embed 0.01, 3 warm-up steps, 20 steps, bf16 vs fp32"
  base_run stab-embed01-bf16 20 80 --train.warmup_frac 0.15 --train.cooldown_frac 0 --train.lr_embed 0.01
  base_run stab-embed01-fp32 20 120 --train.warmup_frac 0.15 --train.cooldown_frac 0 --train.lr_embed 0.01 --train.precision fp32 \
    --train.micro_batch_seqs 4 ;;  # fp32 activations: half the micro-batch, same 65,536-token step
bench)
  echo "== throughput benchmark vs ModernBERT-base and BERT-base"
  timeout 210 python3 -m bench.throughput --bench.out "$OUT/bench.json" --bench.profile true --bench.time_budget_s 100 \
    --bench.baseline_compile false --bench.variants residual_fp32=false --bench.shards "$DATA/prose_train_*.bin" > "$OUT/bench.txt" 2>&1
  tail -9 "$OUT/bench.txt" ;;
finetune)
  # examples/s with the eager FlexAttention default, then whether --train.compile true builds: on
  # torch 2.11 it failed with Triton "XBLOCK is not defined"; the block lists have since stopped
  # sorting, which may or may not have been the cause
  echo "== finetuner.py, MNLI, KBERT-base (random init), 1,024 examples, eager then compiled"
  for compile in false true; do
    timeout 90 python3 finetuner.py --task mnli --train.preset base --train.train_file "$DATA/mnli.jsonl" \
      --train.eval_files "$DATA/mnli.jsonl" --train.max_train_examples 1024 --train.max_eval_examples 1024 \
      --train.pack_len 512 --train.out_dir "$RUN/ft" --train.log_every 32 --train.run_id gpu-mnli-compile-$compile \
      --train.compile $compile > "$OUT/finetune-compile-$compile.txt" 2>&1
    echo "compile $compile (exit $?):"; grep -E "examples/s|accuracy|Error" "$OUT/finetune-compile-$compile.txt" | tail -4 | cut -c1-250
  done ;;
frontier)
  # bench/frontier.py's gpu preset: every arm, 3 budgets, BLiMP and GLUE-small finetuning (sized for 10 minutes on one
  # H100, an estimate of 7-11 until measured: records/2026-12-05-cpu-frontier/README.md; a second call continues it,
  # into the finetuning lr sweep, about 4-5 more minutes, also an estimate);
  # its data prepared by the pack stage into $DATA/frontier
  echo "== the frontier, GPU preset"
  timeout 590 python3 -m bench.frontier --frontier.preset gpu --frontier.corpus "$DATA/frontier/frontier" \
    --frontier.glue_dir "$DATA/frontier" --frontier.blimp_file "$DATA/frontier/blimp.jsonl" --frontier.out "$OUT/frontier" \
    --frontier.work_dir "$RUN/frontier" --frontier.stages pretrain,blimp,finetune,report > "$OUT/frontier.txt" 2>&1
  tail -24 "$OUT/frontier.txt" ;;
*) echo "unknown section $section: choose from tests trainer stability bench finetune frontier"; exit 2 ;;
esac; done
true
