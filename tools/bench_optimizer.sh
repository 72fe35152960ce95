#!/usr/bin/env bash
# One-GPU runs of llama-1.3b on the mixed-precision path (bf16 weights, fp32 main grads and
# master weights), in bf16 and in fp16 with dynamic loss scaling, plus the fp32-weight
# autocast baseline. Record tokens/s and mem_gib from the last steps of each in docs/benchmarks.md.
# Usage: bash tools/bench_optimizer.sh [output root]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_optimizer}
COMMON=(--model.preset llama-1.3b --data.mock true --train.iters 20 --train.micro_batch_size 4
        --train.global_batch_size 4 --train.lr 1e-4 --train.warmup_iters 2 --log.interval 1)
for precision in bf16 fp16 bf16-autocast; do
  python pretrain_gpt.py "${COMMON[@]}" --train.precision "$precision" --train.output_dir "$OUT/$precision"
done
# The same with the distributed optimizer on 2 GPUs (the "Two-GPU run" issue):
#   torchrun --nproc-per-node 2 pretrain_gpt.py "${COMMON[@]}" --train.global_batch_size 8 \
#       --train.precision bf16 --optim.shard true --optim.overlap_param_gather true --train.output_dir "$OUT/shard2"
for precision in bf16 fp16 bf16-autocast; do
  echo "== $precision"; tail -n 3 "$OUT/$precision/metrics.jsonl"
done
