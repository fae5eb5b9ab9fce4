"""The DALI pipeline: per-view crop/flip, memory-driven RandAugment (eq. 10), CLIP normalisation.

All randomness is drawn in numpy from (seed, epoch, step, rank) and fed to DALI with the batch, so
an epoch is reproducible, resumable and comparable sample-by-sample with the PIL reference.
Per sample and slot j < k: an op index, u_j, zeta_j and a sign; the op is applied when
u_j < M_i (probability M_i) at strength M_i * zeta_j. A skipped op is dispatched as index 0
(identity), so each slot needs one dispatch and no separate "apply?" branch.

The same definition runs on CPU (`device_id=None`) and GPU (`device_id=local_rank`, images fed
as CUDA tensors); the per-sample parameters are always CPU argument inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecvl_fast.loaders.randaug_ops import OPS

# open_clip's OPENAI_DATASET_MEAN / STD, on the 0..255 scale.
CLIP_MEAN = [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255]
CLIP_STD = [0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255]


@dataclass(frozen=True)
class AugSpec:
    res: int = 32
    train: bool = True
    views: int = 1
    k: int = 2  # RandAugment ops per sample
    randaug: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)  # BALLAD's RandomResizedCrop scale


def crop_boxes(rng: np.random.Generator, n: int, scale, ratio=(3 / 4, 4 / 3), tries: int = 10):
    """Random-resized-crop boxes (y0, x0, y1, x1), relative to a square image.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); the first of `tries` candidates that
    fits is kept, else the whole image.
    """
    area = rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    ok = (w <= 1) & (h <= 1)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    w = np.where(ok.any(1), w[rows, first], 1.0)
    h = np.where(ok.any(1), h[rows, first], 1.0)
    x0, y0 = rng.uniform(0, 1, n) * (1 - w), rng.uniform(0, 1, n) * (1 - h)
    return np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.float32)


def batch_draws(spec: AugSpec, n: int, seed: int, epoch: int, step: int, rank: int = 0) -> list[dict]:
    """Every random number one batch needs, per view."""
    rng = np.random.default_rng([seed, epoch, step, rank])
    views = []
    for _ in range(spec.views):
        d = {"flip": rng.integers(0, 2, n).astype(np.int32)}
        if spec.train:
            d["box"] = crop_boxes(rng, n, spec.crop_scale)
        if spec.randaug:
            d["op"] = rng.integers(0, len(OPS), (spec.k, n)).astype(np.int32)
            d["u"] = rng.random((spec.k, n), dtype=np.float32)
            d["zeta"] = rng.random((spec.k, n), dtype=np.float32)
            d["sign"] = (rng.integers(0, 2, (spec.k, n)) * 2 - 1).astype(np.float32)
        views.append(d)
    return views


def dispatch(lo: int, hi: int, idx, x, strength, sign):
    """Apply OPS[idx] per sample by binary splitting on the op index (DALI conditionals)."""
    if lo == hi:
        return OPS[lo].dali(x, OPS[lo].param(strength, sign))
    mid = (lo + hi) // 2
    if idx <= mid:
        out = dispatch(lo, mid, idx, x, strength, sign)
    else:
        out = dispatch(mid + 1, hi, idx, x, strength, sign)
    return out


def memory_rand_augment(x, m, op, u, zeta, sign, k: int):
    """eq. 10: k slots; slot j applies OPS[op_j] with probability M at strength M * zeta_j."""
    from nvidia.dali import fn, types

    for j in range(k):
        applied = fn.cast(u[j] < m, dtype=types.INT32)
        x = dispatch(0, len(OPS) - 1, op[j] * applied, x, m * zeta[j], sign[j])
    return x


def _inputs(name: str, n: int):
    from nvidia.dali import fn

    return [fn.external_source(name=f"{name}{j}") for j in range(n)]


def build_pipeline(spec: AugSpec, batch_size: int, *, device_id: int | None = None, threads: int = 2,
                   seed: int = 0, trace: bool = False):
    """One view-graph per view over the same fed images; outputs NHWC float per view (+ traces)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  enable_conditionals=spec.randaug, exec_async=False, exec_pipelined=False,
                  prefetch_queue_depth=1)
    def pipe():
        images = fn.external_source(name="images", device="gpu" if gpu else "cpu", layout="HWC")
        m = fn.external_source(name="m")
        outputs, traces = [], []
        for v in range(spec.views):
            x = images
            if spec.train:
                box = fn.external_source(name=f"box_{v}")
                x = fn.resize(x, size=[spec.res, spec.res], roi_start=box[0:2], roi_end=box[2:4],
                              roi_relative=True, antialias=True)
            else:
                x = fn.resize(x, resize_shorter=spec.res, antialias=True)
            if spec.randaug:
                op, u, zeta, sign = (_inputs(f"{key}_{v}_", spec.k) for key in ("op", "u", "zeta", "sign"))
                x = memory_rand_augment(x, m, op, u, zeta, sign, spec.k)
                traces.append(fn.stack(*[fn.cast(u[j] < m, dtype=types.INT32) for j in range(spec.k)]))
            # Flip last, fused into the normalisation pass. Every op's parameter distribution is
            # mirror-symmetric (signed shears, translations, rotations), so flip-then-RA and
            # RA-then-flip give the same distribution of views.
            flip = fn.external_source(name=f"flip_{v}")
            outputs.append(fn.crop_mirror_normalize(
                x, crop=(spec.res, spec.res), mirror=flip, mean=CLIP_MEAN, std=CLIP_STD,
                dtype=types.FLOAT, output_layout="HWC"))
        return (*outputs, *(traces if trace else []), m)

    p = pipe()
    p.build()
    return p


def feed(p, spec: AugSpec, images, m: np.ndarray, draws: list[dict]) -> None:
    """Feed one batch: images (NHWC uint8; a CUDA tensor on GPU), M per sample, the draws."""
    p.feed_input("images", images, layout="HWC")
    p.feed_input("m", np.ascontiguousarray(m, dtype=np.float32))
    for v, d in enumerate(draws):
        p.feed_input(f"flip_{v}", d["flip"])
        if spec.train:
            p.feed_input(f"box_{v}", d["box"])
        if spec.randaug:
            for j in range(spec.k):
                for key in ("op", "u", "zeta", "sign"):
                    p.feed_input(f"{key}_{v}_{j}", d[key][j])


class AugmentedLoader:
    """FFCV batches through the DALI pipeline: yields ([view NCHW channels_last], labels, indices).

    M_i is gathered from the shared magnitude tensor `m` (the momentum bank's, CUDA or CPU) when a
    batch is fed, so values the kernels wrote at the end of epoch t are used in epoch t+1. The
    pipeline runs synchronously (no prefetch), so no batch is ever built from a stale M.
    """

    def __init__(self, loader, spec: AugSpec, m=None, *, device="cpu", seed: int = 0, rank: int = 0,
                 threads: int = 2):
        import torch

        self.loader, self.spec, self.m, self.seed, self.rank = loader, spec, m, seed, rank
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self.pipe = build_pipeline(spec, loader.batch_size, device_id=self.device.index or 0 if gpu else None,
                                   threads=threads, seed=seed)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def _magnitudes(self, idx):
        if self.m is None or not self.spec.randaug:
            return np.zeros(len(idx), np.float32)
        # On GPU this gathers on the device and copies B floats back: DALI argument inputs live on the host.
        return self.m[idx.to(self.m.device)].cpu().numpy()

    def __iter__(self):
        import torch

        epoch = self.loader.next_epoch
        gpu = self.device.type == "cuda"
        for step, (images, labels, idx) in enumerate(self.loader):
            draws = batch_draws(self.spec, len(labels), self.seed, epoch, step, self.rank)
            if gpu:
                images = images.to(self.device, non_blocking=True)
                torch.cuda.current_stream().synchronize()  # DALI reads the fed memory on its own stream
            feed(self.pipe, self.spec, images if gpu else images.numpy(), self._magnitudes(idx), draws)
            outs = self.pipe.run()
            views = [_to_torch(outs[v], self.device) for v in range(self.spec.views)]
            yield views, labels.to(torch.int64).clone(), idx.to(torch.int64).clone()


def _to_torch(tl, device):
    """DALI NHWC float output -> NCHW channels_last (a free permute); bf16 on GPU. Copies, since
    DALI owns its output buffers."""
    import torch

    t = torch.from_dlpack(tl.as_tensor())
    t = t.to(torch.bfloat16) if device.type == "cuda" else t.clone()
    return t.permute(0, 3, 1, 2)
