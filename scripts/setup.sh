#!/usr/bin/env bash
# One-time set-up on a fresh machine: installs only what is missing.
# torch is installed only where absent, pinned to the CPU build that lies on
# this project's machines (an unpinned `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
# triton 3.6 is what the lent GPUs run; the interpreter and AOT tests use it here.
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q triton==3.6.0
# DeepSpeed (test extra, ZeRO-3 on CPU): no CUDA ops are built at install; its CPU accelerator.
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu $PY -m pip install -q -e ".[test]"
