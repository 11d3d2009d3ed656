#!/usr/bin/env bash
# One-time preparation, on a machine with internet access, for the GPU session (launch/bench/gpu_session.sh) on an
# offline GPU node:
#   .whl/   wheels the GPU image lacks (deepspeed, omegaconf, webdataset, diffusers, pydantic, hjson, ...), made by
#           ../shared/tools/gpu_wheels.sh for Python 3.12 x86_64
#   .peer/  the peer script and its stored H100 numbers (../shared is not copied to the GPU node)
# Both are ignored by git (.gitignore; also added to .git/info/exclude in case a checkout's .gitignore lacks them);
# copy them to the node with the repository, then run there: bash launch/bench/gpu_session.sh
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
echo "to copy along: $(du -sh .whl | cut -f1) .whl, $(du -sh .peer | cut -f1) .peer;" \
     "tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
