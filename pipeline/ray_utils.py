"""Ray start-up: an embedded local cluster by default, a real one with RAY_ADDRESS or `ray job submit`."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.logging import quiet_ray

log = logging.getLogger(__name__)


def init_ray(cfg: Any = None) -> None:
    """Connect to (or start) Ray once per process.

    Order: an already initialised Ray; `ray.address` from the config; RAY_ADDRESS (set by
    `ray job submit` for the job's driver); else a local cluster with `ray.num_cpus` CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray()  # before ray.init: its start-up notices go through the "ray" logger's handler
    address = getattr(cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "ignore_reinit_error": True}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        quiet_ray()
        return
    if getattr(cfg, "num_cpus", None):
        kwargs["num_cpus"] = cfg.num_cpus
    if getattr(cfg, "object_store_memory_mb", None):
        kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    log.info("starting an embedded local Ray cluster")
    ray.init(include_dashboard=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("R1V_PROGRESS", "1") == "1"
    quiet_ray()
