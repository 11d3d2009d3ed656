#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the default CPU suite
# (everything not marked slow or gpu). Extra arguments go to pytest, e.g. `bash tests/run.sh -m slow`.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh || exit 1
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export WANDB_MODE=${WANDB_MODE:-disabled}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
python -m pytest "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
exit $rc
