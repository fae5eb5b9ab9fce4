"""What a person reads: metrics.json, the console tables and the plots of a run (per class,
curves, M by shot group) and of an ablation (its table, paired differences and bars)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError
from ecvl_fast.evaluation.metrics import METRICS
from ecvl_fast.method.rows import LABELS
from ecvl_fast.kernels.formulas import QUANTILE_NAMES
from ecvl_fast.run.logs import read_log

EMPTY = "–"  # how the tables show a metric of an empty shot group (null in the JSON files)
PAIRED = ("few", "macro_f1", "all")  # the metrics an ablation sets against BALLAD and the controls, seed by seed


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


CONFUSION_PLOT_MAX = 100  # classes up to which confusion.png is drawn (confusion.csv always)


def write_report(metrics: dict, meta: dict, out_dir: Path, title: str, context: dict | None = None) -> dict:
    """metrics.json, confusion.csv, per_class.png (accuracy against train count, log x),
    confusion.png (up to CONFUSION_PLOT_MAX classes) and a console table. Returns the metrics as
    read back from metrics.json (`read_metrics`), so a finished run reports exactly what a fresh one did."""
    from ecvl_fast.run.files import atomic_write

    path = Path(out_dir) / "metrics.json"
    readable = metrics_file(metrics, meta["classes"], context or {})
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(readable, indent=1)))
    if metrics.get("confusion") is not None:
        write_confusion(metrics["confusion"], meta["classes"], Path(out_dir) / "confusion.csv")
        if len(meta["classes"]) <= CONFUSION_PLOT_MAX:
            plot_confusion(metrics["confusion"], meta, Path(out_dir) / "confusion.png", title)
    _plot(metrics, meta, Path(out_dir) / "per_class.png", title)
    print_table(metrics, title)
    return read_metrics(path)


def write_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """The confusion matrix as CSV: a row per true class, a column per predicted one, in class order."""
    import csv

    from ecvl_fast.run.files import atomic_write

    names = unique_names(classes)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *names])
            for name, row in zip(names, cm):
                w.writerow([name, *map(int, row)])

    atomic_write(path, write)


def plot_confusion(cm: np.ndarray, meta: dict, path: Path, title: str) -> None:
    """Each true class's predictions in percent of its images, classes ordered by training count
    (the head top left); names on the axes up to 40 classes."""
    plt = pyplot()
    if plt is None:
        return
    order = np.argsort(-np.asarray(meta["train_counts"]), kind="stable")
    m = cm[np.ix_(order, order)].astype(np.float64)
    m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(order)
    fig, ax = plt.subplots(figsize=(min(6 + 0.18 * k, 16), min(5 + 0.18 * k, 15)))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of the true class's images")
    if k <= 40:
        names = [unique_names(meta["classes"])[i] for i in order]
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted class (by train count, most first)")
    ax.set_ylabel("true class (by train count, most first)")
    ax.set_title(f"{title}\nconfusion matrix", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def unique_names(classes: list[str]) -> list[str]:
    """Class names as keys: a name that occurs more than once (ImageNet has two "missile"s) gets
    its class index."""
    from collections import Counter

    twice = {n for n, c in Counter(classes).items() if c > 1}
    return [f"{n} ({i})" if n in twice else n for i, n in enumerate(classes)]


def metrics_file(metrics: dict, classes: list[str], context: dict) -> dict:
    """metrics.json as a person reads it: what was evaluated (`context`: split, stage or row,
    checkpoint), then every accuracy in percent, as the tables print them; per class by name."""
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    names = unique_names(classes)
    extra = {}
    if "per_class_precision" in metrics:  # recall is per_class: a class's accuracy
        extra = {
            "per_class_precision": dict(zip(names, map(pct, metrics["per_class_precision"]))),
            "per_class_recall": dict(zip(names, map(pct, metrics["per_class"]))),
        }
    return {
        **context,
        "units": "percent",
        **{k: pct(metrics[k]) for k in METRICS},
        "top5": pct(metrics.get("top5")),
        "per_class": dict(zip(names, map(pct, metrics["per_class"]))),
        **extra,
        "num_images": metrics["num_images"],
        "predicted_classes": metrics["predicted_classes"],
    }


def read_metrics(path: Path) -> dict:
    """metrics.json's measurements as the code uses them: fractions, per-class accuracies in class
    order (what was evaluated, the file's context, is left out: two runs compare by their numbers)."""
    saved = json.loads(Path(path).read_text())
    if saved.get("units") != "percent":
        raise EcvlError(f"{path}: written by an older ecvl-fast (fractions, no units); pass --restart to redo the run")
    frac = lambda v: None if v is None else v / 100  # noqa: E731
    return {
        **{k: frac(saved[k]) for k in METRICS},
        "top5": frac(saved.get("top5")),
        "per_class": [frac(v) for v in saved["per_class"].values()],
        "num_images": saved["num_images"],
        "predicted_classes": saved["predicted_classes"],
    }


def _plot(metrics: dict, meta: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    counts = np.asarray(meta["train_counts"])
    acc = np.asarray([np.nan if a is None else 100 * a for a in metrics["per_class"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
        ix = meta["groups"][group]
        if not ix:  # an empty shot group: nothing to draw, no legend entry
            continue
        ax.scatter(counts[ix], acc[ix], s=14, c=color, label=f"{group} ({len(ix)})")
    names = unique_names(meta["classes"])
    labelled = range(len(names)) if len(names) <= 40 else [i for i in np.argsort(np.nan_to_num(acc, nan=101))[:10]]
    for i in labelled:  # every class's name up to 40 classes, else the ten worst classes'
        if not np.isnan(acc[i]):
            ax.annotate(names[i], (counts[i], acc[i]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("train images in class (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
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
    cols = METRICS + ("top5",) * all(m.get("top5") is not None for m in rows.values())
    if any(rows):
        t.add_column("run")
    for c in cols:
        t.add_column(c, justify="right")
    for label, m in rows.items():
        cells = [EMPTY if m[c] is None else f"{100 * m[c]:.2f}" for c in cols]
        t.add_row(*([label] if any(rows) else []), *cells)
    Console().print(t)


def plot_curves(log_path: Path, path: Path, title: str) -> None:
    """The run's training loss (each logged step, and each epoch's mean) and validation accuracy
    (all, and per shot group) above; the learning rate below."""
    from ecvl_fast.run.logs import epoch_val

    records = read_log(log_path)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    plt = pyplot() if steps else None
    if plt is None:
        return
    fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    ax.plot(
        [r["step"] for r in steps],
        [r["loss"] for r in steps],
        color="tab:blue",
        alpha=0.4,
        lw=1,
        label="loss (logged steps)",
    )
    per_epoch = max(r["step"] for r in steps) / max(r["epoch"] for r in epochs) if epochs else 0  # steps per epoch
    if epochs:
        ax.plot(
            [r["epoch"] * per_epoch for r in epochs],
            [r["train_loss"] for r in epochs],
            "o-",
            color="tab:blue",
            label="loss (epoch mean)",
        )
    ax.set_ylabel("training loss")
    scored = [(r["epoch"] * per_epoch, epoch_val(r)) for r in epochs if epoch_val(r) is not None]
    if scored:
        right = ax.twinx()
        for key, style in (
            ("all", ("s-", "black")),
            ("many", ("^--", "tab:green")),
            ("medium", ("v--", "tab:orange")),
            ("few", ("o--", "tab:red")),
        ):
            pts = [(x, 100 * v[key]) for x, v in scored if v.get(key) is not None]
            if pts:
                right.plot(*zip(*pts), style[0], color=style[1], ms=4, label=f"val {key}")
        right.set_ylabel("validation accuracy (%)")
        right.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title)
    low.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:purple", lw=1)
    low.set_ylabel("learning rate")
    low.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_m_by_group(log_path: Path, path: Path, title: str = "") -> None:
    """How M is distributed per shot group at the end of each stage-2 epoch (median, 25-75% band)."""
    plt = pyplot()
    if plt is None:
        return

    rows = read_log(log_path)
    rows = [r for r in rows if "m_by_group" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in (("many", "tab:blue"), ("medium", "tab:orange"), ("few", "tab:red")):
        pts = [
            (r["epoch"], [r["m_by_group"][group][n] for n in QUANTILE_NAMES]) for r in rows if group in r["m_by_group"]
        ]
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


def print_ablation(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{result['model']} on {Path(result['data']).name}: mean ± std over seeds "
        f"{', '.join(map(str, result['seeds']))} (%)"
    )
    t.add_column("row")
    for k in METRICS:
        t.add_column(k, justify="right")
    for row in result["rows"]:
        cells = [
            EMPTY if row[k] is None else f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}" for k in METRICS
        ]
        t.add_row(row["label"], *cells)
    console = Console(width=max(120, Console().width))
    console.print(t)
    val = [(row["label"], row["val"]) for row in result["rows"] if row.get("val")]
    if val:
        print(
            "val split (last epoch, mean over seeds; choose on these): "
            + "; ".join(
                f"{label} " + " ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()) for label, scores in val
            )
        )
    if result.get("paired"):
        t = Table(
            title="paired by seed: row minus BALLAD, and minus its no-memory control (points; per seed, mean ± std)"
        )
        for col in ("row", "minus", *PAIRED):
            t.add_column(col, justify="left" if col in ("row", "minus") else "right")
        for e in result["paired"]:
            t.add_row(
                LABELS[e["row"]],
                LABELS[e["against"]],
                *(
                    EMPTY
                    if e[k] is None
                    else " ".join(f"{100 * v:+.2f}" for v in e[k]["per_seed"])
                    + f"  ({100 * e[k]['mean']:+.2f} ± {100 * e[k]['std']:.2f})"
                    for k in PAIRED
                ),
            )
        console.print(t)
        skipped = sorted({k for e in result["paired"] for k in e.get("skipped", ())})
        if skipped:
            print(
                f"paired differences skipped for {', '.join(skipped)}: the shot group is empty in this dataset "
                f"({EMPTY} in the tables, null in ablation.json)"
            )
    print(
        "rows (each described in ecvl_fast/method/rows.py): "
        + "; ".join(f"{r['name']} = {r['label']}" for r in result["rows"])
        + ". Every row starts from the same stage-1 encoders and trains the config's stage2.epochs, "
        "except rows that declare their own budget (LIFT+'s) where the command line does not set it."
    )


def plot_rows(result: dict, path: Path) -> None:
    """Bars per shot group (and all, macro-F1), one per row, with the std over seeds."""
    from ecvl_fast.evaluation.reports import pyplot

    plt = pyplot()
    if plt is None:
        return

    rows = result["rows"]
    groups = [
        g for g in ("many", "medium", "few", "all", "macro_f1") if any(row[g] for row in rows)
    ]  # empty groups left out
    width = 0.8 / max(1, len(rows))
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10").colors  # no colour twice
    fig, ax = plt.subplots(figsize=(8 + 3 * (len(rows) > 6), 4))
    for i, row in enumerate(rows):
        x = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        mean = [100 * row[g]["mean"] if row[g] else np.nan for g in groups]
        std = [100 * row[g]["std"] if row[g] else np.nan for g in groups]
        ax.bar(x, mean, width, yerr=std, capsize=2, label=row["label"], color=colours[i % len(colours)])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("test accuracy / macro-F1 (%)")
    ax.set_title(f"{result['model']} on {Path(result['data']).name}, seeds {result['seeds']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
