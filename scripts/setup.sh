#!/usr/bin/env bash
# Set-up on a fresh machine, and a check on every `make test`: installs only what is missing or
# not at the version CI tested (constraints/test.txt); when all is in place it returns in about a
# second without calling pip.
# torch is installed only where absent, pinned to the CPU build that lies on this project's machines
# (an unpinned `torch` would pull a multi-GB CUDA build); a torch that is there (CPU or CUDA, any
# version) is never replaced: pip runs with it held at its version.
# torchattacks (constraints/no-deps.txt) is installed with --no-deps: its metadata asks for torchvision,
# which setup refuses (scripts/test_env.py forbidden says why).
# PRSL_UNLOCKED=1: upgrade everything else to the newest releases pyproject.toml allows, to see
# breakage early (a later plain run goes back to the locked versions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
UNLOCKED=${PRSL_UNLOCKED:-0}
$PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" || $PY -m pip install -q torch==2.13.0
# torchvision would replace that torch (its wheels pin a torch build): stop, saying so, where it is installed.
$PY scripts/test_env.py forbidden
if [ "$UNLOCKED" != 1 ] && $PY scripts/test_env.py check 2>/dev/null; then
    exit 0
fi
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
$PY scripts/test_env.py constraints $([ "$UNLOCKED" = 1 ] && echo --unlocked) > "$CONSTRAINTS"
# DeepSpeed (test extra, ZeRO-3 on CPU): no CUDA ops are built at install; its CPU accelerator.
export DS_BUILD_OPS=0 DS_ACCELERATOR=cpu
if [ "$UNLOCKED" = 1 ]; then
    $PY -m pip install -q --upgrade --upgrade-strategy eager -c "$CONSTRAINTS" -e ".[test]"
else
    $PY scripts/test_env.py check || true  # say what is missing or off the lock
    $PY -m pip install -q -c "$CONSTRAINTS" -e ".[test]"
fi
# Test tools whose metadata asks for torchvision (constraints/no-deps.txt): without their dependencies.
$PY -m pip install -q --no-deps $([ "$UNLOCKED" = 1 ] && echo --upgrade) $($PY scripts/test_env.py no-deps $([ "$UNLOCKED" = 1 ] && echo --unlocked))
