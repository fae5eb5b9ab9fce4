"""`ecvl-fast convert`: a long-tailed dataset into FFCV `.beton` files plus `meta.json`.

Each split becomes one .beton with fields image (RGB), label and index (the sample's row, so
per-sample state such as the momentum loss can be addressed whatever order the loader uses).
Everything is written into a temporary folder beside `--out` and renamed when complete.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError, __version__, first_line
from ecvl_fast.loaders import sources

DATASETS = ("mnist-lt", "cifar10-lt", "cifar100-lt", "tiny-imagenet-lt", "imagenet-lt", "places-lt", "list", "folder")
MIN_PAGE = 1 << 21  # ffcv's minimum page size


# The longest side `convert` keeps by default. Every record of a .beton is sized for its largest
# image, so one 8000 x 8000 photo made a 200-image set 1 GB and asked 61 GB of the loader; 512
# keeps twice a 224-px model's decode size (256).
DEFAULT_MAX_RES = 512
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: above any camera's photo; decoding one takes ~0.2 GB per worker


@dataclass(frozen=True)
class ConvertOptions:
    dataset: str
    out: Path
    source: Path | None = None
    root: Path | None = None
    train_split: Path | None = None
    val_split: Path | None = None
    test_split: Path | None = None
    classes: Path | None = None
    wnids: Path | None = None
    imbalance: float = 100.0
    seed: int = 0
    val_per_class: int = 0
    format: str = "raw"
    max_res: int = DEFAULT_MAX_RES  # 0: keep every image at its own size
    max_pixels: int = DEFAULT_MAX_PIXELS  # images larger than this are refused from their header (0: no limit)
    jpeg_quality: int = 90
    workers: int = 2
    overwrite: bool = False
    skip_bad: bool = False
    many_threshold: int = 100
    few_threshold: int = 20


def build_source(o: ConvertOptions) -> sources.Source:
    src = _source(o)
    if o.val_per_class and o.dataset != "tiny-imagenet-lt":  # tiny-imagenet-lt takes spare images instead
        if "val" in src.splits:
            raise EcvlError(f"--val-per-class {o.val_per_class}: {o.dataset} already has a val split")
        train, val = sources.carve_val(src.splits["train"], o.val_per_class, o.seed)
        src.splits = {"train": train, "val": val, **{k: v for k, v in src.splits.items() if k != "train"}}
        src.info = {**(src.info or {}), "val_carved_from_train": {"per_class": o.val_per_class, "seed": o.seed}}
    return src


def _source(o: ConvertOptions) -> sources.Source:
    if o.dataset == "mnist-lt":
        return sources.load_mnist_lt(o.imbalance, o.seed)
    if o.dataset in ("cifar10-lt", "cifar100-lt"):
        return sources.load_cifar_lt(10 if o.dataset == "cifar10-lt" else 100, o.source, o.imbalance, o.seed)
    if o.dataset == "tiny-imagenet-lt":
        return sources.load_tiny_imagenet_lt(o.source, o.imbalance, o.seed, o.wnids, o.val_per_class)
    if o.dataset in ("imagenet-lt", "places-lt", "list"):
        root = o.root or o.source
        if root is None:
            raise EcvlError(f"{o.dataset} needs --root (the image folder)")
        splits = {"train": o.train_split, "val": o.val_split, "test": o.test_split}
        return sources.load_split_list(o.dataset, root, splits, o.classes)
    if o.dataset == "folder":
        if o.source is None:
            raise EcvlError("folder needs --source (an ImageFolder root)")
        return sources.load_folder(o.source)
    raise EcvlError(f"unknown dataset {o.dataset!r}; choose one of {', '.join(DATASETS)}")


def shot_groups(train_counts: np.ndarray, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Many > `many` train images, few < `few`, medium otherwise (the usual LT split)."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > many).tolist(),
        "medium": np.flatnonzero((counts >= few) & (counts <= many)).tolist(),
        "few": np.flatnonzero(counts < few).tolist(),
    }


def _probe(path: str, max_pixels: int = 0) -> tuple[str, int, int] | tuple[str, str]:
    """("ok", width, height), or ("bad", why): decoded once; an image over `max_pixels` is refused
    from its header, before it is decoded (a small file can hold a huge image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if max_pixels and im.width * im.height > max_pixels:
                return (
                    "bad",
                    f"{im.width} x {im.height} = {im.width * im.height / 1e6:.1f} megapixels, over "
                    f"--max-pixels {max_pixels:,}",
                )
            w, h = im.width, im.height
            sources.rgb(im)
            return ("ok", w, h)
    except Exception as e:
        return ("bad", first_line(e))


def check_images(split: sources.Split, workers: int, skip_bad: bool, name: str, max_res: int = 0, max_pixels: int = 0):
    """Decode every file once, so a corrupt image (or one too large to decode, PIL's decompression
    bomb limit) is named before ffcv's workers see it.

    Returns the (possibly filtered) split, the largest side seen, the skipped paths, and how many
    images are larger than `max_res` on their longest side (shrunk when written).
    """
    if split.paths is None:
        side = max(split.images.shape[1:3])
        return split, side, [], len(split) if max_res and side > max_res else 0
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        results = pool.map(functools.partial(_probe, max_pixels=max_pixels), split.paths, chunksize=64)
    bad = [(p, r[1]) for p, r in zip(split.paths, results) if r[0] == "bad"]
    if bad and not skip_bad:
        raise EcvlError(f"{bad[0][0]}: corrupt or unreadable image in {name} ({bad[0][1]}); pass --skip-bad to skip it")
    good = np.asarray([r[0] == "ok" for r in results])
    sides = [max(r[1], r[2]) for r in results if r[0] == "ok"]
    over = sum(s > max_res for s in sides) if max_res else 0
    return split.subset(np.flatnonzero(good)), max(sides, default=0), [p for p, _ in bad], over


class _Rows:
    """Indexable (image, label, index) rows for ffcv's DatasetWriter."""

    def __init__(self, split: sources.Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.images is not None:
            img = self.split.images[i]
        else:
            from PIL import Image

            with Image.open(self.split.paths[i]) as im:
                img = sources.rgb(im)
        return img, int(self.split.labels[i]), int(i)


def write_beton(path: Path, split: sources.Split, largest: int, o: ConvertOptions) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    side = min(largest, o.max_res) if o.max_res else largest
    page = MIN_PAGE
    while page < 2 * side * side * 3 + 65536:
        page *= 2
    fields = {
        "image": RGBImageField(write_mode=o.format, max_resolution=o.max_res or None, jpeg_quality=o.jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    with _progress(f"writing {path.name}: {len(split)} images, longest side {side} px"):
        DatasetWriter(str(path), fields, page_size=page, num_workers=o.workers).from_indexed_dataset(
            _Rows(split), chunksize=256
        )


@contextlib.contextmanager
def _progress(phase: str):
    """ffcv's progress bars on a terminal; in a redirected log one line per phase instead of a
    flood of carriage returns."""
    import sys

    import ffcv.writer

    if sys.stderr.isatty():
        yield
        return
    print(phase, flush=True)
    bars = {name: getattr(ffcv.writer, name) for name in ("tqdm", "thread_map")}
    for name, fn in bars.items():
        setattr(ffcv.writer, name, functools.partial(fn, disable=True))
    try:
        yield
    finally:
        for name, fn in bars.items():
            setattr(ffcv.writer, name, fn)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_source(src: sources.Source) -> np.ndarray:
    k = len(src.classes)
    for name, split in src.splits.items():
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= k):
            raise EcvlError(f"{name} split: label {int(split.labels.max())} out of range [0, {k})")
    counts = np.bincount(src.splits["train"].labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise EcvlError(f"class {int(empty[0])} ({src.classes[empty[0]]!r}) has zero train images")
    return counts


def _validate_options(o: ConvertOptions) -> None:
    if o.format not in ("raw", "jpg"):
        raise EcvlError(f"--format must be raw or jpg, not {o.format!r}")
    if o.out.exists() and not o.overwrite:
        raise EcvlError(f"{o.out}: already exists; pass --overwrite to replace it")
    if o.imbalance < 1:
        raise EcvlError(f"--imbalance must be >= 1, got {o.imbalance}")
    if o.val_per_class < 0:
        raise EcvlError(f"--val-per-class must be at least 0, not {o.val_per_class}")
    if o.few_threshold > o.many_threshold:
        raise EcvlError("--few-threshold must not exceed --many-threshold")


def convert(o: ConvertOptions) -> dict:
    """Build the dataset, write every split into a temp folder, then rename it to `o.out`."""
    _validate_options(o)
    src = build_source(o)
    # Before the forks below (the image check's pool, ffcv's writer workers): a DALI pipeline that
    # earlier work in this process (a test session, a notebook) left in a reference cycle would
    # otherwise be collected inside a forked worker, where its shutdown segfaults and the parent
    # waits on the dead worker forever (seen once in a full test run).
    gc.collect()
    o.out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{o.out.name[:100]}.tmp-"  # a legal 255-byte name leaves no room for more: keep the temp's short
    _remove_killed_temps(o.out.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=o.out.parent.resolve()))
    try:
        meta = _write_all(src, tmp, o)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o755)
        if o.out.exists():
            shutil.rmtree(o.out)
        tmp.rename(o.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _remove_killed_temps(parent: Path, prefix: str) -> None:
    """Temp folders a killed convert into the same --out left (`prefix` + its pid): removed, with one line."""
    for p in Path(parent).glob(f"{prefix}*"):
        try:
            pid = int(p.name[len(prefix) :].split("-")[0])
            os.kill(pid, 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        print(f"removed {p}, a killed convert's temp folder ({size / 1e6:.1f} MB)")


def _write_all(src: sources.Source, tmp: Path, o: ConvertOptions) -> dict:
    skipped, images, seconds, largest_side = {}, {}, {}, 0
    for name in list(src.splits):
        split, largest, bad, over = check_images(src.splits[name], o.workers, o.skip_bad, name, o.max_res, o.max_pixels)
        src.splits[name], skipped[name] = split, bad
        if over:
            print(
                f"{name}: {over} images larger than {o.max_res} px on their longest side are shrunk to it "
                f"(--max-res sets the side; 0 keeps every image's own size)"
            )
        largest_side = max(largest_side, largest)
        if name == "train":
            counts = _check_source(src)
        t0 = time.perf_counter()
        write_beton(tmp / f"{name}.beton", split, largest, o)
        seconds[name], images[name] = time.perf_counter() - t0, len(split)
    return {
        "dataset": o.dataset,
        "ecvl_fast_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": src.origin,
        "classes": src.classes,
        "num_classes": len(src.classes),
        "train_counts": counts.tolist(),
        "groups": shot_groups(counts, o.many_threshold, o.few_threshold),
        "thresholds": {"many": o.many_threshold, "few": o.few_threshold},
        "images": images,
        "skipped": {k: len(v) for k, v in skipped.items()},
        "skipped_files": {k: v for k, v in skipped.items() if v},
        "imbalance": src.info.get("imbalance"),
        "seed": o.seed,
        "source_info": src.info,
        "format": o.format,
        "max_res": o.max_res,
        "max_side": largest_side if not o.max_res else min(largest_side, o.max_res),
        "write_seconds": seconds,
        "sha256": {f"{n}.beton": sha256(tmp / f"{n}.beton") for n in src.splits},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
    }


def load_meta(data_dir: Path) -> dict:
    """Read and sanity-check `DIR/meta.json` written by convert."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise EcvlError(f"{path}: missing; run `ecvl-fast convert` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EcvlError(f"{path}: not valid JSON ({e})") from None
    needed = {"classes", "train_counts", "groups", "images", "sha256"}
    if not needed <= set(meta):
        raise EcvlError(f"{path}: not an ecvl-fast meta.json (missing {sorted(needed - set(meta))})")
    return meta
