"""Every random number of the memory-driven RandAugment, and eq. 10.

All randomness is a hash of (seed, epoch, position in the epoch), drawn in numpy and fed to DALI
with the batch, so an epoch is reproducible, resumable, identical under DDP, and comparable
sample-by-sample with the PIL reference.
Per sample and slot j < k: an op index, u_j, zeta_j and a sign; the op is applied when
u_j < M_i (probability M_i) at strength M_i * zeta_j. A skipped op is dispatched as index 0
(identity), so each slot needs one dispatch and no separate "apply?" branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecvl_fast.loaders.randaug_ops import OPS, slot_inputs


@dataclass(frozen=True)
class AugSpec:
    res: int = 32
    train: bool = True
    views: int = 1
    k: int = 2  # RandAugment ops per sample
    randaug: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)  # BALLAD's RandomResizedCrop scale
    eval_resize: int = 0  # evaluation: Resize(S) before CenterCrop(res) (or FiveCrop(res), views 5); 0 = res


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
    return (_splitmix(ctr ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(r: np.ndarray, scale, ratio=(3 / 4, 4 / 3), aspect=None):
    """Random-resized-crop boxes (y0, x0, y1, x1), relative to each image, from uniforms r[:, 2T+2].

    As torchvision's RandomResizedCrop on the whole image: area fraction ~ U(scale), log aspect
    (in pixels) ~ U(log ratio); the first of T candidates that fits is kept, else the whole image.
    `aspect`: each image's width / height (default square); a crop of pixel aspect q on an image of
    aspect a spans sqrt(s q / a) of its width and sqrt(s a / q) of its height.
    """
    tries = (r.shape[1] - 2) // 2
    a = np.ones((len(r), 1)) if aspect is None else np.asarray(aspect, np.float64).reshape(-1, 1)
    area = scale[0] + r[:, :tries] * (scale[1] - scale[0])
    q = np.exp(np.log(ratio[0]) + r[:, tries : 2 * tries] * (np.log(ratio[1]) - np.log(ratio[0])))
    w, h = np.sqrt(area * q / a), np.sqrt(area * a / q)
    ok = (w <= 1) & (h <= 1)
    first, rows, fits = np.argmax(ok, axis=1), np.arange(len(r)), ok.any(1)
    w, h = np.where(fits, w[rows, first], 1.0), np.where(fits, h[rows, first], 1.0)
    x0, y0 = r[:, -2] * (1 - w), r[:, -1] * (1 - h)
    return np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.float32)


def centre_boxes(heights, widths, resize: int, res: int) -> np.ndarray:
    """Evaluation's crop, relative to each image: torchvision's Resize(resize) (the short side to
    `resize`, the long one to int(resize * long / short)) then CenterCrop(res), its offsets rounded
    as torchvision rounds them, so the crop falls on the same pixels where the image's short side
    is `resize` (on the canvas, every image up to 4:3 whose short side reached it)."""
    h, w = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    lo = np.minimum(h, w)
    hs = np.where(h <= w, resize, np.floor(resize * h / lo))
    ws = np.where(w <= h, resize, np.floor(resize * w / lo))
    top, left = np.round((hs - res) / 2), np.round((ws - res) / 2)
    return np.stack([top / hs, left / ws, (top + res) / hs, (left + res) / ws], 1).astype(np.float32)


def five_crop_boxes(heights, widths, resize: int, res: int) -> np.ndarray:
    """[5, N, 4]: LIFT's test-time crops, torchvision's Resize(resize) then FiveCrop(res), in its
    order (top-left, top-right, bottom-left, bottom-right, centre), relative to each image."""
    h, w = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    lo = np.minimum(h, w)
    hs = np.where(h <= w, resize, np.floor(resize * h / lo))
    ws = np.where(w <= h, resize, np.floor(resize * w / lo))
    zero = np.zeros_like(hs)
    corners = [
        (zero, zero),
        (zero, ws - res),
        (hs - res, zero),
        (hs - res, ws - res),
        (np.round((hs - res) / 2), np.round((ws - res) / 2)),
    ]
    return np.stack(
        [np.stack([t / hs, left / ws, (t + res) / hs, (left + res) / ws], 1) for t, left in corners]
    ).astype(np.float32)


def on_canvas(box: np.ndarray, sizes: np.ndarray, side: int) -> np.ndarray:
    """Boxes relative to each image -> relative to the square canvas whose top-left it fills."""
    share = np.asarray(sizes, np.float64) / side
    return (box * np.concatenate([share, share], 1)).astype(np.float32)


CROP_STREAMS = 2 * 10 + 2


def batch_draws(
    spec: AugSpec, positions: np.ndarray, seed: int, epoch: int, sizes: np.ndarray | None = None, side: int = 1
) -> list[dict]:
    """Every random number one batch needs, per view, for samples at these epoch positions, and
    each view's crop box on the canvas. `sizes`: each image's (height, width) on the `side`-pixel
    canvas (loaders/canvas.py); default: every image fills it."""
    sizes = np.full((len(positions), 2), side) if sizes is None else np.asarray(sizes)
    aspect = sizes[:, 1] / sizes[:, 0]
    k = spec.k
    per_view = CROP_STREAMS + 1 + 4 * k
    r = uniforms(seed, epoch, np.asarray(positions), per_view * spec.views)
    views = []
    for v in range(spec.views):
        rv = r[:, v * per_view : (v + 1) * per_view]
        d = {"flip": (rv[:, CROP_STREAMS] < 0.5).astype(np.int32) * int(spec.train)}  # eval: no flip
        if spec.train:
            box = crop_boxes(rv[:, :CROP_STREAMS], spec.crop_scale, aspect=aspect)
        elif spec.views == 1:
            box = centre_boxes(sizes[:, 0], sizes[:, 1], spec.eval_resize or spec.res, spec.res)
        else:  # test-time ensembling: view v is LIFT's crop v
            box = five_crop_boxes(sizes[:, 0], sizes[:, 1], spec.eval_resize or spec.res, spec.res)[v]
        d["box"] = on_canvas(box, sizes, side)
        if spec.randaug:
            ra = rv[:, CROP_STREAMS + 1 :].T.reshape(4, k, -1)
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
