"""One logging setup for the CLI, Ray workers and trainer ranks."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s | %(message)s"


def setup_logging(level: str | int | None = None, rank: int | None = None) -> None:
    """Configure the root logger once; ranks > 0 log warnings only."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = os.environ.get("R1V_LOG_LEVEL", "INFO")
    if rank > 0:
        level = logging.WARNING
    root = logging.getLogger()
    if not getattr(root, "_r1v_configured", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root._r1v_configured = True  # type: ignore[attr-defined]
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
