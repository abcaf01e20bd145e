"""Run one stage module against hand-written input steps, exactly as the runner does.

Tests write their input tables with the real ShardWriter into `<run>/<step>/`, build a StageContext
pointing at them, call `module.run(cfg, ctx)` and then check counts and write the manifest like
pipeline.runner does, so a stage is exercised through its real I/O without the rest of the pipeline.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

from pipeline.rundir import Manifest, ShardWriter
from pipeline.runner import StageContext


def write_step(run_dir: Path, step: str, schema: pa.Schema, table: str, rows: list[dict] | pa.Table,
               sub: str | None = None, stage: str | None = None, round_: int = 0) -> Path:
    """Write rows as a finished step (shards + manifest), so `ctx.read_input` finds them."""
    d = run_dir / step
    with ShardWriter(d / sub if sub else d, schema, table) as w:
        w.write(rows)
    if sub is None:
        n = rows.num_rows if isinstance(rows, pa.Table) else len(rows)
        Manifest(stage=stage or step.split("-r")[0], step=step, round=round_, rows_in=n, kept=n).write(d)
    return d


def run_stage(module, cfg, run_dir: Path, step: str, inputs: dict[str, list[str]], round_: int = 0,
              seed: int = 0) -> Manifest:
    ctx = StageContext(
        run_dir=run_dir,
        step=step,
        stage=step.split("-r")[0],
        round=round_,
        out_dir=run_dir / step,
        inputs={role: [run_dir / u for u in ups] for role, ups in inputs.items()},
        run_config=SimpleNamespace(run=SimpleNamespace(seed=seed)),
        fingerprint="test",
    )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    m = module.run(cfg, ctx)
    m.stage, m.step, m.round = ctx.stage, step, round_
    m.check_counts()
    m.write(ctx.out_dir)
    return m
