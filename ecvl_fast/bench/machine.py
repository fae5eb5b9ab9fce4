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

    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "dali": version("nvidia-dali-cuda130"), "ffcv": version("ffcv"), "numba": version("numba")}


def describe() -> str:
    """The machine in one line, for table titles."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"
