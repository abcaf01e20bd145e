"""One logging setup for the CLI, Ray workers and trainer ranks.

By default a run shows our lines and real warnings only: Ray Data's execution plans and progress dumps,
the token-auth notice, and the progress bars of transformers / huggingface_hub / tqdm are turned off
(`quiet_env`, `quiet_ray`). `verbose=True` (`r1v -v`) leaves every library as it is.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s | %(message)s"

# Environment read by libraries at import (here and in Ray workers, which inherit it or get it through
# the runtime env): no tqdm bars from transformers ("Loading weights", "Writing model shards") or hub
# downloads (transformers follows huggingface_hub's switch), no Ray usage-stats notice. tqdm itself stays
# on (TQDM_DISABLE would also silence our own bar, pipeline.progress).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "R1V_QUIET": "1",
}

# Ray messages that say nothing about the run (each a substring of the message).
_RAY_NOISE = (
    "Token authentication is enabled",
    "Generated new authentication token",
    "Started a local Ray instance",
    "Progress will be logged because",
    "Progress bars disabled",
    # momentary while one stage's actors release their CPUs to the next stage's tasks
    "does not have any available CPUs",
)
# DeepSpeed on a machine without an accelerator says so at every import.
_DEEPSPEED_NOISE = ("Setting accelerator to CPU",)


class _DropNoise(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


def quiet() -> bool:
    return os.environ.get("R1V_QUIET", "1") == "1"


def quiet_env() -> dict[str, str]:
    """The variables that keep libraries quiet (empty with -v), for this process and Ray workers."""
    return dict(QUIET_ENV) if quiet() else {}


def _add_filter(target: logging.Logger | logging.Handler, needles: tuple[str, ...]) -> None:
    if not any(isinstance(f, _DropNoise) and f.needles == needles for f in target.filters):
        target.addFilter(_DropNoise(needles))


def quiet_libraries() -> None:
    """Without importing anything: DeepSpeed's no-accelerator notice (its logger is the object DeepSpeed
    configures when imported later)."""
    if quiet():
        _add_filter(logging.getLogger("DeepSpeed"), _DEEPSPEED_NOISE)


def quiet_ray() -> None:
    """Once Ray is imported (before and after ray.init): no start-up notices, no execution-plan or
    per-operator dumps from Ray Data on the console (they stay in Ray Data's own log file); warnings show."""
    if not quiet():
        return
    quiet_libraries()
    for name in ("ray", "ray.data"):
        for h in logging.getLogger(name).handlers:
            _add_filter(h, _RAY_NOISE)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.print_on_execution_start = False
        # Ray Data's own bars: off (a second bar beside ours on a terminal, a multi-line dump per tick
        # elsewhere); pipeline.progress reports the long loops. `-v` keeps them.
        ctx.enable_progress_bars = False
    except ImportError:
        return
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
            _add_filter(h, _RAY_NOISE)


def setup_logging(level: str | int | None = None, rank: int | None = None, verbose: bool | None = None) -> None:
    """Configure the root logger once; ranks > 0 log warnings only. `verbose` (r1v -v) keeps every
    library's own logs and progress bars; otherwise they are quieted (`QUIET_ENV`)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = os.environ.get("R1V_LOG_LEVEL", "INFO")
    if rank > 0:
        level = logging.WARNING
    if verbose is not None:
        os.environ["R1V_QUIET"] = "0" if verbose else "1"
    for k, v in quiet_env().items():
        os.environ.setdefault(k, v)
    root = logging.getLogger()
    if not getattr(root, "_r1v_configured", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root._r1v_configured = True  # type: ignore[attr-defined]
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries()
