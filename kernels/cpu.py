"""CPU kernels (numba njit): pure array functions that update the momentum state in place.

State per sample i: loss_sum[i], loss_count[i] (this epoch), ema[i], seen[i] (has an EMA), m[i],
labels[i]. The per-sample arithmetic of eqs. 8-9 lives in `formulas.py`; `kernels/cuda.py` holds
the numba.cuda twins, compiled from the same formulas.
"""

import numpy as np
from numba import njit

from ecvl_fast.kernels import formulas

_ema_update = njit(cache=True)(formulas.ema_update)
_magnitude = njit(cache=True)(formulas.magnitude)
_spread_of = njit(cache=True)(formulas.spread_of)
_rank_unit = njit(cache=True)(formulas.rank_unit)
_ranks_below = njit(cache=True)(formulas.ranks_below)
_lol_step = njit(cache=True)(formulas.lol_step)


@njit(cache=True)
def accumulate(loss_sum, loss_count, indices, losses):
    """Add this batch's per-sample losses to the epoch sums (several views per sample are fine)."""
    for j in range(indices.shape[0]):
        i = indices[j]
        loss_sum[i] += losses[j]
        loss_count[i] += 1


@njit(cache=True)
def first_nonfinite(loss_sum, loss_count):
    """Index of the first seen sample whose epoch loss is NaN/inf, or -1."""
    for i in range(loss_sum.shape[0]):
        if loss_count[i] > 0 and not np.isfinite(loss_sum[i]):
            return i
    return -1


@njit(cache=True)
def end_epoch(ema, seen, loss_sum, loss_count, beta):
    """eq. 8 for the samples seen this epoch (L_t = the mean of their losses this epoch); the
    epoch sums are reset. Call `first_nonfinite` before this."""
    for i in range(ema.shape[0]):
        c = loss_count[i]
        if c > 0:
            ema[i] = _ema_update(ema[i], loss_sum[i] / c, seen[i], beta)
            seen[i] = 1
            loss_sum[i] = 0.0
            loss_count[i] = 0


@njit(cache=True)
def normalise(ema, seen, labels, m, num_classes):
    """eq. 9 for every seen sample (`formulas.magnitude`), then the rule for samples never seen.

    Never seen (class-balanced sampling draws with replacement, so after an epoch many head-class
    samples have not been drawn): M = the mean M of the seen samples of the same class, or the
    mean over all seen samples (0.5 up to clipping) if none of its class has been seen. Before any
    sample has been seen, M = 0 everywhere: no augmentation in the first epoch (BCL).
    """
    n, s = 0, 0.0
    lo, hi = np.inf, -np.inf
    for i in range(ema.shape[0]):
        if seen[i]:
            v = np.float64(ema[i])
            n += 1
            s += v
            lo = min(lo, v)
            hi = max(hi, v)
    if n == 0:
        m[:] = 0.0
        return
    mean = s / n
    spread = _spread_of(mean, lo, hi)
    class_sum, class_n = np.zeros(num_classes, np.float64), np.zeros(num_classes, np.int64)
    for i in range(ema.shape[0]):
        if seen[i]:
            m[i] = _magnitude(np.float64(ema[i]), mean, spread)
            class_sum[labels[i]] += m[i]
            class_n[labels[i]] += 1
    overall = class_sum.sum() / n
    for i in range(ema.shape[0]):
        if not seen[i]:
            c = labels[i]
            m[i] = class_sum[c] / class_n[c] if class_n[c] > 0 else overall


@njit(cache=True)
def rank_classes(means, present, out):
    """out[c] = class c's rank by mean among the present classes, on [0, 1] (0: the lowest mean);
    0.5 for a class not present. Returns how many are present."""
    n = 0
    for c in range(means.shape[0]):
        n += 1 if present[c] else 0
    for c in range(means.shape[0]):
        out[c] = _rank_unit(_ranks_below(means, present, c), n) if present[c] else 0.5
    return n


@njit(cache=True)
def class_scope(ema, seen, labels, m, num_classes):
    """aug.m_scope = "class": every sample's M is its class's rank, over the classes, by the mean
    EMA of the class's seen samples (0: the lowest mean loss, 1: the highest; a class with no
    seen sample gets 0.5). Before any sample is seen M is left as it is (0)."""
    sums, counts = np.zeros(num_classes, np.float64), np.zeros(num_classes, np.int64)
    for i in range(ema.shape[0]):
        if seen[i]:
            sums[labels[i]] += ema[i]
            counts[labels[i]] += 1
    present = counts > 0
    means = sums / np.maximum(counts, 1)
    per_class = np.empty(num_classes, np.float64)
    if rank_classes(means, present, per_class) == 0:
        return
    for i in range(m.shape[0]):
        m[i] = per_class[labels[i]]


@njit(cache=True)
def lol_update(loss_sum, loss_count, labels, level, m, levels, accept):
    """aug.m_source = "lol": this epoch's per-sample sums are of correctness (1: right), so a
    class's sum over count is its accuracy on the views it was trained on, augmented at its current
    level. Each class's level takes one step (`formulas.lol_step`); every sample's M is its class's
    level / levels. Call before `end_epoch`, which resets the sums."""
    num_classes = level.shape[0]
    correct, trials = np.zeros(num_classes, np.float64), np.zeros(num_classes, np.float64)
    for i in range(loss_sum.shape[0]):
        correct[labels[i]] += loss_sum[i]
        trials[labels[i]] += loss_count[i]
    for c in range(num_classes):
        level[c] = _lol_step(level[c], correct[c], trials[c], accept, levels)
    for i in range(m.shape[0]):
        m[i] = level[labels[i]] / levels


@njit(cache=True)
def class_csr(labels, num_classes):
    """Sample indices grouped by class: (offsets[K+1], order[N]) with class c at order[offsets[c]:offsets[c+1]]."""
    counts = np.zeros(num_classes + 1, np.int64)
    for y in labels:
        counts[y + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    order = np.empty(labels.shape[0], np.int64)
    for i in range(labels.shape[0]):
        y = labels[i]
        order[fill[y]] = i
        fill[y] += 1
    return offsets, order


@njit(cache=True)
def balanced_pick(offsets, order, class_draw, u, out):
    """eq. 12's sampler: class c with probability 1/K (class_draw), then a uniform member (u in [0,1))."""
    for j in range(class_draw.shape[0]):
        c = class_draw[j]
        n = offsets[c + 1] - offsets[c]
        k = min(np.int64(u[j] * n), n - 1)
        out[j] = order[offsets[c] + k]


def balanced_draws(num_classes: int, n: int, seed: int, epoch: int):
    """The random numbers behind one epoch of class-balanced sampling, fixed by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.integers(0, num_classes, size=n), rng.random(n)


def balanced_indices(labels: np.ndarray, num_classes: int, n: int, seed: int, epoch: int) -> np.ndarray:
    offsets, order = class_csr(np.ascontiguousarray(labels, dtype=np.int64), num_classes)
    if np.any(np.diff(offsets) == 0):
        raise ValueError("class-balanced sampling needs at least one sample in every class")
    class_draw, u = balanced_draws(num_classes, n, seed, epoch)
    out = np.empty(n, np.int64)
    balanced_pick(offsets, order, class_draw, u, out)
    return out
