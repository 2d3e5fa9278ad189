#!/usr/bin/env bash
# One script for the GPU paths (NCCL, CUDA placement, bf16/fp16 AMP, checkpoint + bitwise resume on the GPU, the
# non-finite guard, SyncBatchNorm, FSDP2 over NCCL with bf16 mixed precision, sharded save + resume),
# then a GPU benchmark: our loop vs the hand-written DDP loop in bf16, and checkpoint blocked time sync vs async.
# Usage: bash scripts/gpu_check.sh [REPORT]  (on a machine with a CUDA GPU). Uses the python3 that has torch with
# CUDA and the project's runtime packages when it has them (an offline GPU image); else installs into .venv-gpu.
# With REPORT, the table is also written to that file.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime_ok() { python3 -c "import torch, yaml, psutil, xxhash, tqdm, numpy, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! runtime_ok; then
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  pip install -q -e . 2>&1 | tail -2
fi
# The package from this checkout, whether installed or not (workers are forked from the launcher's interpreter).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 scripts/gpu_check.py "$@"
