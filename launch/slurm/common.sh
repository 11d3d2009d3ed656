#!/usr/bin/env bash
# Shared body of the sbatch scripts: rendezvous from the Slurm environment, one srun step, requeue on preemption.
# Expects CONFIG and RUN_DIR; extra arguments are dotlist overrides.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"
# No --kill-on-bad-exit: it SIGKILLs the other tasks as soon as the first exits non-zero, so a preempted step whose
# first rank exits 75 could end 137 (no requeue). The ranks end themselves instead: a rank that fails tells the
# others (exit 1 at once), a dead or stopped rank ends the others within dist.timeout_s (anima_ft.train.distributed).
# srun returns the highest task exit code: 75 when every rank saved and stopped.
# Signals: --signal=USR1@N (no "B:") and `scancel --signal=USR1 JOB` reach every task (the ranks); one rank is
# enough, the stop vote is all-reduced. checkpoint.resume=auto picks up RUN_DIR/checkpoints/latest.
srun --cpu-bind=none launch/slurm/run_task.sh --config "$CONFIG" run.dir="$RUN_DIR" "$@"
rc=$?
if [ "$rc" -eq 75 ]; then  # stopped by USR1/TERM (after saving a checkpoint once training had started): requeue
  echo "preempted: checkpoint saved, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
