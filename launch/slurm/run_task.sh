#!/usr/bin/env bash
# One training rank, as started by `srun` (one task per GPU). Ranks come from the Slurm environment
# (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, read by anima_ft.train.distributed); MASTER_ADDR / MASTER_PORT are
# exported by the sbatch script. `exec` keeps this process the one Slurm signals (USR1 / TERM reach the trainer).
# Usage: run_task.sh --config configs/X.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
: "${MASTER_ADDR:?export MASTER_ADDR (first node of the allocation) before srun}"
: "${MASTER_PORT:?export MASTER_PORT before srun}"
exec python -u launch/train.py "$@"
