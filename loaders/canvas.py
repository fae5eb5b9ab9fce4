"""The whole stored image, on a fixed-size canvas: what the DALI graph crops from.

ffcv's decoders hand out one shape per batch, and its centre-crop decoder keeps only the centre
square: a 4:3 photo would never show its sides, in training or at test time. This decoder keeps
every pixel instead. An image is shrunk (OpenCV's area filter, as ffcv's decoders do), keeping its
aspect, until its short side is at most evaluation's resize size S and its long side fits the
canvas (4/3 S: a 4:3 photo whole at S), never enlarged, and placed in the canvas's top-left corner; the
rest of the canvas repeats the image's last row and column, so that a resize filter that reaches
past the image's edge sees its edge, not zeros. `sizes` says how much of the canvas each image
fills; the crop boxes (loaders/draws.py) are drawn inside it, so the random-resized crop reaches
every edge, and an image smaller than the canvas (CIFAR's 32 px) is enlarged by DALI's linear
filter, never by the area filter's nearest-neighbour-like upscale.
"""

from __future__ import annotations

import numpy as np


def canvas_side(short: int, largest: int) -> int:
    """The canvas for images whose short side is resized to at most `short` (evaluation's Resize(S)):
    a 4:3 photo fits it whole at that size; never larger than the largest stored image."""
    return max(1, min(-(-short * 4 // 3), int(largest)))  # ceil(4/3 S): 342 for 256


def fitted(heights, widths, short: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The size each image takes on the canvas, never enlarged: its short side resized to `short`
    with torchvision's Resize rule (the long side int(short * long / short_side)), unless its long
    side would pass `side`, which then binds (an image wider than 4:3 then has a short side below
    `short`). The decoder below computes the same, in numba."""
    h, w = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    lo, hi = np.minimum(h, w), np.maximum(h, w)
    by_short = short * hi < side * lo  # short / lo < side / hi, exactly
    new_lo = np.where(by_short, short, np.maximum(1, side * lo // hi))
    new_hi = np.where(by_short, short * hi // lo, side)
    keep = (lo <= short) & (hi <= side)
    new_lo, new_hi = np.where(keep, lo, new_lo), np.where(keep, hi, new_hi)
    tall = h > w
    return np.where(tall, new_hi, new_lo), np.where(tall, new_lo, new_hi)


def sizes(heights, widths, short: int, side: int) -> np.ndarray:
    """[N, 2] int64: each image's (height, width) on the canvas."""
    h, w = fitted(heights, widths, short, side)
    return np.stack([h, w], 1)


def _decode_one(imdecode_c, resize_c):
    """One image onto its canvas: decode (JPEG), fit as `fitted` says (OpenCV's area filter), place
    top-left, repeat the last row and column past its edge. Plain loops: numba compiles them fast,
    and compiles them anew for every loader, as ffcv does its decoders (a compiled function shared
    by loaders running in threads races in numba's dispatcher)."""

    def one(data, jpg, height, width, short, side, temp, small, out):
        if jpg:
            imdecode_c(data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
            image = temp[: 3 * height * width].reshape(height, width, 3)
        else:
            image = data.reshape(height, width, 3)
        lo, hi = min(height, width), max(height, width)
        new_lo, new_hi = lo, hi
        if lo > short or hi > side:  # as `fitted`, in integers
            if short * hi < side * lo:
                new_lo, new_hi = short, short * hi // lo
            else:
                new_lo, new_hi = max(1, side * lo // hi), side
        h, w = (new_hi, new_lo) if height > width else (new_lo, new_hi)
        src = image
        if new_lo != lo or new_hi != hi:
            src = small[: h * w * 3].reshape(h, w, 3)
            resize_c(image, 0, height, 0, width, src)
        for y in range(side):  # past the image's edge, its edge: a filter reaching there sees the image
            sy = min(y, h - 1)
            for x in range(side):
                sx = min(x, w - 1)
                for c in range(3):
                    out[y, x, c] = src[sy, sx, c]

    return one


def canvas_decoder(short: int, side: int):
    """An ffcv decoder for RGBImageField: uint8 [side, side, 3] per image, each fitted as `fitted`
    says (built lazily: ffcv is imported only where it is used)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class CanvasDecoder(ResizedCropRGBImageDecoder):
        def __init__(self):
            super().__init__((side, side))

        def declare_state_and_memory(self, previous_state):
            state, (out, temp) = super().declare_state_and_memory(previous_state)
            return state, (out, temp, AllocationQuery((side * side * 3,), np.dtype("<u1")))

        @property
        def get_crop_generator(self):  # the whole image: no crop here, the graph cuts it
            return None

        def generate_code(self):
            jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            one = Compiler.compile(_decode_one(Compiler.compile(imdecode), Compiler.compile(resize_crop)))
            lo_max, hi_max = np.int64(short), np.int64(side)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, small_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    one(
                        mem_read(field["data_ptr"], storage_state),
                        field["mode"] == jpg,
                        np.int64(field["height"]),
                        np.int64(field["width"]),
                        lo_max,
                        hi_max,
                        temp_storage[dst_ix],
                        small_storage[dst_ix],
                        destination[dst_ix],
                    )
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return CanvasDecoder()
