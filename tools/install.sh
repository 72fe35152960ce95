#!/usr/bin/env bash
# Installs Trellis and its test dependencies. Where no torch is present it installs the CPU
# build first, so pip never resolves a bare `torch` requirement to a multi-GB CUDA wheel.
set -euo pipefail
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
