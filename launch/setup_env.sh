#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install anima_ft with its dependencies.
# The CPU build of torch is pinned first so that no dependency pulls a multi-GB CUDA build.
# Usage: source launch/setup_env.sh   (from the repository root; VENV overrides the location)
# Exports TORCH_EXTENSIONS_DIR=<venv>/torch_extensions (unless set): DeepSpeed's CPU ops build there, not in the
# ~/.cache/torch_extensions shared by every environment, where one killed build leaves a lock that hangs them all
# (launch/train.py sets the same default and reports a stale lock with its path and the fix).
set -euo pipefail
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}
export TORCH_EXTENSIONS_DIR
stamp="$VENV/.anima_ft_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# On a CPU-only machine DeepSpeed's gloo ranks use its shared-memory communication op, which it compiles on the first
# run (about 50 s on 2 cores); build it here, with the installation, so a first training run does not pay for it.
if [ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ] \
    && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "setup_env: building DeepSpeed's CPU communication op into $TORCH_EXTENSIONS_DIR (once)"
  if ! DS_ACCELERATOR=cpu python -c "
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
builder.load(verbose=False)" >"$VENV/shm_op_build.log" 2>&1; then
    echo "setup_env: WARNING: the op build failed (log: $VENV/shm_op_build.log); DeepSpeed will retry it on the first run"
  fi
fi
set +euo pipefail
