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
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's "L" conversion
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
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate)."""
    return _u8(degenerate + factor * (_f(x) - degenerate))


def _warp(x, a, b, c, d, e, f):
    """Affine warp with PIL's convention: output (x, y) samples input (a x + b y + c, d x + e y + f)."""
    fn, _, types = _d()
    m = fn.stack(fn.stack(a, b, c), fn.stack(d, e, f))
    return fn.warp_affine(x, matrix=m, fill_value=FILL, interp_type=types.INTERP_NN, inverse_map=True)


def _consts(v):
    """0 and 1 shaped like the per-sample parameter v (so they stack with it)."""
    return v * 0.0, v * 0.0 + 1.0


def d_identity(x, v):
    return x


def d_auto_contrast(x, v):
    fn, math, _ = _d()
    lo = _f(fn.reductions.min(x, axes=(0, 1), keep_dims=True))
    hi = _f(fn.reductions.max(x, axes=(0, 1), keep_dims=True))
    has_range = _f(hi > lo)
    scale = 255.0 / math.max(hi - lo, 1.0)
    xf = _f(x)
    return _u8(has_range * (xf - lo) * scale + (1.0 - has_range) * xf)


def d_equalize(x, v):
    fn, _, _ = _d()
    return fn.equalize(x)


def d_rotate(x, v):
    fn, _, types = _d()
    return fn.rotate(x, angle=v, fill_value=FILL, keep_size=True, interp_type=types.INTERP_NN)


def d_solarize(x, v):
    xf = _f(x)
    keep = _f(xf < v)
    return _u8(keep * xf + (1.0 - keep) * (255.0 - xf))


def d_posterize(x, v):
    _, math, _ = _d()
    q = math.pow(2.0, 8.0 - math.floor(v + 0.5))
    return _u8(math.floor(_f(x) / q) * q)


def d_color(x, v):
    return _blend(_gray(x), x, 1.0 + v)


def d_contrast(x, v):
    fn, math, _ = _d()
    mean = math.floor(fn.reductions.mean(_gray(x), axes=(0, 1, 2)) + 0.5)
    return _blend(mean, x, 1.0 + v)


def d_brightness(x, v):
    return _u8(_f(x) * (1.0 + v))


def d_sharpness(x, v):
    fn, _, _ = _d()
    _, _, types = _d()
    smooth = _f(fn.filter(x, types.Constant(SMOOTH), border="clamp"))
    return _blend(smooth, x, 1.0 + v)


def d_shear_x(x, v):
    z, o = _consts(v)
    return _warp(x, o, v, z, z, o, z)


def d_shear_y(x, v):
    z, o = _consts(v)
    return _warp(x, o, z, z, v, o, z)


def d_translate_x(x, v):
    fn, _, types = _d()
    z, o = _consts(v)
    w = fn.cast(x.shape(), dtype=types.FLOAT)[1]
    return _warp(x, o, z, v * w, z, o, z)


def d_translate_y(x, v):
    fn, _, types = _d()
    z, o = _consts(v)
    h = fn.cast(x.shape(), dtype=types.FLOAT)[0]
    return _warp(x, o, z, z, z, o, v * h)


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
OPS = [
    Op("identity", d_identity, PIL_OPS["identity"]),
    Op("auto_contrast", d_auto_contrast, PIL_OPS["auto_contrast"]),
    Op("equalize", d_equalize, PIL_OPS["equalize"]),
    Op("rotate", d_rotate, PIL_OPS["rotate"], 0.0, 30.0, signed=True),
    Op("solarize", d_solarize, PIL_OPS["solarize"], 256.0, 0.0),
    Op("color", d_color, PIL_OPS["color"], 0.0, 0.9, signed=True),
    Op("posterize", d_posterize, PIL_OPS["posterize"], 8.0, 4.0),
    Op("contrast", d_contrast, PIL_OPS["contrast"], 0.0, 0.9, signed=True),
    Op("brightness", d_brightness, PIL_OPS["brightness"], 0.0, 0.9, signed=True),
    Op("sharpness", d_sharpness, PIL_OPS["sharpness"], 0.0, 0.9, signed=True),
    Op("shear_x", d_shear_x, PIL_OPS["shear_x"], 0.0, 0.3, signed=True),
    Op("shear_y", d_shear_y, PIL_OPS["shear_y"], 0.0, 0.3, signed=True),
    Op("translate_x", d_translate_x, PIL_OPS["translate_x"], 0.0, 150 / 331, signed=True),
    Op("translate_y", d_translate_y, PIL_OPS["translate_y"], 0.0, 150 / 331, signed=True),
]
OP_INDEX = {op.name: i for i, op in enumerate(OPS)}
