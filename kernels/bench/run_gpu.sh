#!/usr/bin/env bash
# The kernels' GPU check in one command: bf16 correctness tests, kernel timings, and the peer baseline beside them.
#
#   bash kernels/bench/run_gpu.sh [PATH/peer_baseline.py] [extra gpu_check.py flags, e.g. --peer-full]
#
# The peer script lives outside the repository: copy it into the ignored .peer/ first
# (mkdir -p .peer && cp ../shared/bench/peer_baseline.py .peer/) and pass .peer/peer_baseline.py; allow 540 s.
# Without it the script still runs, recording the peer step as missing. Results: $OUT/gpu_check.{md,json},
# $OUT/pytest_gpu.log, $OUT/gpu_check.log. Reads the GPU state with nvidia-smi (query only, changes nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kernels_gpu_check}
mkdir -p "$OUT"
# kernels/ is the import package anima_kernels (pyproject maps it): a link under that name serves it from PYTHONPATH
SITE=$(mktemp -d) && ln -s "$PWD/kernels" "$SITE/anima_kernels"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
peer_args=()
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then peer_args=(--peer "$1"); shift; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    >"$OUT/nvidia_smi.csv" 2>&1 || true
python3 kernels/bench/gpu_check.py --out "$OUT" "${peer_args[@]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
