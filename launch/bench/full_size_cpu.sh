#!/usr/bin/env bash
# The full-size production path on this CPU machine: bash launch/bench/full_size_cpu.sh OUT_DIR [--smoke] [...]
# (a random 2B Anima, ZeRO-2 and ZeRO-3 on 2 CPU ranks, kill -9 + resume, 1-rank universal resume, export).
# Installs what it needs into .venv first; results in OUT_DIR/results.{json,md}; see docs/full_size_cpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: bash launch/bench/full_size_cpu.sh OUT_DIR [--smoke] [--steps N]" >&2; exit 2; }
source launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python launch/bench/full_size_cpu.py "$@"
