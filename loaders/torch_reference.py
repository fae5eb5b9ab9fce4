"""The torchvision/PIL reference: the same crop, op semantics, per-sample M and draws as the DALI
pipeline, one sample at a time in torch DataLoader workers. Tests compare against it; the
loader benchmark uses it as the peer.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ecvl_fast.loaders.dali_graph import CLIP_MEAN, CLIP_STD
from ecvl_fast.loaders.draws import AugSpec, batch_draws, eq10
from ecvl_fast.loaders.randaug_ops import OPS

MEAN = [c / 255 for c in CLIP_MEAN]
STD = [c / 255 for c in CLIP_STD]


def _sample(d: dict, j: int) -> dict:
    """One sample's draws out of a batch's (arrays shaped [B] or [k, B])."""
    return {key: (val[:, j] if val.ndim == 2 and key != "box" else val[j]) for key, val in d.items()}


def reference_view(img: np.ndarray, m: float, d: dict, spec: AugSpec) -> torch.Tensor:
    """uint8 HWC -> normalised float CHW, for one sample's draws `d` of one view."""
    pil = Image.fromarray(img)
    y0, x0, y1, x1 = d["box"]  # the crop on the canvas: random-resized, or evaluation's centre crop
    box = (x0 * pil.width, y0 * pil.height, x1 * pil.width, y1 * pil.height)
    pil = pil.resize((spec.res, spec.res), Image.BICUBIC if spec.interp == "cubic" else Image.BILINEAR, box=box)
    if spec.randaug:
        for j in range(spec.k):
            i, strength = eq10(d["op"][j], d["u"][j], d["zeta"][j], m)
            if i:
                pil = OPS[i].pil(pil, OPS[i].param(strength, d["sign"][j]))
    t = TF.to_tensor(pil)
    if d["flip"]:
        t = t.flip(-1)
    return TF.normalize(t, MEAN, STD)


def reference_batch(images: np.ndarray, m: np.ndarray, draws: list[dict], spec: AugSpec) -> list[torch.Tensor]:
    """The reference for a whole batch with the DALI pipeline's draws (for the tests)."""
    return [
        torch.stack([reference_view(im, float(mi), _sample(d, j), spec) for j, (im, mi) in enumerate(zip(images, m))])
        for d in draws
    ]


class ReferenceDataset(torch.utils.data.Dataset):
    """In-memory uint8 images; M read per sample from a shared tensor (share_memory_ for workers)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, m: torch.Tensor, spec: AugSpec, seed: int = 0):
        self.images, self.labels, self.m, self.spec, self.seed = images, labels, m, spec, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        draws = batch_draws(self.spec, np.array([i]), self.seed, self.epoch)
        m = float(self.m[i])
        views = [reference_view(self.images[i], m, _sample(d, 0), self.spec) for d in draws]
        return views, int(self.labels[i]), int(i)
