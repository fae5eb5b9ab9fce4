"""Writing files so that nothing is lost: a temp file of this writer's own, flushed to disk, then
renamed over the target, then the folder flushed (a power loss leaves the old file or the new one,
never a torn or empty one). Errors from the disk become one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from ecvl_fast import EcvlError, first_line

TMP_SUFFIX = ".tmp"

DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def temp_path(path: Path) -> Path:
    """A temp name no other writer uses (the pid), hidden beside the target."""
    return path.with_name(f".{path.name[:150]}.{os.getpid()}{TMP_SUFFIX}")  # a 255-byte name leaves no room


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content; then fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise EcvlError(
            f"{path}: could not write it ({disk_reason(e, path.parent)}); "
            f"{'the previous file is intact' if path.exists() else 'nothing was written'}"
        ) from None


def disk_reason(e: BaseException, folder: Path) -> str:
    code = getattr(e, "errno", None)
    if code in DISK_ERRORS:
        return DISK_ERRORS[code]
    try:
        import shutil

        usage = shutil.disk_usage(folder)
        if 0 < usage.total and usage.free < 1 << 20:  # /proc and the like: no size at all, not a full disk
            return DISK_ERRORS[errno.ENOSPC]
    except OSError:
        pass
    return first_line(e)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Temp files a killed writer left (call while holding the folder's lock)."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def writable(folder: str | Path) -> str | None:
    """Why a report cannot be written into `folder` (created if need be), else None: checked before
    the work, not after it."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        for p in made:  # nothing is left behind: the report creates its folder when it is written
            try:
                p.rmdir()
            except OSError:
                break
    return None
