"""Hard per-task deadlines: a small pool of persistent worker processes that are killed when they overrun.

sympy can spend minutes (or all memory) on one adversarial expression, inside C code that no signal
interrupts, and `signal.alarm` only works on a process's main thread (Ray Data actors run batches on
other threads). So every check runs in a separate worker process: the parent waits at most `timeout_s`
for the answer, then SIGKILLs the worker and starts a fresh one. Workers are long-lived, so a check
costs one pipe round trip, not a process start.

Workers are plain `python -m filters.deadline` subprocesses talking over two dedicated pipes. Unlike
multiprocessing's spawn/forkserver they never re-import the caller's `__main__` (a Ray worker, a script
without a main guard), and unlike fork they are safe to start from a multi-threaded Ray actor.
A replacement starts in the background while the other workers keep going.

    pool = DeadlinePool("filters.verify:check_answer", workers=1, timeout_s=5.0)
    outcomes = pool.map([(arg1, arg2), ...])   # one Outcome per task, in input order
    pool.close()
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    """The result of one task: `value` when ok; `timed_out` at the deadline; `error` when the task raised
    or its worker died (e.g. killed by the memory limit)."""

    value: Any = None
    timed_out: bool = False
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.error is None


def _ref(fn: Callable | str) -> str:
    if isinstance(fn, str):
        return fn
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(ref: str) -> Callable:
    mod, _, name = ref.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class _Worker:
    def __init__(self, ref: str, memory_mb: int | None) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the child must import exactly what the parent imports (Ray workers, editable installs, tests)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        cmd = [sys.executable, "-m", "filters.deadline", str(to_child_r), str(from_child_w), ref, str(memory_mb or 0)]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None
        self.t0 = 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("check worker %d did not exit after SIGKILL", self.proc.pid)
        self.send_conn.close()
        self.recv_conn.close()


class DeadlinePool:
    """Runs `fn(*args)` for each task in persistent worker processes with a hard per-task deadline.

    `fn` is a module-level function (or its "module:name"). A task that overruns `timeout_s` gets
    `Outcome(timed_out=True)` and its worker is replaced; a task whose worker dies (memory limit,
    segfault) gets `Outcome(error=...)`; neither affects the other tasks.
    """

    def __init__(
        self, fn: Callable | str, workers: int = 1, timeout_s: float = 5.0, memory_mb: int | None = None
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        self.ref, self.timeout_s, self.memory_mb = _ref(fn), float(timeout_s), memory_mb
        self._workers = [_Worker(self.ref, memory_mb) for _ in range(workers)]
        self.replaced = 0
        self._owner = os.getpid()

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.ref, self.memory_mb)
        self.replaced += 1

    def _on_message(self, i: int, w: _Worker, out: list, now: float) -> None:
        try:
            kind, value = w.recv_conn.recv()
        except (EOFError, OSError):
            code = w.proc.poll()
            if not w.ready:
                raise RuntimeError(f"check worker for {self.ref} failed to start (exit code {code})") from None
            log.warning("check worker died (exit code %s); replacing it", code)
            if w.task is not None:  # an idle worker's death costs no task
                out[w.task] = Outcome(error=f"worker died (exit code {code})", seconds=now - w.t0)
            self._replace(i)
            return
        if kind == "ready":
            w.ready = True
            return
        elapsed = now - w.t0
        out[w.task] = Outcome(value=value, seconds=elapsed) if kind == "ok" else Outcome(error=value, seconds=elapsed)
        w.task = None

    def map(self, tasks: Sequence[tuple]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while pending or any(w.task is not None for w in self._workers):
            for i, w in enumerate(list(self._workers)):
                if w.ready and w.task is None and pending:
                    idx = pending.popleft()
                    try:
                        w.send_conn.send(tasks[idx])
                    except OSError:  # the worker died while idle (BrokenPipeError): the task goes to another
                        log.warning("check worker died while idle (exit code %s); replacing it", w.proc.poll())
                        pending.appendleft(idx)
                        self._replace(i)
                        continue
                    w.task, w.t0 = idx, time.monotonic()
            now = time.monotonic()
            limits = [w.t0 + self.timeout_s for w in self._workers if w.task is not None]
            limits += [w.started + START_TIMEOUT_S for w in self._workers if not w.ready]
            ready = set(wait([w.recv_conn for w in self._workers], timeout=max(0.0, min(limits) - now)))
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.recv_conn in ready:
                    self._on_message(i, w, out, now)
                elif w.task is not None and now - w.t0 >= self.timeout_s:
                    log.warning("check overran its %.1fs deadline; replacing its worker", self.timeout_s)
                    out[w.task] = Outcome(timed_out=True, seconds=now - w.t0)
                    self._replace(i)
                elif not w.ready and now - w.started >= START_TIMEOUT_S:
                    raise RuntimeError(f"check worker for {self.ref} did not start within {START_TIMEOUT_S:.0f}s")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if os.getpid() != self._owner:
            return
        for w in self._workers:
            try:
                w.send_conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            try:
                w.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):  # interpreter shutdown: nothing left to report to
            pass


def _worker_main(read_fd: int, write_fd: int, ref: str, memory_mb: int) -> None:
    import signal

    # The parent owns interruption: Ctrl-C in a terminal must not kill workers mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice: we enforce one
    rx, tx = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    fn = _resolve(ref)
    warmup = getattr(sys.modules.get(getattr(fn, "__module__", ""), None), "warmup", None)
    if callable(warmup):
        warmup()  # heavy imports before "ready", so the first task's deadline measures the task only
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))
    tx.send(("ready", None))
    while True:
        try:
            args = rx.recv()
        except (EOFError, OSError):
            return
        if args is None:
            return
        try:
            reply = ("ok", fn(*args))
        except MemoryError:
            reply = ("error", "MemoryError")
        except RecursionError:
            reply = ("error", "RecursionError")
        except Exception as e:  # noqa: BLE001 - one task's failure is reported, never fatal to the worker
            reply = ("error", f"{type(e).__name__}: {str(e)[:300]}")
        try:
            tx.send(reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
