"""An in-memory stand-in for the ffcv Loader: the same uint8 NHWC batches, orders and sharding,
read from a numpy array instead of a `.beton`. Benchmarks use it where ffcv cannot be built
(the GPU check machine) and to time the augmentation alone; `AugmentedLoader` takes either."""
from __future__ import annotations

import numpy as np
import torch

from ecvl_fast.loaders.ffcv_loader import epoch_indices


class MemoryLoader:
    def __init__(self, images: np.ndarray, labels: np.ndarray, order: str, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.order, self.batch_size, self.seed, self.rank, self.world = order, batch_size, seed, rank, world
        self.num_classes = int(self.labels.max()) + 1
        self.next_epoch = 0

    def _indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(self.order, self.labels, self.num_classes, self.seed, epoch, self.rank, self.world)

    def __len__(self) -> int:
        n = len(self._indices(self.next_epoch))
        return n // self.batch_size if self.order != "sequential" else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices(self.next_epoch)
        self.next_epoch += 1
        for s in range(len(self)):
            ix = idx[s * self.batch_size:(s + 1) * self.batch_size]
            yield torch.from_numpy(self.images[ix]), torch.from_numpy(self.labels[ix]), torch.from_numpy(ix)
