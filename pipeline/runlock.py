"""One writer per run directory: an exclusive lock held for as long as the driver process lives.

    with RunLock(run_dir, command="r1v run configs/demo.yaml"):
        ...                                  # a second driver on run_dir gets RunLockedError

The lock is `fcntl.flock` on `<run>/.lock`: the kernel drops it when the holding process exits, however
it exits (kill -9, OOM, node reboot), so a dead holder never blocks the next run and nothing has to guess
whether a pid is stale. The file also records who holds it (pid, host, command, start time), rewritten by
each new holder, so the refusal names the holder. On NFS, Linux maps flock onto the server's POSIX locks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.errors import RunStateError

LOCK_FILE = ".lock"

# fds of the locks this process holds. A forked child (a verifier worker, a multiprocessing pool) gets a
# copy of each; closing the copies there keeps the lock tied to the driver's life only (the lock stays
# held through the driver's own fd). Across exec the fds are not inherited at all (os.open's default).
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RunStateError):
    """Another live process holds the run directory (exit code 3, as for any run-state refusal)."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]) -> None:
        self.run_dir, self.holder = run_dir, holder
        since = holder.get("started_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        super().__init__(
            f"run directory {run_dir} is in use by another driver: pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} ({holder.get('command') or 'unknown command'}), running since {when}. "
            f"Wait for it to finish or stop it (kill {holder.get('pid', '?')} on {holder.get('host', '?')}); "
            f"the lock is released the moment that process exits"
        )


def read_holder(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def is_locked(run_dir: Path) -> dict[str, Any] | None:
    """The holder's record when a live process holds the run, else None (for `r1v status`)."""
    p = Path(run_dir) / LOCK_FILE
    if not p.exists():
        return None
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return read_holder(run_dir) or {"pid": "?"}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(self.run_dir, read_holder(self.run_dir)) from None
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started_at": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc: Any) -> None:
        self.release()
