"""What a run reports: `log.jsonl` (appended across restarts, every record timestamped, accuracies
in percent), `summary.csv` (one row per epoch), the console (a bar per epoch that stays on a
terminal; about `run.lines_per_epoch` lines per epoch when stdout is a file, as in a batch job;
an epoch line either way), and optionally TensorBoard and Weights & Biases (`run.report_to`).
Only the main rank writes any of it."""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

from ecvl_fast import EcvlError
from ecvl_fast.kernels.formulas import QUANTILE_NAMES


# What a log.jsonl record holds: a logged step, an epoch's summary, M's quantiles per shot group
# at an epoch's end, or an event in the run's life (resumed).
KINDS = ("step", "epoch", "memory", "event")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a line a killed writer left torn is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def epoch_val(record: dict) -> dict | None:
    """An epoch record's validation scores as fractions (all, the shot groups, macro_f1), whatever
    units its log was written in (percent since `units` was recorded); None without a val split."""
    if record.get("val_all") is None:
        return None
    scale = 100.0 if record.get("units") == "percent" else 1.0
    raw = {"all": record["val_all"], **(record.get("val_groups") or {}), "macro_f1": record.get("val_macro_f1")}
    return {k: None if v is None else v / scale for k, v in raw.items()}


SUMMARY = ("epoch", "train_loss", "lr", "img_s", "val_all", "val_many", "val_medium", "val_few", "val_macro_f1")


class RunLog:
    def __init__(
        self,
        folder: Path,
        main: bool,
        epochs: int,
        stage: int,
        report_to: set[str] = frozenset(),
        interactive: bool | None = None,
        lines_per_epoch: int = 20,
        name: str = "",
        config: dict | None = None,
    ):
        self.path, self.main, self.epochs, self.stage = folder / "log.jsonl", main, epochs, stage
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.lines = lines_per_epoch
        self.t0, self.done = time.time(), 0  # this process's start, and epochs it finished
        self.images = 0  # images this process trained (the ETA's pace)
        self.folder, self.report_to, self.name, self.config = folder, report_to, name or folder.name, config
        self.tb = self.wandb = None  # opened by open_trackers, once the run is known to train
        for tracker in sorted(report_to):  # every rank checks, so that none waits alone on a refused one
            _tracker_module(tracker)
        if main and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a killed writer's torn last line: the next record starts afresh
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def __call__(self, kind: str, record: dict) -> None:
        """One JSON line of a `kind` (KINDS), with the wall-clock time; scalars also to TensorBoard."""
        if not self.main:
            return
        assert kind in KINDS, kind
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = dict(self._scalars(record))
        for key, value in scalars.items() if self.tb is not None else ():
            self.tb.add_scalar(key, value, record.get("step", record.get("epoch", 0)))
        if self.wandb is not None and scalars:
            self.wandb.log(scalars)

    def eta(self, images_left: int) -> float:
        """Seconds left in the stage at this process's pace so far (evaluation and checkpoints included)."""
        return (time.time() - self.t0) / self.images * images_left if self.images else float("nan")

    def progress(self, loader, epoch: int, first: int, batch: int) -> Progress:
        """The epoch's batches from step `first`, with what the console shows of them (`Progress`)."""
        return Progress(self, loader, epoch, first, batch)

    def epoch_end(self, epoch: int, stats: dict, lr: float, scores: dict | None, steps: int, batch: int) -> None:
        """The per-epoch line, its record (accuracies in percent) and summary.csv's row; `scores`:
        the validation metrics, when the dataset has a val split."""
        self.done += 1
        pct = lambda v: None if v is None else round(100 * v, 4)  # noqa: E731
        val = None if scores is None else pct(scores["all"])
        groups = (
            None
            if scores is None
            else {g: pct(scores[g]) for g in ("many", "medium", "few") if scores.get(g) is not None}
        )
        record = {
            "epoch": epoch + 1,
            **stats,
            "lr": lr,
            "units": "percent",
            "val_all": val,
            "val_groups": groups,
            "val_macro_f1": None if scores is None else pct(scores.get("macro_f1")),
        }
        self("epoch", record)
        if not self.main:
            return
        self._summary()
        acc = "-" if val is None else f"{val:.2f}%"
        print(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} stage {self.stage} epoch {epoch + 1}/{self.epochs} "
            f"loss {stats['train_loss']:.4f} lr {lr:.3g} {stats['img_s']:.0f} img/s val {acc} "
            f"stage ETA {_clock(self.eta((self.epochs - epoch - 1) * steps * batch))}",
            flush=True,
        )

    def _summary(self) -> None:
        """summary.csv beside log.jsonl: one row per epoch (timm's), rewritten from the log so a
        resumed run's rows are its epochs once each: a resume drops the rows from the epoch it
        resumes at (a run resumed from an earlier, healthy checkpoint trains those again), a
        restart all of them."""
        from ecvl_fast.run.files import atomic_write

        rows = {}
        for r in read_log(self.path):
            if r.get("kind") == "event":
                since = r.get("epoch", 1) if r.get("event") == "resumed" else 1
                rows = {e: row for e, row in rows.items() if e < since}
            elif r.get("kind") == "epoch":
                val = {k: None if v is None else 100 * v for k, v in (epoch_val(r) or {}).items()}  # percent
                rows[r["epoch"]] = [
                    r["epoch"],
                    r["train_loss"],
                    r["lr"],
                    r["img_s"],
                    val.get("all"),
                    *(val.get(g) for g in ("many", "medium", "few")),
                    val.get("macro_f1"),
                ]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(SUMMARY)
                for epoch in sorted(rows):
                    w.writerow(
                        ["" if v is None else format(v, ".7g") if isinstance(v, float) else v for v in rows[epoch]]
                    )

        atomic_write(self.path.parent / "summary.csv", write)

    def open_trackers(self) -> None:
        """TensorBoard and W&B (run.report_to), on the main rank: called once the run is known to
        train (not for a finished one), after --restart has moved an old run's files aside."""
        if not self.main:
            return
        if "tensorboard" in self.report_to:
            self.tb = _tensorboard(self.folder / "tb")
        if "wandb" in self.report_to:
            self.wandb = _wandb(self.folder, self.name, self.stage, self.config)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None

    def _scalars(self, r: dict):
        """(name, value) of every scalar in a record, as the trackers get them."""
        for key in ("loss", "lr", "img_s", "train_loss", "val_all", "val_macro_f1"):
            if isinstance(r.get(key), (int, float)):
                yield f"stage{self.stage}/{key}", r[key]
        for key, value in (r.get("val_groups") or {}).items():
            if isinstance(value, (int, float)):
                yield f"stage{self.stage}/val_{key}", value
        for group, q in (r.get("m_by_group") or {}).items():
            for name in QUANTILE_NAMES:
                yield f"stage{self.stage}/M_{group}/{name}", q[name]


class Progress:
    """One epoch's batches, timed, and what the console shows of them: on a terminal a bar that
    stays (images, img/s, the epoch's ETA; loss, data time and the stage's ETA at each logged
    step); when stdout is a file, a line (timm's) about `run.lines_per_epoch` times per epoch."""

    def __init__(self, log: RunLog, loader, epoch: int, first: int, batch: int):
        self.log, self.loader, self.epoch, self.first, self.batch = log, loader, epoch, first, batch
        self.steps, self.data_s, self.t0 = len(loader), 0.0, time.perf_counter()
        # the same steps on every rank, terminal or not: the caller syncs the ranks at them
        self.every = max(1, math.ceil(self.steps / log.lines)) if log.lines > 0 else 0
        self.bar = None
        if log.main and log.interactive:
            from tqdm import tqdm

            total = self.steps * batch
            self.bar = tqdm(
                total=total,
                initial=first * batch,
                unit="img",
                unit_scale=total >= 100_000,
                leave=True,
                dynamic_ncols=True,
                desc=f"stage {log.stage} epoch {epoch + 1}/{log.epochs}",
            )

    def __iter__(self):
        batches = iter(self.loader)
        try:
            while True:
                t = time.perf_counter()
                try:
                    item = next(batches)
                except StopIteration:
                    return
                self.data_s += time.perf_counter() - t
                yield item
                self.log.images += self.batch
                if self.bar is not None:
                    self.bar.update(self.batch)
        finally:
            if self.bar is not None:
                self.bar.close()

    def wants(self, step: int) -> bool:
        """Whether step `step` (0-based, in the epoch) prints a line: the caller reads its loss then."""
        return bool(self.every) and (step + 1) % self.every == 0

    def show(self, step: int, loss: float, lr: float, img_s: float) -> None:
        """At a logged step: the bar's figures, or (when it `wants` the step) the line."""
        data = self.data_s / max(1e-9, time.perf_counter() - self.t0)  # the share of the time spent waiting on data
        left = (self.steps - step - 1 + (self.log.epochs - self.epoch - 1) * self.steps) * self.batch
        eta = _clock(self.log.eta(left))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, data {100 * data:.0f}%, stage ETA {eta}", refresh=False)
        elif self.log.main and self.wants(step):
            n = len(str(self.steps))
            print(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} stage {self.log.stage} epoch {self.epoch + 1}/{self.log.epochs} "
                f"[{step + 1:>{n}}/{self.steps} ({100 * (step + 1) / self.steps:3.0f}%)] loss {loss:.4f} lr {lr:.3g} "
                f"{img_s:.0f} img/s data {100 * data:.0f}% stage ETA {eta}",
                flush=True,
            )


def _tracker_module(name: str):
    """The tracker's module, or one line saying which extra installs it."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise EcvlError(
            f"run.report_to = \"{name}\" needs the {name} package: pip install 'ecvl-fast[{name}]'"
        ) from None


def _tensorboard(folder: Path):
    return _tracker_module("tensorboard")(str(folder))


def _wandb(folder: Path, name: str, stage: int, config: dict | None):
    """A Weights & Biases run in <run folder>/wandb, resumed by the same id when the run resumes
    (WANDB_MODE=offline works without a network; `wandb sync` uploads it later)."""
    import secrets

    from ecvl_fast import first_line

    wandb = _tracker_module("wandb")
    stamp = folder / ".wandb-id"  # the folder's W&B run, across resumes; --restart moves it aside with the rest
    if not stamp.is_file():
        stamp.write_text(secrets.token_hex(6))
    run_id = stamp.read_text().strip()
    try:
        return wandb.init(
            dir=str(folder),
            name=f"{name} stage {stage}",
            id=run_id,
            resume="allow",
            project="ecvl-fast",
            config={**(config or {}), "folder": str(folder), "stage": stage},
        )
    except Exception as e:  # no API key in a batch job, no network
        raise EcvlError(
            f"wandb could not start ({type(e).__name__}: {first_line(e)}): run `wandb login`, or set "
            "WANDB_MODE=offline and `wandb sync` later"
        ) from None
