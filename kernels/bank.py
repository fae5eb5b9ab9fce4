"""The momentum bank: per-sample loss memory and the shared magnitude tensor M (eqs. 8-9).

All state lives in torch tensors on one device (CUDA on GPU, CPU otherwise). The kernels update
them in place at the end of each epoch. The loader is handed the bank and asks it for M once per
epoch (`magnitudes`), so the values written at the end of epoch t are the ones used in epoch t+1.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ecvl_fast import EcvlError
from ecvl_fast.config import CHOICES


# The allowed values have one home, the config's CHOICES; the bank checks against them.
NORMS, SCOPES, DIRECTIONS = (CHOICES["aug", key] for key in ("m_norm", "m_scope", "m_direction"))


class MomentumBank:
    def __init__(
        self,
        labels,
        beta: float = 0.97,
        device: str | torch.device = "cpu",
        norm: str = "bcl",
        scope: str = "sample",
        direction: str = "hard",
        fixed=None,
        lol: tuple[int, float] | None = None,
    ):
        """`labels`: every train sample's class (the rule for never-seen samples needs them).
        `norm`: eq. 9 as BCL computes it ("bcl"), or the EMA's percentile rank ("rank", see `_rank`).
        `scope` "class": one M per class, its rank by mean EMA (`kernels.cpu.class_scope`).
        `direction` "easy": M = 1 - M, so what is learned well is augmented harder (Ahn et al.,
        ICLR 2023); "hard" (the paper): what is learned poorly.
        `fixed`: M per sample that the memory never changes (the no-memory controls,
        `frequency_magnitudes`); the EMA is still kept.
        `lol` = (levels, accept): Ahn et al.'s level-of-learning rule instead of eqs. 8-9 (the
        recorded values are then correctness, `kernels.cpu.lol_update`); scope and direction are
        per class and "easy" by construction."""
        for value, known, what in (
            (norm, NORMS, "M normalisation"),
            (scope, SCOPES, "M scope"),
            (direction, DIRECTIONS, "M direction"),
        ):
            if value not in known:
                raise EcvlError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
        self.beta, self.norm, self.scope, self.direction = float(beta), norm, scope, direction
        self.device = canonical_device(device)
        z = dict(device=self.device)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64, device=self.device)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 1
        n = len(self.labels)
        self.loss_sum = torch.zeros(n, dtype=torch.float32, **z)
        self.loss_count = torch.zeros(n, dtype=torch.int32, **z)
        self.ema = torch.zeros(n, dtype=torch.float32, **z)
        self.seen = torch.zeros(n, dtype=torch.uint8, **z)
        self.m = torch.zeros(n, dtype=torch.float32, **z)
        self.level = torch.zeros(self.num_classes, dtype=torch.int32, **z)  # aug.m_source = "lol"
        self.lol = lol
        self._k = _kernels(self.device)
        self._views = {}  # tensor id -> kernel view of the bank's own state, made once
        self.fixed = None if fixed is None else torch.as_tensor(np.asarray(fixed), dtype=torch.float32).to(self.device)
        if self.fixed is not None:
            self.m.copy_(self.fixed)

    def __len__(self) -> int:
        return self.m.numel()

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Add per-sample losses (one per index; repeat an index for several views). No host sync:
        the indices must already be on the bank's device (the loader hands them over there), since
        copying them here from pageable host memory would block every step."""
        if canonical_device(indices.device) != self.device:
            raise EcvlError(
                f"sample indices on {indices.device}, the momentum bank on {self.device}: "
                "move them with the batch (a copy here would sync every step)"
            )
        idx = indices.detach().to(torch.int64).contiguous()
        val = losses.detach().to(torch.float32).contiguous()
        self._k.accumulate(*self._args(self.loss_sum, self.loss_count, idx, val))

    def end_epoch(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Fold this epoch's mean losses into the EMA (eq. 8) and rewrite M (eq. 9) in place.

        `all_reduce` sums the epoch's loss sums and counts over DDP ranks first, so every rank
        ends with the same M.
        """
        if all_reduce is not None:
            all_reduce(self.loss_sum)
            all_reduce(self.loss_count)
        bad = self._k.first_nonfinite(*self._args(self.loss_sum, self.loss_count))
        if bad >= 0:
            raise EcvlError(f"sample {bad}: non-finite loss ({float(self.loss_sum[bad])}) in the momentum bank")
        if self.lol is not None:  # before end_epoch, which resets the epoch's sums
            self._k.lol_update(*self._args(self.loss_sum, self.loss_count, self.labels, self.level, self.m), *self.lol)
        self._k.end_epoch(*self._args(self.ema, self.seen, self.loss_sum, self.loss_count), self.beta)
        if self.fixed is not None or self.lol is not None:
            return
        self._k.normalise(*self._args(self.ema, self.seen, self.labels, self.m), self.num_classes)
        if self.norm == "rank":
            self._rank()
        if self.scope == "class":
            self._k.class_scope(*self._args(self.ema, self.seen, self.labels, self.m), self.num_classes)
        if self.direction == "easy":  # not before anything is seen: M = 0, no augmentation (no host sync)
            self.m.copy_(torch.where(self.seen.bool().any(), 1 - self.m, self.m))

    def _rank(self) -> None:
        """M = the percentile rank of the sample's EMA among the seen samples, so M spreads evenly
        over [0, 1]. BCL's z / max|z| lets a few outliers squeeze most samples into a narrow band
        around 0.5 (docs/study-tiny-imagenet.md). Never-seen samples: their class's mean M, as in eq. 9's
        kernels. Once per epoch; boolean indexing syncs with the host on GPU."""
        seen = self.seen.bool()
        n = int(seen.sum())
        if n == 0:
            return
        ranks = torch.empty(n, dtype=torch.float32, device=self.device)
        ranks[self.ema[seen].argsort()] = torch.linspace(0, 1, n, device=self.device) if n > 1 else 0.5
        self.m[seen] = ranks
        k = self.num_classes
        sums = torch.zeros(k, device=self.device).index_add_(0, self.labels[seen], ranks)
        counts = torch.bincount(self.labels[seen], minlength=k)
        per_class = torch.where(counts > 0, sums / counts.clamp(min=1), ranks.mean())
        self.m[~seen] = per_class[self.labels[~seen]]

    def magnitudes(self) -> np.ndarray:
        """M for every sample as a host array: what the loader reads, once per epoch (on GPU the
        one device-to-host copy of the epoch, off the step's critical path)."""
        return self.m.cpu().numpy().copy()

    def state_dict(self) -> dict:
        return {
            "ema": self.ema.cpu(),
            "seen": self.seen.cpu(),
            "m": self.m.cpu(),
            "level": self.level.cpu(),
            "beta": torch.tensor(self.beta),
        }

    def partial_state(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict:
        """This epoch's per-sample loss sums and counts so far, summed over DDP ranks: what a
        checkpoint written mid-epoch needs to resume the epoch exactly (every rank calls it)."""
        s, c = self.loss_sum.clone(), self.loss_count.clone()
        if all_reduce is not None:
            all_reduce(s)
            all_reduce(c)
        return {"loss_sum": s.cpu(), "loss_count": c.cpu()}

    def load_state_dict(self, sd: dict, partial: bool = True) -> None:
        """`partial`: also this epoch's sums when the checkpoint has them (one rank takes them,
        the others start the epoch's remainder from zero, so the epoch-end sum is the whole)."""
        if sd["ema"].numel() != len(self):
            raise EcvlError(f"momentum state holds {sd['ema'].numel()} samples, this dataset {len(self)}")
        for name in ("ema", "seen", "m", "level"):
            getattr(self, name).copy_(sd[name])
        self.beta = float(sd["beta"])
        self.loss_sum.zero_(), self.loss_count.zero_()
        if partial and "loss_sum" in sd:
            self.loss_sum.copy_(sd["loss_sum"]), self.loss_count.copy_(sd["loss_count"])

    def _args(self, *tensors):
        return tuple(self._view(t) for t in tensors)

    def _view(self, t: torch.Tensor):
        own = any(
            t is s for s in (self.loss_sum, self.loss_count, self.ema, self.seen, self.m, self.labels, self.level)
        )
        if not own:
            return t if self.device.type == "cuda" else t.numpy()
        if id(t) not in self._views:
            self._views[id(t)] = self._k.view(t) if self.device.type == "cuda" else t.numpy()
        return self._views[id(t)]


def canonical_device(device: str | torch.device) -> torch.device:
    """A device with its index: torch.device("cuda") != torch.device("cuda", 0), while every tensor
    reports the indexed form, so a bank built on "cuda" would refuse its own indices."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def frequency_magnitudes(labels, direction: str = "hard") -> np.ndarray:
    """The no-memory control (aug.m_source = "frequency"): M per sample from its class's size
    alone, the class's rank on [0, 1]. "hard": the rarest class gets 1, as if rare meant poorly
    learned; "easy": the most frequent gets 1. Ties keep class order."""
    from ecvl_fast.kernels import cpu

    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels).astype(np.float64)
    key = 1.0 / np.maximum(counts, 1) if direction == "hard" else counts
    per_class = np.empty(len(counts))
    cpu.rank_classes(key, counts > 0, per_class)
    return per_class[labels].astype(np.float32)


class StaticMagnitudes:
    """M per sample that never changes: what a loader reads instead of the memory (ablations,
    benchmarks). Same interface as `MomentumBank.magnitudes`."""

    def __init__(self, m):
        self.m = np.asarray(m, np.float32)

    def magnitudes(self) -> np.ndarray:
        return self.m


def _kernels(device: torch.device):
    if device.type == "cuda":
        from ecvl_fast.kernels import cuda as k
    else:
        from ecvl_fast.kernels import cpu as k
    return k
