"""FFCV Loader over a `.beton`: uint8 NHWC images, labels and sample indices, in one of three orders.

- `random`: instance-balanced (stage 1), a fresh seeded permutation per epoch;
- `balanced`: class-balanced (stage 2), indices from the kernel sampler every epoch (eq. 12);
- `sequential`: every sample once, in file order (eval).

All three are one TraversalOrder that we shard ourselves (rank::world over a list trimmed to a
multiple of world), so every DDP rank gets the same number of batches. Build a loader once and
reuse it: ffcv compiles its pipeline on the first epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError
from ecvl_fast.kernels import cpu as kernels
from ecvl_fast.loaders import canvas

ORDERS = ("random", "balanced", "sequential")


def epoch_indices(
    order: str,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    limit: int = 0,
) -> np.ndarray:
    """The sample indices one rank reads in one epoch. `limit` > 0: at most that many over all
    ranks (a quick trial): the epoch's first ones in a training order; in `sequential` order
    the same seeded subset every epoch, in file order."""
    n = len(labels)
    if order == "sequential":  # eval: no trimming, every sample exactly once overall
        chosen = (
            np.arange(n)
            if not 0 < limit < n
            else np.sort(np.random.default_rng([seed, 0x5EED]).choice(n, limit, replace=False))
        )
        return chosen[rank::world]
    if order == "random":
        full = np.random.default_rng([seed, epoch]).permutation(n)
    elif order == "balanced":
        full = kernels.balanced_indices(labels, num_classes, n, seed, epoch)
    else:
        raise EcvlError(f"unknown loader order {order!r}; choose one of {', '.join(ORDERS)}")
    per_rank = (min(n, limit) if limit > 0 else n) // world
    return full[: per_rank * world][rank::world]


def resume_offset(loader, epoch: int) -> int:
    """Samples of `epoch` to skip: a run resumed mid-epoch sets `loader.resume_at = (epoch, step)`,
    and that epoch then starts at batch `step` (every later epoch is whole). Shared with
    `HeldLoader`."""
    at = getattr(loader, "resume_at", None)
    return at[1] * loader.batch_size if at is not None and at[0] == epoch else 0


def read_labels(path: Path) -> np.ndarray:
    """All labels of a .beton, read from its metadata table (no image decoding)."""
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as e:
        raise EcvlError(f"{path}: not a readable .beton ({type(e).__name__}: {e})") from None
    if list(reader.handlers) != ["image", "label", "index"]:
        raise EcvlError(f"{path}: foreign .beton (fields {list(reader.handlers)}); write it with `ecvl-fast convert`")
    return np.asarray(reader.metadata["f1"], dtype=np.int64)


_QUIETED = False
_SAID: set[str] = set()


def reader_threads(workers: int) -> tuple[int, str | None]:
    """ffcv's reader threads are numba's, which refuses more than the machine's cores (a preset
    written for a 16-core node, tried on a laptop): capped, with a note saying so."""
    import numba

    cores = numba.config.NUMBA_NUM_THREADS
    if workers <= cores:
        return workers, None
    return cores, f"note: data.workers = {workers}, and this machine has {cores} cores: reading with {cores} threads"


def _quiet_numba_finalizer() -> None:
    """ffcv's compiled pipelines make numba print a harmless KeyError from a weakref finalizer at
    exit (seen with ffcv 1.0.2 and numba 0.68); drop exactly that report and pass everything else on. Installed once."""
    global _QUIETED
    import sys

    if _QUIETED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        func = getattr(unraisable.object, "__qualname__", "") or repr(unraisable.object)
        if isinstance(unraisable.exc_value, KeyError) and "finalize" in func:
            return
        previous(unraisable)

    sys.unraisablehook, _QUIETED = hook, True


def _no_ffcv_streams() -> None:
    """ffcv's epoch thread enters `torch.cuda.stream(...)` without setting a device; leaving it
    restores that thread's stream on cuda:0, which opens a CUDA context on GPU 0 in every rank
    (~0.5 GB each). Its streams order nothing here: the pipeline has no device operation, and the
    feeder finishes its copies out of a pinned slot before it takes the next batch
    (`AugmentedLoader._feed`). ffcv pins its slots whatever this switch says."""
    from ffcv.loader import epoch_iterator

    epoch_iterator.IS_CUDA = False


def image_sizes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of every stored image, from the .beton's metadata table."""
    from ffcv.reader import Reader

    meta = Reader(str(path)).metadata["f0"]
    return np.asarray(meta["height"], np.int64), np.asarray(meta["width"], np.int64)


def make_loader(
    path: Path,
    order: str,
    batch_size: int,
    load_res: int,
    *,
    workers: int = 2,
    seed: int = 0,
    num_classes: int | None = None,
    rank: int = 0,
    world: int = 1,
    limit: int = 0,
):
    """An ffcv Loader yielding (images uint8 [B,S,S,3] on a canvas, labels int64 [B], indices int64 [B]);
    `loader.sizes[index]` is each image's (height, width) on the canvas (loaders/canvas.py), its
    short side resized to at most `load_res`. `limit`: images per epoch at most (`epoch_indices`)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor
    from ffcv.traversal_order.base import TraversalOrder

    path = Path(path)
    if not path.is_file():
        raise EcvlError(f"{path}: no such .beton file")
    _quiet_numba_finalizer()
    _no_ffcv_streams()
    workers, note = reader_threads(workers)
    if note and note not in _SAID:
        _SAID.add(note)
        print(note, flush=True)
    labels = read_labels(path)
    k = num_classes or int(labels.max()) + 1
    heights, widths = image_sizes(path)
    side = canvas.canvas_side(load_res, max(heights.max(), widths.max()))

    class Order(TraversalOrder):
        def sample_order(self, epoch: int):
            full = epoch_indices(order, labels, k, seed, epoch, rank, world, limit)
            skip = resume_offset(self.loader, epoch)
            # ffcv trims an epoch to whole batches by the full epoch's length; a shortened one
            # must be trimmed here, or its remainder would come out as one extra, partial batch.
            return full[: len(full) // batch_size * batch_size][skip:] if skip else full

    int_pipe = lambda: [IntDecoder(), ToTensor(), Squeeze(1)]  # noqa: E731
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=order != "sequential",
        seed=seed,
        pipelines={
            "image": [canvas.canvas_decoder(load_res, side), ToTensor()],
            "label": int_pipe(),
            "index": int_pipe(),
        },
    )
    loader.traversal_order = Order(loader)
    loader.first_traversal_order = loader.traversal_order.sample_order(0)
    loader.sizes = canvas.sizes(heights, widths, load_res, side)
    return loader
