#!/usr/bin/env bash
# On the development machine: gather what the GPU check machine (Python 3.12, torch 2.11, numpy,
# numba-cuda; no network, no DALI, no ffcv) needs, in ignored folders that `run` can carry:
#   .whl/   every wheel in .ci/gpu-carry.txt, built for that machine (~26 MB)
#   .dali/  DALI 2.4.0 split into p00..p03 (<= 56 MiB each, one per carry), and .dali/small/install.sh
# Then, back to back, one call each (the machine stays warm 30 s between calls):
#   carry [.dali/p0i]                        mkdir -p /tmp/parts && cp .dali/p0i /tmp/parts/      (i = 0, 1, 2)
#   carry [.dali/p03, .dali/small, .whl]     mkdir -p /tmp/parts && cp .dali/p03 /tmp/parts/ && bash .ci/gpu-check.sh /tmp/parts
# Rehearse all of it here first: bash .ci/gpu-rehearse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.dali/' .git/info/exclude 2>/dev/null || echo '/.dali/' >> .git/info/exclude
rm -rf .whl
python3 .ci/carry.py download .whl --python 3.12 --torchvision "${TORCHVISION:-0.26.0}" 2> >(grep -v "^WARNING: Location" >&2)
# the commit the check runs: the GPU machine's copy of the tree has no .git (bench's machine block, summary.json)
echo "$(git rev-parse --short HEAD)$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo +)" > .whl/COMMIT
[ -d .dali ] && [ -f .dali/small/install.sh ] && [ "${REFRESH_DALI:-0}" = 0 ] || \
  ../shared/tools/wheel-parts.sh .dali 'nvidia-dali-cuda130==2.4.0'
last=$(ls .dali/p0* | tail -1)
total=$(du -cb "$last" .dali/small .whl | tail -1 | cut -f1)
echo "last call carries $last + .dali/small + .whl: $((total / 1048576)) MiB (limit 64 MiB with the working tree)"
[ "$total" -lt $((60 * 1048576)) ] || { echo "too big for one call: move wheels to an earlier call"; exit 1; }
