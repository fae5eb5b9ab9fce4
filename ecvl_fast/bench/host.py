"""`ecvl-fast bench loader`: the data path against its torchvision peer, and the kernels against
numpy, all measured in one run so the ratios compare like with like on a noisy machine."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ecvl_fast.bench.machine import machine_info
from ecvl_fast.training.data import default_load_res


@dataclass(frozen=True)
class LoaderBench:
    data: Path
    res: int = 32
    batch: int = 256
    workers: int = 2
    dali_threads: int = 4  # DALI's pool; 2 per core hides its per-operator waits (docs/benchmarks.md: what limits)
    views: int = 2
    k: int = 2
    min_images: int = 4096


def _timed(batches, min_images: int) -> float:
    """Images/s over whole passes of `batches()` until `min_images` have gone by (after one warm-up pass)."""
    for _ in batches():
        pass
    n, t0 = 0, time.perf_counter()
    while n < min_images:
        for item in batches():
            n += len(item[1])
    return n / (time.perf_counter() - t0)


def bench_dali(b: LoaderBench):
    """A function that times the FFCV -> DALI loader (built once, reused)."""
    from ecvl_fast.kernels.bank import StaticMagnitudes
    from ecvl_fast.loaders.dali_loader import AugmentedLoader
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.loaders.ffcv_loader import make_loader, read_labels

    path = b.data / "train.beton"
    m = torch.rand(len(read_labels(path)), generator=torch.Generator().manual_seed(0))
    loader = make_loader(path, "random", b.batch, default_load_res(b.res), workers=b.workers)
    aug = AugmentedLoader(
        loader, AugSpec(res=b.res, views=b.views, k=b.k), StaticMagnitudes(m.numpy()), threads=b.dali_threads
    )
    return lambda: _timed(lambda: aug, b.min_images)


def bench_reference(b: LoaderBench):
    """A function that times the torchvision/PIL peer in DataLoader worker processes."""
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.loaders.ffcv_loader import make_loader
    from ecvl_fast.loaders.torch_reference import ReferenceDataset

    path = b.data / "train.beton"
    imgs, labels = [], []
    for im, y, _ in make_loader(path, "sequential", b.batch, default_load_res(b.res), workers=b.workers):
        imgs.append(im.numpy().copy()), labels.append(y.numpy().copy())
    imgs, labels = np.concatenate(imgs), np.concatenate(labels)
    m = torch.rand(len(labels), generator=torch.Generator().manual_seed(0)).share_memory_()
    ds = ReferenceDataset(imgs, labels, m, AugSpec(res=b.res, views=b.views, k=b.k))
    dl = torch.utils.data.DataLoader(
        ds, batch_size=b.batch, shuffle=True, num_workers=b.workers, persistent_workers=True, drop_last=True
    )
    return lambda: _timed(lambda: dl, b.min_images)


def bench_kernels(n: int = 1_280_000, batch: int = 512, seed: int = 0) -> dict:
    """One epoch of momentum bookkeeping over n samples: numba kernels vs vectorised numpy."""
    from ecvl_fast.kernels import cpu

    rng = np.random.default_rng(seed)
    idx = rng.permutation(n).astype(np.int64)
    loss = rng.gamma(2.0, 1.0, n).astype(np.float32)
    labels = rng.integers(0, 1000, n)
    state = [
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        np.zeros(n, np.float32),
        np.zeros(n, np.uint8),
        np.zeros(n, np.float32),
    ]

    def numba_epoch():
        s, c, ema, seen, m = state
        for j in range(0, n, batch):
            cpu.accumulate(s, c, idx[j : j + batch], loss[j : j + batch])
        assert cpu.first_nonfinite(s, c) == -1
        cpu.end_epoch(ema, seen, s, c, 0.97)
        cpu.normalise(ema, seen, labels, m, 1000)

    def numpy_epoch():
        s, c, ema, seen, m = (a.copy() for a in state)
        for j in range(0, n, batch):
            np.add.at(s, idx[j : j + batch], loss[j : j + batch])
            np.add.at(c, idx[j : j + batch], 1)
        hit = c > 0
        assert np.isfinite(s[hit]).all()
        lt = s[hit] / c[hit]
        ema[hit] = np.where(seen[hit] == 1, 0.97 * ema[hit] + 0.03 * lt, lt)
        seen[hit] = 1
        v = ema[seen == 1].astype(np.float64)
        spread = np.abs(v - v.mean()).max()
        m[seen == 1] = (v - v.mean()) / spread / 2 + 0.5 if spread > 0 else 0.5

    out = {}
    for name, f in (("numba", numba_epoch), ("numpy", numpy_epoch)):
        f()  # compile / warm caches
        t0 = time.perf_counter()
        f()
        out[f"{name}_s"] = time.perf_counter() - t0
    out["speedup"] = out["numpy_s"] / out["numba_s"]
    out["n"] = n
    return out


def bench_kernels_cuda(n: int = 1_280_000, batch: int = 512, seed: int = 0) -> dict | None:
    """The same epoch through the numba.cuda kernels on torch CUDA tensors (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    from ecvl_fast.kernels.bank import MomentumBank

    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randperm(n, device="cuda", generator=g)
    loss = torch.rand(n, device="cuda", generator=g) * 4
    bank = MomentumBank(torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)), device="cuda")

    def epoch():
        for j in range(0, n, batch):
            bank.record(idx[j : j + batch], loss[j : j + batch])
        bank.end_epoch()
        torch.cuda.synchronize()

    epoch()
    t0 = time.perf_counter()
    epoch()
    record_only = time.perf_counter()
    for j in range(0, n, batch):
        bank.record(idx[j : j + batch], loss[j : j + batch])
    torch.cuda.synchronize()
    t_record = time.perf_counter() - record_only
    t1 = time.perf_counter()
    bank.end_epoch()
    torch.cuda.synchronize()
    return {
        "cuda_s": record_only - t0,
        "record_s": t_record,
        "end_epoch_s": time.perf_counter() - t1,
        "n": n,
        "device": torch.cuda.get_device_name(0),
    }


def run_loader_bench(b: LoaderBench, kernels_n: int = 1_280_000, repeats: int = 3) -> dict:
    """Contenders alternate `repeats` times; the ratio reported is the median of the paired ratios."""
    dali, ref = bench_dali(b), bench_reference(b)
    pairs = [(dali(), ref()) for _ in range(repeats)]
    ratios = sorted(d / r for d, r in pairs)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(b).items()},
        "machine": machine_info(),
        "pairs": pairs,
        "ffcv_dali_img_s": float(np.median([d for d, _ in pairs])),
        "torchvision_img_s": float(np.median([r for _, r in pairs])),
        "ratio": ratios[len(ratios) // 2],
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "kernels": bench_kernels(kernels_n),
    }


def bench_convert(per_class: int = 5000, workers: int = 2) -> dict:
    """`convert cifar10-lt` of a synthetic CIFAR-10 (standard pickles, 50k train) in raw and jpg.

    Images/s counts every image written (the long-tailed train split plus the whole test split),
    timed around the ffcv writer only (meta.json's write_seconds), after a warm-up conversion.
    """
    import tempfile

    from ecvl_fast.loaders.convert import ConvertOptions, convert
    from ecvl_fast.bench.synthetic import write_cifar10

    out = {"per_class": per_class, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_cifar10(Path(tmp) / "cifar-10-batches-py", per_class, per_class // 5)
        convert(ConvertOptions("cifar10-lt", Path(tmp) / "warm", source=src, workers=workers))
        for fmt in ("raw", "jpg"):
            meta = convert(ConvertOptions("cifar10-lt", Path(tmp) / fmt, source=src, format=fmt, workers=workers))
            n, secs = sum(meta["images"].values()), sum(meta["write_seconds"].values())
            out[fmt] = {
                "images": n,
                "seconds": secs,
                "img_s": n / secs,
                "bytes": sum((Path(tmp) / fmt / f"{s}.beton").stat().st_size for s in meta["images"]),
            }
    return out


def bench_ops(res: int, batch: int = 128, seconds: float = 2.0, threads: int = 2) -> dict:
    """The DALI graph alone (images fed from memory, no FFCV), two views: crop + normalise only, the
    RandAugment graph with every op skipped (M = 0), with M ~ U(0, 1), and each op forced on every
    sample; images per second of each, and the per-image cost each op adds over M = 0."""
    from ecvl_fast.loaders import randaug_ops as ro
    from ecvl_fast.loaders.dali_graph import build_pipeline, feed
    from ecvl_fast.loaders.draws import AugSpec, batch_draws

    rng = np.random.default_rng(0)
    side = 256 if res > 64 else res
    imgs = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    spec, plain = AugSpec(res=res, views=2), AugSpec(res=res, views=2, randaug=False)
    pipes = {spec: build_pipeline(spec, batch, threads=threads), plain: build_pipeline(plain, batch, threads=threads)}

    def rate(sp, m, only=None) -> float:
        draws = batch_draws(sp, np.arange(batch), 0, 0)
        for d in draws if only is not None else ():
            d["op"][:] = only
        pipe = pipes[sp]
        feed(pipe, sp, imgs, m, draws)
        pipe.run()  # warm-up
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            feed(pipe, sp, imgs, m, draws)
            pipe.run()
            n += batch
        return n / (time.perf_counter() - t)

    rates = {
        "crop + normalise only": rate(plain, np.zeros(batch, np.float32)),
        "RA graph, M = 0": rate(spec, np.zeros(batch, np.float32)),
        "RA graph, M ~ U(0,1)": rate(spec, rng.random(batch).astype(np.float32)),
    }
    rates |= {f"only {op.name}": rate(spec, np.ones(batch, np.float32), only=i) for i, op in enumerate(ro.OPS)}
    base = rates["RA graph, M = 0"]
    return {
        "machine": machine_info(),
        "config": {"res": res, "batch": batch, "views": 2, "threads": threads, "seconds": seconds},
        "img_s": rates,
        "added_us_per_image": {k: 1e6 * (1 / v - 1 / base) for k, v in rates.items()},
    }
