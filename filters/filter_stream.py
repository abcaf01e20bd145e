"""The filter stage on Ray, where the chains are: each actor reads one row group of a chains shard, scores
it (filters.filter.score_batch) and writes the scored rows as one shard named after that row group, so
the output keeps the input's order and a retried task rewrites the same file. The driver reads only the
problems' answer columns (shipped to the actors once) and sums one accounting row per shard.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rundir import close_attempt, open_attempt, publish_shard, shard_files

log = logging.getLogger(__name__)

_ANSWER_COLS = ("problem_id", "answer", "answer_type", "choices", "max_tokens")
STATS = pa.schema([
    pa.field("rows", pa.int64()), pa.field("unknown", pa.int64()), pa.field("kept", pa.int64()),
    pa.field("loops", pa.int64()), pa.field("q_sum", pa.float64()), pa.field("t_verify", pa.float64()),
    pa.field("counts", pa.string()),  # JSON {"drops"|"verdicts"|"formats"|"sources"|"cuts": {key: n}}
    pa.field("node", pa.string()),
])


def answer_columns(ctx: Any) -> pa.Table:
    """problem_id and what a chain is scored against, for every problem (no images, no text)."""
    parts = []
    for d in ctx.input_dirs("problems"):
        for f in shard_files(d):
            have = set(pq.ParquetFile(f).schema_arrow.names)
            parts.append(pq.read_table(f, columns=[c for c in _ANSWER_COLS if c in have]))
    if not parts:
        return pa.table({"problem_id": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="default")


class FilterShardActor:
    """A redundancy scorer, a deadline worker for the sympy checks, and the problems' answers."""

    def __init__(self, cfg: Any, answers_ref: Any, attempt: str) -> None:
        import ray

        from filters.deadline import DeadlinePool
        from filters.redundancy import Scorer
        from filters.verify import check_answer

        self.cfg, self.attempt = cfg, Path(attempt)
        v = cfg.verify
        self.pool = DeadlinePool(check_answer, workers=1, timeout_s=v.timeout_s, memory_mb=v.memory_mb)
        self.scorer = Scorer(cfg.redundancy)
        answers = ray.get(answers_ref)
        self.problems = {r["problem_id"]: r for r in answers.to_pylist()}
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, units: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._unit(u) for u in units.to_pylist()], schema=STATS)

    def _unit(self, u: dict[str, Any]) -> dict[str, Any]:
        from filters.filter import _PROBLEM_COLS, FILTERED, _cut_kind, _output_row, score_batch
        from pipeline.schema import conform

        t = pq.ParquetFile(u["file"]).read_row_group(int(u["row_group"]))
        known = [p in self.problems for p in t.column("problem_id").to_pylist()]
        unknown = len(known) - sum(known)
        t = t.filter(pa.array(known, pa.bool_()))
        pids = t.column("problem_id").to_pylist()
        for col, key in _PROBLEM_COLS.items():
            typ = pa.list_(pa.string()) if col == "_choices" else pa.int64() if col == "_budget" else pa.string()
            t = t.append_column(col, pa.array([self.problems[p].get(key) for p in pids], type=typ))
        out = []
        for off in range(0, t.num_rows, self.cfg.batch_size):
            out += score_batch(t.slice(off, self.cfg.batch_size).to_pylist(), self.cfg, self.pool, self.scorer)
        c = {k: Counter() for k in ("drops", "verdicts", "formats", "sources", "cuts")}
        kept, loops, q_sum, t_verify = 0, 0, 0.0, 0.0
        for r in out:
            c["verdicts"][r["verdict"]] += 1
            c["formats"][r["trace_format"]] += 1
            c["sources"][r.get("pred_source") or "none"] += 1
            if r["verdict"] == "truncated":
                c["cuts"][_cut_kind(r.get("verify_detail"))] += 1
            loops += bool(r["loop_detected"])
            t_verify += r.get("verify_s") or 0.0
            if r["keep"]:
                kept += 1
                q_sum += r.get("quality") or 0.0
            else:
                c["drops"][r["drop_reason"]] += 1
        if out:
            rows = pa.Table.from_pylist([_output_row(r) for r in out]).drop_columns(["_idx"])
            name = f"part-{Path(u['file']).stem.removeprefix('part-')}-g{int(u['row_group']):04d}.parquet"
            publish_shard(conform(rows, FILTERED), self.attempt, name, "chains")
        return {"rows": len(out), "unknown": unknown, "kept": kept, "loops": loops, "q_sum": q_sum,
                "t_verify": t_verify, "counts": json.dumps(c), "node": self.node}

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()


def run_streaming(cfg: Any, ctx: Any, m: Any) -> dict[str, Any]:
    """Score every chains shard of the input where Ray places the actors; returns the summed counts."""
    import ray

    from filters.filter import FILTERED
    from pipeline.progress import track
    from pipeline.rundir import ShardWriter
    from teachers.stream import _read_units

    files = [f for d in ctx.input_dirs("chains") for f in shard_files(d)]
    n_in = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    attempt = open_attempt(ctx.out_dir)
    for f in shard_files(ctx.out_dir):
        f.unlink()  # always rewritten whole: scoring is cheap next to generation
    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_worker))
    workers = min(cfg.workers, fits)
    if workers < cfg.workers:
        log.warning("filter.workers=%d but the cluster fits %d actors of %g CPU; using %d",
                    cfg.workers, fits, cfg.cpus_per_worker, workers)
    units = _read_units(files)
    acc: dict[str, Any] = {"rows": 0, "unknown": 0, "kept": 0, "loops": 0, "q_sum": 0.0, "t_verify": 0.0,
                           "nodes": Counter(), **{k: Counter() for k in ("drops", "verdicts", "formats", "sources",
                                                                          "cuts")}}
    try:
        if units:
            ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
                FilterShardActor,
                fn_constructor_kwargs={"cfg": cfg, "answers_ref": ray.put(answer_columns(ctx)),
                                       "attempt": str(attempt.resolve())},
                compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1, batch_format="pyarrow",
                num_cpus=cfg.cpus_per_worker)
            stats = ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)
            rows = lambda b: sum(b.column("rows").to_pylist()) + sum(b.column("unknown").to_pylist())  # noqa: E731
            for b in track(stats, "filter", total=n_in, unit="chains", size=rows, logger=log):
                for row in b.to_pylist():
                    for k in ("rows", "unknown", "kept", "loops", "q_sum", "t_verify"):
                        acc[k] += row[k]
                    for k, v in json.loads(row["counts"]).items():
                        acc[k].update(v)
                    acc["nodes"][row["node"]] += 1
    finally:
        close_attempt(attempt)
    if acc["rows"] + acc["unknown"] != n_in:
        raise RuntimeError(f"filter: {n_in} chains in but {acc['rows']} scored and {acc['unknown']} unknown")
    if not shard_files(ctx.out_dir):
        ShardWriter(ctx.out_dir, FILTERED, "chains").close()  # an empty table, with its schema
    acc["n_in"] = n_in
    return acc
