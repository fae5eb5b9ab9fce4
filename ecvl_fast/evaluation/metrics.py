"""Evaluation: per-class accuracy, many/medium/few/all, macro-F1 and the head-tail gap; the eval
loop over a split; M's quantiles per shot group."""

from __future__ import annotations

import numpy as np
import torch

from ecvl_fast.run import dist as D
from ecvl_fast.kernels.formulas import QUANTILE_NAMES, QUANTILES

METRICS = ("many", "medium", "few", "all", "macro_f1", "head_tail_gap")  # the reported columns, in order
TOP = 5  # top-k accuracy reported beside top-1


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts, rows the true class, columns the predicted one."""
    return np.bincount(np.asarray(labels, np.int64) * k + np.asarray(preds, np.int64), minlength=k * k).reshape(k, k)


def macro_f1(cm: np.ndarray) -> float:
    """The mean over all k classes of F1 = 2TP / (2TP + FP + FN), 0 for a class never true nor
    predicted (scikit-learn's f1_score(average="macro", zero_division=0))."""
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def ranked(logits: np.ndarray, top: int = TOP) -> np.ndarray:
    """[N, min(top, K)]: each row's classes by falling logit; the first is argmax's (the lowest
    index among equal logits), so top-1 never depends on how ties are ranked."""
    top = min(top, logits.shape[1])
    part = np.argpartition(-logits, top - 1, axis=1)[:, :top]
    order = np.argsort(-np.take_along_axis(logits, part, 1), axis=1, kind="stable")
    return _first(np.take_along_axis(part, order, 1), logits.argmax(1))


def _best(logits: torch.Tensor, top: int) -> torch.Tensor:
    """`ranked` on the device."""
    return _first(logits.topk(min(top, logits.shape[1]), 1).indices, logits.argmax(1))


def _first(out, best):
    """Each row of `out` (classes by falling logit) with `best` first: swapped with the place it
    holds where equal logits ranked it later, or in the first place where they left it out."""
    if isinstance(out, np.ndarray):
        at, rows, first = (out == best[:, None]).argmax(1), np.arange(len(out)), out[:, 0].copy()
    else:
        at, rows, first = (
            (out == best[:, None]).int().argmax(1),
            torch.arange(len(out), device=out.device),
            out[:, 0].clone(),
        )
    out[rows, at] = first  # its place, 0 where it is absent
    out[:, 0] = best
    return out


def shot_metrics(preds: np.ndarray, labels: np.ndarray, meta: dict) -> dict:
    """`preds`: the predicted class [N], or each image's classes best first [N, k] (`ranked`), which
    adds top-5 accuracy (where k covers min(5, K))."""
    k = len(meta["classes"])
    preds = np.asarray(preds)
    best = preds if preds.ndim == 2 else preds[:, None]
    preds = best[:, 0]
    cm = confusion(labels, preds, k)
    support, predicted = cm.sum(1), cm.sum(0)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, np.diag(cm) / np.maximum(predicted, 1), np.nan)
    out = {"all": float((preds == labels).mean()) if len(labels) else float("nan")}
    top = min(TOP, k)
    out["top5"] = (
        None
        if k <= TOP
        else (
            float((best[:, :top] == np.asarray(labels)[:, None]).any(1).mean())
            if best.shape[1] >= top and len(labels)
            else None
        )
    )
    for group, classes in meta["groups"].items():
        accs = per_class[classes] if classes else np.array([])
        accs = accs[~np.isnan(accs)]
        out[group] = float(accs.mean()) if len(accs) else None
    out["macro_f1"] = macro_f1(cm)
    out["head_tail_gap"] = out["many"] - out["few"] if out["many"] is not None and out["few"] is not None else None
    out["per_class"] = [None if np.isnan(a) else float(a) for a in per_class]  # = each class's recall
    out["per_class_precision"] = [None if np.isnan(a) else float(a) for a in precision]
    out["confusion"] = cm
    out["num_images"] = int(len(labels))
    out["predicted_classes"] = int(np.count_nonzero(cm.sum(0)))  # how many classes any prediction names
    return out


@torch.no_grad()
def predict_logits(scorer, images: torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
    """A `method.model.Scorer`'s logits (fp32) for a batch of prepared images. `dt`: the compute
    dtype (run.precision; default bf16 on CUDA, fp32 on CPU)."""
    from ecvl_fast.run import precision

    with precision.autocast(images.device, dt or precision.dtype("auto", images.device)):
        return scorer(images).float()


@torch.no_grad()
def split_logits(
    scorer, loader, d: D.Dist, dt: torch.dtype | None = None, top: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K], labels) over the whole eval split, gathered from every rank, each sample once;
    `top` > 0: each image's `top` best classes [N, top] instead, so a split's K logits per image
    never leave their rank."""
    scorer.eval()
    outs, labels, index = [], [], []
    for views, y, idx in loader:
        x = views[0] if len(views) == 1 else torch.stack(views, 1)  # views prepared by the loader: [N, V, ...]
        logits = predict_logits(scorer, x.to(d.device, non_blocking=True), dt)
        outs.append((_best(logits, top) if top else logits).cpu())  # sync point
        labels.append(y.cpu()), index.append(idx.cpu())
    k = scorer.weights.shape[0]
    empty = (
        np.zeros((0, min(top, k)), np.int64) if top else np.zeros((0, k), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    arrays = [torch.cat(a).numpy() if a else e for a, e in zip((outs, labels, index), empty)]
    out, y, i = D.gather_arrays(*arrays)
    _, first = np.unique(i, return_index=True)
    return out[first], y[first]


def predict_split(scorer, loader, d: D.Dist, dt: torch.dtype | None = None, top: int = 1):
    """(predictions [N], labels) over the whole eval split; `top` > 1: each image's `top` best classes [N, top]."""
    preds, labels = split_logits(scorer, loader, d, dt, top=top)
    return (preds[:, 0] if top == 1 else preds), labels


def m_quantiles(bank, labels: np.ndarray, groups: dict[str, list[int]]) -> dict:
    """Per shot group: M's quantiles over its samples, and the share of them seen so far
    (`labels`: the train labels on the host)."""
    m, seen = bank.magnitudes(), bank.seen.cpu().numpy()
    out = {}
    for group, classes in groups.items():
        sel = np.isin(labels, classes)
        if sel.any():
            q = np.quantile(m[sel], QUANTILES).round(4).tolist()
            out[group] = {**dict(zip(QUANTILE_NAMES, q)), "seen": round(float(seen[sel].mean()), 4)}
    return out
