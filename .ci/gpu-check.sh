#!/usr/bin/env bash
# The device check on the GPU machine (Python 3.12, torch + numba-cuda; no DALI, no ffcv, no
# network), in one call of at most 7 minutes, DALI's install included:
#   bash .ci/gpu-check.sh [PARTS_DIR]     (PARTS_DIR holds p00..p03; see .ci/gpu-prepare.sh)
# GPU-critical checks first (smoke steps, the `gpu` tests: op parity, the loader's hand-over,
# the no-sync step, the CUDA bank, a stage-2 run fed by DALI), then the benchmarks, each under
# its own timeout and only while the budget lasts. Everything lands in $OUT as it goes, so a run
# cut short still returns what finished. Rehearsed offline by .ci/gpu-rehearse.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
PARTS=${1:-/tmp/parts}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
log() { echo "[$SECONDS s] $*" | tee -a "$OUT/steps.log"; }
# step NAME TIMEOUT CMD...: run CMD under a timeout if the budget allows, its output in $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  if [ $((SECONDS + limit)) -gt "$BUDGET" ]; then log "skip $name (needs ${limit}s, $((BUDGET - SECONDS))s left)"; return 0; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^WARNING" "$OUT/$name.log" | tail -25
  log "$name: exit $rc"
  return $rc
}

log "install: carried wheels, DALI, ecvl-fast"
$PY .ci/carry.py install .whl "$SITE" > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; log "carried wheels failed"; exit 1; }
if [ -f .dali/small/install.sh ] && ls "$PARTS"/p0* > /dev/null 2>&1; then
  bash .dali/small/install.sh "$PARTS" "$SITE" >> "$OUT/install.log" 2>&1 || log "DALI install failed: DALI tests will skip"
else
  log "no DALI parts in $PARTS: DALI tests will skip"
fi
export PYTHONPATH=$SITE
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/install.log" 2>&1 \
  || { tail -5 "$OUT/install.log"; log "pip install -e . failed"; exit 1; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
DEV=${DEVICE:-cuda}

step smoke 90 $PY .ci/smoke.py --device "$DEV"
step gpu-tests 150 $PY -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu.py tests/test_kernels.py \
  --junitxml="$OUT/gpu-tests.xml"
[ "${BENCH:-1}" = 1 ] || exit 0
b() { local name=$1 limit=$2; shift 2; step "bench-$name" "$limit" $PY -m ecvl_fast.cli bench "$name" --device "$DEV" "$@" --json "$OUT/$name.json"; }
b step 60 --model RN50 --res 224 --batch 256 --steps 10 --repeats 3
b infer 45 --model RN50 --res 224 --batch 1024 --images 8192
b augment 60 --res 224 --batch 256 --images 4096 --repeats 3
b train 100 --model RN50 --res 224 --batch 256 --images 8192 --epochs 2
step bench-kernels 30 $PY -m ecvl_fast.cli bench kernels --json "$OUT/kernels.json"
log "done"
ls -la "$OUT"
