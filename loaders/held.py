"""A stand-in for the ffcv Loader over images held in host RAM: the same uint8 NHWC batches, orders and sharding,
read from a numpy array instead of a `.beton`. Benchmarks use it where ffcv cannot be built
(the GPU check machine) and to time the augmentation alone; `AugmentedLoader` takes either.

Like ffcv, it hands out batches in a ring of `slots` preallocated buffers, pinned where CUDA is
available (ffcv's `allocation_query.py`), and refills a slot as soon as a later batch is taken.
So a consumer sees ffcv's memory semantics: a batch is only valid until the next one is taken,
and a non-blocking copy out of it must be finished by then.
"""

from __future__ import annotations

import numpy as np
import torch

from ecvl_fast.loaders.ffcv_loader import epoch_indices, resume_offset


class HeldLoader:
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        order: str,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        slots: int = 3,
        limit: int = 0,
    ):
        self.images, self.labels, self.limit = images, np.asarray(labels, np.int64), limit
        self.order, self.batch_size, self.seed, self.rank, self.world = order, batch_size, seed, rank, world
        self.num_classes = int(self.labels.max()) + 1
        self.next_epoch = 0
        self.resume_at = None
        pin = torch.cuda.is_available()
        shape = (batch_size, *images.shape[1:])
        self._slots = [
            tuple(
                t.pin_memory() if pin else t
                for t in (
                    torch.empty(shape, dtype=torch.uint8),
                    torch.empty(batch_size, dtype=torch.int64),
                    torch.empty(batch_size, dtype=torch.int64),
                )
            )
            for _ in range(slots)
        ]

    def _indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(
            self.order, self.labels, self.num_classes, self.seed, epoch, self.rank, self.world, self.limit
        )

    def __len__(self) -> int:
        n = len(self._indices(self.next_epoch))
        return n // self.batch_size if self.order != "sequential" else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices(self.next_epoch)
        skip = resume_offset(self, self.next_epoch) // self.batch_size
        self.next_epoch += 1
        for s in range(skip, len(self)):
            ix = idx[s * self.batch_size : (s + 1) * self.batch_size]
            images, labels, index = (t[: len(ix)] for t in self._slots[s % len(self._slots)])
            np.take(self.images, ix, axis=0, out=images.numpy(), mode="clip")  # straight into the (pinned) slot
            labels.copy_(torch.from_numpy(self.labels[ix]))
            index.copy_(torch.from_numpy(ix))
            yield images, labels, index
