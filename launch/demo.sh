#!/usr/bin/env bash
# The main job on a fresh CPU machine: installs what it needs into .venv, then runs the mini-lab
# (prepare -> deepspeed ZeRO-2 on 2 CPU ranks -> probe, drift, export -> runs/lab/report.md): the base model, the
# plain fine-tune, 25% replay, output preservation, both, and a second seed of the plain fine-tune (Question 1).
# Extra arguments go to `anima-ft lab` (see `anima-ft lab --help`); `--full` adds the adapter-frozen-first fine-tune
# and the redistribution variant.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec anima-ft lab --out runs/lab "$@"
