#!/usr/bin/env bash
# The GPU check (issue 15): benchmarks/scale.py on one CUDA GPU, in about 8 minutes or less.
#
# The same ladder as on the CPU, in CUDA bf16 and 4-bit NF4 (bf16 compute, the paper's): tli at
# layer 2 on Llama-3-8B geometry (random weights, written as safetensors), median step time and
# peak GPU memory; then the paper's way (full depth with the LM head, 4-bit) for a few steps and a
# full-depth 4-bit scan of 200 strings. The full checkpoint (16 GB in bf16) is written to
# $TLI_SCALE_DIR (default: a temporary folder) and removed afterwards.
#
# Usage: bash benchmarks/gpu.sh            (from the repository root; needs tli[quant] and CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: needs a CUDA GPU, and torch sees none")
PY
args=(--device cuda --steps 10 --paper-steps 5)
if [[ -n "${TLI_SCALE_DIR:-}" ]]; then args+=(--workdir "$TLI_SCALE_DIR"); fi
exec timeout 480 python benchmarks/scale.py "${args[@]}"
