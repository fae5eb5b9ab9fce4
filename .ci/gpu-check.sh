#!/usr/bin/env bash
# The device check on the GPU machine (Python 3.12, torch + numba-cuda; no DALI, no ffcv, no
# network), in one call, DALI's install included:
#   bash .ci/gpu-check.sh [PARTS_DIR]     (PARTS_DIR holds p00..p03; see .ci/gpu-prepare.sh)
# GPU-critical checks first (smoke steps, the `gpu` tests: op parity, the loader's hand-over,
# the no-sync step, the CUDA bank, stage-2 runs fed by DALI), then `bench profile` (per batch: the
# feeder's DALI time and waits, the copies, the step; the top kernels), then `bench train` (the only
# DALI-fed RN50/224 run and the data-stall figure), then the other benchmarks, then `bench infer`
# and `bench step` with --compile, each under its own timeout and only while the budget lasts.
# What comes back is a fixed set of 4 files in $OUT (the machine returns at most 8):
#   check.log     every step's output, appended as it runs
#   results.json  per step: exit status, seconds, and its benchmark JSON; rewritten after each step
#   gpu-tests.xml the tests' JUnit report
#   summary.json  the headline figures (issue 30's keys): keep as docs/gpu/summary-<device>-<date>.json
# Run again while the machine is warm, the install is kept: STEPS="bench-train bench-infer" picks steps
# (STEPS="bench-step-compiled" the compiled step alone).
# Rehearsed offline, every step at a tiny size, by .ci/gpu-rehearse.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d)}  # per-step logs and JSON, outside $OUT
PARTS=${1:-/tmp/parts}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
BUDGET=${BUDGET:-460}
SIZE=${SIZE:-full}  # tiny: the rehearsal's sizes (CPU)
STEPS=${STEPS:-}
LOG=$OUT/check.log RESULTS=$OUT/results.json
log() { echo "[$SECONDS s] $*" | tee -a "$LOG"; }
# step NAME TIMEOUT CMD...: run CMD under a timeout if the budget allows; its output goes to
# check.log, its exit status, time and $WORK/NAME.json (if it wrote one) to results.json
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  if [ $((SECONDS + limit)) -gt "$BUDGET" ]; then
    log "skip $name (needs ${limit}s, $((BUDGET - SECONDS))s left)"
    $PY .ci/results.py "$RESULTS" "$name" skip 0
    return 0
  fi
  local t0=$SECONDS rc
  log "start $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >> "$LOG"
  grep -v "^WARNING" "$WORK/$name.log" | tail -25
  $PY .ci/results.py "$RESULTS" "$name" $rc $((SECONDS - t0)) "$WORK/$name.json"
  log "$name: exit $rc ($((SECONDS - t0)) s)"
  return $rc
}

t0=$SECONDS
export PYTHONPATH=$SITE
[ -n "${ECVL_FAST_COMMIT:-}" ] || ! [ -f .whl/COMMIT ] || export ECVL_FAST_COMMIT=$(cat .whl/COMMIT)  # no .git here
if $PY -c "import nvidia.dali" 2> /dev/null; then
  log "install: kept from the last call"
else
  log "install: carried wheels, DALI, ecvl-fast"
  $PY .ci/carry.py install .whl "$SITE" >> "$LOG" 2>&1 || { log "carried wheels failed"; exit 1; }
  if [ -f .dali/small/install.sh ] && ls "$PARTS"/p0* > /dev/null 2>&1; then
    bash .dali/small/install.sh "$PARTS" "$SITE" >> "$LOG" 2>&1 || log "DALI install failed: DALI tests will skip"
  else
    log "no DALI parts in $PARTS: DALI tests will skip"
  fi
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1 \
  || { tail -5 "$LOG"; log "pip install -e . failed"; exit 1; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG"
$PY .ci/results.py "$RESULTS" install 0 $((SECONDS - t0))
DEV=${DEVICE:-cuda}

step smoke 90 $PY .ci/smoke.py --device "$DEV"
# a per-test timeout names a slow test instead of losing the whole step to the step's limit
step gpu-tests 180 $PY -m pytest -q -p no:cacheprovider -rs --timeout 90 --durations 10 -m gpu \
  tests/test_gpu.py tests/test_kernels.py --junitxml="$OUT/gpu-tests.xml"
[ "${BENCH:-1}" = 1 ] || exit 0
if [ "$SIZE" = tiny ]; then  # every benchmark's code path, at the smallest size (the rehearsal)
  M=(--model ecvl-tiny-vit --res 32) TRAIN=(--batch 16 --images 64 --epochs 1 --workers 1 --dali-threads 1)
  STEP=(--batch 8 --steps 2 --repeats 1) INFER=(--batch 16 --images 64 --repeats 1)
  AUG=(--res 32 --batch 16 --images 64 --repeats 1 --workers 1 --dali-threads 1) KN=(--n 10000)
  PROF=(--batch 16 --images 64 --dali-threads 1)
else
  M=(--model RN50 --res 224) TRAIN=(--batch 256 --images 8192 --epochs 2)
  STEP=(--batch 256 --steps 10 --repeats 3) INFER=(--batch 1024 --images 8192)
  AUG=(--res 224 --batch 256 --images 4096 --repeats 3) KN=()
  PROF=(--batch 256 --images 4096)
fi
b() { local name=$1 limit=$2; shift 2; step "bench-$name" "$limit" $PY -m ecvl_fast.cli bench "$name" "$@" --json "$WORK/bench-$name.json"; }
# the same benchmark with --compile (the frozen tower, or the whole classifier, as one frozen graph)
bc() { local name=$1 limit=$2; shift 2; step "bench-$name-compiled" "$limit" $PY -m ecvl_fast.cli bench "$name" "$@" --compile --json "$WORK/bench-$name-compiled.json"; }
b profile 90 "${M[@]}" --device "$DEV" "${PROF[@]}"  # first: where the fed step's time goes decides the rest
b train 110 "${M[@]}" --device "$DEV" "${TRAIN[@]}"
b step 60 "${M[@]}" --device "$DEV" "${STEP[@]}"
b infer 90 "${M[@]}" --device "$DEV" "${INFER[@]}"
b augment 60 --device "$DEV" "${AUG[@]}"
b kernels 30 "${KN[@]}"
# last, as each compiles for a minute or more: the levers of item 4, while the budget lasts
bc infer 120 "${M[@]}" --device "$DEV" "${INFER[@]}"
bc step 180 "${M[@]}" --device "$DEV" "${STEP[@]}"
$PY .ci/results.py "$RESULTS" --summary "$OUT/summary.json"  # docs/gpu/summary-<device>-<date>.json
log "done"
