"""`ecvl-fast bench step|augment|train|infer`: throughput per device, warm-up excluded.

- step:    the stage 1 and stage 2 train steps on synthetic batches already on the device;
- augment: the memory-driven RandAugment alone (k=2, two views, M ~ U(0,1)): DALI against the
           torchvision/PIL peer in DataLoader workers on every CPU core, same images, same run;
- train:   stage 2 epochs through the real data path with each feeder, and the data-stall
           fraction: 1 - (time of the same steps on a batch already on the device) / (wall time);
- infer:   the `predict` path (prepare, encode, adapter, eq. 6) on the test images.

Times are medians over repeats, measured with CUDA events on GPU. Under torchrun each rank
reports its own img/s and rank 0 adds the total. `--compare OLD.json` prints new/old ratios.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ecvl_fast.run import dist as D
from ecvl_fast.bench.machine import machine_info
from ecvl_fast.method.rows import LIFT
from ecvl_fast.config import Config, DataCfg, ModelCfg, RunCfg, Stage1Cfg, Stage2Cfg


class Timer:
    """Wall seconds of a block; on CUDA, events on the current stream (synchronised at the end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()  # sync point: work queued before the block (warm-up) is not timed
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()  # sync point: the benchmark's own clock
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def _cfg(
    model: str, res: int, batch: int, device: str, compile: bool, world: int = 1, precision: str = "auto"
) -> Config:
    return Config(
        data=DataCfg(res=res, batch_size=batch * world),
        model=ModelCfg(name=model, compile=compile),
        stage1=Stage1Cfg(loss="prompt-ce"),
        stage2=Stage2Cfg(init="none"),
        run=RunCfg(device=device, precision=precision),
    )


def synthetic_batch(
    n: int, res: int, classes: int, device: torch.device, dt: torch.dtype = torch.float32, seed: int = 0
):
    from ecvl_fast.run import precision

    g = torch.Generator().manual_seed(seed)
    x = precision.inputs(torch.randn(n, 3, res, res, generator=g).to(device), dt)
    return x, (torch.arange(n) % classes).to(device), torch.arange(n, device=device)


def _meta(labels: np.ndarray) -> dict:
    """What build_run reads of a dataset's meta.json, for synthetic data with these train labels."""
    return {"classes": [f"class {i}" for i in range(int(labels.max()) + 1)], "train_labels": labels}


def _with_totals(d: D.Dist, r: dict, keys: tuple[str, ...]) -> dict:
    """Per-rank img/s, and their sum over ranks (the total) under torchrun."""
    for k in keys:
        v = torch.tensor([r[k]], dtype=torch.float64, device=d.device)
        r[f"{k}_total"] = float(D.all_reduce_sum(v)) if d.enabled else r[k]
    r["world_size"] = d.world_size
    return r


def bench_step(
    model: str,
    res: int,
    batch: int,
    device: str,
    compile: bool = False,
    steps: int = 10,
    repeats: int = 3,
    classes: int = 100,
    precision: str = "auto",
) -> dict:
    """Both stages' train steps, model only: stage 1; stage 2 (two views, frozen encoders + adapter);
    and `lift`, stage 2 with LIFT's settings (one view, a light module inside the frozen image tower
    and a cosine head, so the tower's backward runs too; method/rows.py's LIFT)."""
    from ecvl_fast.training.loop import build_run, train_step

    d = D.setup(device)
    out = {
        "machine": machine_info(),
        "config": dict(
            model=model,
            res=res,
            batch_per_device=batch,
            compile=compile,
            steps=steps,
            repeats=repeats,
            device=str(d.device),
            precision=precision,
        ),
    }
    for name, stage in (("stage1", 1), ("stage2", 2), ("lift", 2)):
        cfg = _cfg(model, res, batch, device, compile, d.world_size, precision)
        if name == "lift":
            cfg = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, **LIFT))
        run = build_run(cfg, d, _meta(np.arange(batch) % classes), steps_per_epoch=10**6, stage=stage)
        x, y, idx = synthetic_batch(batch, res, classes, d.device, run.amp)
        views = x if cfg.stage2.views == 1 or stage == 1 else [x, x.flip(-1)]
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        with Timer(d.device) as first:
            train_step(run, views, y, idx)
        times = []
        for _ in range(repeats):
            with Timer(d.device) as t:
                for _ in range(steps):
                    train_step(run, views, y, idx)
            times.append(t.seconds / steps)
        step_s = statistics.median(times)
        trained = run.stage2.trained().values() if stage == 2 else run.net.parameters()
        out[name] = _with_totals(
            d,
            {
                "img_s": batch / step_s,
                "step_ms": 1e3 * step_s,
                "first_step_s": first.seconds,
                "peak_device_mem_gb": torch.cuda.max_memory_allocated(d.device) / 2**30
                if d.device.type == "cuda"
                else None,
                "trained_params": sum(p.numel() for p in trained if p.requires_grad),
                "encoder_forwards_s": batch * (1 if isinstance(views, torch.Tensor) else len(views)) / step_s,
            },
            ("img_s",),
        )
    return out


def held_images(data: Path | None, res: int, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 NHWC images and labels: a converted split read once (ffcv), else synthetic ones."""
    from ecvl_fast.training.data import default_load_res

    side = default_load_res(res)
    if data is not None and (Path(data) / f"{split}.beton").is_file():
        try:
            from ecvl_fast.loaders.ffcv_loader import make_loader

            imgs, labels = [], []
            for im, y, _ in make_loader(Path(data) / f"{split}.beton", "sequential", 256, side, workers=2):
                imgs.append(im.numpy().copy()), labels.append(y.numpy().copy())
            imgs, labels = np.concatenate(imgs), np.concatenate(labels)
            reps = -(-n // len(imgs))
            return np.tile(imgs, (reps, 1, 1, 1))[:n], np.tile(labels, reps)[:n], f"{data}/{split}.beton, in memory"
        except ImportError:
            pass
    from ecvl_fast.bench.synthetic import fake_images

    return fake_images(n, 0, side), np.arange(n) % 100, "synthetic images in memory (no .beton / no ffcv here)"


def _peer_loader(images, labels, m, spec, batch: int, workers: int, seed: int = 0):
    from ecvl_fast.loaders.torch_reference import ReferenceDataset

    ds = ReferenceDataset(images, labels, m, spec, seed=seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )


def _dali_loader(
    images,
    labels,
    bank,
    spec,
    batch: int,
    device: torch.device,
    threads: int,
    prefetch: int = 2,
    dtype: torch.dtype | None = None,
    queue: int = 0,
):
    from ecvl_fast.loaders.dali_loader import AugmentedLoader
    from ecvl_fast.loaders.held import HeldLoader

    return AugmentedLoader(
        HeldLoader(images, labels, "random", batch),
        spec,
        bank,
        device=device,
        threads=threads,
        prefetch=prefetch,
        dtype=dtype,
        queue=queue,
    )


def uniform_m(n: int, seed: int = 0) -> np.ndarray:
    """M ~ U(0,1) per sample, fixed: what the augmentation benchmarks feed (as after some epochs)."""
    return np.random.default_rng(seed).random(n, dtype=np.float32)


class TrivialAugmentPeer:
    """The strongest GPU peer: DALI's own `trivial_augment_wide` (one op per sample, at a random one
    of 31 magnitudes; Mueller and Hutter 2021) on the same held images, two views each, after the
    same random-resized crop scale and flip, normalised as ours; DALI's GPU ops where there is
    CUDA, else its CPU ones. Yields ([views NCHW], labels, indices) as `AugmentedLoader` does."""

    def __init__(self, images, labels, res: int, batch: int, device: torch.device, threads: int, seed: int = 0):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug import trivial_augment
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.images, self.labels, self.batch, self.device = images, np.asarray(labels), batch, device
        gpu = device.type == "cuda"

        @pipeline_def(enable_conditionals=True)
        def graph():
            x = fn.external_source(name="images", layout="HWC")
            x = x.gpu() if gpu else x
            views = []
            for _ in range(2):
                v = fn.random_resized_crop(x, size=(res, res), random_area=(0.5, 1.0))
                v = trivial_augment.trivial_augment_wide(v)
                views.append(
                    fn.crop_mirror_normalize(
                        v,
                        dtype=types.FLOAT,
                        output_layout="HWC",
                        mirror=fn.random.coin_flip(),
                        mean=[255 * m for m in OPENAI_DATASET_MEAN],
                        std=[255 * s for s in OPENAI_DATASET_STD],
                    )
                )
            return tuple(views)

        self.pipe = graph(  # DALI's executor as the loader runs it (loaders/dali_graph.py): one batch at a time
            batch_size=batch,
            num_threads=threads,
            device_id=device.index or 0 if gpu else None,
            seed=seed,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        self.pipe.build()

    def __len__(self) -> int:
        return len(self.labels) // self.batch

    def __iter__(self):
        from ecvl_fast.loaders.dali_loader import _to_torch

        for s in range(len(self)):
            ix = np.arange(s * self.batch, (s + 1) * self.batch)
            self.pipe.feed_input("images", self.images[ix])
            views = [_to_torch(v, self.device) for v in self.pipe.run()]
            yield views, torch.from_numpy(self.labels[ix]), torch.from_numpy(ix)


def _img_s(loader, device: torch.device, passes: int) -> float:
    """Images/s over whole passes of `loader` after one warm-up pass; outputs land on `device`."""
    for _ in loader:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()  # sync point: the warm-up's last copies land before the clock starts
    n, t0 = 0, time.perf_counter()
    for _ in range(passes):
        for views, y, _ in loader:
            for v in views:  # both views reach the device, as in training (the peer's via pinned memory)
                v.to(device, non_blocking=True)
            n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_augment(
    data: Path | None, res: int, batch: int, device: str, n: int, workers: int, threads: int, repeats: int = 3
) -> dict:
    from ecvl_fast.kernels.bank import StaticMagnitudes
    from ecvl_fast.loaders.draws import AugSpec

    d = D.setup(device)
    images, labels, source = held_images(data, res, n)
    spec, m = AugSpec(res=res, views=2, k=2), uniform_m(len(labels))
    dali = _dali_loader(images, labels, StaticMagnitudes(m), spec, batch, d.device, threads)
    peer = _peer_loader(images, labels, torch.from_numpy(m).share_memory_(), spec, batch, workers)
    trivial = TrivialAugmentPeer(images, labels, res, batch, d.device, threads)
    timed = [
        (_img_s(dali, d.device, 1), _img_s(peer, d.device, 1), _img_s(trivial, d.device, 1)) for _ in range(repeats)
    ]
    pairs = [(a, b) for a, b, _ in timed]
    ratios = sorted(a / b for a, b in pairs)
    against_dali = sorted(a / c for a, _, c in timed)  # the speed-up over the strongest GPU peer, paired
    return {
        "machine": machine_info(),
        "source": source,
        "config": dict(
            res=res,
            batch=batch,
            views=2,
            k=2,
            images=len(labels),
            peer_workers=workers,
            dali_threads=threads,
            device=str(d.device),
        ),
        "dali_img_s": statistics.median(a for a, _ in pairs),
        "peer_img_s": statistics.median(b for _, b in pairs),
        "ratio": ratios[len(ratios) // 2],
        "pairs": pairs,
        "dali_peer_img_s": statistics.median(c for _, _, c in timed),  # DALI's trivial_augment_wide
        "ratio_dali_peer": against_dali[len(against_dali) // 2],
    }


def _stage2_run(model: str, res: int, batch: int, device: str, labels: np.ndarray, d: D.Dist, precision: str = "auto"):
    from ecvl_fast.training.loop import build_run

    cfg = _cfg(model, res, batch, device, False, d.world_size, precision)
    return build_run(cfg, d, _meta(labels), steps_per_epoch=10**6, stage=2)


def _held_stage2(data: Path | None, model: str, res: int, batch: int, device: str, n: int, precision: str):
    """What the fed stage-2 benchmarks share: the device, the held images, and a stage-2 run whose
    bank holds M ~ U(0,1) (what every feeder reads). Returns (dist, images, labels, source, run)."""
    d = D.setup(device)
    images, labels, source = held_images(data, res, n)
    run = _stage2_run(model, res, batch, device, labels, d, precision)
    run.bank.m.copy_(torch.from_numpy(uniform_m(len(labels))))
    return d, images, labels, source, run


def _train_pass(run, loader, d: D.Dist) -> tuple[float, int]:
    from ecvl_fast.training.loop import train_step

    n = 0
    with Timer(d.device) as t:
        for views, y, idx in loader:
            views = [v.to(d.device, non_blocking=True) for v in views]
            if d.device.type == "cuda":
                views = [v.to(run.amp).contiguous(memory_format=torch.channels_last) for v in views]
            train_step(run, views, y.to(d.device, non_blocking=True), idx.to(d.device, non_blocking=True))
            n += len(y)
    return t.seconds, n


def bench_train(
    data: Path | None,
    model: str,
    res: int,
    batch: int,
    device: str,
    n: int,
    workers: int,
    threads: int,
    epochs: int = 2,
    precision: str = "auto",
) -> dict:
    """Stage 2 epochs (adapter + L_DCVL + memory-driven RA) fed by DALI, then by the PIL peer."""
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.training.loop import train_step

    d, images, labels, source, run = _held_stage2(data, model, res, batch, device, n, precision)
    spec = AugSpec(res=res, views=2, k=2)
    feeders = {
        "dali": _dali_loader(images, labels, run.bank, spec, batch, d.device, threads, dtype=run.amp),
        "peer": _peer_loader(images, labels, run.bank.m.cpu().share_memory_(), spec, batch, workers),
    }
    x, y, idx = synthetic_batch(batch, res, int(labels.max()) + 1, d.device, run.amp)
    steps = len(feeders["dali"])

    def model_only() -> float:
        """Seconds per step with the batch already on the device: the step's own cost."""
        with Timer(d.device) as t:
            for _ in range(steps):
                train_step(run, [x, x], y, idx)
        return t.seconds / steps

    model_only()  # warm-up
    step_s = [model_only()]
    out = {
        "machine": machine_info(),
        "source": source,
        "config": dict(
            model=model,
            res=res,
            batch=batch,
            images=len(labels),
            epochs=epochs,
            peer_workers=workers,
            dali_threads=threads,
            device=str(d.device),
            precision=precision,
        ),
    }
    walls = {}
    for name, loader in feeders.items():
        _train_pass(run, loader, d)  # warm-up epoch (JIT, worker start-up)
        secs, imgs = zip(*[_train_pass(run, loader, d) for _ in range(epochs)])
        walls[name] = (statistics.median(secs), imgs[0])
    step_s.append(model_only())  # before and after the feeders; the faster is the step's cost
    out["model_only_step_ms"] = 1e3 * min(step_s)
    for name, (wall, imgs) in walls.items():
        compute = min(step_s) * (imgs // batch)
        out[name] = _with_totals(
            d,
            {
                "img_s": imgs / wall,
                "epoch_s": wall,
                "step_ms": 1e3 * wall / (imgs // batch),
                "data_stall": max(0.0, 1 - compute / wall),
            },
            ("img_s",),
        )
    out["ratio"] = out["dali"]["img_s"] / out["peer"]["img_s"]
    return out


def bench_infer(
    ckpt: Path | None,
    data: Path | None,
    model: str,
    res: int,
    batch: int,
    device: str,
    n: int,
    repeats: int = 3,
    precision: str = "auto",
    compile: bool = False,
) -> dict:
    """The predict path on test images held in memory: prepare (resize, normalise), encode, classify;
    `compile`: the classifier compiled as one frozen graph (`predict --compile`), its compilation
    in the first, untimed pass (`first_pass_s`)."""
    from ecvl_fast.evaluation.metrics import predict_logits
    from ecvl_fast.serving.classifier import load_checkpoint, to_input

    dev = D.resolve_device(device)
    if ckpt is not None:
        from ecvl_fast.serving.classifier import load_scorer

        state, cfg = load_checkpoint(ckpt)
        scorer = load_scorer(cfg, state, state["classes"], dev, compile=compile)
        res = cfg.data.res
    else:
        from ecvl_fast.method import stage2 as two

        run = _stage2_run(model, res, batch, str(dev), np.arange(100), D.Dist(0, 0, 1, dev), precision)
        scorer = two.scorer(run.cfg, run.stage2, compile=compile)
    if dev.type == "cuda":
        scorer = scorer.to(memory_format=torch.channels_last)
    from ecvl_fast.run import precision as prec

    dt = prec.dtype(precision, dev)
    images, _, source = held_images(data, res, n, split="test")
    held = torch.from_numpy(images)
    held = held.pin_memory() if dev.type == "cuda" else held  # as a loader would hand them over
    batches = [held[i : i + batch] for i in range(0, len(held) - batch + 1, batch)]

    @torch.no_grad()  # as predict runs it
    def one_pass():
        for b in batches:
            predict_logits(scorer, to_input(b, res, dev, dt), dt).argmax(1)

    with Timer(dev) as first:
        one_pass()
    times = []
    for _ in range(repeats):
        with Timer(dev) as t:
            one_pass()
        times.append(t.seconds)
    done = len(batches) * batch
    return {
        "machine": machine_info(),
        "source": source,
        "checkpoint": str(ckpt) if ckpt else None,
        "config": dict(
            model=model if ckpt is None else cfg.model.name,
            res=res,
            batch=batch,
            images=done,
            device=str(dev),
            precision=precision,
            compile=compile,
        ),
        "first_pass_s": first.seconds,
        "img_s": done / statistics.median(times),
    }


def compare(new: dict, old: dict, prefix: str = "") -> list[tuple[str, float, float, float]]:
    """(key, new, old, new/old) for every img/s and ratio both results hold."""
    rows = []
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            rows += compare(v, old[k], f"{prefix}{k}.")
        elif (
            (k.endswith("img_s") or k.endswith("img_s_total") or k == "ratio")
            and isinstance(v, (int, float))
            and isinstance(old.get(k), (int, float))
            and old[k]
        ):
            rows.append((prefix + k, float(v), float(old[k]), float(v) / float(old[k])))
    return rows


PROFILE_KEYS = ("feed_s", "schedule_s", "outputs_wait_s", "copy_s", "data_wait_s", "step_host_s", "step_device_s")


def bench_profile(
    data: Path | None,
    model: str,
    res: int,
    batch: int,
    device: str,
    n: int,
    threads: int,
    queue: int = 0,
    precision: str = "auto",
    trace: Path | None = None,
) -> dict:
    """Where a stage-2 step fed by DALI spends its time, per batch (issue 30's profile): in the
    feeder thread, feeding DALI (the draws, the host-to-device copy and its wait) and scheduling its
    run, the wait for DALI's output and the copy out of it; in the training loop, the wait for the
    next batch and the step, on the host and on the device (CUDA events, read at the end). Then
    torch.profiler over a few steps: every kernel of the process, DALI's included, by device time
    (`trace`: its Chrome trace too)."""
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.training.loop import train_step

    d, images, labels, source, run = _held_stage2(data, model, res, batch, device, n, precision)
    gpu = d.device.type == "cuda"
    loader = _dali_loader(
        images, labels, run.bank, AugSpec(res=res, views=2, k=2), batch, d.device, threads, dtype=run.amp, queue=queue
    )
    _train_pass(run, loader, d)  # warm-up epoch
    loader.timings, rows = [], []
    events = []
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch_ = next(it, None)
        t1 = time.perf_counter()
        if batch_ is None:
            break
        views, y, idx = batch_
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if gpu else None
        if pair:
            pair[0].record()
        train_step(run, views, y, idx)
        if pair:
            pair[1].record()
        rows.append({"data_wait_s": t1 - t0, "step_host_s": time.perf_counter() - t1})
        events.append(pair)
    if gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    for row, feed_row, pair in zip(rows, loader.timings, events):
        row.update(feed_row)
        row["step_device_s"] = pair[0].elapsed_time(pair[1]) / 1e3 if pair else row["step_host_s"]
    loader.timings = None
    out = {
        "machine": machine_info(),
        "source": source,
        "config": dict(
            model=model,
            res=res,
            batch=batch,
            images=len(labels),
            dali_threads=threads,
            dali_queue=loader.queue,
            device=str(d.device),
            precision=precision,
        ),
        "batches": len(rows),
        "img_s": len(rows) * batch / wall,
        "data_stall": sum(r["data_wait_s"] for r in rows) / wall,
        "median_ms": {k: 1e3 * statistics.median(r.get(k, 0.0) for r in rows) for k in PROFILE_KEYS},
        "per_batch_ms": [{k: round(1e3 * r.get(k, 0.0), 3) for k in PROFILE_KEYS} for r in rows[:64]],
    }
    out["kernels"] = _profiled_kernels(run, loader, d, trace)
    return out


def _profiled_kernels(run, loader, d: D.Dist, trace: Path | None, steps: int = 8, top: int = 20) -> list[dict]:
    """torch.profiler over `steps` fed steps: the operators and kernels with the most self time on
    the device (on a CPU: on the host), DALI's kernels among them (CUPTI sees every stream)."""
    import os

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on a CPU-only machine
    from torch.profiler import ProfilerActivity, profile

    from ecvl_fast.training.loop import train_step

    gpu = d.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for s, (views, y, idx) in enumerate(loader):
            if s == steps:
                break
            train_step(run, views, y, idx)
        if gpu:
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return [
        {"name": e.key[:80], "calls": e.count, "self_ms": getattr(e, key, 0.0) / 1e3 / steps, "per": "step"}
        for e in rows
    ]
