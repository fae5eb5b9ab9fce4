"""Synthetic stand-ins for real datasets: smooth random images and CIFAR-format pickles.

Used by the tests and by `ecvl-fast bench convert` (no dataset ships with the package but MNIST-5k).
"""

import pickle
from pathlib import Path

import numpy as np


def fake_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random images (gradients plus noise), so JPEG error stays small and measurable."""
    rng = np.random.default_rng(seed)
    ramp = (np.add.outer(np.arange(size), np.arange(size)) / size).astype(np.float32)[None, :, :, None]
    base = (rng.uniform(0, 255, (n, 1, 1, 3)) * 0.5).astype(np.float32)
    slope = rng.uniform(-80, 80, (n, 1, 1, 3)).astype(np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(0, n, 256):  # float32 in chunks: the uint8 result is the only full-size array
        out[i : i + 256] = np.clip(base[i : i + 256] + slope[i : i + 256] * ramp + 64, 0, 255)
    return out


def write_cifar10(root: Path, per_class_train: int = 50, per_class_test: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class{c}" for c in range(10)]
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
    train = fake_images(len(train_labels), 1)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for i, ix in enumerate(chunks, 1):
        batch = {"data": train[ix].transpose(0, 3, 1, 2).reshape(len(ix), -1), "labels": train_labels[ix].tolist()}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test_labels = np.repeat(np.arange(10), per_class_test)
    test = fake_images(len(test_labels), 2)
    (root / "test_batch").write_bytes(
        pickle.dumps({"data": test.transpose(0, 3, 1, 2).reshape(len(test), -1), "labels": test_labels.tolist()})
    )
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root
