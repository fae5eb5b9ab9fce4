"""`ecvl-fast predict`: classify image files with a checkpoint or an exported model (the classifier
in `ecvl_fast.serving.classifier`), print them, and write them as CSV."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError, first_line
from ecvl_fast.run.files import atomic_write
from ecvl_fast.serving.classifier import Prediction, decode, load


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
        raise EcvlError(
            f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return list(images)


def run_predict(
    ckpt: Path,
    images: list[Path],
    folder: Path | None = None,
    top_k: int = 5,
    strict: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    views: int | None = None,
    compile: bool = False,
) -> list[Prediction]:
    """`ckpt`: a stage 1/2 training checkpoint, an exported `.pt`, or an exported `.onnx`;
    `views`: test-time views (default: the model's own); `compile`: see classifier.load."""
    model = load(ckpt, device, views, compile)
    files = image_files(images, folder)
    out, pending = [], []

    def flush():
        arrays, n = np.stack([a for _, a in pending]), len(pending)
        if compile and out:  # a short last batch, padded to the compiled shape: no second compilation
            arrays = np.concatenate([arrays, np.repeat(arrays[-1:], batch_size - n, 0)])
        out.extend(model._top(arrays, [str(p) for p, _ in pending] + [""] * (len(arrays) - n), top_k)[:n])
        pending.clear()

    for path in files:
        try:
            p = model.predictor
            pending.append((path, decode(path, p.load_res, p.res, p.crops, p.interp)))
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
