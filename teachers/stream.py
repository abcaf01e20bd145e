"""The generate stage on Ray, streaming: rows never pass through the driver (DESIGN.md, "At scale").

    r1v run configs/demo.yaml --stage generate          # workers >= 1: this path

The driver reads only the `problem_id` column of the problems (to count the expected samples, find
duplicates and apply `limit` / the retry list) and, when resuming, the `chain_id` column of the shards
already written. The problems themselves are read as a Ray Data dataset; each engine actor takes a batch
of problems, renders the prompts (images become data URIs there), expands them into the k samples,
skips samples already written, looks each up in the generation cache, sends the rest to its engine,
stores new results in the cache and writes the batch's chains as one shard (`flush_rows` chains at
most). It returns one small accounting row per shard; the driver sums them and commits the manifest.

Shards are named by the chain ids they hold (pipeline.rundir.shard_name): a task Ray retries rewrites
the same file. Workers write into the step's attempt folder and rename (pipeline.rundir.open_attempt),
so a worker left over from a killed driver cannot publish after the next attempt has read what is done.

The vllm engine is not streamed yet: it keeps the driver-side path through Ray's `ray.data.llm`
processor (teachers/generate.py). Feeding the processor typed Arrow request blocks from the workers
failed inside ray.data.llm's block concatenation (a per-row engine error's row beside the others).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.progress import Progress
from pipeline.rundir import (
    Manifest,
    close_attempt,
    open_attempt,
    publish_shard,
    read_table,
    shard_files,
    shard_name,
)
from pipeline.schema import CHAINS, conform
from teachers.cache import GenerationCache, cache_key
from teachers.engines import GenRequest, engine_config, make_engine

log = logging.getLogger(__name__)

# One accounting row per shard a worker wrote.
STATS = pa.schema([
    pa.field("shard", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("engine", pa.int64()),
    pa.field("cache_hits", pa.int64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("engine_completion_tokens", pa.int64()),
    pa.field("retries", pa.int64()),
    pa.field("errors", pa.string()),  # JSON {kind: n}
    pa.field("finish", pa.string()),  # JSON {finish_reason: n}
    pa.field("node", pa.string()),
])


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or "local"
    except (ImportError, RuntimeError, AttributeError):
        return "local"


class _Plan:
    """What every worker needs to know about the step (pickled once into each actor)."""

    def __init__(self, cfg: Any, round_: int, run_seed: int, attempt: Path, cache_dir: Path | None,
                 done_ref: Any) -> None:
        self.cfg, self.round, self.run_seed = cfg, round_, run_seed
        self.attempt = str(Path(attempt).resolve())
        self.cache_dir = str(Path(cache_dir).resolve()) if cache_dir else None
        self.done_ref = done_ref

    def done(self) -> set[str]:
        if self.done_ref is None:
            return set()
        import ray

        return set(ray.get(self.done_ref).to_pylist())


def prepare(batch: pa.Table, plan: _Plan, done: set[str], cache: GenerationCache | None
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[dict[str, Any], GenRequest, str]]]:
    """(chain rows from the cache, chain rows of problems that cannot be rendered, engine requests) for a
    batch of problem rows; samples in `done` are left out."""
    from teachers.generate import _chain_row, _result_from_cache, build_requests, expand

    cfg = plan.cfg
    work, bad = build_requests(batch.to_pylist(), cfg, plan.round, plan.run_seed)
    bad = [b for b in bad if b["chain_id"] not in done]
    identity = cfg.engine.cache_identity()
    hits, misses = [], []
    for w in work:
        messages = problem = None
        for r in expand(w):
            if r["chain_id"] in done:
                continue
            key = cache_key(identity, w["messages"], r["sampling"]) if cache else ""
            entry = cache.get(key) if cache else None
            if entry is not None:
                hits.append(_chain_row(r, _result_from_cache(entry)))
                continue
            if messages is None:  # parsed once per problem, k uses
                messages, problem = json.loads(w["messages"]), json.loads(w["problem"])
            misses.append((r, GenRequest(messages=messages, sampling=dict(r["sampling"]), problem=problem,
                                         request_id=r["chain_id"]), key))
    return hits, bad, misses


def _cache_put(cache: GenerationCache, keys: dict[str, str], rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["error"] is None and row["chain_id"] in keys:
            cache.put(keys[row["chain_id"]], {
                "text": row["completion"], "reasoning": row["reasoning"], "response": row["response"],
                "finish_reason": row["finish_reason"], "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"], "latency_s": row["latency_s"],
                "simulated": row["simulated"],
            })


def write_chains(rows: list[dict[str, Any]], plan: _Plan, engine_rows: int, hits: int) -> dict[str, Any]:
    """Publish `rows` (WORKER_OUT dicts) as one chains shard; its accounting row."""
    from teachers.generate import WORKER_OUT, _strip

    t = conform(pa.Table.from_pylist(rows, schema=WORKER_OUT), WORKER_OUT)
    d = t.select(["prompt_tokens", "completion_tokens", "finish_reason", "_retries", "_error_kind"]).to_pydict()
    name = shard_name(t.column("chain_id").to_pylist())
    publish_shard(conform(_strip(t), CHAINS), Path(plan.attempt), name, "chains")
    ct = [x or 0 for x in d["completion_tokens"]]
    return {
        "shard": name, "rows": t.num_rows, "engine": engine_rows, "cache_hits": hits,
        "prompt_tokens": sum(x or 0 for x in d["prompt_tokens"]), "completion_tokens": sum(ct),
        "engine_completion_tokens": sum(ct[-engine_rows:]) if engine_rows else 0,
        "retries": sum(x or 0 for x in d["_retries"]),
        "errors": json.dumps(Counter(k for k in d["_error_kind"] if k)),
        "finish": json.dumps(Counter(x or "none" for x in d["finish_reason"])), "node": _node_id(),
    }


class ShardWorker:
    """One engine actor: problem batch → rendered, expanded, cached, generated, written; returns STATS."""

    def __init__(self, plan: _Plan, env: dict[str, str] | None = None) -> None:
        import os

        t0 = time.perf_counter()
        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)  # secrets travel as constructor arguments, never as row data
        self.plan = plan
        self.done = plan.done()
        self.cache = GenerationCache(plan.cache_dir) if plan.cache_dir else None
        self.engine = make_engine(engine_config(plan.cfg.engine.model_dump()))
        log.info("generate worker: %s engine ready in %.2fs", plan.cfg.engine.kind, time.perf_counter() - t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from teachers.generate import _chain_row

        hits, bad, misses = prepare(batch, self.plan, self.done, self.cache)
        out = hits + bad
        if misses:
            # openai shares its max_concurrency slots across one call; the others take batch_size at a time
            step = len(misses) if self.plan.cfg.engine.kind == "openai" else self.plan.cfg.batch_size
            for i in range(0, len(misses), step):
                chunk = misses[i:i + step]
                results = self.engine.generate([req for _, req, _ in chunk])
                if len(results) != len(chunk):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(chunk)} requests")
                rows = [_chain_row(r, res) for (r, _, _), res in zip(chunk, results, strict=True)]
                if self.cache:
                    _cache_put(self.cache, {r["chain_id"]: k for r, _, k in chunk}, rows)
                out += rows
        if not out:
            return STATS.empty_table()
        return pa.Table.from_pylist([write_chains(out, self.plan, len(misses), len(hits))], schema=STATS)

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------- driver


def _problem_files(ctx: Any) -> list[Path]:
    files = [f for d in ctx.input_dirs("problems") for f in shard_files(d)]
    if not files:
        raise FileNotFoundError(f"step {ctx.step!r}: input 'problems' has no shards in "
                                f"{[str(d) for d in ctx.input_dirs('problems')]}")
    return files


def select(cfg: Any, ctx: Any, m: Manifest, files: list[Path]) -> tuple[pa.Array | None, dict[int, list[int]], int]:
    """From the problem_id column only: (ids to generate, or None for all; per file the rows of a
    duplicated id after its first, which the readers skip; the number of problems to generate)."""
    per_file = [pq.read_table(f, columns=["problem_id"]).column(0).combine_chunks() for f in files]
    ids = pa.chunked_array(per_file, type=pa.string()).combine_chunks()
    unique = pc.unique(ids)  # in order of first appearance
    allow = None
    if ctx.round > 0 and "retry" in ctx.inputs:
        wanted = [read_table(d / "retry", ["problem_id"]).column("problem_id") for d in ctx.input_dirs("retry")
                  if shard_files(d / "retry")]
        wanted = pa.chunked_array(wanted, type=pa.string()).combine_chunks() if wanted else pa.array([], pa.string())
        m.metrics["retry_problems"] = len(pc.unique(wanted))
        allow = unique.filter(pc.is_in(unique, value_set=wanted))
    if cfg.limit:
        allow = (allow if allow is not None else unique)[: cfg.limit]
    chosen = allow if allow is not None else unique
    skip: dict[int, list[int]] = {}
    if len(unique) != len(ids):  # rare (ingest removes exact duplicates): positions of the repeats
        counts = pc.value_counts(ids)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        dup = set(dup.filter(pc.is_in(dup, value_set=chosen)).to_pylist())
        seen: set[str] = set()
        for i, col in enumerate(per_file):
            for j in pc.indices_nonzero(pc.is_in(col, value_set=pa.array(sorted(dup), pa.string()))).to_pylist():
                pid = col[j].as_py()
                if pid in seen:
                    skip.setdefault(i, []).append(j)
                    m.drop("duplicate_problem", cfg.samples_per_problem)
                    m.rows_in += cfg.samples_per_problem
                seen.add(pid)
    return allow, skip, len(chosen)


def read_problems(desc: dict[str, Any], allow: pa.Array | None, skip: dict[int, list[int]], rows: int
                  ) -> Iterator[pa.Table]:
    """One row group of a problems shard, less the skipped rows, in blocks of `rows` problems (a Ray
    Data read task: it runs on whichever node Ray picks and needs the run root there)."""
    import numpy as np

    t = pq.ParquetFile(desc["file"]).read_row_group(int(desc["row_group"]))
    if desc.get("length") is not None:
        t = t.slice(int(desc["start"]), int(desc["length"]))
    drop = skip.get(int(desc["file_idx"]))
    if drop:
        first = int(desc["offset"]) + int(desc.get("start") or 0)
        pos = np.arange(first, first + t.num_rows)
        t = t.filter(pa.array(~np.isin(pos, np.asarray(drop))))
    if allow is not None:
        t = t.filter(pc.is_in(t.column("problem_id"), value_set=allow))
    for i in range(0, t.num_rows, rows):
        yield t.slice(i, rows)


def _read_units(files: list[Path], max_rows: int | None = None) -> list[dict[str, Any]]:
    """One unit per row group, or per slice of at most `max_rows` rows of one: read tasks spread over the
    nodes (Ray Data then feeds each node's actors from the blocks read there)."""
    units = []
    for i, f in enumerate(files):
        md, off = pq.ParquetFile(f).metadata, 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            step = max_rows or max(n, 1)
            for start in range(0, max(n, 1), step):
                # absolute: a worker on another node (or in another working directory) opens it
                units.append({"file": str(Path(f).resolve()), "file_idx": i, "row_group": g, "offset": off,
                              "start": start, "length": min(step, n - start) if n else 0})
            off += n
    return units


def _read_batches(desc: pa.Table, allow: pa.Array | None, skip: dict[int, list[int]], rows: int
                  ) -> Iterator[pa.Table]:
    for d in desc.to_pylist():
        yield from read_problems(d, allow, skip, rows)


def stream(cfg: Any, ctx: Any, m: Manifest, cache_dir: Path | None) -> tuple[Iterator[pa.Table], int, int, Any]:
    """Start the pipeline: (stats batches, samples expected, samples already written, the attempt folder)."""
    import ray

    from teachers.generate import _actor_pool, _secret_env, concurrent_calls

    files = _problem_files(ctx)
    allow, skip, n_problems = select(cfg, ctx, m, files)
    expected = n_problems * cfg.samples_per_problem
    attempt = open_attempt(ctx.out_dir)  # fences older attempts before what is done is read
    if not ctx.resume:
        for f in shard_files(ctx.out_dir):
            f.unlink()
    done = (read_table(ctx.out_dir, ["chain_id"]).column("chain_id").combine_chunks()
            if shard_files(ctx.out_dir) else pa.array([], pa.string()))
    plan = _Plan(cfg, ctx.round, ctx.run_config.run.seed, attempt, cache_dir, ray.put(done) if len(done) else None)
    per_call = max(1, cfg.flush_rows // cfg.samples_per_problem)
    units = _read_units(files, max_rows=per_call * 4)
    # One read task per slice of a row group. Reads take no CPU slot: the engine actors may hold every CPU, and a
    # read that waited for one would never run (Ray Data's streaming backpressure still bounds them).
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units))).map_batches(
        _read_batches, fn_kwargs={"allow": allow, "skip": skip, "rows": per_call}, batch_size=1,
        batch_format="pyarrow", num_cpus=0)
    calls = concurrent_calls(cfg)
    out = ds.map_batches(
        ShardWorker, fn_constructor_kwargs={"plan": plan, "env": _secret_env(cfg.engine)},
        batch_size=per_call, batch_format="pyarrow", compute=_actor_pool(cfg.workers, calls),
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None,
    )
    batches = out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    return batches, expected, len(done), attempt


def run_streaming(cfg: Any, ctx: Any, m: Manifest, cache_dir: Path | None) -> tuple[Manifest, dict[str, Any]]:
    """Run the streaming pipeline to the end; (manifest with rows_in, this attempt's accounting)."""
    batches, expected, resumed, attempt = stream(cfg, ctx, m, cache_dir)
    m.rows_in += expected
    log.info("generate: %d samples expected, %d resumed from written shards, %d to do with %s (%s), streamed "
             "through %d worker(s)", expected, resumed, expected - resumed, cfg.engine.kind,
             cfg.engine.teacher_name(), cfg.workers)
    acct: dict[str, Any] = {"engine": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
                            "engine_completion_tokens": 0, "retries": 0, "errors": Counter(), "finish": Counter(),
                            "nodes": Counter(), "written": 0, "first_at": None, "first_tokens": 0,
                            "t0": time.perf_counter(), "resumed": resumed, "expected": expected}
    try:
        with Progress("generate", total=expected - resumed, unit="samples", logger=log) as progress:
            for b in batches:
                for row in b.to_pylist():
                    for k in ("engine", "cache_hits", "prompt_tokens", "completion_tokens",
                              "engine_completion_tokens", "retries"):
                        acct[k] += row[k]
                    acct["errors"].update(json.loads(row["errors"]))
                    acct["finish"].update(json.loads(row["finish"]))
                    acct["nodes"][row["node"]] += 1
                    acct["written"] += row["rows"]
                    if row["engine"] and acct["first_at"] is None:
                        acct["first_at"], acct["first_tokens"] = time.perf_counter(), row["engine_completion_tokens"]
                    progress.update(row["rows"], extra=f"{acct['cache_hits']} from cache | "
                                                       f"{acct['engine_completion_tokens']} completion tokens")
    finally:
        close_attempt(attempt)
    acct["engine_s"] = time.perf_counter() - acct["t0"]
    return m, acct
