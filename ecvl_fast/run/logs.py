"""What a run reports: `log.jsonl` (appended across restarts, every record timestamped), the
console (progress bars on a terminal; one line per epoch when stdout is a file, as in a batch
job), and optionally TensorBoard (`run.tensorboard`). Only the main rank writes any of it."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ecvl_fast import EcvlError


# What a log.jsonl record holds: a logged step, an epoch's summary, M's quantiles per shot group
# at an epoch's end, or an event in the run's life (resumed).
KINDS = ("step", "epoch", "memory", "event")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # of M per shot group, labelled p10 ... p90
QUANTILE_NAMES = tuple(f"p{round(100 * q)}" for q in QUANTILES)


def _clock(seconds: float) -> str:
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


class RunLog:
    def __init__(self, folder: Path, main: bool, epochs: int, stage: int, tensorboard: bool = False,
                 interactive: bool | None = None):
        self.path, self.main, self.epochs, self.stage = folder / "log.jsonl", main, epochs, stage
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.t0, self.done = time.time(), 0  # this process's start, and epochs it finished
        self.tb = _tensorboard(folder / "tb") if tensorboard and main else None
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
        if self.tb is not None:
            self._scalars(record)

    def eta(self, epoch: int) -> float:
        """Seconds left in the stage, from this process's pace (epochs finished since it started)."""
        return (time.time() - self.t0) / self.done * (self.epochs - epoch) if self.done else float("nan")

    def progress(self, loader, epoch: int):
        """A bar on a terminal (with the stage's ETA); the bare loader in a batch job's log."""
        if not (self.main and self.interactive):
            return loader
        from tqdm import tqdm

        eta = "" if not self.done else f", stage ETA {_clock(self.eta(epoch))}"
        return tqdm(loader, desc=f"stage {self.stage} epoch {epoch + 1}/{self.epochs}{eta}", leave=False,
                    dynamic_ncols=True)

    def epoch_end(self, epoch: int, stats: dict, lr: float, scores: dict | None) -> None:
        """The per-epoch line (printed when there are no bars) and its record; `scores`: the
        validation metrics, when the dataset has a val split."""
        self.done += 1
        val = None if scores is None else scores["all"]
        groups = None if scores is None else {g: scores[g] for g in ("many", "medium", "few") if scores.get(g) is not None}
        self("epoch", {"epoch": epoch + 1, **stats, "lr": lr, "val_all": val, "val_groups": groups,
                       "val_macro_f1": None if scores is None else scores.get("macro_f1")})
        if self.main and not self.interactive:
            acc = "-" if val is None else f"{100 * val:.2f}%"
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stage {self.stage} epoch {epoch + 1}/{self.epochs} "
                  f"loss {stats['train_loss']:.4f} lr {lr:.3g} {stats['img_s']:.0f} img/s val {acc} "
                  f"ETA {_clock(self.eta(epoch + 1))}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _scalars(self, r: dict) -> None:
        step = r.get("step", r.get("epoch", 0))
        for key in ("loss", "lr", "img_s", "train_loss", "val_all"):
            if isinstance(r.get(key), (int, float)):
                self.tb.add_scalar(f"stage{self.stage}/{key}", r[key], step)
        for key, group_metrics in (r.get("val_groups") or {}).items():
            if isinstance(group_metrics, (int, float)):
                self.tb.add_scalar(f"stage{self.stage}/val_{key}", group_metrics, r["epoch"])
        for group, q in (r.get("m_by_group") or {}).items():
            for name in QUANTILE_NAMES:
                self.tb.add_scalar(f"stage{self.stage}/M_{group}/{name}", q[name], r["epoch"])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise EcvlError("run.tensorboard = true needs the tensorboard package: pip install 'ecvl-fast[tensorboard]'") \
            from None
    return SummaryWriter(str(folder))
