#!/usr/bin/env bash
# On the development machine: gather what the GPU check machine (Python 3.12, torch, numba-cuda;
# no network, no DALI, no ffcv) needs, in ignored folders that `run` can carry:
#   .whl/   open_clip and its pure-Python dependencies (one carry)
#   .dali/  DALI 2.4.0 split into p00..p03 (<= 56 MiB each, one per carry) and .dali/small/
# Then, back to back, one call each (the machine stays warm 30 s between calls):
#   carry [.dali/p0i]                        mkdir -p /tmp/parts && cp .dali/p0i /tmp/parts/      (i = 0, 1, 2)
#   carry [.dali/p03, .dali/small, .whl]     mkdir -p /tmp/parts && cp .dali/p03 /tmp/parts/ && bash .ci/gpu-check.sh /tmp/parts
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.dali/' .git/info/exclude 2>/dev/null || echo '/.dali/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth
../shared/tools/wheel-parts.sh .dali 'nvidia-dali-cuda130==2.4.0' astunparse==1.6.3 gast==0.6.0 optree nvtx makefun 'libcst~=1.8'
ls -la .whl .dali .dali/small
