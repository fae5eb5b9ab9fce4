"""Checkpoints: written to a temp file and renamed, read back with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch

from ecvl_fast import EcvlError, __version__, first_line
from ecvl_fast.run.files import atomic_write

REQUIRED = ("ecvl_fast_version", "model", "model_name", "num_classes", "epoch", "config")


def save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save({**payload, "ecvl_fast_version": __version__}, tmp))


def load(path: Path, *, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Load and check that the checkpoint fits this model and dataset."""
    path = Path(path)
    if not path.is_file():
        raise EcvlError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise EcvlError(f"{path}: an empty file (0 bytes; a write cut short, e.g. by a power loss){elsewhere(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EcvlError(
            f"{path}: not a readable ecvl-fast checkpoint, truncated or foreign ({first_line(e)}){elsewhere(path)}"
        ) from None
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("ecvl-fast-classifier"):
        raise EcvlError(
            f"{path}: an exported classifier (ecvl-fast export), which predict and the Python API read; "
            f"this command needs a training checkpoint (last.pt or best.pt in a run folder)"
        )
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise EcvlError(
            (
                f"{path}: not an ecvl-fast checkpoint (missing {[k for k in REQUIRED if k not in ckpt]})"
                if isinstance(ckpt, dict)
                else f"{path}: not an ecvl-fast checkpoint"
            )
            + elsewhere(path)
        )
    bad = nonfinite(ckpt)
    if bad:
        raise EcvlError(f"{path}: holds non-finite weights ({bad}); a run that diverged{elsewhere(path)}")
    return check(ckpt, path, model_name=model_name, num_classes=num_classes)


def nonfinite(ckpt: dict) -> str | None:
    """The first weight tensor (model or adapter) holding NaN or inf, by name, else None."""
    for part in ("model", "adapter"):
        for name, t in (ckpt.get(part) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{part}.{name}"
    return None


def elsewhere(path: Path) -> str:
    """What else a user can turn to: the other checkpoints beside this one, and starting over."""
    others = [p for p in (path.with_name("best.pt"), path.with_name("last.pt")) if p != path and p.is_file()]
    there = f"; {' and '.join(str(p) for p in others)} beside it may be intact" if others else ""
    return f"{there}; `train --restart` starts the run over, keeping this one aside"


def check(ckpt: dict, path: Path, *, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Check a loaded checkpoint against this model and dataset (for callers that load it first)."""
    if model_name is not None and ckpt["model_name"] != model_name:
        raise EcvlError(f"{path}: checkpoint is for model {ckpt['model_name']}, config says {model_name}")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise EcvlError(f"{path}: checkpoint has {ckpt['num_classes']} classes, the dataset {num_classes}")
    return ckpt


def check_classes(ckpt: dict, path: Path, classes: list[str], data) -> None:
    """The same class count is not the same classes: scores would be filed under the wrong names."""
    saved = ckpt.get("classes")
    if saved is not None and list(saved) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved, classes)) if a != b)
        raise EcvlError(
            f"{path}: its classes are not {data}'s: class {i} is {saved[i]!r} in the checkpoint and "
            f"{classes[i]!r} in the data; evaluating would file its scores under the wrong names"
        )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
