#!/usr/bin/env bash
# Pipeline throughput against the theoretical bubble, for the multi-GPU runs.
#
#   bash tools/run_pipeline_benchmarks.sh [NGPUS] [extra --section.key value ...]
#
# Trains llama-1.3b on mock data at PP=2 and PP=4 (1F1B, and interleaved with vpp=2 where the
# microbatch count allows it) with 4, 8 and 32 microbatches per step, and prints the measured
# tokens/s (median of the steps after the first two) next to the 1F1B bubble fraction
# (p-1)/(m+p-1). The rest of the GPUs form data-parallel replicas. Logs: runs/pp_bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${1:-4}
shift || true
ITERS=${ITERS:-12}
MICRO=${MICRO:-1}
mkdir -p runs/pp_bench
printf "%-4s %-4s %-4s %-10s %-12s %s\n" pp vpp m bubble tokens/s run
for PP in 2 4; do
  if (( NGPUS % PP )); then continue; fi
  DP=$(( NGPUS / PP ))
  for M in 4 8 32; do
    for VPP in 1 2; do
      if (( VPP > 1 && M % PP )); then continue; fi
      RUN=runs/pp_bench/pp${PP}_vpp${VPP}_m${M}
      rm -rf "$RUN"  # metrics.jsonl is appended to
      torchrun --nproc-per-node "$NGPUS" pretrain_gpt.py --model.preset llama-1.3b --data.mock true \
        --parallel.pp "$PP" --parallel.vpp "$VPP" --train.iters "$ITERS" \
        --train.micro_batch_size "$MICRO" --train.global_batch_size $(( M * MICRO * DP )) \
        --train.lr 1e-4 --train.output_dir "$RUN" --log.quiet true "$@" > "$RUN.log" 2>&1 \
        || { echo "pp=$PP vpp=$VPP m=$M failed: see $RUN.log"; continue; }
      python - "$RUN/metrics.jsonl" "$PP" "$M" "$VPP" <<'PY'
import json, statistics, sys
path, pp, m, vpp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rates = [json.loads(line)["tokens_per_s"] for line in open(path)][2:]
bubble = (pp - 1) / (m + pp - 1)
print(f"{pp:<4} {vpp:<4} {m:<4} {bubble:<10.3f} {statistics.median(rates):<12.0f} {path}")
PY
    done
  done
done
