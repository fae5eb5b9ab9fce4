"""Stage 2's trained parts, built from the config in one place for training, resuming, eval,
predict and export: a light module in the frozen image tower (method/peft.py), eq. 7's adapter
and a cosine head (LIFT), and the classifier they evaluate as."""

from __future__ import annotations

import torch

from ecvl_fast import EcvlError
from ecvl_fast.config import Config, trained_scale
from ecvl_fast.method import peft
from ecvl_fast.method.model import Adapter, ClipNet, CosineHead, Scorer, StageTwo, tte_split


def add_light_module(cfg: Config, net: ClipNet, num_classes: int, saved: dict | None = None) -> str:
    """Freeze `net` and add stage2.peft inside its image tower, before loading a stage-2
    checkpoint's "model" (`saved`), whose keys include the module's, at the width it was saved
    with; returns the module added."""
    net.requires_grad_(False)
    width = cfg.stage2.peft_dim or (peft.saved_width(saved) if saved else 0)
    return peft.apply(net.clip.visual, cfg.stage2.peft, num_classes, width, cfg.model.name)


def modules(cfg: Config, net: ClipNet, text: torch.Tensor) -> StageTwo:
    """The adapter and the cosine head, fresh, around `net` (its light module already added)."""
    s = cfg.stage2
    adapter = Adapter(text.shape[1], s.ratio) if s.adapter else None
    head = CosineHead(text, s.head_scale) if s.head == "cosine" else None
    return StageTwo(net, text, adapter, head, s.accum_steps, compile=cfg.model.compile)


def load(st: StageTwo, state: dict) -> None:
    """A stage-2 checkpoint's adapter and head into `st` (the light module comes with "model")."""
    for name in ("adapter", "head"):
        module, saved = getattr(st, name), state.get(name)
        if (module is None) != (saved is None):
            raise EcvlError(
                f"the checkpoint {'has a' if saved is not None else 'has no'} stage-2 {name}, and its "
                f"config {'asks for none' if module is None else 'asks for one'}"
            )
        if module is not None:
            module.load_state_dict(saved)


def state(st: StageTwo) -> dict:
    """What a stage-2 checkpoint holds beside the net: the adapter's and the head's weights, and
    the class text features of its frozen text tower (eval, predict and export read them instead
    of encoding every class's prompts again: minutes on a CPU for open_clip's 80 templates)."""
    return {
        "adapter": None if st.adapter is None else st.adapter.state_dict(),
        "head": None if st.head is None else st.head.state_dict(),
        "text": st.text.detach().cpu(),
    }


def scorer(cfg: Config, st: StageTwo, views: int | None = None, compile: bool = False) -> Scorer:
    """The classifier a stage-2 model evaluates as: a cosine head at its own scale, or the text
    features at the scale prompt CE trained them at (eq. 6 with stage2.ce_scale); `views` test-time
    views (default data.tte_views); `compile`: Scorer's."""
    weights = st.text if st.head is None else st.head.weights().detach()
    return Scorer(
        st.net,
        weights,
        st.adapter,
        trained_scale(cfg, 2) if st.head is None else st.head.scale,
        tte_split(cfg.data.tte_crops, cfg.data.tte_views if views is None else views)[0],
        compile=compile,
    )
