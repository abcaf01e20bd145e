"""Progress of a long loop in the driver: rows done / total, rate and ETA.

On a terminal a live bar (tqdm, log lines printed above it); otherwise (CI, `ray job logs`, a pipe) one
log line every `R1V_PROGRESS_EVERY` seconds (default 5) and a last one when the loop ends:

    filter: 192/456 chains (42%) | 61.3 chains/s | ETA 4s
    filter: 456/456 chains in 7.4s | 61.6 chains/s

    with Progress("filter", total=n, unit="chains") as p:
        for batch in batches:
            p.update(len(batch))
    for batch in track(batches, "filter", total=n, unit="chains", size=len): ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def _every_s() -> float:
    try:
        return float(os.environ.get("R1V_PROGRESS_EVERY", "5"))
    except ValueError:
        return 5.0


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, name: str, total: int | None = None, unit: str = "rows", logger: logging.Logger | None = None,
                 every_s: float | None = None, live: bool | None = None) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.log = logger or logging.getLogger(name if "." in name else f"pipeline.progress.{name}")
        self.every_s = _every_s() if every_s is None else every_s
        self.done = 0
        self.extra = ""
        self.t0 = self._last = time.perf_counter()
        if live is None:
            live = sys.stderr.isatty() and os.environ.get("R1V_PROGRESS", "1") != "0"
        self._bar = None
        self._redirect: contextlib.ExitStack | None = None
        if live:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(total=total, desc=name, unit=f" {unit}", dynamic_ncols=True, leave=False,
                             disable=False, file=sys.stderr)

    def line(self, final: bool = False) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        extra = f" | {self.extra}" if self.extra else ""
        if final:
            of = f"/{self.total}" if self.total is not None else ""
            return f"{self.name}: {self.done}{of} {self.unit} in {dt:.1f}s | {rate:.1f} {self.unit}/s{extra}"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = _duration(eta) if eta != float("inf") else "?"
            return (f"{self.name}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%) | "
                    f"{rate:.1f} {self.unit}/s | ETA {eta_s}{extra}")
        return f"{self.name}: {self.done} {self.unit} | {rate:.1f} {self.unit}/s{extra}"

    def update(self, n: int = 1, extra: str | None = None) -> None:
        self.done += n
        if extra is not None:
            self.extra = extra
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix_str(extra, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s and (self.total is None or self.done < self.total):
            self._last = now
            self.log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
        self.log.info("%s", self.line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:  # an error or Ctrl-C: no summary line, just put the terminal back
            self._bar.close()
            if self._redirect is not None:
                self._redirect.close()


def track(items: Iterable[T], name: str, total: int | None = None, unit: str = "rows",
          size: Callable[[T], int] | None = None, logger: logging.Logger | None = None) -> Iterator[T]:
    """Yield `items`, counting `size(item)` (default 1) of `unit` per item."""
    with Progress(name, total, unit, logger) as p:
        for item in items:
            yield item
            p.update(size(item) if size else 1)
