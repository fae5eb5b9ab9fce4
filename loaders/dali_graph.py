"""The DALI graph: per-view crop, the memory-driven RandAugment (eq. 10) as per-sample dispatch
over the ops, flip, CLIP normalisation; and how one batch is fed to it.

The same definition runs on CPU (`device_id=None`) and GPU (`device_id=local_rank`, images fed
as CUDA tensors); the per-sample parameters are always CPU argument inputs.
"""

from __future__ import annotations

import numpy as np
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ecvl_fast.loaders.draws import AugSpec, plan_slots
from ecvl_fast.loaders.randaug_ops import LEAVES


CLIP_MEAN = [255 * m for m in OPENAI_DATASET_MEAN]  # CLIP's normalisation on the 0..255 scale
CLIP_STD = [255 * s for s in OPENAI_DATASET_STD]


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


def build_pipeline(
    spec: AugSpec, batch_size: int, *, device_id: int | None = None, threads: int = 2, seed: int = 0, queue: int = 1
):
    """One graph; the views of a batch travel through it side by side as one batch of views * B.

    Folding views into the batch halves the number of operator launches per image, which is what
    bounds DALI at small resolutions (see docs/benchmarks.md, "What limits the loader ratio").
    `queue` > 1: DALI's asynchronous, pipelined executor with that many batches in flight (the loader
    feeds the next batch before it takes this one's output); 1: one batch at a time.
    """
    p = define_pipeline(spec, batch_size, device_id=device_id, threads=threads, seed=seed, queue=queue)
    p.build()
    return p


def define_pipeline(
    spec: AugSpec, batch_size: int, *, device_id: int | None = None, threads: int = 2, seed: int = 0, queue: int = 1
):
    """The graph, not built: no device is needed until it is, so its operators can be counted
    anywhere (`graph_ops`)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        if not (e.name or "").startswith("nvidia"):
            raise  # DALI is there but lacks one of its own dependencies: say which
        from ecvl_fast import EcvlError

        raise EcvlError(
            "the data path needs NVIDIA DALI for your CUDA major: pip install 'ecvl-fast[dali-cuda13]' "
            "(driver for CUDA 13) or 'ecvl-fast[dali-cuda12]' (CUDA 12; nvidia-smi shows the version)"
        ) from None

    gpu = device_id is not None

    @pipeline_def(
        batch_size=batch_size * spec.views,
        num_threads=threads,
        device_id=device_id,
        seed=seed,
        enable_conditionals=spec.randaug,
        exec_async=queue > 1,
        exec_pipelined=queue > 1,
        prefetch_queue_depth=queue,
    )
    def pipe():
        x = fn.external_source(name="images", device="gpu" if gpu else "cpu", layout="HWC")
        # The crop (a random-resized one, or evaluation's centre crop) on the canvas, resized to res:
        # linear (or cubic, spec.interp), antialiased where it shrinks
        start, end = fn.external_source(name="roi_start"), fn.external_source(name="roi_end")
        interp = types.INTERP_CUBIC if spec.interp == "cubic" else types.INTERP_LINEAR
        x = fn.resize(
            x,
            size=[spec.res, spec.res],
            roi_start=start,
            roi_end=end,
            roi_relative=True,
            antialias=True,
            interp_type=interp,
        )
        for j in range(spec.k if spec.randaug else 0):
            leaf, p = fn.external_source(name=f"leaf{j}"), fn.external_source(name=f"p{j}")
            x = apply_slot(leaf, x, p)
        # Flip last, fused into the normalisation pass. Every op's parameter distribution is
        # mirror-symmetric (signed shears, translations, rotations), so flip-then-RA and
        # RA-then-flip give the same distribution of views.
        flip = fn.external_source(name="flip")
        return fn.crop_mirror_normalize(
            x,
            crop=(spec.res, spec.res),
            mirror=flip,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            dtype=types.FLOAT16 if spec.out == "float16" else types.FLOAT,
            output_layout="HWC",
        )

    return pipe()


def graph_ops(p) -> dict[str, int]:
    """The operator instances of a defined pipeline, by where they run: "gpu" and "cpu" compute,
    "splits/merges" (conditionals' re-pointing of samples; they copy nothing), "inputs" (external
    sources, fed from the host each batch), and "host" (every operator DALI runs on the CPU per
    batch: cpu compute, its splits and merges, and the inputs)."""
    p._build_graph()
    counts = {"gpu": 0, "cpu": 0, "splits/merges": 0, "inputs": 0, "host": 0}
    for op in p._ops:
        name, device = getattr(op._op, "schema_name", type(op._op).__name__), op._op.device
        if name in ("_conditional__Split", "_conditional__Merge"):
            counts["splits/merges"] += 1
        elif name == "ExternalSource":
            counts["inputs"] += 1
        else:
            counts["gpu" if device == "gpu" else "cpu"] += 1
        counts["host"] += device == "cpu"
    return counts


def feed(p, spec: AugSpec, images, m: np.ndarray, draws: list[dict]) -> None:
    """Feed one batch: images (NHWC uint8; a CUDA tensor on GPU), M per sample, the draws per view.
    Views are stacked along the batch: rows [v*B, (v+1)*B) are view v."""
    import torch

    m = np.asarray(m, np.float32)
    views = len(draws)
    if isinstance(images, torch.Tensor) and images.is_cuda:
        # One device copy of the batch per extra view (a single kernel); DALI copies the batch on the
        # stream we name and orders its work after that copy, so the host-to-device transfer that
        # produced `images` on the same stream comes first (no sync).
        images = torch.cat([images] * views) if views > 1 else images
        p.feed_input("images", images, layout="HWC", cuda_stream=torch.cuda.current_stream().cuda_stream)
    elif views > 1:  # on the host, each view's samples point at the same images: DALI's own copy is the only one
        images = np.asarray(images)
        p.feed_input("images", [images[i] for i in range(len(images))] * views, layout="HWC")
    else:
        p.feed_input("images", np.asarray(images), layout="HWC")
    cat = lambda key: np.concatenate([d[key] for d in draws])  # noqa: E731
    p.feed_input("flip", cat("flip"))
    box = cat("box")
    p.feed_input("roi_start", np.ascontiguousarray(box[:, :2]))
    p.feed_input("roi_end", np.ascontiguousarray(box[:, 2:]))
    if spec.randaug:
        plans = [plan_slots(spec, m, d) for d in draws]
        for j in range(spec.k):
            p.feed_input(f"leaf{j}", np.concatenate([plan[j][0] for plan in plans]))
            p.feed_input(f"p{j}", np.concatenate([plan[j][2] for plan in plans]))
