"""Shared by the pipeline tests and their GPU twins: test images, one batch through the pipeline,
and one op through its DALI leaf, on the CPU (`device_id=None`) or a GPU."""

import numpy as np
import torch

from ecvl_fast.loaders.dali_graph import build_pipeline, feed
from ecvl_fast.loaders.randaug_ops import LEAVES, OP_INDEX, slot_inputs
from ecvl_fast.bench.synthetic import fake_images


def images(n=32, size=40, seed=0):
    """Half smooth gradients, half uniform noise (flat and busy histograms for the tonal ops)."""
    rng = np.random.default_rng(seed)
    half = n // 2
    return np.concatenate(
        [fake_images(half, seed, size), rng.integers(0, 256, (n - half, size, size, 3), dtype=np.uint8)]
    )


def run(spec, imgs, m, draws, device_id=None):
    """Views as a list of NHWC float arrays."""
    p = build_pipeline(spec, len(imgs), device_id=device_id)
    feed(p, spec, imgs, m, draws)
    out = p.run()[0]
    out = np.array(out.as_cpu().as_tensor() if device_id is not None else out.as_tensor())
    return np.split(out, spec.views)


def run_leaf(op_name, imgs, strengths, signs, device_id=None):
    """One op forced on every sample through its DALI leaf, with the parameters `slot_inputs`
    feeds in training (the per-sample block stays a CPU argument input on GPU too)."""
    from nvidia.dali import fn, pipeline_def

    n, size = len(imgs), imgs.shape[1]
    leaf, v, mat = slot_inputs(
        np.full(n, OP_INDEX[op_name]), np.asarray(strengths, np.float32), np.asarray(signs, np.float32), size
    )
    gpu = device_id is not None

    @pipeline_def(batch_size=n, num_threads=1, device_id=device_id)
    def single():
        x, block = fn.external_source(name="x", device="gpu" if gpu else "cpu"), fn.external_source(name="p")
        return LEAVES[leaf[0]](x, block), block

    p = single()
    p.build()
    p.feed_input("x", torch.from_numpy(imgs).cuda() if gpu else list(imgs), layout="HWC")
    p.feed_input("p", mat)
    out = p.run()[0]
    return np.array(out.as_cpu().as_tensor() if gpu else out.as_tensor())
