"""CPU kernels (numba njit): pure array functions that update the momentum state in place.

State per sample i: loss_sum[i], loss_count[i] (this epoch), ema[i], seen[i] (has an EMA), m[i].
`kernels/cuda.py` holds the numba.cuda twins with the same semantics.
"""
import numpy as np
from numba import njit


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
    """eq. 8: L^m = beta * L^m_prev + (1 - beta) * L_t for samples seen this epoch.

    L_t is the mean of the sample's losses this epoch; a first observation initialises the EMA.
    The epoch sums are reset. Call `first_nonfinite` before this.
    """
    for i in range(ema.shape[0]):
        c = loss_count[i]
        if c > 0:
            lt = loss_sum[i] / c
            ema[i] = beta * ema[i] + (1.0 - beta) * lt if seen[i] else lt
            seen[i] = 1
            loss_sum[i] = 0.0
            loss_count[i] = 0


@njit(cache=True)
def normalise(ema, seen, m):
    """eq. 9 in BCL's form: z = (L - mean)/std, M = z / max|z| / 2 + 1/2, so M is in [0, 1].

    The std cancels: z / max|z| = (L - mean) / max|L - mean|, which is what is computed.
    The paper divides by max(L - mean), which can push M below 0; BCL's code does this instead.
    Unseen samples get M = 0 (no augmentation yet); if every value is equal, M = 0.5.
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
    mean = s / max(n, 1)
    spread = max(hi - mean, mean - lo) if n > 0 else 0.0
    for i in range(ema.shape[0]):
        if not seen[i]:
            m[i] = 0.0
        elif spread > 0:
            m[i] = min(max((ema[i] - mean) / spread / 2.0 + 0.5, 0.0), 1.0)
        else:
            m[i] = 0.5


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
