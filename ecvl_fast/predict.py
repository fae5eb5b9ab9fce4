"""`ecvl-fast predict`: classify image files with a stage 1 or stage 2 checkpoint (adapter applied).

No ffcv or DALI: images are decoded with PIL and prepared as the eval path prepares them (centre
square, resized to the decode size with area interpolation as ffcv's decoder does, then to the
model's resolution with antialiasing, CLIP normalisation), so predictions match `eval`'s.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecvl_fast import EcvlError, first_line
from ecvl_fast import checkpoint as ckpt_io
from ecvl_fast.config import Config, from_dict
from ecvl_fast.files import atomic_write

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip OPENAI_DATASET_MEAN
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Prediction:
    path: str
    classes: list[str]
    probs: list[float]


def image_files(images: list[Path], folder: Path | None) -> list[Path]:
    from ecvl_fast.loaders.sources import IMAGE_EXTS

    if folder is not None:
        if not folder.is_dir():
            raise EcvlError(f"{folder}: no such folder")
        images = list(images) + sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise EcvlError("no images: pass image files or --folder DIR")
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise EcvlError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return list(images)


def decode(image, load_res: int) -> np.ndarray:
    """uint8 [load_res, load_res, 3] from an image file or a PIL image: the centre square, resized
    as ffcv's CenterCropRGBImageDecoder does (OpenCV's area filter; an image already at that size
    is used as it is)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = np.asarray(image.convert("RGB"))
    else:
        with Image.open(image) as im:
            img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = img[y0:y0 + side, x0:x0 + side]
    if side == load_res:
        return np.ascontiguousarray(square)
    import cv2

    return cv2.resize(square, (load_res, load_res), interpolation=cv2.INTER_AREA)


_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on `device`, copied there once: a copy per batch from pageable memory would
    sync with the host on every batch."""
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (MEAN.to(device), STD.to(device))
    return _ON_DEVICE[device]


def to_input(batch, res: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 NHWC (numpy, or a tensor) -> normalised NCHW at `res` (antialiased linear resize, as
    the eval pipeline), channels_last; `dtype` (default bf16) on GPU. The uint8 batch moves to the
    device first and is prepared there: a quarter of the bytes of float over the bus, and the
    resize on the GPU."""
    x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if device.type == "cuda" and not x.is_cuda:
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[-1] != res:
        x = torch.nn.functional.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    mean, std = _normaliser(x.device)
    x = ((x / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    return x.to(dtype or torch.bfloat16) if device.type == "cuda" else x


def load_checkpoint(ckpt: Path) -> tuple[dict, Config]:
    state = ckpt_io.load(ckpt)
    if state.get("stage") not in (1, 2) or "classes" not in state:
        raise EcvlError(f"{ckpt}: not a stage 1 or stage 2 training checkpoint (no stage/classes)")
    return state, from_dict(state["config"], f"{ckpt} config")


class Model:
    """A trained or exported classifier for Python code:

        from ecvl_fast.predict import load
        model = load("model.pt")                   # `export`'s .pt or .onnx, or a training checkpoint
        for p in model.classify(["cat.jpg", pil_image], top_k=3):
            print(p.path, p.classes, p.probs)      # the top classes, most likely first

    Images are prepared as `eval` prepares them, so the probabilities match `predict`'s."""

    def __init__(self, predictor):
        self.predictor = predictor

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def classify(self, images, top_k: int = 5) -> list[Prediction]:
        """Image files or PIL images -> one Prediction each (top_k classes, or all there are)."""
        from PIL import Image

        arrays = [decode(im, self.predictor.load_res) for im in images]
        names = [getattr(im, "filename", "") or f"image {i}" if isinstance(im, Image.Image) else str(im)
                 for i, im in enumerate(images)]
        return self._top(np.stack(arrays), names, top_k)

    def _top(self, arrays: np.ndarray, names: list[str], top_k: int) -> list[Prediction]:
        p = self.predictor
        probs = p.probs(to_input(arrays, p.res, p.device))
        values, ix = probs.topk(min(top_k, len(p.classes)), dim=1)
        return [Prediction(name, [p.classes[i] for i in ii], pi) for name, pi, ii in zip(names, values.tolist(), ix.tolist())]


def load(path: str | Path, device: str = "auto") -> Model:
    """An exported `.pt` or `.onnx`, or a stage 1/2 training checkpoint, ready to classify."""
    from ecvl_fast.dist import resolve_device
    from ecvl_fast.export import load_predictor

    return Model(load_predictor(Path(path), resolve_device(device)))


def run_predict(ckpt: Path, images: list[Path], folder: Path | None = None, top_k: int = 5, strict: bool = False,
                batch_size: int = 256, device: str = "auto") -> list[Prediction]:
    """`ckpt`: a stage 1/2 training checkpoint, an exported `.pt`, or an exported `.onnx`."""
    model = load(ckpt, device)
    files = image_files(images, folder)
    out, pending = [], []

    def flush():
        out.extend(model._top(np.stack([a for _, a in pending]), [str(p) for p, _ in pending], top_k))
        pending.clear()

    for path in files:
        try:
            pending.append((path, decode(path, model.predictor.load_res)))
        except Exception as e:  # an unreadable or corrupt image
            reason = first_line(e)
            if strict:
                raise EcvlError(f"{path}: unreadable image ({reason})") from None
            print(f"skipped {path}: unreadable image ({reason})", file=sys.stderr)
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return out


def write_csv(preds: list[Prediction], path: Path) -> None:
    """One row per image: path, then class and probability for each rank; temp file, then rename."""
    k = max((len(p.classes) for p in preds), default=0)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [c for r in range(1, k + 1) for c in (f"class{r}", f"prob{r}")])
            for p in preds:
                w.writerow([p.path] + [v for c, pr in zip(p.classes, p.probs) for v in (c, f"{pr:.6f}")])

    atomic_write(path, write)
