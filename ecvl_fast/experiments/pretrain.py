"""`ecvl-fast pretrain`'s last step: a stage-1 run's CLIP weights as a file `model.pretrained` names."""

from __future__ import annotations

from pathlib import Path

from ecvl_fast.run.files import atomic_write


def export_weights(ckpt: Path, out: Path) -> None:
    """The CLIP weights of an ecvl-fast checkpoint as a file `model.pretrained` can name (open_clip's
    {"state_dict": ...} form), written to a temp file and renamed."""
    import torch

    from ecvl_fast.run import checkpoint as ckpt_io

    state = ckpt_io.load(ckpt)
    clip = {k.removeprefix("clip."): v for k, v in state["model"].items()}
    atomic_write(out, lambda tmp: torch.save({"state_dict": clip, "model_name": state["model_name"]}, tmp))
