#!/usr/bin/env bash
# The device check (H200, no DALI/ffcv there): CUDA kernels, the bf16 step path, zero-shot parity, kernel bench.
# Run from the repo root with the carried wheels in .whl (open_clip_torch, ftfy, wcwidth).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, numba; from numba import cuda; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda ok', cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu.py tests/test_losses_model.py 2>&1 | tee "${OUT:-/tmp}/pytest.log"
python3 -m ecvl_fast.cli bench kernels --json "${OUT:-/tmp}/kernels.json" 2>&1 | tail -12
