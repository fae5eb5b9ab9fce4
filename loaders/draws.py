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
    # LIFT+'s minimalist augmentation (Shi et al., arXiv 2504.13282; code shijxcs/LIFT-plus, utils/transforms.py)
    square: bool = False  # square crops (pixel aspect 1), as LIFT+'s MinimalistRandomResizedCrop
    flip: bool = True  # a random horizontal flip (training only)
    interp: str = "linear"  # the resize filter: "linear" or "cubic" (LIFT+'s bicubic)
    schedule: str = "constant"  # the crop's minimum scale: "constant" (crop_scale[0]) or "lift+" (rising, `min_scale`)
    epochs: int = 1  # the epochs the schedule spans
    crop_m: float = 0.0  # the memory-driven crop: each sample's minimum scale moved by crop_m * (M_i - mean M)
    crop_shuffle: bool = False  # its no-memory control: the same minimum scales, dealt to samples at random
    out: str = "float32"  # the graph's output: "float32", or "float16" (half the bytes, for a 16-bit step)


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


def min_scale(spec: AugSpec, epoch: int) -> float:
    """The crop's minimum area fraction at `epoch` (0-based). "lift+": LIFT+'s convex schedule,
    s = 1 - sqrt(1 - t^2) with t = epoch / (epochs - 1), mapped onto [crop_scale[0], 1] (its
    MinimalistRandomResizedCrop.get_min_scale): the crops grow gentler as training goes on, and the
    last epoch sees whole (square) images."""
    lo = spec.crop_scale[0]
    if spec.schedule == "constant":
        return lo
    t = min(1.0, epoch / max(1, spec.epochs - 1))
    return lo + (1 - np.sqrt(1 - t * t)) * (spec.crop_scale[1] - lo)


MIN_AREA = 0.01  # the memory-driven crop never asks for less than 1% of an image


def sample_min_scales(spec: AugSpec, epoch: int, m: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N] each sample's minimum crop scale for the epoch, from M over the whole train set: the
    schedule's value moved by crop_m * (M_i - mean M), so that the schedule stays the population's
    mean (before clipping to [MIN_AREA, 1]); crop_m > 0 gives a high-M sample a gentler crop.
    `crop_shuffle`: the same values dealt to samples by a permutation keyed on (seed, epoch), the
    no-memory control. Without crop_m, the schedule's value for every sample."""
    base = min_scale(spec, epoch)
    m = np.asarray(m, np.float64)
    if spec.crop_m == 0 or len(m) == 0:
        return np.full(len(m), base)
    s = np.clip(base + spec.crop_m * (m - m.mean()), MIN_AREA, spec.crop_scale[1])
    if spec.crop_shuffle:
        keys = uniforms(seed, epoch, np.arange(len(s)) + 2**40, 1)[:, 0]  # past any epoch's positions
        s = s[np.argsort(keys, kind="stable")]
    return s


def square_boxes(r: np.ndarray, lo, hi: float, aspect=None):
    """LIFT+'s square crops (MinimalistRandomResizedCrop.get_params), from uniforms r[:, 3]: area
    fraction ~ U(lo, hi), both capped at the largest square's share min(h, w)^2 / (h w); the side
    sqrt(area) in pixels, placed uniformly. `lo` may be per sample."""
    a = np.ones(len(r)) if aspect is None else np.asarray(aspect, np.float64).reshape(-1)
    cap = np.minimum(a, 1 / a)  # the largest square's share of the image
    lo, hi = np.minimum(lo, cap), np.minimum(hi, cap)
    area = lo + r[:, 0] * (hi - lo)
    w, h = np.minimum(1.0, np.sqrt(area / a)), np.minimum(1.0, np.sqrt(area * a))
    x0, y0 = r[:, -2] * (1 - w), r[:, -1] * (1 - h)
    return np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.float32)


def crop_boxes(r: np.ndarray, scale, ratio=(3 / 4, 4 / 3), aspect=None):
    """Random-resized-crop boxes (y0, x0, y1, x1), relative to each image, from uniforms r[:, 2T+2].

    As torchvision's RandomResizedCrop on the whole image: area fraction ~ U(scale), log aspect
    (in pixels) ~ U(log ratio); the first of T candidates that fits is kept, else the whole image.
    `aspect`: each image's width / height (default square); a crop of pixel aspect q on an image of
    aspect a spans sqrt(s q / a) of its width and sqrt(s a / q) of its height.
    """
    tries = (r.shape[1] - 2) // 2
    a = np.ones((len(r), 1)) if aspect is None else np.asarray(aspect, np.float64).reshape(-1, 1)
    lo = np.asarray(scale[0], np.float64).reshape(-1, 1)
    area = lo + r[:, :tries] * (scale[1] - lo)
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
    spec: AugSpec,
    positions: np.ndarray,
    seed: int,
    epoch: int,
    sizes: np.ndarray | None = None,
    side: int = 1,
    lo: np.ndarray | None = None,
) -> list[dict]:
    """Every random number one batch needs, per view, for samples at these epoch positions, and
    each view's crop box on the canvas. `sizes`: each image's (height, width) on the `side`-pixel
    canvas (loaders/canvas.py); default: every image fills it. `lo`: each sample's minimum crop
    scale (`sample_min_scales`); default: the schedule's value at `epoch`."""
    sizes = np.full((len(positions), 2), side) if sizes is None else np.asarray(sizes)
    aspect = sizes[:, 1] / sizes[:, 0]
    k = spec.k
    per_view = CROP_STREAMS + 1 + 4 * k
    r = uniforms(seed, epoch, np.asarray(positions), per_view * spec.views)
    views = []
    for v in range(spec.views):
        rv = r[:, v * per_view : (v + 1) * per_view]
        d = {"flip": (rv[:, CROP_STREAMS] < 0.5).astype(np.int32) * int(spec.train and spec.flip)}  # eval: none
        if spec.train:
            low = min_scale(spec, epoch) if lo is None else lo
            if spec.square:
                box = square_boxes(rv[:, :CROP_STREAMS], low, spec.crop_scale[1], aspect=aspect)
            else:
                box = crop_boxes(rv[:, :CROP_STREAMS], (low, spec.crop_scale[1]), aspect=aspect)
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
