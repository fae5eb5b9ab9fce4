"""Packaged presets by name (`--config cifar100-lt` from any directory after a pip install), and
the dry run: what a `train` or `ablate` command would do, printed before any work."""

from __future__ import annotations

import json
from pathlib import Path

from ecvl_fast import EcvlError
from ecvl_fast.config import Config, annotated_toml

PRESETS = Path(__file__).parent.parent / "configs"


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def resolve(config: str | Path | None) -> Path | None:
    """A TOML file's path, or a packaged preset's by its name."""
    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    if path.name == str(config) and (PRESETS / f"{path.name}.toml").is_file():
        return PRESETS / f"{path.name}.toml"
    raise EcvlError(f"--config {config}: no such file or preset (presets: {', '.join(names())})")


def _status(folder: Path, cfg: Config, epochs: int, stage: int) -> tuple[str, int]:
    """What the run in `folder` would do (start, resume where, reuse, or be refused), and the
    epochs it would still train."""
    from ecvl_fast.run import checkpoint as ckpt_io
    from ecvl_fast.run.lifecycle import config_diff, done, retunable

    last = folder / "last.pt"
    if not last.is_file():
        return "start", epochs
    try:
        ckpt = ckpt_io.load(last)
    except EcvlError as e:
        return f"refused: {e}", 0
    diff = config_diff(ckpt["config"], cfg.to_dict(), stage)
    if diff and not retunable(folder, diff):
        return f"refused: another config there ({'; '.join(diff)}); --restart moves it aside", 0
    at = ckpt["position"]
    if done(ckpt, epochs, folder, cfg.run.report):
        return "reuse (finished)", 0
    return f"resume at epoch {at['epoch'] + 1}" + (f", step {at['step']}" if at["step"] else ""), epochs - at["epoch"]


def data_summary(cfg: Config) -> dict:
    from ecvl_fast.loaders.convert import load_meta
    from ecvl_fast.training.data import steps_per_epoch

    meta = load_meta(Path(cfg.data.path))
    counts = meta["train_counts"]
    return {
        "classes": len(meta["classes"]),
        "images": meta["images"],
        "max_per_class": max(counts),
        "min_per_class": min(counts),
        "groups": {g: len(c) for g, c in meta["groups"].items()},
        "steps_per_epoch": steps_per_epoch(cfg, meta["images"]["train"]),
    }


def model_check(cfg: Config, light: bool = False) -> str:
    """Build the run's model for its resolution (random weights: nothing is downloaded), with the
    stage-2 light module when `light`, and run one forward on a dummy batch."""
    from ecvl_fast.method import stage2 as two
    from ecvl_fast.method.model import ClipNet, activation_line, build_clip, check_forward

    clip, tokenizer = build_clip(cfg.model, load_weights=False, res=cfg.data.res)
    net = ClipNet(clip)
    if light:
        two.add_light_module(cfg, net, 2)
    check_forward(net, tokenizer(["a photo of a cat.", "a photo of a dog."]), cfg.data.res, cfg.model.name)
    return (
        f"model {cfg.model.name} at {cfg.data.res} px: one forward on a dummy batch passed; "
        f"{activation_line(cfg.model)}"
    )


TIMED_STEPS = 2  # steps timed per stage for the dry run's estimate (after one untimed)
CPU_TIMED_BATCH = 8  # images per timed step on a CPU (per image, a CPU's time barely depends on the batch)


def seconds_per_image(cfg: Config, stage: int, classes: int) -> tuple[float, str]:
    """(seconds per training image, how it was measured): real train steps of `stage` at the run's
    model, resolution, precision and stage settings, on synthetic images and random weights (the
    time does not depend on either), on this machine's device; on a CPU at a small batch."""
    import torch

    from ecvl_fast.run import dist as D

    d = D.setup(cfg.run.device)
    batch = cfg.data.batch_size if d.device.type == "cuda" else min(cfg.data.batch_size, CPU_TIMED_BATCH)
    while True:  # the global batch on one GPU may not fit where the run splits it over several: halve it
        try:
            return _timed_steps(cfg, d, stage, classes, batch)
        except torch.OutOfMemoryError:
            if batch <= CPU_TIMED_BATCH:
                raise
            torch.cuda.empty_cache()
            batch //= 2


def _timed_steps(cfg: Config, d, stage: int, classes: int, batch: int) -> tuple[float, str]:
    import dataclasses

    import numpy as np

    from ecvl_fast.bench.device import Timer, synthetic_batch
    from ecvl_fast.training.loop import build_run, train_step

    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=max(2, batch)),
        # one prompt per class: the heads' size is the classes', and encoding open_clip's 80 templates
        # per class (minutes on a CPU) only sets their starting values
        model=dataclasses.replace(cfg.model, pretrained="none", templates="single"),
        stage2=dataclasses.replace(cfg.stage2, init="none"),
    )
    batch = cfg.data.batch_size
    meta = {"classes": [f"class {i}" for i in range(classes)], "train_labels": np.arange(batch) % classes}
    run = build_run(cfg, d, meta, steps_per_epoch=10**6, stage=stage)
    x, y, idx = synthetic_batch(batch, cfg.data.res, classes, d.device, run.amp)
    views = x if stage == 1 else [x] * cfg.stage2.views
    times = []
    for _ in range(TIMED_STEPS + 1):  # the first, untimed: allocations, kernel choices
        with Timer(d.device) as t:
            train_step(run, views, y, idx)
        times.append(t.seconds)
    return min(times[1:]) / batch, f"{TIMED_STEPS} steps of {batch} images timed on {d.device.type}"


def duration(seconds: float) -> str:
    """A rough duration as a person says it."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def check_stage2_init(cfg: Config, stages: list[int]) -> None:
    """Stage 2 alone needs the stage-1 checkpoint it starts from (unless it starts from model.pretrained)."""
    from ecvl_fast.config import stage2_from_pretrained

    if 2 in stages and 1 not in stages and not stage2_from_pretrained(cfg):
        init = Path(cfg.stage2.init or Path(cfg.run.out) / "best.pt")
        if not init.is_file():
            raise EcvlError(
                f"--stage 2 starts from the stage-1 checkpoint {init}, and there is none: run stage 1 "
                f"first (train without --stage), or set stage2.init to a checkpoint"
            )


def dry_run(cfg: Config, runs: list[tuple[str, int, Config, Path]], origins: dict | None = None) -> dict:
    """Print the resolved config (each value with where it came from: `origins`), the data, the
    model check and each run (name, stage, config, folder): what it would do, the images it would
    process and about how long; nothing is written."""
    from ecvl_fast.loaders.ffcv_loader import reader_threads

    stages = sorted({stage for _, stage, _, _ in runs})
    check_stage2_init(cfg, stages)
    data = data_summary(cfg)
    light = any(stage == 2 and run_cfg.stage2.peft != "none" for _, stage, run_cfg, _ in runs)
    check = model_check(cfg, light)
    print(
        "# resolved config, each value with where it came from (default, recipe, dataset, the config file, a "
        "flag or --set); each run's own differ only as listed below"
    )
    print(annotated_toml(cfg, origins or {}))
    print(
        f"data {cfg.data.path}: {data['classes']} classes; images {json.dumps(data['images'])}; "
        f"{data['max_per_class']} ... {data['min_per_class']} train images per class; shot groups "
        f"many {data['groups']['many']} / medium {data['groups']['medium']} / few {data['groups']['few']} classes; "
        f"{data['steps_per_epoch']} steps per epoch at batch {cfg.data.batch_size}"
    )
    print(check)
    threads, note = reader_threads(cfg.data.workers)
    if note:
        print(note)
    total, seconds, plan, timed = 0, 0.0, [], {}
    for name, stage, run_cfg, folder in runs:
        epochs = run_cfg.stage1.epochs if stage == 1 else run_cfg.stage2.epochs
        status, left = _status(folder, run_cfg, epochs, stage)
        views = 1 if stage == 1 else run_cfg.stage2.views
        batches = data["steps_per_epoch"] * run_cfg.data.batch_size * left  # training images, each in `views` views
        key = (stage, repr(run_cfg.stage2 if stage == 2 else run_cfg.stage1), repr(run_cfg.aug))  # not the seed
        if left and key not in timed:
            timed[key] = seconds_per_image(run_cfg, stage, data["classes"])
        run_s = batches * timed[key][0] if left else 0.0
        total, seconds = total + batches * views, seconds + run_s
        plan.append(
            {
                "run": name,
                "stage": stage,
                "folder": str(folder),
                "epochs": epochs,
                "status": status,
                "images": batches * views,
                "estimate_s": round(run_s, 1),
            }
        )
        print(
            f"{name}: stage {stage}, {epochs} epochs, {folder}: {status}; {batches * views:,} images"
            + (f", about {duration(run_s)}" if left else "")
        )
    how = "; ".join(sorted({m for _, m in timed.values()}))
    print(
        f"in all: {total:,} images through the encoders (views counted)"
        + (
            f"; about {duration(seconds)} of training in one process on this machine (an estimate: {how}, scaled to "
            f"the images; reading, augmentation and evaluation not counted)"
            if timed
            else ""
        )
        + "; dry run, nothing written"
    )
    return {"data": data, "runs": plan, "images": total, "estimate_s": round(seconds, 1)}
