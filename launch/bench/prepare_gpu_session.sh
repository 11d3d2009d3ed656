#!/usr/bin/env bash
# One-time preparation, on the CPU machine, for the GPU session call (launch/bench/gpu_session.sh):
#   .whl/   wheels the GPU image lacks (deepspeed, omegaconf, webdataset, diffusers, pydantic, hjson, ...), made by
#           ../shared/tools/gpu_wheels.sh for Python 3.12 x86_64
#   .peer/  the peer script and its stored H100 numbers (../shared does not travel to the GPU machine)
# Both are ignored by git (.gitignore; also added to .git/info/exclude in case a checkout's .gitignore lacks them)
# and travel through the call's carry list:
#   run(command="bash launch/bench/gpu_session.sh", carry=[".whl", ".peer"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED_DIR:-../shared}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for line in /.whl/ /.peer/; do
    grep -qxF "$line" "$exclude" 2>/dev/null || echo "$line" >>"$exclude"
done
if ! compgen -G ".whl/deepspeed-*.whl" >/dev/null; then
    bash "$shared/tools/gpu_wheels.sh" .whl
fi
mkdir -p .peer
cp "$shared/bench/peer_baseline.py" "$shared/baselines/h100_peer_2026-11-26.json" .peer/
{ git check-ignore -q .whl/ && git check-ignore -q .peer/; } || { echo "error: .whl/ or .peer/ is not ignored by git" >&2; exit 1; }
echo "carried by the call: $(du -sh .whl | cut -f1) .whl, $(du -sh .peer | cut -f1) .peer;" \
     "tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes (limit 64 MiB in all)"
