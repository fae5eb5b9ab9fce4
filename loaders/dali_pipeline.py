"""The DALI pipeline: per-view crop/flip, memory-driven RandAugment (eq. 10), CLIP normalisation.

All randomness is a hash of (seed, epoch, position in the epoch), drawn in numpy and fed to DALI
with the batch, so an epoch is reproducible, resumable, identical under DDP, and comparable
sample-by-sample with the PIL reference.
Per sample and slot j < k: an op index, u_j, zeta_j and a sign; the op is applied when
u_j < M_i (probability M_i) at strength M_i * zeta_j. A skipped op is dispatched as index 0
(identity), so each slot needs one dispatch and no separate "apply?" branch.

The same definition runs on CPU (`device_id=None`) and GPU (`device_id=local_rank`, images fed
as CUDA tensors); the per-sample parameters are always CPU argument inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecvl_fast.loaders.randaug_ops import LEAVES, OPS, slot_inputs

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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash, vectorised."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, positions: np.ndarray, streams: int) -> np.ndarray:
    """[len(positions), streams] uniforms in [0, 1), a pure function of (seed, epoch, position).

    Keyed by a sample's position in the epoch's global order, not by rank or batch, so a DDP run
    and a single-process run augment every sample identically, and a repeated sample (balanced
    sampling) gets fresh draws.
    """
    key = _splitmix(_splitmix(np.array([seed], np.uint64)) ^ np.array([epoch], np.uint64))
    with np.errstate(over="ignore"):
        ctr = np.asarray(positions, np.uint64)[:, None] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)
    return (_splitmix(ctr ^ key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def crop_boxes(r: np.ndarray, scale, ratio=(3 / 4, 4 / 3)):
    """Random-resized-crop boxes (y0, x0, y1, x1), relative to a square image, from uniforms r[:, 2T+2].

    Area fraction ~ U(scale), log aspect ~ U(log ratio); the first of T candidates that fits is
    kept, else the whole image.
    """
    tries = (r.shape[1] - 2) // 2
    area = scale[0] + r[:, :tries] * (scale[1] - scale[0])
    aspect = np.exp(np.log(ratio[0]) + r[:, tries:2 * tries] * (np.log(ratio[1]) - np.log(ratio[0])))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    ok = (w <= 1) & (h <= 1)
    first, rows, fits = np.argmax(ok, axis=1), np.arange(len(r)), ok.any(1)
    w, h = np.where(fits, w[rows, first], 1.0), np.where(fits, h[rows, first], 1.0)
    x0, y0 = r[:, -2] * (1 - w), r[:, -1] * (1 - h)
    return np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.float32)


CROP_STREAMS = 2 * 10 + 2


def batch_draws(spec: AugSpec, positions: np.ndarray, seed: int, epoch: int) -> list[dict]:
    """Every random number one batch needs, per view, for samples at these epoch positions."""
    k = spec.k
    per_view = CROP_STREAMS + 1 + 4 * k
    r = uniforms(seed, epoch, np.asarray(positions), per_view * spec.views)
    views = []
    for v in range(spec.views):
        rv = r[:, v * per_view:(v + 1) * per_view]
        d = {"flip": (rv[:, CROP_STREAMS] < 0.5).astype(np.int32) * int(spec.train)}  # eval: no flip
        if spec.train:
            d["box"] = crop_boxes(rv[:, :CROP_STREAMS], spec.crop_scale)
        if spec.randaug:
            ra = rv[:, CROP_STREAMS + 1:].T.reshape(4, k, -1)
            d["op"] = np.minimum((ra[0] * len(OPS)).astype(np.int32), len(OPS) - 1)
            d["u"] = ra[1].astype(np.float32)
            d["zeta"] = ra[2].astype(np.float32)
            d["sign"] = np.where(ra[3] < 0.5, -1.0, 1.0).astype(np.float32)
        views.append(d)
    return views


def eq10(op, u, zeta, m):
    """eq. 10 for one slot: the drawn op is applied when u < M (probability M) at strength
    M * zeta; a skipped op becomes index 0 (identity). Vectorised; scalars work too. The DALI
    feed (`plan_slots`) and the PIL reference both call this."""
    return np.where(u < m, op, 0), m * zeta


def plan_slots(spec: AugSpec, m: np.ndarray, d: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """eq. 10 for one view, as per-slot DALI inputs (leaf, v, matrix)."""
    plans = []
    for j in range(spec.k):
        op, strength = eq10(d["op"][j], d["u"][j], d["zeta"][j], m)
        plans.append(slot_inputs(op, strength, d["sign"][j], spec.res))
    return plans


def dispatch(lo: int, hi: int, leaf, x, p):
    """Run LEAVES[leaf] per sample by binary splitting on the leaf index (DALI conditionals)."""
    if lo == hi:
        return LEAVES[lo](x, p)
    mid = (lo + hi) // 2
    if leaf <= mid:
        out = dispatch(lo, mid, leaf, x, p)
    else:
        out = dispatch(mid + 1, hi, leaf, x, p)
    return out


def apply_slot(leaf, x, p):
    """Identity (a skipped or drawn no-op, probability ~ 1 - M) is tested first, so most samples
    leave after one split instead of descending the whole tree."""
    if leaf == 0:
        out = x
    else:
        out = dispatch(1, len(LEAVES) - 1, leaf, x, p)
    return out


def build_pipeline(spec: AugSpec, batch_size: int, *, device_id: int | None = None, threads: int = 2,
                   seed: int = 0):
    """One graph; the views of a batch travel through it side by side as one batch of views * B.

    Folding views into the batch halves the number of operator launches per image, which is what
    bounds DALI at small resolutions (see docs/benchmarks.md, "What limits the loader ratio").
    """
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        if not (e.name or "").startswith("nvidia"):
            raise  # DALI is there but lacks one of its own dependencies: say which
        from ecvl_fast import EcvlError

        raise EcvlError("the data path needs NVIDIA DALI for your CUDA major: pip install 'ecvl-fast[dali-cuda13]' "
                        "(driver for CUDA 13) or 'ecvl-fast[dali-cuda12]' (CUDA 12; nvidia-smi shows the version)") from None

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size * spec.views, num_threads=threads, device_id=device_id, seed=seed,
                  enable_conditionals=spec.randaug, exec_async=False, exec_pipelined=False,
                  prefetch_queue_depth=1)
    def pipe():
        x = fn.external_source(name="images", device="gpu" if gpu else "cpu", layout="HWC")
        if spec.train:
            start, end = fn.external_source(name="roi_start"), fn.external_source(name="roi_end")
            x = fn.resize(x, size=[spec.res, spec.res], roi_start=start, roi_end=end,
                          roi_relative=True, antialias=True)
        else:
            x = fn.resize(x, resize_shorter=spec.res, antialias=True)
        for j in range(spec.k if spec.randaug else 0):
            leaf, p = fn.external_source(name=f"leaf{j}"), fn.external_source(name=f"p{j}")
            x = apply_slot(leaf, x, p)
        # Flip last, fused into the normalisation pass. Every op's parameter distribution is
        # mirror-symmetric (signed shears, translations, rotations), so flip-then-RA and
        # RA-then-flip give the same distribution of views.
        flip = fn.external_source(name="flip")
        return fn.crop_mirror_normalize(x, crop=(spec.res, spec.res), mirror=flip, mean=CLIP_MEAN,
                                        std=CLIP_STD, dtype=types.FLOAT, output_layout="HWC")

    p = pipe()
    p.build()
    return p


def feed(p, spec: AugSpec, images, m: np.ndarray, draws: list[dict]) -> None:
    """Feed one batch: images (NHWC uint8; a CUDA tensor on GPU), M per sample, the draws per view.
    Views are stacked along the batch: rows [v*B, (v+1)*B) are view v."""
    import torch

    m = np.asarray(m, np.float32)
    views = len(draws)
    if views > 1:
        images = torch.cat([images] * views) if isinstance(images, torch.Tensor) else np.concatenate([images] * views)
    if isinstance(images, torch.Tensor) and images.is_cuda:
        # DALI copies the batch on the stream we name and orders its work after that copy, so the
        # host-to-device transfer that produced `images` on the same stream comes first (no sync).
        p.feed_input("images", images, layout="HWC", cuda_stream=torch.cuda.current_stream().cuda_stream)
    else:
        p.feed_input("images", images, layout="HWC")
    cat = lambda key: np.concatenate([d[key] for d in draws])  # noqa: E731
    p.feed_input("flip", cat("flip"))
    if spec.train:
        box = cat("box")
        p.feed_input("roi_start", np.ascontiguousarray(box[:, :2]))
        p.feed_input("roi_end", np.ascontiguousarray(box[:, 2:]))
    if spec.randaug:
        plans = [plan_slots(spec, m, d) for d in draws]
        for j in range(spec.k):
            p.feed_input(f"leaf{j}", np.concatenate([plan[j][0] for plan in plans]))
            p.feed_input(f"p{j}", np.concatenate([plan[j][2] for plan in plans]))


class AugmentedLoader:
    """FFCV batches through the DALI pipeline: yields ([view NCHW channels_last], labels, indices),
    all three on `device` (bf16 views on GPU), so the step never copies or syncs for its inputs.

    `magnitudes` is the momentum bank (anything with `.magnitudes()` -> M per sample). It is read
    once at the start of each epoch, so values the kernels wrote at the end of epoch t are used
    throughout epoch t+1, and no per-batch device-to-host copy sits on the step's path.

    With `prefetch` > 0 a feeder thread builds up to that many batches ahead of the step. M is
    fixed for the epoch and every draw is a function of (seed, epoch, position), so the batches
    are exactly those of the synchronous loader; the feeder never runs past the epoch's end.

    On GPU the feeder owns a CUDA stream, so its copies and DALI's work overlap the step (see
    `_gpu_batch`); each batch carries an event the consumer's stream waits on (`_handed_over`).
    """

    def __init__(self, loader, spec: AugSpec, magnitudes=None, *, device="cpu", seed: int = 0, rank: int = 0,
                 world: int = 1, threads: int = 2, prefetch: int = 2, dtype=None):
        import torch

        self.loader, self.spec, self.bank, self.seed, self.rank, self.world = loader, spec, magnitudes, seed, rank, world
        self.prefetch = prefetch
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # High priority: the next batch's augmentation is scheduled ahead of the step's queued kernels
        self.stream = torch.cuda.Stream(self.device, priority=-1) if gpu else None
        self.dtype = dtype or (torch.bfloat16 if gpu else torch.float32)  # the step's compute dtype (on GPU)
        self.pipe = build_pipeline(spec, loader.batch_size, device_id=self.device.index if gpu else None,
                                   threads=threads, seed=seed)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def resume_at(self, epoch: int, step: int) -> None:
        """Start at batch `step` of `epoch`: the batches and views are those the uninterrupted run
        had there (every draw is a function of the position in the epoch)."""
        self.loader.next_epoch, self.loader.resume_at = epoch, (epoch, step)

    def __iter__(self):
        m = self.bank.magnitudes() if self.bank is not None and self.spec.randaug else None
        at = getattr(self.loader, "resume_at", None)
        first = at[1] if at is not None and at[0] == self.loader.next_epoch else 0
        batches = self._batches(self.loader.next_epoch, m, first)
        return _handed_over(prefetched(batches, self.prefetch) if self.prefetch > 0 else batches)

    def _batches(self, epoch: int, m, first: int = 0):
        """(views, labels, indices, ready event or None) per batch from batch `first` of the epoch;
        runs in the feeder thread."""
        import torch

        gpu = self.device.type == "cuda"
        if gpu:  # a new thread starts on cuda:0; under torchrun rank r works on cuda:r
            torch.cuda.set_device(self.device)
        b, previous = self.loader.batch_size, None
        for step, (images, labels, idx) in enumerate(self.loader, first):
            local = step * b + np.arange(len(labels))
            draws = batch_draws(self.spec, local * self.world + self.rank, self.seed, epoch)
            mi = m[idx.numpy()] if m is not None else np.zeros(len(idx), np.float32)
            if gpu:
                if previous is not None:
                    previous.synchronize()  # the last output is copied out before DALI reuses its buffer
                batch = self._gpu_batch(images, labels, idx, mi, draws)
                previous = batch[3]
                yield batch
            else:
                feed(self.pipe, self.spec, images.numpy(), mi, draws)
                views = list(_to_torch(self.pipe.run()[0], self.device).chunk(self.spec.views))
                yield views, labels.to(torch.int64).clone(), idx.to(torch.int64).clone(), None

    def _gpu_batch(self, images, labels, idx, mi, draws):
        """One batch on the feeder's stream: host-to-device copies, DALI, the copy out of DALI's
        buffer into bf16. Returns before the GPU work is done, except for the host copies:

        ffcv yields pinned slots it refills as soon as we take a later batch, and a non-blocking
        copy from pinned memory reads it whenever the stream gets there. So we wait for our copies
        (microseconds for a batch) before returning to ffcv for the next batch.
        """
        import torch

        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True)
            y = _pinned(labels).to(self.device, non_blocking=True)
            i = _pinned(idx).to(self.device, non_blocking=True)
            copied = torch.cuda.Event(blocking=True)  # its wait sleeps instead of spinning a core
            copied.record(self.stream)
            feed(self.pipe, self.spec, x, mi, draws)  # DALI copies `x` on this (current) stream
            views = list(_to_torch(self.pipe.run()[0], self.device, self.stream, self.dtype).chunk(self.spec.views))
            y, i = y.to(torch.int64), i.to(torch.int64)
            ready = torch.cuda.Event(blocking=True)
            ready.record(self.stream)
        copied.synchronize()
        return views, y, i, ready


def _pinned(t):
    return t if t.is_pinned() else t.pin_memory()


def _handed_over(batches):
    """The consumer's side: on GPU, its current stream waits for the feeder's event, and every
    tensor made on the feeder's stream is marked as used on the consumer's (`record_stream`), so
    the caching allocator does not hand its memory back to the feeder while the step reads it."""
    import torch

    for views, labels, idx, ready in batches:
        if ready is not None:
            stream = torch.cuda.current_stream(views[0].device)
            stream.wait_event(ready)
            for t in (*views, labels, idx):
                t.record_stream(stream)
        yield views, labels, idx


def prefetched(batches, depth: int):
    """Run the generator `batches` in a feeder thread, at most `depth` items ahead of the consumer.
    Errors surface in the consumer; leaving early stops and joins the feeder."""
    import queue
    import threading

    q, stop, end = queue.Queue(maxsize=depth), threading.Event(), object()

    def feeder():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            q.put((end, None))
        except BaseException as e:  # handed to the consumer
            q.put((end, e))
        finally:
            batches.close()

    thread = threading.Thread(target=feeder, daemon=True, name="ecvl-feeder")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is end:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _to_torch(tl, device, stream=None, dtype=None):
    """DALI NHWC float output -> NCHW channels_last (a free permute); `dtype` on GPU. Always a copy
    in memory torch owns: DALI releases its one output buffer at the next run (prefetch depth 1).

    On GPU the copy goes through DALI's `feed_ndarray` on `stream`, which orders it after DALI's
    own work on its internal stream, then converts to the compute dtype on the same stream."""
    import torch

    if device.type != "cuda":
        return torch.from_dlpack(tl.as_tensor()).clone().permute(0, 3, 1, 2)
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    feed_ndarray(t, out, cuda_stream=stream)
    return out.to(dtype or torch.bfloat16).permute(0, 3, 1, 2)
