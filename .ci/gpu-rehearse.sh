#!/usr/bin/env bash
# Rehearse the device check here, offline from what it carries, before spending GPU minutes:
#   bash .ci/gpu-rehearse.sh                   (LEAVE_OUT="six" to see it fail without a carried wheel)
# 1. a fresh venv with only what the GPU machine has: torch (with its own dependencies), numpy,
#    numba; it must not import DALI, ffcv or open_clip;
# 2. the carried set for this machine's Python (.ci/gpu-carry.txt), compared with the GPU
#    machine's set in .whl/ (made by .ci/gpu-prepare.sh), the differences listed;
# 3. the install exactly as .ci/gpu-check.sh does it: DALI re-joined from its parts (DALI's wheel
#    is py3-none, the very file the GPU machine gets), the wheels --no-deps --target, ecvl-fast -e;
# 4. every step of the check, at a tiny size on the CPU: .ci/smoke.py (imports, the memory-driven
#    RandAugment pipeline with conditionals, predict, bench step), the `gpu` tests (they skip here),
#    every benchmark; then tests/test_gpu.py, whose CPU twins run here. It fails when a step fails,
#    or when $OUT ends with more than the 8 files the GPU machine returns or one deeper than 2 folders;
#    it prints each phase's seconds.
# Exits non-zero when any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${REHEARSE_DIR:-/tmp/gpu-rehearse}
TORCH=${TORCH:-2.14.1} TORCHVISION=${TORCHVISION:-0.29.1}  # the pair that imports together on this machine
[ -f .dali/small/install.sh ] && [ -d .whl ] || { echo "run .ci/gpu-prepare.sh first (no .dali/ or .whl/)"; exit 2; }
rm -rf "$R/site" "$R/whl"
if [ ! -x "$R/venv/bin/python" ]; then
  python3 -m venv "$R/venv"
  "$R/venv/bin/pip" install -q "torch==$TORCH" numpy numba 2> >(grep -v "^WARNING: Location" >&2)
fi
PY=$R/venv/bin/python
for m in nvidia.dali ffcv open_clip torchvision; do
  if $PY -c "import $m" 2> /dev/null; then echo "the venv has $m: it must hold only what the GPU machine has"; exit 1; fi
done
echo "== venv: $($PY -c 'import sys, torch, numpy, numba; print(sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "numba", numba.__version__)')"

echo "== the carried wheels: the GPU machine's (.whl, cp312) against this machine's ($R/whl)"
python3 .ci/carry.py download "$R/whl" --python "$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
  --torchvision "$TORCHVISION" 2> >(grep -v "^WARNING: Location" >&2)
python3 .ci/carry.py compare .whl "$R/whl" || { echo "the two sets name different packages"; exit 1; }

echo "== install, as gpu-check.sh does"
mkdir -p "$R/parts" && cp .dali/p0* "$R/parts/"
rm -rf "$R/whl-used" && mkdir -p "$R/whl-used" && cp "$R"/whl/*.whl "$R/whl-used/"
for name in ${LEAVE_OUT:-}; do rm -f "$R"/whl-used/"$name"-*.whl "$R"/whl-used/"${name//-/_}"-*.whl; echo "left out: $name"; done
rm -rf "$R/check" && mkdir -p "$R/check" && OUT=$R/check
# gpu-check.sh with this venv's Python, the local wheels in place of .whl, on the CPU
tmp=$(mktemp -d) && git ls-files -z -co --exclude-standard | xargs -0 -I{} cp --parents {} "$tmp/" \
  && mkdir -p "$tmp/.dali" && cp -r .dali/small "$tmp/.dali/" && cp -r "$R/whl-used" "$tmp/.whl" \
  && cp .whl/COMMIT "$tmp/.whl/COMMIT"  # the copy has no .git, as on the GPU machine
(cd "$tmp" && OUT=$OUT SITE=$R/site PY=$PY DEVICE=cpu SIZE=tiny BUDGET=1200 bash .ci/gpu-check.sh "$R/parts")
rc=0
echo "== what comes back from \$OUT (at most 8 files, at most 2 folders down)"
python3 .ci/results.py - --files "$OUT" || rc=1
echo "== each phase: exit status and seconds (choose the check's order and limits from these)"
python3 - "$OUT/results.json" <<'PY' || rc=1
import json, sys
steps = json.load(open(sys.argv[1]))["steps"]
for s in steps:
    print(f"  {s['name']:14s} {str(s['rc']):5s} {s['seconds']:4d} s")
names = {s["name"] for s in steps}
need = {"install", "smoke", "gpu-tests", "bench-profile", "bench-train", "bench-step", "bench-infer", "bench-augment", "bench-kernels", "bench-infer-compiled", "bench-step-compiled"}
bad = [s["name"] for s in steps if s["rc"] != 0] + sorted(need - names)
sys.exit(f"  failed or missing: {', '.join(bad)}" if bad else 0)
PY
echo "== the summary the check wrote"
python3 - "$OUT/summary.json" <<'PY' || rc=1
import json, sys
s = json.load(open(sys.argv[1]))
print("  " + json.dumps(s))
empty = [k for k, v in s.items() if v is None]
sys.exit(f"  no figure for {', '.join(empty)}" if empty else 0)
PY
# the CPU twins of the GPU tests, with the same install (gpu-check.sh selected only `-m gpu`)
(cd "$tmp" && PYTHONPATH=$R/site timeout 600 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py) || rc=1
rm -rf "$tmp"
[ $rc = 0 ] && echo "rehearsal passed" || echo "rehearsal FAILED (see $OUT)"
exit $rc
