#!/usr/bin/env bash
# FP8 against bf16 on real text: the same model, data, seed and steps in both precisions;
# prints the mean loss over the last 50 steps of each and their relative difference.
# Needs data/stdlib_text from examples/prepare_text_data.py. Usage: bash tools/fp8_convergence.sh [iters]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-300}
OUT=${OUT_DIR:-runs/fp8_convergence}
for precision in bf16 fp8; do
  rm -rf "$OUT/$precision"
  python3 pretrain_gpt.py --model.preset llama-1.3b --model.num_layers 8 --model.vocab_size 4096 \
    --model.seq_length 1024 --data.path data/stdlib_text --data.split 949,50,1 --train.iters "$ITERS" \
    --train.micro_batch_size 8 --train.global_batch_size 8 --train.lr 3e-4 --train.min_lr 3e-5 \
    --train.warmup_iters 30 --train.precision "$precision" --train.output_dir "$OUT/$precision" \
    --log.interval 50
done
python3 - "$OUT" <<'PY'
import json, sys
runs = {p: [json.loads(l)["loss"] for l in open(f"{sys.argv[1]}/{p}/metrics.jsonl")] for p in ("bf16", "fp8")}
tail = {p: sum(v[-50:]) / len(v[-50:]) for p, v in runs.items()}
worst = max(abs(a - b) / b for a, b in zip(runs["fp8"][10:], runs["bf16"][10:]))
print(f"mean loss, last 50 steps: bf16 {tail['bf16']:.4f}  fp8 {tail['fp8']:.4f}  "
      f"relative difference {100 * (tail['fp8'] - tail['bf16']) / tail['bf16']:+.2f}%  "
      f"(largest per-step difference after step 10: {100 * worst:.1f}%)")
PY
