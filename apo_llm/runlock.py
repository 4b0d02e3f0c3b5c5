"""One writer per run directory: an exclusive OS file lock held for the life of the run.

`RunLock(run_dir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<parent>/.<name>.lock`, a sibling of
the run directory (so that `logging.overwrite`, which moves the run directory aside, never moves the
lock, and so that taking the lock writes nothing inside the run). The kernel releases a flock when
the process that holds it dies, by SIGKILL included, so a stale lock file never blocks a requeue:
only a live holder does. The lock file names its holder (pid and host) for the second job's error.

Every command that writes a run takes it before it writes anything (`apo_llm.train` on both engines,
on rank 0 only under several processes; `apo_llm.evaluate`, `apo_llm.topk_coverage`; `apo_toy.run`).
This module imports only the standard library (and apo_llm.cli), so the simulator can use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from apo_llm.cli import UserError


class RunLockedError(UserError):
    """Another live process holds the run directory; str(e) is one line naming it (pid, host)."""


def lock_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


class RunLock:
    """Context manager (or acquire()/release()) for the exclusive lock of one run directory."""

    def __init__(self, run_dir: str | Path, what: str = "run directory", place: str = "output directory"):
        self.run_dir, self.what, self.place = Path(run_dir), what, place  # names for the two errors
        self.path = lock_path(run_dir)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockedError naming the holder; creates the parent directory only.
        A lock file that cannot be created is a UserError naming `place` (an unusable output dir)."""
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.place}: cannot create the lock file {self.path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(f"{self.what} {self.run_dir} is in use by another job ({holder}, lock "
                                 f"{self.path}); wait for it to end, or pick another name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the lock file stays: deleting it could let two jobs lock two different files)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a lock object dropped without release() (a library caller)
        try:
            self.release()
        except Exception:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder not yet named"
