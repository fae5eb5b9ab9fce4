"""Glue from a config to the loaders: a converted dataset, checked, and its train/eval loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ecvl_fast import EcvlError
from ecvl_fast.run import precision
from ecvl_fast.config import Config
from ecvl_fast.run.dist import Dist
from ecvl_fast.run.files import atomic_write


STAMP = ".verified.json"  # per .beton: the size, mtime and sha256 last found to match meta.json


def verify(path: str | Path, meta: dict, force: bool = False) -> dict[str, str]:
    """Each .beton against the sha256 meta.json recorded at convert. Hashing tens of GB on every run
    is too slow, so a file is hashed once and stamped (its size and mtime); later opens hash it again
    only where those changed (a write changes them) or with `force` (`ecvl-fast verify`). What was
    found, per split: "hashed", "stamped", or "unrecorded" (meta.json has no sha256 for it)."""
    import json

    from ecvl_fast.loaders.convert import sha256

    folder = Path(path)
    stamps = []  # every stamp found: beside the data, and in the user's cache
    for where in _stamps(folder):
        try:
            stamps.append(json.loads(where.read_text()))
        except (OSError, ValueError):
            continue
    stamp, found, changed = dict(stamps[0]) if stamps else {}, {}, False
    for split in meta["images"]:
        name = f"{split}.beton"
        st, want = (folder / name).stat(), meta["sha256"].get(name)
        mark = [st.st_size, st.st_mtime_ns, want]
        if not force and any(s.get(name) == mark for s in stamps):
            found[split], stamp[name] = "stamped", mark
            continue
        if want is None:  # a meta.json that records none (a dataset assembled by hand): nothing to check against
            found[split] = "unrecorded"
            continue
        if sha256(folder / name) != want:
            raise EcvlError(
                f"{folder / name} does not match the sha256 meta.json recorded when it was written: the "
                f"file was changed or damaged; convert the dataset again"
            )
        stamp[name], found[split], changed = mark, "hashed", True
    for where in _stamps(folder) if changed else ():
        try:
            atomic_write(where, lambda tmp: tmp.write_text(json.dumps(stamp)))
            break
        except (OSError, EcvlError):  # a dataset the user cannot write to: the stamp goes to the user's cache
            continue
    return found


def _stamps(folder: Path) -> list[Path]:
    """Where a dataset's stamp lives: beside it, or, where that is read-only, in ~/.cache/ecvl-fast."""
    import hashlib
    import os

    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / STAMP, base / "ecvl-fast" / f"verified-{key}.json"]


def open_dataset(path: str | Path, d: Dist | None = None) -> dict:
    """meta.json plus a check of each .beton against it: its sha256 (`verify`, on every rank at
    once, so that none waits on another's hashing past a collective's timeout; a refusal on one
    stops all), then its label count. The train labels are kept in meta["train_labels"] (the
    momentum bank needs them)."""
    from ecvl_fast.loaders.convert import load_meta
    from ecvl_fast.loaders.ffcv_loader import read_labels
    from ecvl_fast.run import dist as D

    meta = load_meta(Path(path))
    refused = None
    try:
        verify(path, meta)
    except EcvlError as e:
        refused = str(e)
    if d is not None and d.enabled:
        import torch

        elsewhere = int(D.all_reduce_max(torch.tensor([int(refused is not None)], device=d.device)))
        refused = refused or (
            "another rank found a .beton that does not match meta.json: see its error" if elsewhere else None
        )
    if refused:
        raise EcvlError(refused)
    for split, n in meta["images"].items():
        labels = read_labels(Path(path) / f"{split}.beton")
        if len(labels) != n:
            raise EcvlError(f"{path}/{split}.beton: {len(labels)} images, meta.json says {n}; not this dataset's file")
        if split == "train":
            meta["train_labels"] = labels
    return meta


def default_load_res(res: int) -> int:
    """Evaluation's Resize(S) before CenterCrop(res): the crop size at small resolutions (the whole
    short side), else 8/7 of it (256 for 224, torchvision's ImageNet convention)."""
    return res if res <= 64 else round(res * 8 / 7)


def load_res(cfg: Config) -> int:
    if cfg.data.load_res:
        return cfg.data.load_res
    res = cfg.data.res
    return (
        res + res // 7 if cfg.data.eval_resize == "lift+" else default_load_res(res)
    )  # LIFT+'s Resize(res + res // 7)


def dali_threads(cfg: Config) -> int:
    return cfg.data.dali_threads or 2 * cfg.data.workers


def per_rank_batch(cfg: Config, d: Dist) -> int:
    if cfg.data.batch_size % d.world_size:
        raise EcvlError(f"data.batch_size={cfg.data.batch_size} does not split over {d.world_size} ranks")
    return cfg.data.batch_size // d.world_size


def steps_per_epoch(cfg: Config, train_images: int) -> int:
    """The loader's length: whole global batches (drop_last), at most run.limit_steps."""
    steps = train_images // cfg.data.batch_size
    return min(steps, cfg.run.limit_steps) if cfg.run.limit_steps else steps


def train_loader(cfg: Config, d: Dist, meta: dict, order: str, views: int = 1, memory=None, stage: int = 1):
    """Stage 1: `random` order, one view, crop + flip. Stage 2: `balanced`, two views, [aug]'s crop
    (its schedule, shape, flip and filter), and with `memory` (the momentum bank, or a fixed M) the
    memory-driven RandAugment (eq. 10) and crop reading its M."""
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.loaders.ffcv_loader import make_loader

    loader = make_loader(
        Path(cfg.data.path) / "train.beton",
        order,
        per_rank_batch(cfg, d),
        load_res(cfg),
        workers=cfg.data.workers,
        seed=cfg.run.seed,
        num_classes=len(meta["classes"]),
        rank=d.rank,
        world=d.world_size,
        limit=cfg.run.limit_steps * cfg.data.batch_size,
    )
    spec = AugSpec(
        res=cfg.data.res,
        train=True,
        views=views,
        k=cfg.aug.k,
        randaug=memory is not None and cfg.stage2.randaug,
        crop_scale=(cfg.aug.crop_min_scale, 1.0),
    )
    if stage == 2:
        a = cfg.aug
        spec = dataclasses.replace(
            spec,
            square=a.crop_square,
            flip=a.flip,
            interp=a.interp,
            schedule=a.crop_schedule,
            epochs=cfg.stage2.epochs,
            crop_m=a.crop_m,
            crop_shuffle=a.crop_m_shuffle,
        )
    return _augmented(cfg, d, loader, spec, memory)


def _augmented(cfg: Config, d: Dist, loader, spec, memory=None):
    """An ffcv loader through the DALI graph of `spec`, with the run's seed, sharding, threads,
    prefetch and output dtype: what training and evaluation both read."""
    from ecvl_fast.loaders.dali_loader import AugmentedLoader

    return AugmentedLoader(
        loader,
        spec,
        memory,
        device=d.device,
        seed=cfg.run.seed,
        rank=d.rank,
        world=d.world_size,
        threads=dali_threads(cfg),
        prefetch=cfg.data.prefetch,
        dtype=precision.dtype(cfg.run.precision, d.device),
        queue=dali_queue(cfg, d.device),
    )


def dali_queue(cfg: Config, device) -> int:
    """Batches in DALI at once on `device` (data.dali_queue; `dali_loader.queue_depth` resolves 0)."""
    import torch

    from ecvl_fast.loaders.dali_loader import queue_depth

    return queue_depth(cfg.data.dali_queue, torch.device(device).type == "cuda")


def five_crop_resize(res: int) -> int:
    """LIFT's test transform resizes to res + 24 at 224 px (its `expand`), then cuts five res crops."""
    return res + max(1, round(res * 24 / 224))


def eval_loader(cfg: Config, d: Dist, split: str, views: int | None = None):
    """The split in file order, evaluation's centre crop; with LIFT's five crops (data.tte_crops =
    "five") each image's five views. `views`: test-time views, over data.tte_views."""
    from ecvl_fast.method.model import tte_split

    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.loaders.ffcv_loader import make_loader

    path = Path(cfg.data.path) / f"{split}.beton"
    if not path.is_file():
        raise EcvlError(f"{path}: no such split in {cfg.data.path}")
    crops = tte_split(cfg.data.tte_crops, cfg.data.tte_views if views is None else views)[1]
    resize = five_crop_resize(cfg.data.res) if crops > 1 else max(cfg.data.res, load_res(cfg))
    # decoded with the short side at most `resize`: every crop is then at most res, only enlarged
    loader = make_loader(
        path,
        "sequential",
        per_rank_batch(cfg, d),
        resize if crops > 1 else load_res(cfg),
        workers=cfg.data.workers,
        seed=cfg.run.seed,
        rank=d.rank,
        world=d.world_size,
        limit=cfg.run.limit_eval,
    )
    spec = AugSpec(res=cfg.data.res, train=False, views=crops, randaug=False, eval_resize=resize, interp=cfg.aug.interp)
    return _augmented(cfg, d, loader, spec)
