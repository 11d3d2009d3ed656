#!/usr/bin/env bash
# The one device call for kernels/: bf16 correctness tests, kernel timings, and the peer baseline beside them.
#
#   bash kernels/bench/run_gpu.sh [PATH/peer_baseline.py] [extra gpu_check.py flags, e.g. --peer-full]
#
# The device machine sees only the repository, so before the call copy the peer script into an ignored folder and
# carry it:  mkdir -p .peer && cp ../shared/bench/peer_baseline.py .peer/ && echo /.peer/ >> .git/info/exclude
# then run(command="bash kernels/bench/run_gpu.sh .peer/peer_baseline.py", carry=[".peer"], timeout_s=540).
# Without it the script still runs, recording the peer step as missing. Results: $OUT/gpu_check.{md,json},
# $OUT/pytest_gpu.log, $OUT/gpu_check.log. Reads the GPU state with nvidia-smi (query only, changes nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kernels_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
peer_args=()
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then peer_args=(--peer "$1"); shift; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    >"$OUT/nvidia_smi.csv" 2>&1 || true
python3 kernels/bench/gpu_check.py --out "$OUT" "${peer_args[@]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
