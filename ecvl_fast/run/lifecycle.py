"""A run's lifecycle on a shared cluster: the same command resumes, signals stop it cleanly.

- **Auto-resume.** A run folder with a `last.pt` is continued, from mid-epoch if that is where it
  stopped; one with a finished run is reported, not trained again; one whose saved config
  differs is refused, naming the keys. `--restart` starts over and moves the old run aside
  (`previous-<time>/`), so nothing is deleted.
- **Preemption.** SIGTERM (torchrun, SLURM at the time limit) and SIGUSR1 (SLURM's `--signal`)
  set a flag. Ranks agree on it at the next log-cadence sync point, the main rank writes a
  checkpoint that resumes at that very step, and every rank leaves with `EXIT_PREEMPTED`.
  If the agreement cannot complete (a dead peer), a watchdog exits after `run.stop_grace_s`;
  the last good checkpoint then stands.
- **Shared filesystem.** Only global rank 0 writes; every rank reads the run folder, so at
  start-up each rank must read back a token rank 0 wrote there.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ecvl_fast import EcvlError
from ecvl_fast.config import Config
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.run import dist as D
from ecvl_fast.run.files import atomic_write, remove_stale_temps

LOCK = ".lock"  # the run folder's writer (RunLock)
DIVERGED = "diverged"  # left by a run stopped on a non-finite loss: its optimizer settings may change on resume
HEALTHY = "healthy.pt"  # the newest checkpoint the training went on from without its loss blowing up
DIVERGED_LAST = "last-diverged.pt"  # a diverged run's last checkpoint, set aside when it resumes healthy.pt
HEALTH_FACTOR = 3.0  # a window's mean loss above this times the median of the earlier ones' is not healthy
# What a diverged run may change when it resumes its last finite checkpoint
RETUNABLE = {f"stage{s}.{key}" for s in (1, 2) for key in ("lr", "warmup_epochs", "weight_decay")}
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; run the same command again

# Settings that change how a run executes, not what it computes: a resumed run may change them.
OPERATIONAL = {
    "data": {"workers", "dali_threads", "prefetch", "dali_queue"},
    "dist": {"backend"},
    "run": {"out", "device", "log_every", "checkpoint_every", "stop_grace_s", "report_to", "lines_per_epoch", "report"},
}  # out: a folder may move


EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class Preempted(EcvlError):
    """Stopped on a signal after writing a resumable checkpoint (exit status EXIT_PREEMPTED, or
    EXIT_INTERRUPTED after Ctrl-C)."""

    def __init__(self, message: str, exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Position:
    """Where a run continues: `step` is the first step of `epoch` still to run; `carry` holds that
    epoch's running sums (train loss, images) when it stopped mid-epoch."""

    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    carry: dict | None = None
    finished: Path | None = None  # a finished run's metrics.json: nothing to train


def config_diff(old: dict, new: dict, stage: int = 2) -> list[str]:
    """`section.key` for every setting that differs and changes what the run computes (stage 1
    reads no [stage2] setting, so changing one never refuses a stage-1 folder)."""
    defaults, keys = Config().to_dict(), []
    for section, values in new.items():
        if stage == 1 and section == "stage2":
            continue
        for key, value in values.items():
            if key in OPERATIONAL.get(section, ()):
                continue
            # a setting added after the run was written: it ran as the default does (defaults keep old behaviour)
            was = old.get(section, {}).get(key, defaults.get(section, {}).get(key))
            if was != value:
                keys.append(f"{section}.{key} ({was!r} -> {value!r})")
    return keys


def set_aside(folder: Path) -> Path | None:
    """`--restart`: move what a previous run left in `folder` into `folder/previous-<time>/`."""
    old = (
        [p for p in folder.iterdir() if not p.name.startswith("previous-") and p.name != LOCK]
        if folder.is_dir()
        else []
    )
    if not old:
        return None
    dest = folder / time.strftime("previous-%Y%m%d-%H%M%S")
    dest.mkdir()
    for p in old:
        p.rename(dest / p.name)
    return dest


def start(
    folder: Path, cfg, epochs: int, d: D.Dist, restart: bool, log, stage: int = 2
) -> tuple[Position, dict | None]:
    """Decide how this run starts; returns (position, the checkpoint to restore or None)."""
    if restart and d.main:
        moved = set_aside(folder)
        if moved is not None:
            print(f"--restart: the previous run in {folder} was moved to {moved}")
    D.barrier()
    if d.main:  # under the folder's lock: a temp file here is a killed writer's
        remove_stale_temps(folder)
    last = folder / "last.pt"
    if not last.is_file():
        return Position(), None
    ckpt = ckpt_io.load(last)  # a different model shows up as a config difference below
    diff = config_diff(ckpt["config"], cfg.to_dict(), stage)
    if diff and retunable(folder, diff):  # the marker stays until a checkpoint with the new settings is written
        healthy = folder / HEALTHY
        D.barrier()  # every rank has read last.pt before the main rank replaces it
        if d.main:
            _set_aside_diverged(folder, healthy)
        D.barrier()
        if not healthy.is_file():
            if d.main:
                print(
                    f"{folder} diverged before any healthy checkpoint: starting over with {'; '.join(diff)} "
                    f"(its last checkpoint is kept as {DIVERGED_LAST})"
                )
            log("event", {"event": "restarted after divergence", "host": socket.gethostname()})
            return Position(), None
        ckpt = ckpt_io.load(healthy)
        at = ckpt["position"]
        if d.main:
            where = f"epoch {at['epoch'] + 1}" + (f", step {at['step']}" if at["step"] else "")
            print(
                f"{folder} diverged: resuming its last healthy checkpoint ({HEALTHY}, {where}) with {'; '.join(diff)}"
            )
        diff = []
    if diff:
        raise EcvlError(
            f"{folder} holds a run with another config: {'; '.join(diff)}. Re-run with its config "
            f"({folder / 'config.toml'}), pass --restart to start over (the old run is kept in "
            f"{folder}/previous-*), or choose another run.out"
        )
    at = ckpt["position"]
    pos = Position(at["epoch"], at["step"], ckpt["best"], at.get("carry"))
    if done(ckpt, epochs, folder, cfg.run.report):
        pos.finished = folder / "metrics.json"
        return pos, None
    log("event", {"event": "resumed", "epoch": pos.epoch + 1, "step": pos.step, "host": socket.gethostname()})
    if d.main:
        print(f"resuming {folder} at epoch {pos.epoch + 1}" + (f", step {pos.step}" if pos.step else ""))
    return pos, ckpt


def done(ckpt: dict, epochs: int, folder: Path, report: str = "last") -> bool:
    """The one rule for "this run is finished" (train, the dry run and ablate ask it), given that
    its last.pt holds the same config: that checkpoint ends its last epoch, and the final report
    (metrics.json) was written, on the checkpoint `report` (run.report) names."""
    import json

    at, metrics = ckpt["position"], folder / "metrics.json"
    if not (at["epoch"] >= epochs and at["step"] == 0 and metrics.is_file()):
        return False
    try:
        return json.loads(metrics.read_text()).get("report", "last") == report
    except (OSError, ValueError):
        return False


def finished(folder: Path, cfg, epochs: int, stage: int) -> Path | None:
    """metrics.json of a finished run in `folder` with this config (`done`; settings that change
    only how a run executes aside, and for stage 1 the [stage2] section), else None."""
    last = folder / "last.pt"
    if not last.is_file():
        return None
    try:
        ckpt = ckpt_io.load(last)
    except EcvlError:
        return None
    if config_diff(ckpt["config"], cfg.to_dict(), stage) or not done(ckpt, epochs, folder, cfg.run.report):
        return None
    return folder / "metrics.json"


def _set_aside_diverged(folder: Path, healthy: Path) -> None:
    """The wrecked last.pt is kept as DIVERGED_LAST for a post-mortem, and never resumed or promoted:
    last.pt becomes a copy of healthy.pt (each file written whole before the next step, so a crash
    in between loses neither), or is moved aside where there is none. A last.pt that already is
    healthy.pt's copy (a retuned run that diverged before its first checkpoint) stays as it is."""
    import filecmp

    last = folder / "last.pt"
    if not healthy.is_file():
        last.replace(folder / DIVERGED_LAST)  # atomic: afterwards there is no last.pt, so a rerun starts over
        return
    if filecmp.cmp(last, healthy, shallow=False):
        return
    atomic_write(folder / DIVERGED_LAST, lambda tmp: shutil.copyfile(last, tmp))
    atomic_write(last, lambda tmp: shutil.copyfile(healthy, tmp))


def healthy(window: float, earlier: list[float]) -> bool:
    """The mean loss after a checkpoint says whether training went on well from it: finite, and at
    most HEALTH_FACTOR times the median of the earlier windows' (any finite first window)."""
    if not math.isfinite(window):
        return False
    if not earlier:
        return True
    ordered = sorted(earlier)
    return window <= HEALTH_FACTOR * ordered[len(ordered) // 2]


def retunable(folder: Path, diff: list[str]) -> bool:
    """A diverged run may resume its last finite checkpoint with other optimizer settings, and only those."""
    return (folder / DIVERGED).is_file() and all(key.split(" ")[0] in RETUNABLE for key in diff)


def mark_diverged(folder: Path) -> None:
    (folder / DIVERGED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def check_shared_folder(folder: Path, d: D.Dist) -> None:
    """Every rank must see what rank 0 writes in the run folder (checkpoints, the stage-2 init,
    finished rows). A node that does not gets one clear line, not a hang or a wrong result."""
    if not d.enabled:
        return
    token = D.broadcast_object(secrets.token_hex(8) if d.main else None)
    path = folder / f".token-{token}"
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    D.barrier()
    try:
        ok = path.read_text() == token
    except OSError:
        ok = False
    missing = torch.tensor([0 if ok else 1], device=d.device)
    D.all_reduce_sum(missing)
    D.barrier()
    if d.main:
        path.unlink(missing_ok=True)
    if int(missing):
        where = "" if ok else f" (this is rank {d.rank} on {socket.gethostname()})"
        raise EcvlError(
            f"{int(missing)} rank(s) cannot read {folder}, which rank 0 writes: run.out (and the data) "
            f"must be on a filesystem every node shares{where}"
        )


class RunLock:
    """One writer per run folder: `.lock` holds the writer's pid, host and start, created
    exclusively and touched every HEARTBEAT_S while the run lives; removed on any exit. A second
    command into a held folder is refused at once. A lock whose holder is gone (its pid no longer
    runs on this host, or runs as a process started after the lock was taken, or no heartbeat for
    STALE_S) is taken over with one line. Under torchrun the main rank takes it and every rank learns whether
    it could (`d`), so a refusal stops them all at once."""

    HEARTBEAT_S, STALE_S = 30.0, 120.0

    def __init__(self, folder: Path, d: D.Dist | None = None):
        self.path, self.d, self.active = Path(folder) / LOCK, d, d is None or d.main
        self._stop = threading.Event()
        self.made: Path | None = None
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "started": time.time(),
        }

    def __enter__(self):
        refused = None
        if self.active:
            try:
                self._acquire()
            except EcvlError as e:
                refused, self.active = str(e), False
        if self.d is not None and self.d.enabled:
            refused = D.broadcast_object(refused)
        if refused:
            raise EcvlError(refused)
        return self

    def _acquire(self) -> None:
        made = self.path.parent
        while not made.parent.exists():  # the topmost folder this command creates, removed again if left empty
            made = made.parent
        self.made = made if not made.exists() else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            break
        threading.Thread(target=self._heartbeat, daemon=True, name="ecvl-lock-heartbeat").start()

    def __exit__(self, *exc):
        if not self.active:
            return
        self._stop.set()
        if self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        if self.made is not None:  # a run refused before it wrote anything leaves no empty folders behind
            folder = self.path.parent
            while folder != self.made.parent and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _take_over_or_refuse(self) -> None:
        holder = self._holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        if holder is None:
            why = "an unreadable lock file" if age > 5 else None  # a writer may be filling it now
        else:
            why = _stale(holder, age)
        if why is None:
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since', '?')}"
                if holder
                else "another command"
            )
            raise EcvlError(
                f"{self.path.parent} is in use by {who}: one run writes to a folder at a time; "
                "wait for it, stop it, or choose another run.out"
            )
        print(f"{self.path.parent}: taking over a stale lock ({why})")
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass


def held_by(folder: Path) -> str | None:
    """Who holds `folder`'s lock while its writer lives ("pid P on HOST"), else None."""
    lock = Path(folder) / LOCK
    try:
        holder, age = json.loads(lock.read_text()), time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return None
    return None if _stale(holder, age) else f"pid {holder.get('pid')} on {holder.get('host')}"


def _stale(holder: dict, age: float) -> str | None:
    """Why a lock is stale, or None while its writer lives: on this host, `_stale_here`; from
    another node (a shared filesystem), no heartbeat for RunLock.STALE_S."""
    if holder.get("host") == socket.gethostname():
        return _stale_here(holder, age, RunLock.STALE_S)
    return f"no heartbeat for {age:.0f} s" if age > RunLock.STALE_S else None


def _stale_here(holder: dict, age: float, stale_s: float) -> str | None:
    """Why a lock taken on this host is stale, or None while its writer runs: its pid is gone; or the
    pid runs, but that process started after the lock was taken (the pid was reused); or, where the
    process's start time cannot be read, no heartbeat for `stale_s`."""
    pid = holder.get("pid")
    if not _alive(pid):
        return f"pid {pid} no longer runs"
    taken = holder.get("started")
    if taken is None:  # a lock from before "started" was written: its local-time "since"
        try:
            taken = time.mktime(time.strptime(holder.get("since", ""), "%Y-%m-%d %H:%M:%S"))
        except (TypeError, ValueError):
            taken = None
    began = _process_start(pid)
    if taken is not None and began is not None:  # decisive: a stopped (Ctrl-Z) writer keeps its lock
        if began > taken + 2:  # /proc's start time is to 1/100 s, btime to 1 s
            return f"pid {pid} runs, but started after the lock was taken: a reused pid"
        return None
    if age > stale_s:  # no start time to compare (no /proc): the heartbeat decides
        return f"no heartbeat for {age:.0f} s"
    return None


def _process_start(pid) -> float | None:
    """When `pid` started, as Unix time (Linux: /proc/PID/stat's starttime after /proc/stat's btime)."""
    try:
        ticks = int(Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, TypeError):
        return None


def _alive(pid) -> bool:
    """Does `pid` run on this host? A zombie does not: a killed writer whose parent is gone stays
    one where no init process reaps it (a container)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # runs, as another user
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{int(pid)}/status").read_text()
    except OSError:
        return True  # no /proc: trust the signal


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGINT set a flag (handlers only in the main thread, restored on exit).
    A second Ctrl-C does not wait for the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, grace_s: float):
        self.grace_s, self.signum, self._old = grace_s, None, {}
        self._left = threading.Event()  # set on leaving the block: the watchdog stands down

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self._left.set()
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            threading.Thread(target=self._watchdog, daemon=True, name="ecvl-stop-watchdog").start()

    def _watchdog(self):
        """If the ranks cannot agree and checkpoint in time (a peer died mid-collective), leave;
        the checkpoint is written to a temp file and renamed, so the last good one stands."""
        if not self._left.wait(self.grace_s):
            os._exit(self.exit_code)

    def agreed(self, d: D.Dist) -> bool:
        """Has any rank been signalled? Every rank calls this at the same steps (a sync point)."""
        flag = torch.tensor([0 if self.signum is None else 1], device=d.device)
        D.all_reduce_max(flag)
        return bool(int(flag))

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
