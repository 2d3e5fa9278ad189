#!/usr/bin/env bash
# One script for the GPU paths (NCCL, CUDA placement, bf16/fp16 AMP, checkpoint + bitwise resume on the GPU, the
# non-finite guard, SyncBatchNorm, FSDP2 over NCCL with bf16 mixed precision, sharded save + resume),
# then a GPU benchmark: our loop vs the hand-written DDP loop in bf16, and checkpoint blocked time sync vs async.
# Usage: bash scripts/gpu_check.sh   (on a machine with a CUDA GPU; installs the project into .venv-gpu first)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  pip install -q -e . 2>&1 | tail -2
else
  pip install -q -e . 2>&1 | tail -2 || true
fi
python3 scripts/gpu_check.py
