#!/usr/bin/env bash
# The GPU tests and the one- and two-GPU speed rows of docs/benchmarks.md in one launch.
#
#   bash tools/speed_checks.sh [OUT_DIR]            (default runs/speed_checks)
#   ONLY="tests fp8" bash tools/speed_checks.sh     (a subset of the steps below)
#
# Steps: tests (tests/gpu but the CUDA-graph tests), graph_tests (those: about 70 s a case),
# base (llama-1.3b, global batch 32, with the plain-PyTorch and Hugging Face baselines),
# graphs (the same with model.cuda_graphs), flash (the same with the flash-attn package's
# kernels, where one is installed, and with Transformer Engine's attention, where TE is), fp8 (an 8-layer llama3-8b cut in bf16 and in each
# FP8 recipe of Trellis's own linears, and in Transformer Engine's where it can run; a 16-layer
# cut in bf16 and the default recipe), tp2 (TP=2 eager and with graphs;
# needs 2 GPUs). Steps run one after another, so timings do not share a GPU. Each has a time
# limit (STEP_LIMIT seconds, default 600), and a failed step does not stop the others. At the
# end a table lists every benchmark's tokens/s per GPU, MFU and peak memory from its JSON file.
# Logs and JSON go to OUT_DIR. The whole list takes longer than a 10-minute call: on a machine
# that limits calls, pass a few steps at a time with ONLY.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/speed_checks}
ONLY=${ONLY:-tests graph_tests base graphs flash fp8 tp2}
LIMIT=${STEP_LIMIT:-600}
mkdir -p "$OUT"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -lt 1 ]; then
  echo "error: tools/speed_checks.sh needs a CUDA GPU; none is visible" >&2
  exit 2
fi
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
run() {  # name, command...: log to OUT/name.log, JSON to OUT/name.json (benchmarks)
  local name=$1; shift
  local start=$SECONDS
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( SECONDS - start )) s (log: $OUT/$name.log)"
}
python3 -m csrc.loader --build 2>&1 | tail -1

if wanted tests; then
  run tests python3 -m pytest tests/gpu -q --ignore=tests/gpu/test_layer_graphs_gpu.py
  tail -n 1 "$OUT/tests.log"
fi
if wanted graph_tests; then  # about 70 s per case: an eager and a graphed run, each in new processes
  run graph_tests python3 -m pytest tests/gpu/test_layer_graphs_gpu.py -q
  tail -n 1 "$OUT/graph_tests.log"
fi
ONE=(env CUDA_VISIBLE_DEVICES=0 python3 tools/benchmark.py)
BASE=(--preset llama-1.3b --steps 5 --warmup 2 --global-batch 32)
wanted base && run base "${ONE[@]}" "${BASE[@]}" --baselines --out "$OUT/base.json"
wanted graphs && run graphs "${ONE[@]}" "${BASE[@]}" --model.cuda_graphs true --out "$OUT/graphs.json"
if wanted flash; then
  if python3 -c "from models.flash_kernels import flash_kernels; raise SystemExit(flash_kernels() is None)"; then
    run flash "${ONE[@]}" "${BASE[@]}" --model.attention_backend flash --out "$OUT/flash.json"
  else
    echo "flash: skipped (no flash-attn package can be imported)"
  fi
  if python3 -c "import torch; from models import te_attention
raise SystemExit(te_attention.unusable_reason(torch.empty(1, 1, 1, 64, device='cuda', dtype=torch.bfloat16), 0.0) is not None)"; then
    run te_attention "${ONE[@]}" "${BASE[@]}" --model.attention_backend te --out "$OUT/te_attention.json"
  else
    echo "te_attention: skipped (Transformer Engine cannot be imported)"
  fi
fi
if wanted fp8; then
  CUT=(--preset llama3-8b --model.num_layers 8 --seq 4096 --micro-batch 1 --global-batch 8 --steps 3 --warmup 2)
  OWN=(--train.precision fp8 --train.fp8_backend trellis)  # Trellis's own FP8 linears, TE installed or not
  run fp8_bf16 "${ONE[@]}" "${CUT[@]}" --out "$OUT/fp8_bf16.json"
  run fp8_hybrid_tensor "${ONE[@]}" "${CUT[@]}" "${OWN[@]}" --out "$OUT/fp8_hybrid_tensor.json"
  run fp8_e4m3_tensor "${ONE[@]}" "${CUT[@]}" "${OWN[@]}" --train.fp8_format e4m3 --out "$OUT/fp8_e4m3_tensor.json"
  run fp8_hybrid_row "${ONE[@]}" "${CUT[@]}" "${OWN[@]}" --train.fp8_scaling row --out "$OUT/fp8_hybrid_row.json"
  if python3 -c "import torch; from parallel import fp8, te_fp8
raise SystemExit(te_fp8.unusable_reason(fp8.FP8Recipe(), torch.device('cuda')) is not None)"; then
    run fp8_te_hybrid_tensor "${ONE[@]}" "${CUT[@]}" --train.precision fp8 --train.fp8_backend te \
      --out "$OUT/fp8_te_hybrid_tensor.json"
  else
    echo "fp8_te_hybrid_tensor: skipped (Transformer Engine cannot run here)"
  fi
  DEEP=("${CUT[@]}" --model.num_layers 16)  # the last --model.num_layers wins; the output layer weighs less
  run fp8_16l_bf16 "${ONE[@]}" "${DEEP[@]}" --out "$OUT/fp8_16l_bf16.json"
  run fp8_16l_hybrid_tensor "${ONE[@]}" "${DEEP[@]}" "${OWN[@]}" --out "$OUT/fp8_16l_hybrid_tensor.json"
fi
if wanted tp2; then
  if [ "$GPUS" -ge 2 ]; then
    TWO=(env CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc-per-node 2 tools/benchmark.py "${BASE[@]}" --tp 2)
    run tp2 "${TWO[@]}" --out "$OUT/tp2.json"
    run tp2_graphs "${TWO[@]}" --model.cuda_graphs true --out "$OUT/tp2_graphs.json"
  else
    echo "tp2: skipped (needs 2 GPUs, $GPUS visible)"
  fi
fi
python3 tools/benchmark.py --summarize "$OUT"
