"""The whole stored image, on a fixed-size canvas: what the DALI graph crops from.

ffcv's decoders hand out one shape per batch, and its centre-crop decoder keeps only the centre
square: a 4:3 photo would never show its sides, in training or at test time. This decoder keeps
every pixel instead. An image is shrunk (OpenCV's area filter, as ffcv's decoders do) only where
it is larger than the canvas, keeping its aspect, and placed in the canvas's top-left corner; the
rest of the canvas repeats the image's last row and column, so that a resize filter that reaches
past the image's edge sees its edge, not zeros. `extents` says what share of the canvas each image
fills; the crop boxes (loaders/draws.py) are drawn inside it, so the random-resized crop reaches
every edge, and an image smaller than the canvas (CIFAR's 32 px) is enlarged by DALI's linear
filter, never by the area filter's nearest-neighbour-like upscale.
"""
from __future__ import annotations

import numpy as np


def fitted(heights, widths, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The size each image takes on a `side` canvas: shrunk to fit, never enlarged (eq. of the
    decoder below, kept in one place: int(x * f + 0.5), at least 1 px)."""
    h, w = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    f = np.minimum(1.0, side / np.maximum(h, w))
    return np.maximum(1, (h * f + 0.5).astype(np.int64)), np.maximum(1, (w * f + 0.5).astype(np.int64))


def extents(heights, widths, side: int) -> np.ndarray:
    """[N, 2] float32: the share (height, width) of the canvas each image fills."""
    h, w = fitted(heights, widths, side)
    return (np.stack([h, w], 1) / side).astype(np.float32)


def canvas_decoder(side: int):
    """An ffcv decoder for RGBImageField: uint8 [side, side, 3] per image (built lazily: ffcv is
    imported only where it is used)."""
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
            imdecode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, small_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = temp_storage[dst_ix]
                        imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)
                    f = min(1.0, side / max(height, width))
                    h, w = max(1, int(height * f + 0.5)), max(1, int(width * f + 0.5))
                    out = destination[dst_ix]
                    if h == height and w == width:
                        out[:h, :w] = image
                    else:
                        small = small_storage[dst_ix][:h * w * 3].reshape(h, w, 3)
                        resize_c(image, 0, height, 0, width, small)
                        out[:h, :w] = small
                    for y in range(h, side):  # the edge, repeated: a filter past it sees the image
                        out[y, :w] = out[h - 1, :w]
                    for x in range(w, side):
                        out[:, x] = out[:, w - 1]
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return CanvasDecoder()

