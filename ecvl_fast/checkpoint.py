"""Checkpoints: written to a temp file and renamed, read back with `weights_only=True`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ecvl_fast import EcvlError, __version__

REQUIRED = ("ecvl_fast_version", "model", "model_name", "num_classes", "epoch", "config")


def save(path: Path, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({**payload, "ecvl_fast_version": __version__}, tmp)
    os.replace(tmp, path)


def load(path: Path, *, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Load and check that the checkpoint fits this model and dataset."""
    path = Path(path)
    if not path.is_file():
        raise EcvlError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EcvlError(f"{path}: not a readable ecvl-fast checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise EcvlError(f"{path}: not an ecvl-fast checkpoint (missing {[k for k in REQUIRED if k not in ckpt]})"
                        if isinstance(ckpt, dict) else f"{path}: not an ecvl-fast checkpoint")
    return check(ckpt, path, model_name=model_name, num_classes=num_classes)


def check(ckpt: dict, path: Path, *, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Check a loaded checkpoint against this model and dataset (for callers that load it first)."""
    if model_name is not None and ckpt["model_name"] != model_name:
        raise EcvlError(f"{path}: checkpoint is for model {ckpt['model_name']}, config says {model_name}")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise EcvlError(f"{path}: checkpoint has {ckpt['num_classes']} classes, the dataset {num_classes}")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
