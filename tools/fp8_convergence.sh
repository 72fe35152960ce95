#!/usr/bin/env bash
# FP8 against bf16 on real text: the same model, data, seed and steps in each precision; prints
# the mean loss over the last 50 steps of each FP8 run against bf16's, and their relative
# difference. FP8_BACKENDS lists the FP8 linears to compare (train.fp8_backend: auto, te,
# trellis; default auto), one run each.
# Needs data/stdlib_text from examples/prepare_text_data.py.
# Usage: [FP8_BACKENDS="te trellis"] [OUT_DIR=DIR] bash tools/fp8_convergence.sh [iters]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-300}
OUT=${OUT_DIR:-runs/fp8_convergence}
RUNS="bf16"
for backend in ${FP8_BACKENDS:-auto}; do RUNS="$RUNS fp8-$backend"; done
for run in $RUNS; do
  precision=${run%%-*}
  backend=trellis
  [ "$precision" = fp8 ] && backend=${run#fp8-}
  rm -rf "$OUT/$run"
  python3 pretrain_gpt.py --model.preset llama-1.3b --model.num_layers 8 --model.vocab_size 4096 \
    --model.seq_length 1024 --data.path data/stdlib_text --data.split 949,50,1 --train.iters "$ITERS" \
    --train.micro_batch_size 8 --train.global_batch_size 8 --train.lr 3e-4 --train.min_lr 3e-5 \
    --train.warmup_iters 30 --train.precision "$precision" --train.fp8_backend "$backend" \
    --train.output_dir "$OUT/$run" --log.interval 50
done
python3 - "$OUT" $RUNS <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
losses = {r: [json.loads(l)["loss"] for l in open(f"{out}/{r}/metrics.jsonl")] for r in runs}
base = losses["bf16"]
tail = lambda v: sum(v[-50:]) / len(v[-50:])
print(f"mean loss, last 50 steps: bf16 {tail(base):.4f}")
for run in runs[1:]:
    worst = max(abs(a - b) / b for a, b in zip(losses[run][10:], base[10:]))
    print(f"  {run}: {tail(losses[run]):.4f}, relative difference {100 * (tail(losses[run]) - tail(base)) / tail(base):+.2f}% "
          f"(largest per-step difference after step 10: {100 * worst:.1f}%)")
PY
