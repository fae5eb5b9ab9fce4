"""Evaluation: per-class accuracy, many/medium/few/all, macro-F1 and the head-tail gap."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ecvl_fast import dist as D
from ecvl_fast.logs import QUANTILE_NAMES, QUANTILES
from ecvl_fast.model import adapted_features, zero_shot_logits

METRICS = ("many", "medium", "few", "all", "macro_f1", "head_tail_gap")  # the reported columns, in order
EMPTY = "–"  # how the tables show a metric of an empty shot group (null in the JSON files)


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts, rows the true class, columns the predicted one."""
    return np.bincount(np.asarray(labels, np.int64) * k + np.asarray(preds, np.int64), minlength=k * k).reshape(k, k)


def macro_f1(cm: np.ndarray) -> float:
    """The mean over all k classes of F1 = 2TP / (2TP + FP + FN), 0 for a class never true nor
    predicted (scikit-learn's f1_score(average="macro", zero_division=0))."""
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def shot_metrics(preds: np.ndarray, labels: np.ndarray, meta: dict) -> dict:
    k = len(meta["classes"])
    cm = confusion(labels, preds, k)
    support = cm.sum(1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    out = {"all": float((preds == labels).mean()) if len(labels) else float("nan")}
    for group, classes in meta["groups"].items():
        accs = per_class[classes] if classes else np.array([])
        accs = accs[~np.isnan(accs)]
        out[group] = float(accs.mean()) if len(accs) else None
    out["macro_f1"] = macro_f1(cm)
    out["head_tail_gap"] = out["many"] - out["few"] if out["many"] is not None and out["few"] is not None else None
    out["per_class"] = [None if np.isnan(a) else float(a) for a in per_class]
    out["num_images"] = int(len(labels))
    out["predicted_classes"] = int(np.count_nonzero(cm.sum(0)))  # how many classes any prediction names
    return out


@torch.no_grad()
def predict_logits(net, images: torch.Tensor, text_features: torch.Tensor, adapter=None,
                   dt: torch.dtype | None = None) -> torch.Tensor:
    """eq. 6 on a batch of prepared images, through the stage-2 adapter when there is one (eq. 7).
    `dt`: the compute dtype (run.precision; default bf16 on CUDA, fp32 on CPU)."""
    from ecvl_fast import precision

    dt = dt or precision.dtype("auto", images.device)
    with precision.autocast(images.device, dt):
        img, _ = net(images)
        img = adapted_features(img, adapter)
    return zero_shot_logits(img, text_features, net.logit_scale)


@torch.no_grad()
def predict(net, loader, text_features: torch.Tensor, d: D.Dist, adapter=None, dt: torch.dtype | None = None):
    """Predictions over the whole eval split, gathered from every rank, each sample once.
    With a stage-2 adapter, image features pass through it (eq. 7) before eq. 6."""
    net.eval()
    preds, labels, index = [], [], []
    for views, y, idx in loader:
        logits = predict_logits(net, views[0].to(d.device, non_blocking=True), text_features, adapter, dt)
        preds.append(logits.argmax(1).cpu())  # sync point: eval reads its predictions back per batch
        labels.append(y.cpu()), index.append(idx.cpu())
    arrays = [torch.cat(a).numpy() if a else np.zeros(0, np.int64) for a in (preds, labels, index)]
    p, y, i = D.gather_arrays(*arrays)
    _, first = np.unique(i, return_index=True)
    return p[first], y[first]


def pyplot():
    """matplotlib's pyplot on the Agg backend; None, said in one line, where matplotlib is not
    installed (a stripped environment): the metrics of a finished run never fail on a plot."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(metrics: dict, meta: dict, out_dir: Path, title: str, context: dict | None = None) -> dict:
    """metrics.json, per_class.png (accuracy against train count, log x) and a console table.
    Returns the metrics as read back from metrics.json (`read_metrics`), so a finished run
    reports exactly what a fresh one did."""
    from ecvl_fast.files import atomic_write

    path = Path(out_dir) / "metrics.json"
    readable = metrics_file(metrics, meta["classes"], context or {})
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(readable, indent=1)))
    _plot(metrics, meta, Path(out_dir) / "per_class.png", title)
    print_table(metrics, title)
    return read_metrics(path)


def metrics_file(metrics: dict, classes: list[str], context: dict) -> dict:
    """metrics.json as a person reads it: what was evaluated (`context`: split, stage or row,
    checkpoint), then every accuracy in percent, as the tables print them; per class by name."""
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    return {**context, "units": "percent", **{k: pct(metrics[k]) for k in METRICS},
            "per_class": {name: pct(a) for name, a in zip(classes, metrics["per_class"])},
            "num_images": metrics["num_images"], "predicted_classes": metrics["predicted_classes"]}


def read_metrics(path: Path) -> dict:
    """metrics.json's measurements as the code uses them: fractions, per-class accuracies in class
    order (what was evaluated, the file's context, is left out: two runs compare by their numbers)."""
    saved = json.loads(Path(path).read_text())
    frac = lambda v: None if v is None else v / 100  # noqa: E731
    return {**{k: frac(saved[k]) for k in METRICS}, "per_class": [frac(v) for v in saved["per_class"].values()],
            "num_images": saved["num_images"], "predicted_classes": saved["predicted_classes"]}


def _plot(metrics: dict, meta: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    counts = np.asarray(meta["train_counts"])
    acc = np.asarray([np.nan if a is None else a for a in metrics["per_class"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
        ix = meta["groups"][group]
        if not ix:  # an empty shot group: nothing to draw, no legend entry
            continue
        ax.scatter(counts[ix], acc[ix], s=14, c=color, label=f"{group} ({len(ix)})")
    ax.set_xscale("log")
    ax.set_xlabel("train images in class (log)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(metrics: dict, title: str, rows: dict[str, dict] | None = None) -> None:
    """One row of metrics, or several labelled rows (`rows`) to compare runs."""
    from rich.console import Console
    from rich.table import Table

    rows = rows or {"": metrics}
    t = Table(title=title)
    cols = METRICS
    if any(rows):
        t.add_column("run")
    for c in cols:
        t.add_column(c, justify="right")
    for label, m in rows.items():
        cells = [EMPTY if m[c] is None else f"{100 * m[c]:.2f}" for c in cols]
        t.add_row(*([label] if any(rows) else []), *cells)
    Console().print(t)


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


def plot_curves(log_path: Path, path: Path, title: str) -> None:
    """The run's training loss (each logged step, and each epoch's mean) and validation accuracy."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    plt = pyplot() if steps else None
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*steps), color="tab:blue", alpha=0.4, lw=1, label="loss (logged steps)")
    per_epoch = max(s for s, _ in steps) / max(r["epoch"] for r in epochs) if epochs else 0  # steps per epoch
    if epochs:
        ax.plot([r["epoch"] * per_epoch for r in epochs], [r["train_loss"] for r in epochs], "o-", color="tab:blue",
                label="loss (epoch mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    val = [(r["epoch"] * per_epoch, 100 * r["val_all"]) for r in epochs if r.get("val_all") is not None]
    if val:
        right = ax.twinx()
        right.plot(*zip(*val), "s-", color="tab:orange", label="val accuracy")
        right.set_ylabel("validation accuracy (%)")
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_m_by_group(log_path: Path, path: Path, title: str = "") -> None:
    """How M is distributed per shot group at the end of each stage-2 epoch (median, 25-75% band)."""
    plt = pyplot()
    if plt is None:
        return

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    rows = [r for r in rows if "m_by_group" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
        pts = [(r["epoch"], [r["m_by_group"][group][n] for n in QUANTILE_NAMES]) for r in rows if group in r["m_by_group"]]
        if not pts:
            continue
        x, q = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        ax.plot(x, q[:, 2], color=color, marker="o", ms=3, label=f"{group}: median")
        ax.fill_between(x, q[:, 1], q[:, 3], color=color, alpha=0.2)
    ax.set_xlabel("stage-2 epoch (M at its end, used in the next)")
    ax.set_ylabel("M (eq. 9); band: 25-75%")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole
    ax.set_title(f"M by shot group: {title}" if title else "M by shot group")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
