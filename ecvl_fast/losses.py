"""Losses: pure tensor functions that return named terms (the total is "loss").

Inputs are L2-normalised features. Distributed callers gather features with
`ecvl_fast.dist.gather_with_grad` first; nothing here communicates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
              scale, rows: slice | None = None) -> dict[str, torch.Tensor]:
    """eqs. 4-5: symmetric image<->text contrastive loss over the batch.

    The text of sample j is its class prompt, so every pair (i, j) with y_i == y_j is a positive:
    the target for row i is uniform over its positives rather than one-hot on the diagonal, which
    would push same-class prompts apart as false negatives. `rows` restricts the mean to this
    rank's rows of a gathered batch (the sum over ranks is then the global mean).
    """
    logits = scale * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
    i2t = -(target * logits.log_softmax(1)).sum(1)
    t2i = -(target * logits.T.log_softmax(1)).sum(1)
    if rows is not None:
        i2t, t2i = i2t[rows], t2i[rows]
    i2t, t2i = i2t.mean(), t2i.mean()
    return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i}


def prompt_ce_loss(image_features: torch.Tensor, class_text_features: torch.Tensor, labels: torch.Tensor,
                   scale: float = 100.0) -> dict[str, torch.Tensor]:
    """BALLAD's phase A: cross-entropy of image features against all K class prompts."""
    logits = scale * image_features @ class_text_features.T
    ce = F.cross_entropy(logits, labels)
    return {"loss": ce, "ce": ce}


def dcvl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
    """eq. 11, the two-view contrastive loss, as NT-Xent (BCL's form, temperature 0.2).

    Each view's positive is the other view of its image; the other 2B - 2 views are negatives.
    `per_sample` (the mean of an image's two view terms) is what the momentum bank tracks (eq. 8).
    `rows` keeps this rank's samples of a gathered batch (per_sample and the mean), as in `clip_loss`.
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    per_view = F.cross_entropy(sim, target, reduction="none")
    per_sample = (per_view[:b] + per_view[b:]) / 2
    if rows is not None:
        per_sample = per_sample[rows]
    return {"loss": per_sample.mean(), "per_sample": per_sample}
