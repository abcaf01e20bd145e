"""The curate stage on Ray (`curate.workers` >= 1): grouped by problem without one table in the driver.

    r1v run configs/demo.yaml --stage curate curate.workers=2

Map: one Ray task per row group of the chains and of the problems shards writes its rows into
`n_buckets` bucket files by crc32(problem_id) (in the step's attempt folder, pipeline.rundir).
Reduce: one task per bucket reads that bucket's chains and problems, runs the same per-problem code as
the in-driver path (filters.curate.curate_rows) and publishes the bucket's SFT and retry shards
(`part-b00003.parquet`). The driver sees file names and per-bucket counts only. Rows are ordered by
problem_id within a bucket; a bucket holds about `bucket_problems` problems.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rundir import Manifest, ShardWriter, close_attempt, open_attempt, publish_shard, shard_files

log = logging.getLogger(__name__)


def _bucket_ids(ids: list[str], n: int) -> pa.Array:
    return pa.array([zlib.crc32(p.encode()) % n for p in ids], pa.int32())


def _partition(unit: dict[str, Any], kind: str, columns: list[str] | None, n: int, attempt: str) -> int:
    """Split one row group into bucket files `<kind>-b<bucket>-u<unit>.parquet` of the attempt folder."""
    import os

    import pyarrow.compute as pc

    t = pq.ParquetFile(unit["file"]).read_row_group(int(unit["row_group"]), columns=columns)
    buckets = _bucket_ids(t.column("problem_id").to_pylist(), n)
    for b in pc.unique(buckets).to_pylist():
        part = t.filter(pc.equal(buckets, b))
        name = f"{kind}-b{b:05d}-u{unit['idx']:05d}.parquet"
        tmp = Path(attempt) / f".{name}"
        pq.write_table(part, tmp)  # fails once the attempt is fenced: the folder is gone
        os.replace(tmp, Path(attempt) / name)
    return t.num_rows


def _read_bucket(attempt: Path, kind: str, b: int) -> pa.Table | None:
    files = sorted(attempt.glob(f"{kind}-b{b:05d}-u*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _reduce(b: int, n: int, cfg: Any, round_: int, wanted: list[str] | None, attempt: str, sys_prompt: str) -> dict:
    import ray

    from filters.curate import RETRY, curate_rows
    from pipeline.schema import SFT

    att = Path(attempt)
    ct, pt = _read_bucket(att, "c", b), _read_bucket(att, "p", b)
    chains = ct.to_pylist() if ct is not None else []
    problems = {p["problem_id"]: p for p in pt.to_pylist()} if pt is not None else {}
    seen = {c["problem_id"] for c in chains}
    if wanted is None:
        attempted = set(problems) | seen
    else:
        attempted = {p for p in wanted if zlib.crc32(p.encode()) % n == b} | seen
    attempted &= set(problems)
    m = Manifest(stage="curate")
    rows, retry, filter_reasons = curate_rows(chains, problems, attempted, round_, cfg, sys_prompt, m)
    if rows:
        publish_shard(pa.Table.from_pylist(rows, schema=SFT), att, f"part-b{b:05d}.parquet", "sft")
    if retry:
        publish_shard(pa.Table.from_pylist(retry, schema=RETRY), att, f"part-b{b:05d}.parquet", "retry", sub="retry")
    return {"chains": len(chains), "dropped": m.dropped, "quarantined": m.quarantined, "sft": len(rows),
            "retry": len(retry), "solved": len({r["problem_id"] for r in rows}), "attempted": len(attempted),
            "retry_reasons": Counter(r["reason"] for r in retry), "filter_reasons": filter_reasons,
            "node": ray.get_runtime_context().get_node_id()}


def _bounded(tasks: list, limit: int) -> list:
    """Submit the callables in `tasks` with at most `limit` running; their results in submission order."""
    import ray

    refs, running = [], []
    for make in tasks:
        while len(running) >= limit:
            _, running = ray.wait(running, num_returns=1)
        ref = make()
        refs.append(ref)
        running.append(ref)
    return ray.get(refs)


def run_streaming(cfg: Any, ctx: Any) -> Manifest:
    import ray

    from filters.curate import _CHAIN_COLUMNS, RETRY, _metrics, problem_dirs, system_prompt
    from pipeline.ray_utils import init_ray
    from pipeline.rundir import read_table
    from pipeline.schema import SFT
    from teachers.stream import _read_units

    init_ray()
    m = ctx.manifest()
    sys_prompt = system_prompt(cfg)
    chain_files = [f for d in ctx.input_dirs("chains") for f in shard_files(d)]
    prob_files = [f for d in problem_dirs(ctx) for f in shard_files(d)]
    columns = None
    for f in chain_files:
        have = set(pq.ParquetFile(f).schema_arrow.names)
        missing = [c for c in ("chain_id", "problem_id", "keep") if c not in have]
        if missing:
            raise KeyError(f"step {ctx.step!r}: chains input {f} lacks columns {missing}")
        columns = [c for c in _CHAIN_COLUMNS if c in have]
    n_problems = sum(pq.ParquetFile(f).metadata.num_rows for f in prob_files)
    n = max(1, math.ceil(n_problems / cfg.bucket_problems))
    wanted = None
    if ctx.round > 0:
        wanted = sorted({p for d in (ctx.input_dirs("retry") if "retry" in ctx.inputs else [])
                         if shard_files(d / "retry")
                         for p in read_table(d / "retry", ["problem_id"]).column("problem_id").to_pylist()})
    attempt = open_attempt(ctx.out_dir).resolve()
    (ctx.out_dir / "retry").mkdir(exist_ok=True)
    for d in (ctx.out_dir, ctx.out_dir / "retry"):
        for f in shard_files(d):
            f.unlink()
    # SPREAD: the map and the bucket reducers go to every node with a free CPU, not first to the driver's
    part = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_partition)
    red = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_reduce)
    try:
        units = [("c", columns, u) for u in _read_units(chain_files)] + [("p", None, u) for u in _read_units(prob_files)]
        jobs = [lambda k=k, c=c, u=u, i=i: part.remote({**u, "idx": i}, k, c, n, str(attempt))
                for i, (k, c, u) in enumerate(units)]
        counts = _bounded(jobs, cfg.workers)
        n_chains = sum(c for (k, _, _), c in zip(units, counts, strict=True) if k == "c")
        stats = _bounded([lambda b=b: red.remote(b, n, cfg, ctx.round, wanted, str(attempt), sys_prompt)
                          for b in range(n)], cfg.workers)
    finally:
        close_attempt(attempt)
    m.rows_in = n_chains
    retry_reasons, filter_reasons, nodes = Counter(), Counter(), Counter()
    n_sft = n_retry = solved = attempted = 0
    for s in stats:
        for k, v in s["dropped"].items():
            m.drop(k, v)
        for k, v in s["quarantined"].items():
            m.quarantine(k, v)
        n_sft, n_retry, solved, attempted = n_sft + s["sft"], n_retry + s["retry"], solved + s["solved"], \
            attempted + s["attempted"]
        retry_reasons.update(s["retry_reasons"])
        filter_reasons.update(s["filter_reasons"])
        nodes[s["node"]] += 1
    if sum(s["chains"] for s in stats) != n_chains:
        raise RuntimeError(f"curate: {n_chains} chains partitioned but {sum(s['chains'] for s in stats)} reduced")
    if not shard_files(ctx.out_dir):
        ShardWriter(ctx.out_dir, SFT, "sft").close()
    if not shard_files(ctx.out_dir / "retry"):
        ShardWriter(ctx.out_dir / "retry", RETRY, "retry").close()
    _metrics(m, attempted, n_sft, solved, retry_reasons, filter_reasons, n_retry)
    m.metrics["buckets"] = n
    m.metrics["buckets_by_node"] = dict(nodes)
    log.info("%s: %d chains -> %d SFT samples in %d buckets; %d/%d problems solved, %d to retry",
             ctx.step, n_chains, n_sft, n, solved, attempted, n_retry)
    return m
