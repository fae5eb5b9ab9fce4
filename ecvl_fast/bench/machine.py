"""The machine a benchmark ran on: what every benchmark's JSON records, and its one-line form."""

from __future__ import annotations

import os
import platform
import time

import torch


def machine_info() -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    from ecvl_fast import __version__

    dali = next((v for v in map(version, ("nvidia-dali-cuda130", "nvidia-dali-cuda120")) if v), None)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "ecvl_fast": __version__,
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dali": dali,
        "ffcv": version("ffcv"),
        "numba": version("numba"),
    }


def _commit() -> str | None:
    """The source tree's git commit (a + where it has uncommitted changes), where it is a checkout;
    else ECVL_FAST_COMMIT (a copy of the tree without .git: the device check's)."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("ECVL_FAST_COMMIT"):
        return os.environ["ECVL_FAST_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+" * bool(dirty.stdout.strip())) if head.returncode == 0 else None


def describe() -> str:
    """The machine in one line, for table titles."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"
