"""Tiny generated datasets: fake CIFAR pickles, image trees and OLTR split files."""
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def fake_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random images (gradients plus noise), so JPEG error stays small and measurable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * 0.5
    slope = rng.uniform(-80, 80, (n, 1, 1, 3))
    img = base + slope * (xx[None, :, :, None] + yy[None, :, :, None]) + 64
    return np.clip(img, 0, 255).astype(np.uint8)


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
    (root / "test_batch").write_bytes(pickle.dumps(
        {"data": test.transpose(0, 3, 1, 2).reshape(len(test), -1), "labels": test_labels.tolist()}))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def write_tree(root: Path, counts: list[int], size: int = 24, seed: int = 0) -> list[Path]:
    paths, k = [], 0
    for c, n in enumerate(counts):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for img in fake_images(n, seed + c, size):
            p = d / f"{k:05d}.png"
            Image.fromarray(img).save(p)
            paths.append(p)
            k += 1
    return paths


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar10(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def split_dataset(tmp_path):
    """An OLTR-style root plus train/test split files over 3 classes."""
    root = tmp_path / "images"
    train = write_tree(root / "train", [30, 12, 5])
    test = write_tree(root / "test", [3, 3, 3], seed=10)

    def lines(paths):
        return "".join(f"{p.relative_to(root)} {int(p.parent.name[1:])}\n" for p in paths)

    (tmp_path / "train.txt").write_text(lines(train))
    (tmp_path / "test.txt").write_text(lines(test))
    return root, tmp_path / "train.txt", tmp_path / "test.txt"
