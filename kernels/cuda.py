"""numba.cuda twins of `kernels/cpu.py`, run in place on CUDA torch tensors; the per-sample
arithmetic is `formulas.py`, compiled as device functions.

Tensors are viewed through `__cuda_array_interface__` (no copy), and every launch goes on torch's
current stream so the kernels order correctly against the training step and the DALI feed.
Only `first_nonfinite` syncs with the host (once per epoch, to raise a clear error).
"""

import math

import numpy as np
import torch

if not hasattr(np, "row_stack"):
    # numba-cuda's array typing registers np.row_stack, which NumPy 2.5 removed; it is vstack.
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402

from ecvl_fast.kernels import formulas  # noqa: E402

THREADS = 256
STAT_BLOCKS = 160  # enough to fill an H100/H200 (132 SMs); each thread reduces a strided slice


_STREAMS: dict[int, object] = {}


def view(t):
    """A numba device view of a torch tensor; views made once (the bank's state) pass through."""
    return cuda.as_cuda_array(t.detach()) if isinstance(t, torch.Tensor) else t


def _stream():
    """torch's current stream as a numba stream (wrapped once per stream: launches are per step)."""
    ptr = torch.cuda.current_stream().cuda_stream
    if ptr not in _STREAMS:
        _STREAMS[ptr] = cuda.external_stream(ptr)
    return _STREAMS[ptr]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _blocks(n: int) -> int:
    return max(1, math.ceil(n / THREADS))


@cuda.jit
def _accumulate(loss_sum, loss_count, indices, losses):
    j = cuda.grid(1)
    if j < indices.shape[0]:
        i = indices[j]
        cuda.atomic.add(loss_sum, i, losses[j])
        cuda.atomic.add(loss_count, i, 1)


@cuda.jit
def _first_nonfinite(loss_sum, loss_count, out):
    i = cuda.grid(1)
    if i < loss_sum.shape[0] and loss_count[i] > 0 and not math.isfinite(loss_sum[i]):
        cuda.atomic.min(out, 0, i)


_ema_update = cuda.jit(device=True)(formulas.ema_update)
_magnitude = cuda.jit(device=True)(formulas.magnitude)
_spread_of = cuda.jit(device=True)(formulas.spread_of)
_rank_unit = cuda.jit(device=True)(formulas.rank_unit)
_ranks_below = cuda.jit(device=True)(formulas.ranks_below)
_lol_step = cuda.jit(device=True)(formulas.lol_step)


@cuda.jit
def _end_epoch(ema, seen, loss_sum, loss_count, beta):
    i = cuda.grid(1)
    if i < ema.shape[0] and loss_count[i] > 0:
        ema[i] = _ema_update(ema[i], loss_sum[i] / loss_count[i], seen[i], beta)
        seen[i] = 1
        loss_sum[i] = 0.0
        loss_count[i] = 0


@cuda.jit
def _stats(ema, seen, acc):
    """acc = [n, sum, min, max] over seen samples, one atomic per thread after a strided reduce."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    n, s, lo, hi = 0.0, 0.0, math.inf, -math.inf
    for i in range(start, ema.shape[0], stride):
        if seen[i]:
            v = float(ema[i])
            n += 1.0
            s += v
            lo = min(lo, v)
            hi = max(hi, v)
    if n > 0:
        cuda.atomic.add(acc, 0, n)
        cuda.atomic.add(acc, 1, s)
        cuda.atomic.min(acc, 2, lo)
        cuda.atomic.max(acc, 3, hi)


@cuda.jit
def _write_seen(ema, seen, labels, m, acc, class_acc):
    """eq. 9 for seen samples; class_acc[c] = [sum of M, count] over the seen samples of class c."""
    i = cuda.grid(1)
    if i >= ema.shape[0] or not seen[i]:
        return
    mean = acc[1] / acc[0]
    v = _magnitude(float(ema[i]), mean, _spread_of(mean, acc[2], acc[3]))
    m[i] = v
    cuda.atomic.add(class_acc, (labels[i], 0), v)
    cuda.atomic.add(class_acc, (labels[i], 1), 1.0)


@cuda.jit
def _write_unseen(seen, labels, m, acc, class_acc):
    """Never-seen samples: their class's mean M, else the mean over all seen (cpu.normalise)."""
    i = cuda.grid(1)
    if i >= m.shape[0] or seen[i]:
        return
    if acc[0] == 0:
        m[i] = 0.0
        return
    c = labels[i]
    if class_acc[c, 1] > 0:
        m[i] = class_acc[c, 0] / class_acc[c, 1]
    else:
        total = 0.0
        for k in range(class_acc.shape[0]):
            total += class_acc[k, 0]
        m[i] = total / acc[0]


@cuda.jit
def _class_sums(ema, seen, labels, class_acc):
    """class_acc[c] = [sum of EMA, count] over the seen samples of class c."""
    i = cuda.grid(1)
    if i < ema.shape[0] and seen[i]:
        cuda.atomic.add(class_acc, (labels[i], 0), float(ema[i]))
        cuda.atomic.add(class_acc, (labels[i], 1), 1.0)


@cuda.jit
def _class_means(class_acc, means, present):
    c = cuda.grid(1)
    if c < class_acc.shape[0]:
        means[c] = class_acc[c, 0] / max(class_acc[c, 1], 1.0)
        present[c] = class_acc[c, 1] > 0


@cuda.jit
def _rank_classes(means, present, per_class):
    """cpu.rank_classes, one thread per class (each counts the present classes itself); -1 for
    every class when none is present, which `_write_class` reads as "leave M alone"."""
    c = cuda.grid(1)
    if c >= means.shape[0]:
        return
    n = 0
    for j in range(means.shape[0]):
        n += 1 if present[j] else 0
    if n == 0:
        per_class[c] = -1.0
    elif present[c]:
        per_class[c] = _rank_unit(_ranks_below(means, present, c), n)
    else:
        per_class[c] = 0.5


@cuda.jit
def _write_class(labels, m, per_class):
    i = cuda.grid(1)
    if i < m.shape[0] and per_class[labels[i]] >= 0:
        m[i] = per_class[labels[i]]


def class_scope(ema, seen, labels, m, num_classes: int):
    """`cpu.class_scope` on the device, no host sync (one thread per class ranks it, O(K) each)."""
    dev = _device()
    class_acc = torch.zeros((num_classes, 2), dtype=torch.float64, device=dev)
    means = torch.empty(num_classes, dtype=torch.float64, device=dev)
    present = torch.empty(num_classes, dtype=torch.uint8, device=dev)
    per_class = torch.empty(num_classes, dtype=torch.float64, device=dev)
    stream, blocks, k_blocks = _stream(), _blocks(ema.shape[0]), _blocks(num_classes)
    _class_sums[blocks, THREADS, stream](view(ema), view(seen), view(labels), view(class_acc))
    _class_means[k_blocks, THREADS, stream](view(class_acc), view(means), view(present))
    _rank_classes[k_blocks, THREADS, stream](view(means), view(present), view(per_class))
    _write_class[blocks, THREADS, stream](view(labels), view(m), view(per_class))


@cuda.jit
def _class_totals(loss_sum, loss_count, labels, class_acc):
    """class_acc[c] = [sum of this epoch's values, count] over the samples of class c."""
    i = cuda.grid(1)
    if i < loss_sum.shape[0] and loss_count[i] > 0:
        cuda.atomic.add(class_acc, (labels[i], 0), float(loss_sum[i]))
        cuda.atomic.add(class_acc, (labels[i], 1), float(loss_count[i]))


@cuda.jit
def _lol_levels(class_acc, level, levels, accept):
    c = cuda.grid(1)
    if c < level.shape[0]:
        level[c] = _lol_step(level[c], class_acc[c, 0], class_acc[c, 1], accept, levels)


@cuda.jit
def _write_level(labels, m, level, levels):
    i = cuda.grid(1)
    if i < m.shape[0]:
        m[i] = level[labels[i]] / levels


def lol_update(loss_sum, loss_count, labels, level, m, levels: int, accept: float):
    """`cpu.lol_update` on the device, no host sync."""
    k = level.shape[0]
    class_acc = torch.zeros((k, 2), dtype=torch.float64, device=_device())
    stream, blocks = _stream(), _blocks(loss_sum.shape[0])
    _class_totals[blocks, THREADS, stream](view(loss_sum), view(loss_count), view(labels), view(class_acc))
    _lol_levels[_blocks(k), THREADS, stream](view(class_acc), view(level), int(levels), float(accept))
    _write_level[blocks, THREADS, stream](view(labels), view(m), view(level), int(levels))


def accumulate(loss_sum, loss_count, indices, losses):
    _accumulate[_blocks(indices.shape[0]), THREADS, _stream()](
        view(loss_sum), view(loss_count), view(indices), view(losses)
    )


def first_nonfinite(loss_sum, loss_count) -> int:
    n = loss_sum.shape[0]
    out = torch.full((1,), n, dtype=torch.int64, device=_device())
    _first_nonfinite[_blocks(n), THREADS, _stream()](view(loss_sum), view(loss_count), view(out))
    bad = int(out.item())  # sync point: once per epoch, to name a NaN/inf sample
    return -1 if bad == n else bad


def end_epoch(ema, seen, loss_sum, loss_count, beta):
    _end_epoch[_blocks(ema.shape[0]), THREADS, _stream()](
        view(ema), view(seen), view(loss_sum), view(loss_count), float(beta)
    )


def normalise(ema, seen, labels, m, num_classes: int):
    """`cpu.normalise` on the device: stats, seen samples, then never-seen ones; no host sync."""
    acc = torch.tensor([0.0, 0.0, math.inf, -math.inf], dtype=torch.float64, device=_device())
    class_acc = torch.zeros((num_classes, 2), dtype=torch.float64, device=_device())
    stream, blocks = _stream(), _blocks(ema.shape[0])
    _stats[STAT_BLOCKS, THREADS, stream](view(ema), view(seen), view(acc))
    _write_seen[blocks, THREADS, stream](view(ema), view(seen), view(labels), view(m), view(acc), view(class_acc))
    _write_unseen[blocks, THREADS, stream](view(seen), view(labels), view(m), view(acc), view(class_acc))
