"""Losses: pure tensor functions that return named terms (the total is "loss").

Inputs are L2-normalised features. Distributed callers gather features with
`ecvl_fast.run.dist.gather_with_grad` first; nothing here communicates.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fp32(loss):
    """Run a loss in fp32 whatever autocast the caller is in. Under bf16 autocast the logit
    matmuls would run in bf16, whose 8-bit mantissa rounds logits at scale 100 (eq. 6, BALLAD's CE)
    or 1/0.2 to steps of 0.5 to 0.03: coarse targets for a loss that compares them. The features
    are [B, D] and the matmuls [B, K] or [2B, 2B], so fp32 costs little next to the encoders."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(first.device.type, enabled=False):
            args = [
                a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.element_size() < 4 else a
                for a in args
            ]  # fp16/bf16 up; fp32 and fp64 (the parity tests) as they are
            return loss(*args, **kwargs)

    return wrapper


@fp32
def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, scale, rows: slice | None = None
) -> dict[str, torch.Tensor]:
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


@fp32
def prompt_ce_loss(
    image_features: torch.Tensor,
    class_text_features: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 100.0,
    adjust: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """BALLAD's phase A: cross-entropy of image features against all K class prompts.
    `adjust` [K]: tau * log(class prior), added to the logits inside the loss only: the
    logit-adjusted loss (Menon et al., ICLR 2021, eq. 10; LIFT uses tau = 1).
    `per_sample`: each row's term (what ECVL+'s `aug.m_source = "ce"` memory tracks); `logits`
    (unadjusted): for the caller that needs the top class (`aug.m_source = "lol"`)."""
    logits = scale * image_features @ class_text_features.T
    per_sample = F.cross_entropy(logits if adjust is None else logits + adjust, labels, reduction="none")
    ce = per_sample.mean()
    return {"loss": ce, "ce": ce, "per_sample": per_sample, "logits": logits}


def log_prior(train_counts, tau: float, device=None) -> torch.Tensor | None:
    """tau * log(class prior) from the train counts [K] (None for tau = 0): what the logit-adjusted
    loss adds, and what post-hoc adjustment subtracts at test time (Menon et al., ICLR 2021)."""
    if tau == 0:
        return None
    counts = torch.as_tensor(train_counts, dtype=torch.float32, device=device)
    return tau * torch.log(counts.clamp(min=1) / counts.sum())


@fp32
def dcvl_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2, rows: slice | None = None
) -> dict[str, torch.Tensor]:
    """eq. 11, the two-view contrastive loss, as NT-Xent (BCL's form, temperature 0.2).

    Each view's positive is the other view of its image; the other 2B - 2 views are negatives.
    `per_sample` (the mean of an image's two view terms) is what the momentum bank tracks (eq. 8).
    `rows` keeps this rank's samples of a gathered batch (per_sample and the mean), as in `clip_loss`.
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.arange(2 * b, device=z.device).roll(b)  # made on the device: no host copy per step
    per_view = F.cross_entropy(sim, target, reduction="none")
    per_sample = (per_view[:b] + per_view[b:]) / 2
    if rows is not None:
        per_sample = per_sample[rows]
    return {"loss": per_sample.mean(), "per_sample": per_sample}
