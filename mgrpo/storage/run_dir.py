"""A run directory: one writer at a time, never overwritten by accident, and the disk it needs.

    config.yaml        the resolved config                      metrics.jsonl   one line per step
    checkpoints/       resumable checkpoints (mgrpo/storage/checkpoint.py), rotated by keep_checkpoints
    snapshots/         policy-only Hugging Face exports, kept   final/          the trained policy
    rollouts/          the sampled responses (rollouts_every)   .lock           who writes here now

One writer: the process that owns a run (rank 0 under torchrun) holds an OS lock on `.lock` (flock) for as
long as it trains. The kernel drops the lock when the process ends, however it ends (a crash, kill -9, a
preempted job), so a dead run never leaves a stale lock; the file's text only says who held it last. A second
`mgrpo train` on the directory, with or without resume, stops before any work and says who holds it. Reading
(`mgrpo eval`, `mgrpo compare --report`) takes no lock.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..errors import MgrpoError

LOCK_FILE = ".lock"


class RunDirError(MgrpoError):
    """The run directory cannot be used as asked; the message says how to proceed."""


class DiskFullError(RunDirError):
    """A checkpoint, snapshot or export could not be written for lack of space."""


# ---------------------------------------------------------------------------------------------------------
# One writer

def unusable(run_dir: Path, error: OSError) -> str:
    """Why run_dir cannot be made or written (the OSError of its mkdir or its lock file), and what to do."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"run_dir={run_dir} is a file, not a directory: choose another run_dir"
    above = next((p for p in run_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"run_dir={run_dir} is under {above}, a file, not a directory: choose another run_dir"
    return (f"run_dir={run_dir} cannot be created or written ({error.strerror or error}"
            + (f": {error.filename}" if error.filename and Path(error.filename) != run_dir else "")
            + "): choose a run_dir you can write to")


class RunDirLock:
    """An exclusive flock on run_dir/.lock, held until `release` or the process's end."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(unusable(self.path.parent, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                who = json.loads(holder)
                who = f"host {who['host']}, pid {who['pid']}, started {who['started']}"
            except (ValueError, KeyError, TypeError):
                who = "holder unknown"
            raise RunDirError(f"{self.path.parent} is in use by a running job ({who}): wait for it to end, stop it, "
                              "or give another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": datetime.now().isoformat(timespec="seconds")}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)          # closing the descriptor drops the flock
            self.fd = None


# ---------------------------------------------------------------------------------------------------------
# Disk space

def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def is_out_of_space(error: BaseException) -> bool:
    """An error that a full disk (or quota) caused, wherever it surfaced: an OSError with ENOSPC/EDQUOT, or
    torch's zip writer's short write ("unexpected pos ..."), looked for through DCP's wrapped failures and the
    exception chain."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        for failure in getattr(e, "failures", {}).values():    # DCP's CheckpointException: rank -> (exc, tb)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [e.__cause__, e.__context__]
    return False


def disk_full_error(where: Path, what: str, needed: int) -> DiskFullError:
    return DiskFullError(f"no space left on {mount_point(where)} writing {what} (about {mb(needed)} needed, "
                         f"{mb(free_bytes(where))} free): free space, lower keep_checkpoints, or set run_dir "
                         "elsewhere; the earlier checkpoints are intact and resume=true continues from the newest")


def space_warning(where: Path, needed: int, what: str) -> Optional[str]:
    """A warning line when the disk has less free space than the next write is likely to take."""
    free = free_bytes(where)
    if needed and free < 1.1 * needed:
        return (f"[warning] only {mb(free)} free on {mount_point(where)} and {what} took {mb(needed)}: the next save "
                "may not fit. Free space, lower keep_checkpoints, or set run_dir elsewhere.")
    return None


# ---------------------------------------------------------------------------------------------------------
# Starting, resuming, overwriting

RUN_FILES = ("metrics.jsonl", "metrics.png", "config.yaml", "base_model.txt")
RUN_FOLDERS = ("checkpoints", "snapshots", "final", "tensorboard", "rollouts")


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in ("metrics.jsonl", *RUN_FOLDERS[:3]))


def clear_run(run_dir: Path) -> None:
    """overwrite=true: delete what an earlier run wrote (and nothing else in the directory)."""
    for name in RUN_FOLDERS:
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for earlier in Path(run_dir).glob("config.until_*.yaml"):     # configs a resume replaced (mgrpo/loop/trainer.py)
        earlier.unlink()
