"""`make demo` / `ecvl-fast demo`: the ablation on the embedded MNIST-LT with the packaged recipe."""

from __future__ import annotations

from pathlib import Path

from ecvl_fast.config import DataCfg
from ecvl_fast.experiments.presets import PRESETS

DEMO_CONFIG = PRESETS / "mnist-demo.toml"
DEMO_DATA = Path(DataCfg().path)  # the embedded dataset's one home: the config's default data.path

# The demo's table should be the same on every machine of the 2-core x86_64 kind. Float sums
# round differently when torch, MKL or oneDNN pick other kernels (AVX-512 where the CPU has it,
# AVX2 where not) or split work over other thread counts, and 60 epochs amplify that. So the demo
# pins the kernels to AVX2 and the threads to 2. They are read when torch loads: set them first.
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}


def pin_numerics() -> bool:
    """Set PINNED where the user has not; False when torch is loaded already (then too late)."""
    import os
    import sys

    for key, value in PINNED.items():
        os.environ.setdefault(key, value)
    return "torch" not in sys.modules


def ensure_data(data: Path) -> None:
    """Build the embedded dataset on first use (only at its default place)."""
    if not (data / "meta.json").exists() and data == DEMO_DATA:
        from ecvl_fast.loaders.convert import ConvertOptions, convert

        convert(ConvertOptions("mnist-lt", data))


def run_demo(data: Path, run: Path, config: Path | None = None, seeds: str = "0") -> dict:
    from ecvl_fast.experiments.ablate import parse_seeds, run_ablation
    from ecvl_fast.config import load_config

    ensure_data(data)
    cfg = load_config(config or DEMO_CONFIG, [f"data.path={data}", f"run.out={run}"])
    return run_ablation(cfg, parse_seeds(seeds))
