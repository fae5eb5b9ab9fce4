"""The RandAugment op set, each op declared once with its magnitude range and sign.

Every op has two implementations with the same semantics:
- `dali(x, v)`: a DALI graph on uint8 HWC samples (CPU or GPU), v a per-sample parameter;
- `pil(img, v)`: the PIL reference used by the torchvision peer and the tests.

The parameter for strength s in [0, 1] is `lo + s * (hi - lo)`, negated when the op is signed
and the drawn sign is -1 (eq. 10 draws s = M_i * zeta). Ranges follow RandAugment (Cubuk et al.
2020, as in torchvision's `_augmentation_space`): rotate 30 deg, shear 0.3, translate 150/331 of
the side, enhance factors 1 +/- 0.9, posterize 8..4 bits, solarize threshold 256..0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = 128
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH


@dataclass(frozen=True)
class Op:
    name: str
    dali: Callable
    pil: Callable
    lo: float = 0.0
    hi: float = 0.0
    signed: bool = False

    def param(self, strength, sign):
        """Works on floats and on DALI DataNodes alike."""
        v = self.lo + strength * (self.hi - self.lo)
        return v * sign if self.signed else v


# --- DALI implementations (imported lazily: this module must not pull DALI in on import) ---


def _d():
    from nvidia.dali import fn, math, types

    return fn, math, types


def _f(x):
    fn, _, types = _d()
    return fn.cast(x, dtype=types.FLOAT)


def _u8(x):
    fn, _, types = _d()
    return fn.cast(x, dtype=types.UINT8)  # saturating, rounds to nearest


def _gray(x):
    fn, _, types = _d()
    return _f(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))


def _blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), written so that uint8 x is
    promoted by the float factor (no separate cast pass: DALI CPU time is per operator pass)."""
    return _u8(x * factor + degenerate * (1.0 - factor))


def d_affine(x, p):
    """Rotate, shear and translate in one warp: `p` (2x3, computed in numpy by `affine_matrix`)
    maps an output pixel to the input pixel it samples, PIL's AFFINE convention."""
    fn, _, types = _d()
    return fn.warp_affine(x, matrix=p, fill_value=FILL, interp_type=types.INTERP_NN, inverse_map=True)


def affine_matrices(op_idx: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """[n, 2, 3] inverse-map matrices as PIL builds them (rotate: CCW about the centre); identity
    for non-geometric ops."""
    mat = np.tile(np.eye(2, 3, dtype=np.float32), (len(op_idx), 1, 1))
    rot = op_idx == OP_INDEX["rotate"]
    t, c = -np.radians(v[rot]), size / 2.0
    cos, sin = np.cos(t), np.sin(t)
    mat[rot] = np.stack(
        [np.stack([cos, sin, c - c * cos - c * sin], 1), np.stack([-sin, cos, c + c * sin - c * cos], 1)], 1
    )
    for name, (row, col), scale in (
        ("shear_x", (0, 1), 1.0),
        ("shear_y", (1, 0), 1.0),
        ("translate_x", (0, 2), size),
        ("translate_y", (1, 2), size),
    ):
        sel = op_idx == OP_INDEX[name]
        mat[sel, row, col] = v[sel] * scale
    return mat


def _param(p):
    """A leaf's scalar parameter: non-geometric ops carry it in p[0, 0] of the per-sample 2x3
    block (geometric ops carry their matrix), so one input travels down the dispatch tree. The
    enhance ops' is their factor 1 + v, computed on the host: one DALI op less per slot each."""
    return p[0, 0]


def d_identity(x, p):
    return x


def d_auto_contrast(x, p):
    """Stretch each channel to 0..255 (a flat channel stays as is)."""
    fn, math, types = _d()
    lo = _f(fn.reductions.min(x, axes=(0, 1), keep_dims=True))
    hi = _f(fn.reductions.max(x, axes=(0, 1), keep_dims=True))
    flat = _f(hi == lo)
    if x.device == "cpu":  # one fused pass; its mean/stddev arguments must live on the host
        return fn.normalize(
            x, mean=lo * (1.0 - flat), stddev=(hi - lo) / 255.0 + flat * (1.0 - (hi - lo) / 255.0), dtype=types.UINT8
        )
    scale = 255.0 / (hi - lo + flat)
    return _u8((x - lo) * (scale + flat * (1.0 - scale)) + lo * flat)


def d_equalize(x, p):
    fn, _, _ = _d()
    return fn.equalize(x)


def d_solarize(x, p):
    v = _param(p)
    _, _, types = _d()
    return x ^ ((x >= v) * types.Constant(255, dtype=types.UINT8))  # x ^ 255 == 255 - x on uint8


def d_posterize(x, p):
    """The parameter arrives as the bit mask (see `slot_inputs`): keep the top round(bits) bits."""
    return x & _u8(_param(p))


def d_color(x, p):
    return _blend(_gray(x), x, _param(p))  # the factor 1 + v, computed on the host (`slot_inputs`)


def d_contrast(x, p):
    factor = _param(p)
    fn, math, _ = _d()
    mean = math.floor(fn.reductions.mean(_gray(x), axes=(0, 1, 2)) + 0.5)
    if x.device == "cpu":  # the fused op takes the centre as an argument, which must live on the host
        return fn.contrast(x, contrast=factor, contrast_center=mean)
    return _blend(mean, x, factor)


def d_brightness(x, p):
    fn, _, _ = _d()
    return fn.brightness(x, brightness=_param(p))  # one fused pass, rounds and saturates


def d_sharpness(x, p):
    fn, _, types = _d()
    smooth = _f(fn.filter(x, types.Constant(SMOOTH), border="clamp"))
    return _blend(smooth, x, _param(p))


# --- PIL reference implementations ---


def _pil_affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=(FILL,) * 3)


PIL_OPS = {
    "identity": lambda img, v: img,
    "auto_contrast": lambda img, v: ImageOps.autocontrast(img),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "rotate": lambda img, v: img.rotate(v, resample=Image.NEAREST, fillcolor=(FILL,) * 3),
    "solarize": lambda img, v: ImageOps.solarize(img, v),
    "posterize": lambda img, v: ImageOps.posterize(img, int(np.floor(v + 0.5))),
    "color": lambda img, v: ImageEnhance.Color(img).enhance(1 + v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(1 + v),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(1 + v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(1 + v),
    "shear_x": lambda img, v: _pil_affine(img, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda img, v: _pil_affine(img, (1, 0, 0, v, 1, 0)),
    "translate_x": lambda img, v: _pil_affine(img, (1, 0, v * img.width, 0, 1, 0)),
    "translate_y": lambda img, v: _pil_affine(img, (1, 0, 0, 0, 1, v * img.height)),
}

# The suite: a plain list. Index 0 must stay identity: a skipped op runs as index 0.
# `leaf` is the DALI graph that runs the op; the five geometric ops share one affine warp.
OPS = [
    Op("identity", d_identity, PIL_OPS["identity"]),
    Op("auto_contrast", d_auto_contrast, PIL_OPS["auto_contrast"]),
    Op("equalize", d_equalize, PIL_OPS["equalize"]),
    Op("rotate", d_affine, PIL_OPS["rotate"], 0.0, 30.0, signed=True),
    Op("solarize", d_solarize, PIL_OPS["solarize"], 256.0, 0.0),
    Op("color", d_color, PIL_OPS["color"], 0.0, 0.9, signed=True),
    Op("posterize", d_posterize, PIL_OPS["posterize"], 8.0, 4.0),
    Op("contrast", d_contrast, PIL_OPS["contrast"], 0.0, 0.9, signed=True),
    Op("brightness", d_brightness, PIL_OPS["brightness"], 0.0, 0.9, signed=True),
    Op("sharpness", d_sharpness, PIL_OPS["sharpness"], 0.0, 0.9, signed=True),
    Op("shear_x", d_affine, PIL_OPS["shear_x"], 0.0, 0.3, signed=True),
    Op("shear_y", d_affine, PIL_OPS["shear_y"], 0.0, 0.3, signed=True),
    Op("translate_x", d_affine, PIL_OPS["translate_x"], 0.0, 150 / 331, signed=True),
    Op("translate_y", d_affine, PIL_OPS["translate_y"], 0.0, 150 / 331, signed=True),
]
OP_INDEX = {op.name: i for i, op in enumerate(OPS)}
LEAVES = list(dict.fromkeys(op.dali for op in OPS))  # distinct DALI graphs, identity first
LEAF_OF_OP = np.asarray([LEAVES.index(op.dali) for op in OPS], np.int32)
GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
ENHANCE = {"color", "contrast", "brightness", "sharpness"}  # PIL's ImageEnhance: the factor 1 + v


LO = np.asarray([op.lo for op in OPS], np.float32)
HI = np.asarray([op.hi for op in OPS], np.float32)
SIGNED = np.asarray([op.signed for op in OPS])


def slot_inputs(op_idx: np.ndarray, strength: np.ndarray, sign: np.ndarray, size: int):
    """Per-sample inputs for one slot: leaf index, parameter v (vectorised `Op.param`), and the
    2x3 block the DALI leaf reads: the affine matrix, or v at [0, 0] (see `_param`)."""
    v = (LO[op_idx] + strength * (HI[op_idx] - LO[op_idx])) * np.where(SIGNED[op_idx], sign, 1.0)
    v = v.astype(np.float32)
    mat = affine_matrices(op_idx, v, size)
    post = op_idx == OP_INDEX["posterize"]
    v[post] = 256 - 2.0 ** (8 - np.floor(v[post] + 0.5))  # the bit mask d_posterize applies
    geometric = np.isin(op_idx, [OP_INDEX[g] for g in GEOMETRIC])
    mat[~geometric, 0, 0] = v[~geometric]
    enhance = np.isin(op_idx, [OP_INDEX[e] for e in ENHANCE])
    mat[enhance, 0, 0] = np.float32(1.0) + v[enhance]  # in float32, as DALI computed 1.0 + v
    return LEAF_OF_OP[op_idx], v, mat
