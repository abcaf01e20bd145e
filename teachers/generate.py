"""The generate stage: problems × k samples → `chains`, fanned out over a Ray Data actor pool.

    r1v run configs/demo.yaml --stage generate                    # scripted teacher, CPU, seconds
    r1v run configs/r1v-38b.yaml --stage generate                 # R1 on vLLM, tensor parallel 8

One engine per worker (`workers` actors, `gpus_per_worker` GPUs each); the vllm engine goes through
Ray's `ray.data.llm` processor (`workers` replicas). On Ray the stage streams (teachers/stream.py): the
problems are read as a Ray Data dataset, the workers render, expand, look up the cache, generate and
write their own shards, and the driver commits the manifest. `workers: 0` runs the same per-batch code
in-process without Ray.

Per sample: chain_id = stable_hash(problem_id, teacher, round, sample_idx) and seed = stable_hash(run
seed, chain_id), so a resumed or repeated run asks the same questions. Sampling parameters come from
the problem row where the assess stage set them (repetition_penalty, max_tokens; also temperature and
top_p if present), else from this config. Before any engine call each sample is looked up in the
generation cache (teachers/cache.py); chains are written in shards of at most `flush_rows`, so a killed
run loses at most the shards being written and, resumed (same fingerprint), generates only the missing
samples. In round r > 0 only the problems on the previous curate step's
retry list are generated.

Manifest: rows_in = expected samples; kept = chains without error; engine errors are quarantined by
kind (the rows stay in the table with finish_reason=error). Metrics: engine requests, cache hits,
resumed chains, prompt/completion tokens, retries, errors by kind, finish reasons, tokens/s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipeline.config import StageConfig
from pipeline.progress import Progress
from pipeline.rundir import Manifest, read_table, shard_files, stable_hash
from pipeline.schema import CHAINS, SAMPLING, conform, extend
from teachers.cache import GenerationCache, cache_key
from teachers.engines import (
    EngineConfig,
    GenRequest,
    GenResult,
    engine_config,
    error_result,
    make_engine,
)
from teachers.render import PromptConfig, RenderError, prompt_record, read_prompt_file, render_messages

log = logging.getLogger(__name__)

TABLES = ("chains",)
RESUMABLE = True  # run() reads back a killed attempt's shards and generates only the rest

# Problem fields a request carries to the engine (the scripted engine needs the gold answer).
_PROBLEM_FIELDS = ("problem_id", "question", "answer", "answer_type", "choices", "difficulty", "needs_image")

SAMPLE = pa.struct(
    [
        pa.field("chain_id", pa.string()),
        pa.field("sample_idx", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("sampling", SAMPLING),
    ]
)
# One work row per problem with the samples still to generate: the prompt (and its images) travels
# once per problem, not once per sample, through the object store; a worker expands it.
WORK = pa.schema(
    [
        pa.field("problem_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("teacher", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("messages", pa.string()),
        pa.field("problem", pa.string()),
        pa.field("samples", pa.list_(SAMPLE)),
    ]
)
# What a worker returns: the chain plus accounting columns the driver strips before writing.
WORKER_OUT = extend(CHAINS, pa.field("_retries", pa.int64()), pa.field("_error_kind", pa.string()))


class GenerateConfig(StageConfig):
    engine: EngineConfig = Field(
        description="the teacher engine (required: a missing one must not silently become the simulator)"
    )
    samples_per_problem: int = Field(4, ge=1, description="k chains per problem")
    temperature: float = Field(0.6, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(4096, ge=1, description="completion budget when the problem row sets none")
    repetition_penalty: float = Field(1.0, gt=0, description="used when the problem row sets none")
    use_row_sampling: bool = Field(
        True, description="take repetition_penalty / max_tokens / temperature / top_p from the problem row if set"
    )
    penalty_scale: float = Field(
        1.0, ge=0, le=1,
        description="shrinks a row's assessed penalty toward 1: P' = 1 + (P - 1) * scale (later rounds give "
        "unsolved problems room for longer chains)",
    )
    budget_scale: float = Field(1.0, gt=0, description="multiplies a row's assessed max_tokens budget")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    workers: int = Field(1, ge=0, description="engine actors (one engine each); 0 = in-process, no Ray")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per engine actor (vllm: tensor x pipeline parallel)")
    batch_size: int = Field(16, ge=1, description="requests per worker call")
    concurrent_batches: int | None = Field(
        None, ge=1,
        description="worker calls in flight per engine (default: 2 for openai, whose engine shares its "
        "max_concurrency slots across calls, so a long straggler idles no slot; 1 for the others)",
    )
    flush_rows: int = Field(256, ge=1, description="chains per shard: a kill loses at most this many")
    cache: bool = Field(True, description="use the per-sample generation cache")
    cache_dir: str | None = Field(None, description="cache directory (default: <run.root>/.cache/generations)")
    limit: int | None = Field(None, ge=1, description="generate for the first N problems only")

    @model_validator(mode="after")
    def _vllm_gpus(self) -> GenerateConfig:
        if self.engine.kind == "vllm":  # ray.data.llm places tp x pp ranks of one GPU each
            from teachers.engines.vllm import check_gpus

            check_gpus(self.engine, self.gpus_per_worker)
        return self


# ---------------------------------------------------------------- requests


def _sampling(cfg: GenerateConfig, problem: dict[str, Any], seed: int) -> dict[str, Any]:
    s = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
         "repetition_penalty": cfg.repetition_penalty, "seed": seed}
    if cfg.use_row_sampling:
        for key, ok in _ROW_SAMPLING.items():
            v = problem.get(key)
            if v is None:
                continue
            if isinstance(v, (int, float)) and math.isfinite(v) and ok(v):
                s[key] = int(v) if key == "max_tokens" else float(v)
            else:
                # An unusable per-row value falls back to the config's, never fails the run.
                log.warning("generate: problem %s: ignoring %s=%r", problem.get("problem_id"), key, v)
                continue
            if key == "repetition_penalty":
                s[key] = 1.0 + (s[key] - 1.0) * cfg.penalty_scale
            elif key == "max_tokens":
                s[key] = max(1, int(round(s[key] * cfg.budget_scale)))
    return s


_ROW_SAMPLING = {
    "temperature": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "max_tokens": lambda v: v >= 1,
    "repetition_penalty": lambda v: v > 0,
}


def build_requests(
    problems: list[dict[str, Any]], cfg: GenerateConfig, round_: int, run_seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(work rows, one per problem with its k samples; chain rows for samples whose prompt could not be rendered)."""
    teacher = cfg.engine.teacher_name()
    system = read_prompt_file(cfg.prompt.system_prompt_file)
    reqs, bad = [], []
    for p in problems:
        try:
            messages = render_messages(p, cfg.prompt, cfg.engine.text_only, system)
            err = None
        except RenderError as e:
            messages, err = None, str(e)
        samples = []
        for s in range(cfg.samples_per_problem):
            chain_id = stable_hash(p["problem_id"], teacher, round_, s)
            seed = int(stable_hash(run_seed, chain_id, n=8), 16) & 0x7FFFFFFF
            samples.append({"chain_id": chain_id, "sample_idx": s, "seed": seed, "sampling": _sampling(cfg, p, seed)})
        work = {"problem_id": p["problem_id"], "round": round_, "teacher": teacher, "samples": samples}
        if err is not None:
            res = error_result("bad_input", err)
            res.simulated = cfg.engine.kind == "scripted"
            bad += [_chain_row(r, res) for r in expand({**work, "prompt": None, "messages": None, "problem": None})]
            continue
        work.update(prompt=prompt_record(messages), messages=json.dumps(messages),
                    problem=json.dumps({k: p.get(k) for k in _PROBLEM_FIELDS}, ensure_ascii=False))
        reqs.append(work)
    return reqs, bad


def expand(work: dict[str, Any]) -> list[dict[str, Any]]:
    """A work row as one request row per sample."""
    base = {k: work[k] for k in ("problem_id", "round", "teacher", "prompt", "messages", "problem")}
    return [{**base, **s} for s in work["samples"]]


def _chain_row(req: dict[str, Any], res: GenResult) -> dict[str, Any]:
    return {
        "chain_id": req["chain_id"], "problem_id": req["problem_id"], "round": req["round"],
        "teacher": req["teacher"], "sample_idx": req["sample_idx"], "seed": req["seed"],
        "prompt": req.get("prompt"), "completion": res.text, "reasoning": res.reasoning, "response": res.response,
        "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens, "sampling": req["sampling"], "latency_s": res.latency_s,
        "error": res.error, "simulated": res.simulated, "_retries": res.retries, "_error_kind": res.error_kind,
    }


# what a generation-cache entry holds: these GenResult fields (a chain row names `text` `completion`)
CACHED_FIELDS = ("text", "reasoning", "response", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s",
                 "simulated")


def _result_from_cache(entry: dict[str, Any]) -> GenResult:
    return GenResult(**{k: entry.get(k) for k in CACHED_FIELDS})


# ---------------------------------------------------------------- the per-batch worker


class GenerateWorker:
    """One engine; maps a batch of request rows to chain rows. Plain Python: Ray only fans it out."""

    def __init__(self, engine: dict[str, Any], env: dict[str, str] | None = None) -> None:
        # Secrets (the API key named by api_key_env) travel from the driver's environment to the
        # worker's; they are constructor arguments, never row data, manifests or logs.
        t0 = time.perf_counter()
        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)
        self.engine = make_engine(engine_config(engine))
        # In a fresh worker process this is mostly import time (torch + transformers take seconds on
        # CPU): the fixed start-up a short run pays that an in-process loop does not.
        log.info("generate worker: %s engine ready in %.2fs", engine.get("kind"), time.perf_counter() - t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, requests = [], []
        for work in batch.to_pylist():
            messages, problem = json.loads(work["messages"]), json.loads(work["problem"])  # parsed once, k uses
            for r in expand(work):
                rows.append(r)
                requests.append(GenRequest(messages=messages, sampling=dict(r["sampling"]), problem=problem,
                                           request_id=r["chain_id"]))
        results = self.engine.generate(requests)
        if len(results) != len(rows):
            raise RuntimeError(f"engine returned {len(results)} results for {len(rows)} requests")
        return conform(pa.Table.from_pylist([_chain_row(r, res) for r, res in zip(rows, results, strict=True)],
                                            schema=WORKER_OUT), WORKER_OUT)

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------- driver


class _Accounting:
    def __init__(self) -> None:
        self.engine_requests = 0
        self.cache_hits = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.engine_completion_tokens = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        self.engine_s = 0.0
        self.t0 = time.perf_counter()
        self.first_at: float | None = None  # when the first engine batch arrived: workers are up
        self.first_tokens = 0

    def add(self, t: pa.Table, from_engine: bool) -> None:
        d = t.select(["prompt_tokens", "completion_tokens", "finish_reason", "_retries", "_error_kind"]).to_pydict()
        n = t.num_rows
        pt = sum(x or 0 for x in d["prompt_tokens"])
        ct = sum(x or 0 for x in d["completion_tokens"])
        self.prompt_tokens += pt
        self.completion_tokens += ct
        if from_engine:
            self.engine_requests += n
            self.engine_completion_tokens += ct
            if self.first_at is None:
                self.first_at, self.first_tokens = time.perf_counter(), ct
            self.retries += sum(x or 0 for x in d["_retries"])
        else:
            self.cache_hits += n
        self.finish.update(x or "none" for x in d["finish_reason"])
        self.errors.update(k for k in d["_error_kind"] if k)


def _cache_dir(cfg: GenerateConfig, ctx: Any) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(ctx.run_config.run.root) / ".cache" / "generations"


def _load_problems(cfg: GenerateConfig, ctx: Any, m: Manifest) -> list[dict[str, Any]]:
    problems = ctx.read_input("problems").to_pylist()
    if ctx.round > 0 and "retry" in ctx.inputs:
        wanted: set[str] = set()
        for d in ctx.input_dirs("retry"):
            if shard_files(d / "retry"):
                wanted |= set(read_table(d / "retry", ["problem_id"]).column("problem_id").to_pylist())
        problems = [p for p in problems if p["problem_id"] in wanted]
        m.metrics["retry_problems"] = len(wanted)
    seen: set[str] = set()
    unique = []
    for p in problems:
        if p["problem_id"] in seen:
            m.drop("duplicate_problem", cfg.samples_per_problem)
            m.rows_in += cfg.samples_per_problem
            continue
        seen.add(p["problem_id"])
        unique.append(p)
    return unique[: cfg.limit] if cfg.limit else unique


def concurrent_calls(cfg: Any) -> int:
    n = getattr(cfg, "concurrent_batches", None)
    return n if n else (2 if cfg.engine.kind == "openai" else 1)


def _engine_batches(todo: pa.Table, cfg: Any, per_call: int):
    """Stream chain batches for the work rows in `todo` in this process (`workers: 0`; on Ray the stages
    stream through teachers/stream.py), `per_call` problems per call, in the order they finish;
    `concurrent_calls(cfg)` calls in flight."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    if cfg.workers != 0:
        raise ValueError(f"workers={cfg.workers}: on Ray the stage streams through teachers/stream.py")
    calls = concurrent_calls(cfg)
    worker = GenerateWorker(cfg.engine.model_dump())
    slices = [todo.slice(i, per_call) for i in range(0, todo.num_rows, per_call)]
    try:
        if calls == 1:
            for s in slices:
                yield worker(s)
            return
        with ThreadPoolExecutor(max_workers=calls) as pool:
            pending = {pool.submit(worker, s) for s in slices[:calls]}
            nxt = calls
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if nxt < len(slices):
                        pending.add(pool.submit(worker, slices[nxt]))
                        nxt += 1
                    yield fut.result()
    finally:
        worker.close()


def _actor_pool(workers: int, calls: int) -> Any:
    import ray

    if calls == 1:
        return ray.data.ActorPoolStrategy(size=workers)
    # `calls` batches run at once in each actor (threads): the engine shares its request slots across them
    return ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=calls,
                                      max_tasks_in_flight_per_actor=calls, enable_true_multi_threading=True)


def generate_rows(todo: list[dict[str, Any]], cfg: Any, cache: GenerationCache | None
                  ) -> Iterator[tuple[pa.Table, bool]]:
    """(chain batch, came from the engine) for work rows: cache hits first, then engine results.

    `cfg` is any config with engine, workers, batch_size (requests per worker call), cpus_per_worker,
    gpus_per_worker. Successful engine results are stored in the cache as they arrive.
    """
    identity = cfg.engine.cache_identity()
    keys: dict[str, str] = {}
    misses, hits = [], []
    for w in todo:
        missing = []
        for s in w["samples"]:
            entry = None
            if cache:
                keys[s["chain_id"]] = key = cache_key(identity, w["messages"], s["sampling"])
                entry = cache.get(key)
            if entry is None:
                missing.append(s)
            else:
                hits.append(_chain_row({**w, **s}, _result_from_cache(entry)))
        if missing:
            misses.append({**w, "samples": missing})
    if hits:
        yield pa.Table.from_pylist(hits, schema=WORKER_OUT), False
    if misses:
        k = max(len(w["samples"]) for w in misses)
        per_call = max(1, cfg.batch_size // k)
        for batch in _engine_batches(pa.Table.from_pylist(misses, schema=WORK), cfg, per_call):
            if cache:
                _cache_put(cache, keys, batch)
            yield batch, True


def _secret_env(engine: Any) -> dict[str, str]:
    name = getattr(engine, "api_key_env", None)
    return {name: os.environ[name]} if name and name in os.environ else {}


def _strip(t: pa.Table) -> pa.Table:
    return t.drop_columns([c for c in ("_retries", "_error_kind") if c in t.column_names])


def run(cfg: GenerateConfig, ctx: Any) -> Manifest:
    m = ctx.manifest()
    if cfg.workers == 0:
        return _run_in_driver(cfg, ctx, m)
    from teachers.stream import run_streaming

    m, a = run_streaming(cfg, ctx, m, _cache_dir(cfg, ctx) if cfg.cache else None)
    acct = _Accounting()
    acct.t0, acct.engine_s, acct.first_at, acct.first_tokens = a["t0"], a["engine_s"], a["first_at"], a["first_tokens"]
    acct.engine_requests, acct.cache_hits, acct.retries = a["engine"], a["cache_hits"], a["retries"]
    acct.prompt_tokens, acct.completion_tokens = a["prompt_tokens"], a["completion_tokens"]
    acct.engine_completion_tokens = a["engine_completion_tokens"]
    acct.errors, acct.finish = a["errors"], a["finish"]
    _finish(m, ctx, acct, a["expected"], a["resumed"])
    m.metrics["shards_by_node"] = dict(a["nodes"])
    m.metrics["nodes"] = len(a["nodes"])
    return m


def _run_in_driver(cfg: GenerateConfig, ctx: Any, m: Manifest) -> Manifest:
    """workers: 0 — the same per-batch code in the driver, without Ray, shards written here (a vllm
    engine then runs through its Engine API)."""
    problems = _load_problems(cfg, ctx, m)
    expected = len(problems) * cfg.samples_per_problem
    m.rows_in += expected
    requests, bad = build_requests(problems, cfg, ctx.round, ctx.run_config.run.seed)
    writer = ctx.writer(CHAINS, "chains", rows_per_shard=cfg.flush_rows)
    done: set[str] = set()
    if ctx.resume and shard_files(ctx.out_dir):
        done = set(read_table(ctx.out_dir, ["chain_id"]).column("chain_id").to_pylist())
        log.info("generate: resuming, %d chains already written", len(done))
    acct = _Accounting()
    bad = [b for b in bad if b["chain_id"] not in done]
    if bad:
        writer.write(_strip(pa.Table.from_pylist(bad, schema=WORKER_OUT)))
        acct.errors.update(b["_error_kind"] for b in bad)
    todo = []
    for w in requests:
        left = [s for s in w["samples"] if s["chain_id"] not in done]
        if left:
            todo.append({**w, "samples": left})
    n_todo = sum(len(w["samples"]) for w in todo)
    conc = getattr(cfg.engine, "max_concurrency", 0)
    calls = concurrent_calls(cfg)
    if conc > cfg.batch_size * calls:
        # A worker holds `calls` batches at a time, so fewer requests than the concurrency cap it.
        log.warning("generate: batch_size %d x concurrent_batches %d < engine.max_concurrency %d: at most %d "
                    "requests in flight per worker", cfg.batch_size, calls, conc, cfg.batch_size * calls)
    log.info("generate: %d samples expected, %d resumed from written shards, %d to do with %s (%s)%s",
             expected, len(done), n_todo, cfg.engine.kind, cfg.engine.teacher_name(),
             "; samples already in the generation cache are read back, not generated" if cfg.cache else "")
    t0 = acct.t0 = time.perf_counter()
    cache = GenerationCache(_cache_dir(cfg, ctx)) if cfg.cache else None
    with Progress("generate", total=n_todo, unit="samples", logger=log) as progress:
        for batch, from_engine in generate_rows(todo, cfg, cache):
            acct.add(batch, from_engine)
            writer.write(_strip(batch))
            progress.update(len(batch), extra=f"{acct.cache_hits} from cache | "
                                              f"{acct.engine_completion_tokens} completion tokens")
    acct.engine_s = time.perf_counter() - t0
    writer.close()
    _finish(m, ctx, acct, expected, len(done))
    return m


def _cache_put(cache: GenerationCache, keys: dict[str, str], batch: pa.Table) -> None:
    for row in batch.to_pylist():
        if row["error"] is None:
            cache.put(keys[row["chain_id"]], {k: row["completion" if k == "text" else k] for k in CACHED_FIELDS})


def _steady(acct: _Accounting) -> float:
    if acct.first_at is None:
        return 0.0
    dt = acct.t0 + acct.engine_s - acct.first_at
    return round((acct.engine_completion_tokens - acct.first_tokens) / dt, 1) if dt > 0 else 0.0


def _finish(m: Manifest, ctx: Any, acct: _Accounting, expected: int, resumed: int) -> None:
    """Counts from what is on disk (resumed shards included), so they add up after any restart."""
    # Arrow columns, not Python lists: the driver's memory stays flat as the pool grows
    if shard_files(ctx.out_dir):
        out = read_table(ctx.out_dir, ["chain_id", "error"])
    else:
        out = pa.table({"chain_id": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    ids = out.column("chain_id")
    n = len(ids)
    if pc.count_distinct(ids).as_py() != n:
        vc = pc.value_counts(ids)
        dup = vc.field("values").filter(pc.greater(vc.field("counts"), 1))[:5].to_pylist()
        raise RuntimeError(f"step {ctx.step!r}: duplicate chain ids in {ctx.out_dir}: {dup}")
    if n != expected:
        raise RuntimeError(f"step {ctx.step!r}: {n} chains written but {expected} expected")
    err = out.column("error").drop_null()
    errors: Counter[str] = Counter()
    if len(err):
        kinds = pc.value_counts(pc.list_element(pc.split_pattern(err, ":", max_splits=1), 0))
        errors.update(dict(zip(kinds.field("values").to_pylist(), kinds.field("counts").to_pylist(), strict=True)))
    m.kept = n - sum(errors.values())
    for kind, k in errors.items():
        m.quarantine(f"engine_error:{kind}", k)
    m.outputs = {"chains": n}
    m.metrics.update({
        "requests": acct.engine_requests,
        "cache_hits": acct.cache_hits,
        "resumed": resumed,
        "prompt_tokens": acct.prompt_tokens,
        "completion_tokens": acct.completion_tokens,
        "retries": acct.retries,
        "errors": dict(acct.errors),
        "finish_reasons": dict(acct.finish),
        "engine_s": round(acct.engine_s, 3),
        "tokens_per_s": round(acct.engine_completion_tokens / acct.engine_s, 1) if acct.engine_s > 0 else 0.0,
        # Start-up (worker processes, model load) apart from the steady rate after the first batch.
        "startup_s": round(acct.first_at - acct.t0, 3) if acct.first_at else 0.0,
        "steady_tokens_per_s": _steady(acct),
    })
    log.info("generate: %d chains (%d kept) | requests %d | cache hits %d | retries %d | tok/s %.1f",
             n, m.kept, acct.engine_requests, acct.cache_hits, acct.retries, m.metrics["tokens_per_s"])
