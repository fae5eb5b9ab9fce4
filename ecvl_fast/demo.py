"""`make demo` / `ecvl-fast demo`: the ablation on the embedded MNIST-LT with the packaged recipe."""
from __future__ import annotations

from pathlib import Path

import ecvl_fast

DEMO_CONFIG = Path(ecvl_fast.__file__).parent / "configs" / "mnist-demo.toml"


def ensure_data(data: Path) -> None:
    """Build the embedded dataset on first use (only at its default place)."""
    if not (data / "meta.json").exists() and data == Path("data/mnist-lt"):
        from ecvl_fast.loaders.convert import ConvertOptions, convert

        convert(ConvertOptions("mnist-lt", data))


def run_demo(data: Path, run: Path, config: Path | None = None, seeds: str = "0") -> dict:
    from ecvl_fast.ablate import parse_seeds, run_ablation
    from ecvl_fast.config import load_config

    ensure_data(data)
    cfg = load_config(config or DEMO_CONFIG, [f"data.path={data}", f"run.out={run}"])
    return run_ablation(cfg, parse_seeds(seeds))
