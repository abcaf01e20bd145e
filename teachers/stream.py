"""Generate and caption on Ray, streaming: rows never pass through the driver (DESIGN.md, "At scale").

    r1v run configs/demo.yaml --stage generate          # workers >= 1: this path
    r1v run configs/r1v-38b.yaml --stage caption        # so is caption, for every engine

Both stages share one skeleton: read units → prepare in the workers → engine → write in the workers →
accounting rows; a job (`GenerateJob` here, `teachers.caption.CaptionJob`) says what is prepared and
written. The driver reads only the `problem_id` column of the problems (to count the expected rows,
find duplicates and apply `limit` / the retry list) and, when resuming, the id column of the shards
already written. The problems themselves are read as a Ray Data dataset by read tasks (one per slice
of a row group). Then, per batch of problems, in the workers: the prompts are rendered (images become
data URIs there), expanded into the k samples (generate), rows already written are left out, each
request is looked up in the generation cache, the rest go to the engine, new results are stored in
the cache, and the batch's rows are published as one shard (`flush_rows` chains at most). Each shard
yields one small accounting row (STATS); the driver sums them and commits the manifest.

Engines run in one of two ways:

- scripted, hf, openai: an actor pool of `ShardWorker`s, one engine each, doing all of the above.
- vllm: Ray's `ray.data.llm` processor between two worker stages. `Prepare` (an actor pool: it holds
  the done set and the cache) renders, expands, writes cache hits and bad-input rows as shards itself
  (their accounting rows go to small files in the attempt folder) and hands typed request rows to the
  processor; `Write` (after it) turns the processor's rows into chains, stores them in the cache and
  publishes the shards. A failed row (`__inference_error__`) becomes an error chain; an engine that
  dies is restarted `engine.max_restarts` times, then the run fails naming the engine's error. A probe
  pass (writing nothing) first checks that some row needs the engine: a re-run the cache or the
  written shards answer whole never loads the model.

Shards are named by the ids they hold (pipeline.rundir.shard_name): a task Ray retries rewrites the
same file. Workers write into the step's attempt folder and rename (pipeline.rundir.open_attempt), so
a worker left over from a killed driver cannot publish after the next attempt has read what is done.
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
from teachers.engines import GenRequest, GenResult, engine_config, make_engine

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
    pa.field("counts", pa.string()),  # JSON {name: n}: what a job counts besides (caption: captioned, ...)
])
_STATS_NOTE = "_stats-"  # accounting rows of shards written before the engine (vllm's Prepare)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or "local"
    except (ImportError, RuntimeError, AttributeError):
        return "local"


class _Plan:
    """What every worker needs to know about the step (pickled once into each actor)."""

    def __init__(self, cfg: Any, round_: int, run_seed: int, attempt: Path, cache_dir: Path | None,
                 done_ref: Any, job: type | None = None, schema: pa.Schema | None = None) -> None:
        self.cfg, self.round, self.run_seed = cfg, round_, run_seed
        self.attempt = str(Path(attempt).resolve())
        self.cache_dir = str(Path(cache_dir).resolve()) if cache_dir else None
        self.done_ref = done_ref
        self.job = job or GenerateJob
        self.schema = schema  # the written table's schema where the job needs one (caption: the problems')

    def make_job(self) -> Any:
        return self.job(self)

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


def cache_store(cache: GenerationCache, key: str, res: GenResult) -> None:
    """A successful engine result into the generation cache."""
    from teachers.generate import CACHED_FIELDS

    if res.error is None and key:
        cache.put(key, {k: getattr(res, k) for k in CACHED_FIELDS})


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
        "finish": json.dumps(Counter(x or "none" for x in d["finish_reason"])), "node": _node_id(), "counts": "{}",
    }


class GenerateJob:
    """The generate stage's part of the skeleton: problems → k samples → chains shards."""

    table, id_column, unit = "chains", "chain_id", "samples"  # unit: what the progress line counts

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def prepare(self, batch: pa.Table, done: set[str], cache: GenerationCache | None
                ) -> tuple[list[dict[str, Any]], int, list[tuple[dict[str, Any], GenRequest, str]]]:
        """(rows ready to write, how many of them came from the cache, (context, request, cache key) per
        row for the engine); rows in `done` are left out."""
        hits, bad, misses = prepare(batch, self.plan, done, cache)
        return hits + bad, len(hits), misses

    def complete(self, context: dict[str, Any], res: GenResult) -> dict[str, Any]:
        from teachers.generate import _chain_row

        return _chain_row(context, res)

    def write(self, rows: list[dict[str, Any]], engine_rows: int, hits: int) -> dict[str, Any]:
        return write_chains(rows, self.plan, engine_rows, hits)

    # the vllm path: a request row through ray.data.llm carries its context in typed columns
    def request_schema(self) -> pa.Schema:
        return request_schema()

    def request_row(self, context: dict[str, Any], key: str) -> dict[str, Any]:
        return {**{k: context[k] for k in ("chain_id", "problem_id", "round", "teacher", "sample_idx", "seed",
                                           "prompt", "messages", "sampling")}, "_cache_key": key}

    def context(self, row: dict[str, Any]) -> dict[str, Any]:
        return row  # the chain row ray.data.llm's postprocess built holds every request field


def request_schema() -> pa.Schema:
    """A vllm request row: the sample's fields, its rendered messages (JSON), the cache key (or "")."""
    from teachers.generate import WORKER_OUT

    return pa.schema([WORKER_OUT.field(c) for c in ("chain_id", "problem_id", "round", "teacher", "sample_idx",
                                                     "seed", "prompt")]
                     + [pa.field("messages", pa.string()), WORKER_OUT.field("sampling"),
                        pa.field("_cache_key", pa.string())])


def _stats_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STATS) if rows else STATS.empty_table()


class ShardWorker:
    """One engine actor: problem batch → rendered, expanded, cached, generated, written; returns STATS."""

    def __init__(self, plan: _Plan, env: dict[str, str] | None = None) -> None:
        import os

        t0 = time.perf_counter()
        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)  # secrets travel as constructor arguments, never as row data
        self.plan = plan
        self.job = plan.make_job()
        self.done = plan.done()
        self.cache = GenerationCache(plan.cache_dir) if plan.cache_dir else None
        self.engine = make_engine(engine_config(plan.cfg.engine.model_dump()))
        log.info("%s worker: %s engine ready in %.2fs", self.job.table, plan.cfg.engine.kind, time.perf_counter() - t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, hits, misses = self.job.prepare(batch, self.done, self.cache)
        if misses:
            # openai shares its max_concurrency slots across one call; the others take batch_size at a time
            step = len(misses) if self.plan.cfg.engine.kind == "openai" else self.plan.cfg.batch_size
            for i in range(0, len(misses), step):
                chunk = misses[i:i + step]
                results = self.engine.generate([req for _, req, _ in chunk])
                if len(results) != len(chunk):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(chunk)} requests")
                for (context, _, key), res in zip(chunk, results, strict=True):
                    if self.cache:
                        cache_store(self.cache, key, res)
                    out.append(self.job.complete(context, res))
        return _stats_table([self.job.write(out, len(misses), hits)] if out else [])

    def close(self) -> None:
        self.engine.close()


class Prepare:
    """vllm, before the processor: problem batch → ready rows published here (their accounting row to a
    note in the attempt folder), typed request rows out."""

    def __init__(self, plan: _Plan, mode: str = "requests") -> None:
        self.plan, self.job, self.done = plan, plan.make_job(), plan.done()
        self.cache = GenerationCache(plan.cache_dir) if plan.cache_dir else None
        self.mode = mode  # requests | probe (write nothing: does the batch need the engine?) | ready (no engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ready, hits, misses = self.job.prepare(batch, self.done, self.cache)
        if self.mode == "probe":
            return pa.table({"misses": pa.array([len(misses)], pa.int64())})
        if misses and self.mode == "ready":
            raise RuntimeError(f"{len(misses)} rows left the generation cache ({self.plan.cache_dir}) while the run "
                               "read it: run the step again")
        if ready:
            stats = self.job.write(ready, 0, hits)
            note = Path(self.plan.attempt) / f"{_STATS_NOTE}{stats['shard']}.json"
            tmp = note.with_name(".tmp-" + note.name)
            tmp.write_text(json.dumps(stats))
            tmp.replace(note)
        if self.mode == "ready":
            return STATS.empty_table()
        return pa.Table.from_pylist([self.job.request_row(c, k) for c, _, k in misses], schema=self.job.request_schema())


class Write:
    """vllm, after the processor: chain rows → cache, the job's rows, one shard per batch; STATS out."""

    def __init__(self, plan: _Plan) -> None:
        self.plan, self.job = plan, plan.make_job()
        self.cache = GenerationCache(plan.cache_dir) if plan.cache_dir else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from teachers.engines.vllm import chain_result

        out = []
        for row in batch.to_pylist():
            res = chain_result(row)
            if self.cache:
                cache_store(self.cache, row.get("_cache_key") or "", res)
            out.append(self.job.complete(self.job.context(row), res))
        return _stats_table([self.job.write(out, len(out), 0)] if out else [])


def _noted_stats(attempt: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(Path(attempt).glob(_STATS_NOTE + "*.json"))]


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
    limit, k = getattr(cfg, "limit", None), getattr(cfg, "samples_per_problem", 1)
    if limit:
        allow = (allow if allow is not None else unique)[:limit]
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
                    m.drop("duplicate_problem", k)
                    m.rows_in += k
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


def read_tasks(cfg: Any) -> int:
    """Problem reads in flight at once: two per engine worker keep every worker fed (a read yields a
    worker's batches faster than the worker uses them up) without a process per read."""
    return max(2, 2 * max(1, cfg.workers))


def stream(cfg: Any, ctx: Any, m: Manifest, cache_dir: Path | None, job: type | None = None,
           schema: pa.Schema | None = None) -> tuple[Iterator[pa.Table], int, int, Any]:
    """Start the pipeline: (stats batches, rows expected, rows already written, the attempt folder)."""
    import ray

    job = job or GenerateJob
    files = _problem_files(ctx)
    allow, skip, n_problems = select(cfg, ctx, m, files)
    expected = n_problems * getattr(cfg, "samples_per_problem", 1)
    attempt = open_attempt(ctx.out_dir)  # fences older attempts before what is done is read
    if not ctx.resume:
        for f in shard_files(ctx.out_dir):
            f.unlink()
    done = (read_table(ctx.out_dir, [job.id_column]).column(job.id_column).combine_chunks()
            if shard_files(ctx.out_dir) else pa.array([], pa.string()))
    plan = _Plan(cfg, ctx.round, ctx.run_config.run.seed, attempt, cache_dir, ray.put(done) if len(done) else None,
                 job, schema)
    per_call = max(1, getattr(cfg, "flush_rows", cfg.batch_size) // getattr(cfg, "samples_per_problem", 1))
    units = _read_units(files, max_rows=per_call * 4)
    # One read task per slice of a row group. Reads take no CPU slot: the engine actors may hold every CPU, and a
    # read that waited for one would never run. A task without a CPU slot has no other bound, though: Ray started
    # a worker process for nearly every read at once (96 of them, 20 GB of RSS in all, at 100k problems), so at
    # most `read_tasks(cfg)` run at a time, each process reused for the next read.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units))).map_batches(
        _read_batches, fn_kwargs={"allow": allow, "skip": skip, "rows": per_call}, batch_size=1,
        batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=read_tasks(cfg)))
    if cfg.engine.kind == "vllm":
        out = _through_vllm(ds, cfg, plan, per_call)
    else:
        from teachers.generate import _actor_pool, _secret_env, concurrent_calls

        out = ds.map_batches(
            ShardWorker, fn_constructor_kwargs={"plan": plan, "env": _secret_env(cfg.engine)},
            batch_size=per_call, batch_format="pyarrow", compute=_actor_pool(cfg.workers, concurrent_calls(cfg)),
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None,
        )
    batches = out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    return batches, expected, len(done), attempt


def _through_vllm(ds: Any, cfg: Any, plan: _Plan, per_call: int) -> Any:
    """Prepare (workers) → ray.data.llm → Write (workers). The engine's fatal errors are noted in the
    attempt folder (shared storage: the driver reads them if the run fails)."""
    import ray

    from teachers.engines.vllm import vllm_processor

    cpus = cfg.engine.stage_cpus
    pool = ray.data.ActorPoolStrategy(size=max(1, cfg.workers))

    def prepared(mode: str) -> Any:
        return ds.map_batches(Prepare, fn_constructor_kwargs={"plan": plan, "mode": mode}, batch_size=per_call,
                              batch_format="pyarrow", compute=pool, num_cpus=cpus)

    # Ray Data starts an actor pool's actors whether rows come or not: a re-run that the cache (or the
    # shards already written) answers whole would load the model for nothing. A probe pass, writing
    # nothing, stops at the first batch that needs the engine (at once on a fresh run).
    needed = False
    probe = prepared("probe").iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=0)
    for b in probe:
        if b.column("misses")[0].as_py():
            needed = True
            break
    del probe  # stops the probe's reads and actors
    if not needed:
        log.info("%s: every row is written or cached: the vllm engine is not started", plan.make_job().table)
        return prepared("ready")
    chains = vllm_processor(cfg, death_notes=plan.attempt)(prepared("requests"))
    return chains.map_batches(Write, fn_constructor_kwargs={"plan": plan}, batch_size=getattr(cfg, "flush_rows", cfg.batch_size),
                              batch_format="pyarrow", compute=pool, num_cpus=cpus)


def run_streaming(cfg: Any, ctx: Any, m: Manifest, cache_dir: Path | None, job: type | None = None,
                  schema: pa.Schema | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Run the streaming pipeline to the end; (manifest with rows_in, this attempt's accounting)."""
    job = job or GenerateJob
    batches, expected, resumed, attempt = stream(cfg, ctx, m, cache_dir, job, schema)
    m.rows_in += expected
    log.info("%s: %d %s expected, %d resumed from written shards, %d to do with %s (%s), streamed "
             "through %d worker(s)", ctx.stage, expected, job.unit, resumed, expected - resumed, cfg.engine.kind,
             cfg.engine.teacher_name(), cfg.workers)
    acct: dict[str, Any] = {"engine": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
                            "engine_completion_tokens": 0, "retries": 0, "errors": Counter(), "finish": Counter(),
                            "counts": Counter(), "nodes": Counter(), "written": 0, "first_at": None,
                            "first_tokens": 0, "t0": time.perf_counter(), "resumed": resumed, "expected": expected}
    try:
        with Progress(ctx.stage, total=expected - resumed, unit=job.unit, logger=log) as progress:
            try:
                for b in batches:
                    for row in b.to_pylist():
                        _add(acct, row)
                        progress.update(row["rows"], extra=f"{acct['cache_hits']} from cache | "
                                                           f"{acct['engine_completion_tokens']} completion tokens")
            except Exception as exc:
                died = None
                if cfg.engine.kind == "vllm":
                    from teachers.engines.vllm import engine_died

                    died = engine_died(cfg.engine, str(attempt))
                if died is None:
                    raise
                raise died from exc
            for row in _noted_stats(attempt):  # shards the vllm path wrote before the engine
                _add(acct, row)
                progress.update(row["rows"])
    finally:
        close_attempt(attempt)
    acct["engine_s"] = time.perf_counter() - acct["t0"]
    return m, acct


def _add(acct: dict[str, Any], row: dict[str, Any]) -> None:
    for k in ("engine", "cache_hits", "prompt_tokens", "completion_tokens", "engine_completion_tokens", "retries"):
        acct[k] += row[k]
    acct["errors"].update(json.loads(row["errors"]))
    acct["finish"].update(json.loads(row["finish"]))
    acct["counts"].update(json.loads(row.get("counts") or "{}"))
    acct["nodes"][row["node"]] += 1
    acct["written"] += row["rows"]
    if row["engine"] and acct["first_at"] is None:
        acct["first_at"], acct["first_tokens"] = time.perf_counter(), row["engine_completion_tokens"]
