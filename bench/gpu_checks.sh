#!/usr/bin/env bash
# Every GPU measurement of the project in one call (fits a short GPU lease). Writes under $OUT
# (or bench/out/). Needs token shards and MNLI rows in .devdata/ (see README, Performance).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TIKTOKEN_CACHE_DIR=$PWD/.devdata/tiktoken
{ nvidia-smi; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
echo "== 1. GPU tests (flex vs sdpa in bf16, no recompiles, step time)"
timeout 200 python3 -m pytest tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "KBERT|passed|failed|Error"
echo "== 2. trainer.py, KBERT-base, 60 steps x 65,536 tokens on carried shards"
timeout 130 python3 trainer.py --model.preset base --data.train_files '.devdata/prose_train_*.bin' \
  --data.val_files '.devdata/prose_val_*.bin' --train.steps 60 --train.batch_tokens 65536 --train.micro_batch_seqs 8 \
  --train.val_every 0 --train.val_tokens 65536 --train.save_every 0 --train.run_id gpu-base --train.warmup_frac 0.05 \
  --train.export_dir /tmp/export --train.checkpoint_dir /tmp/ck 2>&1 > "$OUT/trainer.txt"
grep -E "^step:(1|2|10|30|50|60)/|val_loss|Error|error" "$OUT/trainer.txt" | cut -c1-200
echo "== 3. throughput benchmark vs ModernBERT-base and BERT-base"
timeout 180 python3 -m bench.throughput --bench.out "$OUT/bench.json" --bench.profile true --bench.time_budget_s 100 --bench.baseline_compile false \
  --bench.shards '.devdata/prose_train_*.bin' > "$OUT/bench.txt" 2>&1
tail -8 "$OUT/bench.txt"
echo "== 4. finetuner.py, MNLI, KBERT-base (random init), 1,024 examples (eager FlexAttention)"
timeout 60 python3 finetuner.py --task mnli --train.preset base --train.train_file .devdata/mnli.jsonl \
  --train.eval_files .devdata/mnli.jsonl --train.max_train_examples 1024 --train.max_eval_examples 1024 \
  --train.pack_len 512 --train.out_dir /tmp/ft --train.log_every 32 --train.run_id gpu-mnli > "$OUT/finetune.txt" 2>&1
grep -E "examples/s|accuracy|Error" "$OUT/finetune.txt" | tail -4 | cut -c1-250
true
