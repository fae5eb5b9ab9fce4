#!/usr/bin/env bash
# The device check on an H200 (torch + numba-cuda; no DALI, no ffcv, no network), in one run,
# within 8 minutes: install DALI from its parts, then every GPU test and benchmark, JSON to $OUT.
#   bash .ci/gpu-check.sh [PARTS_DIR]   (PARTS_DIR holds p00..p03; see .ci/gpu-prepare.sh)
# Without the parts, the DALI steps are skipped and said to be.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
PARTS=${1:-/tmp/parts}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if [ -f .dali/small/install.sh ] && ls "$PARTS"/p0* >/dev/null 2>&1; then
  bash .dali/small/install.sh "$PARTS" /tmp/site || echo "DALI install failed"
else
  echo "no DALI parts in $PARTS: DALI checks will skip"
fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/dali.txt"
# Which DALI GPU operators run here (the question the install leaves open: NPP, nvimgcodec, ...).
import numpy as np
try:
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali as dali
except Exception as e:
    print("DALI import failed:", type(e).__name__, e); raise SystemExit
print("DALI", dali.__version__)
for name, op in [("resize", lambda x: fn.resize(x, size=[32, 32])),
                 ("warp_affine", lambda x: fn.warp_affine(x, matrix=[1, 0, 0, 0, 1, 0], fill_value=0)),
                 ("brightness", lambda x: fn.brightness(x, brightness=1.2)),
                 ("equalize", lambda x: fn.equalize(x)),
                 ("filter", lambda x: fn.filter(x, types.Constant(np.ones((3, 3), np.float32) / 9))),
                 ("crop_mirror_normalize", lambda x: fn.crop_mirror_normalize(x, dtype=types.FLOAT))]:
    @pipeline_def(batch_size=4, num_threads=2, device_id=0)
    def p():
        x = fn.external_source(source=lambda: [np.full((40, 40, 3), 100, np.uint8)] * 4, layout="HWC", device="gpu")
        return op(x)
    try:
        pipe = p(); pipe.build(); pipe.run(); print(name, "ok")
    except Exception as e:
        print(name, "FAILED:", str(e).splitlines()[0])
PY
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu.py tests/test_losses_model.py \
  tests/test_pipeline.py -k "cuda or gpu or simulator or op_matches or reference or m_zero" 2>&1 | tail -25 | tee "$OUT/pytest.log"
b() { timeout "$1" python3 -m ecvl_fast.cli bench "${@:2}" 2>&1 | grep -v "^WARNING" | tail -14; }
b 40 kernels --json "$OUT/kernels.json"
b 90 step --model RN50 --res 224 --batch 256 --steps 10 --repeats 3 --json "$OUT/step.json"
b 60 augment --res 224 --batch 256 --images 4096 --repeats 3 --json "$OUT/augment.json"
b 150 train --model RN50 --res 224 --batch 256 --images 8192 --epochs 2 --json "$OUT/train.json"
b 40 infer --model RN50 --res 224 --batch 1024 --images 8192 --json "$OUT/infer.json"
ls -la "$OUT"
