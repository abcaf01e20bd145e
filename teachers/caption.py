"""The caption stage: problems → problems + `image_description`, for text-only teachers such as R1.

    r1v run configs/r1v-38b.yaml --stage caption      # a multimodal model describes every image

Any multimodal engine writes one description per problem (all its images in one request, the prompt
from `prompt_file`), with the generation cache, so a re-run costs no engine call. On Ray (`workers >= 1`)
the stage streams like generate (teachers/stream.py, `CaptionJob`): read tasks read the problems' row
groups, the workers build the requests (images become data URIs there), caption — an actor pool of
engines, or the vllm engine through `ray.data.llm` — and publish the problems shards; the driver
commits the manifest. A killed run resumes: problems already written are not captioned again.
`workers: 0` runs in the driver without Ray.

The generate stage puts the description into the prompt instead of the images when its engine says
`text_only`. Problems without images pass with a null description. Every problem is written: a failed
caption leaves the description null and is counted in `metrics.errors` (a text-only teacher then
counts that problem as `bad_input`).
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.config import StageConfig
from pipeline.rundir import Manifest, publish_shard, read_table, shard_files, shard_name, stable_hash
from pipeline.schema import conform, extend
from teachers.cache import GenerationCache, cache_key
from teachers.engines import EngineConfig, GenRequest, GenResult
from teachers.generate import generate_rows
from teachers.render import prompt_record, read_prompt_file

log = logging.getLogger(__name__)

TABLES = ("problems",)
ROWS_FROM = "problems"
RESUMABLE = True  # the streaming run reads back a killed attempt's shards and captions only the rest
DESCRIPTION = pa.field("image_description", pa.string())
_PRIVATE = ("_captioned", "_error", "_tokens")


class CaptionConfig(StageConfig):
    engine: EngineConfig = Field(description="a multimodal engine (scripted: the simulated captioner)")
    prompt_file: str = Field("caption.txt", description="the captioning instruction (teachers/prompts/ or a path)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy: one faithful description")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    workers: int = Field(1, ge=0, description="engine actors (vllm: replicas); 0 = in-process, no Ray")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, description="requests per engine call")
    flush_rows: int = Field(256, ge=1, description="problems per shard on Ray: a kill loses at most this many")
    cache: bool = Field(True, description="use the generation cache")
    cache_dir: str | None = Field(None, description="default: <run.root>/.cache/generations")
    overwrite: bool = Field(False, description="re-caption problems that already carry a description")


def _request(p: dict[str, Any], cfg: CaptionConfig, run_seed: int, instruction: str) -> dict[str, Any] | None:
    """A generate work row with one sample for problem `p` (None: nothing to caption)."""
    from pipeline.images import data_uri

    images = p.get("images") or []
    if not images or (p.get("image_description") and not cfg.overwrite):
        return None
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    parts.append({"type": "text", "text": instruction})
    messages = [{"role": "user", "content": parts}]
    name = cfg.engine.teacher_name()
    cid = stable_hash(p["problem_id"], "caption", name)
    seed = int(stable_hash(run_seed, cid, n=8), 16) & 0x7FFFFFFF
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                "repetition_penalty": 1.0, "seed": seed}
    return {
        "problem_id": p["problem_id"], "round": 0, "teacher": name, "prompt": prompt_record(messages),
        "messages": json.dumps(messages),
        "problem": json.dumps({"problem_id": p["problem_id"], "question": p.get("question")}),
        "samples": [{"chain_id": cid, "sample_idx": 0, "seed": seed, "sampling": sampling}],
    }


def _requests(problems: list[dict[str, Any]], cfg: CaptionConfig, run_seed: int) -> list[dict[str, Any]]:
    instruction = read_prompt_file(cfg.prompt_file)
    return [w for w in (_request(p, cfg, run_seed, instruction) for p in problems) if w is not None]


def _description(res: GenResult) -> tuple[str | None, str | None]:
    """(description, error kind) from an engine result."""
    if res.error:
        return None, res.error_kind or "error"
    text = (res.response or res.text or "").strip()
    return (text, None) if text else (None, "empty")


def output_schema(files: list[Path]) -> pa.Schema:
    schema = pa.unify_schemas([pq.read_schema(f).remove_metadata() for f in files], promote_options="permissive")
    return extend(schema, DESCRIPTION)


class CaptionJob:
    """The caption stage's part of teachers/stream.py's skeleton: problems → problems shards."""

    table, id_column, unit = "problems", "problem_id", "problems"

    def __init__(self, plan: Any) -> None:
        self.plan, self.cfg = plan, plan.cfg
        self.instruction = read_prompt_file(self.cfg.prompt_file)
        self.identity = self.cfg.engine.cache_identity()

    def prepare(self, batch: pa.Table, done: set[str], cache: GenerationCache | None
                ) -> tuple[list[dict[str, Any]], int, list[tuple[dict[str, Any], GenRequest, str]]]:
        from teachers.generate import _result_from_cache

        ready, hits, misses = [], 0, []
        for p in batch.to_pylist():
            if p["problem_id"] in done:
                continue
            w = _request(p, self.cfg, self.plan.run_seed, self.instruction)
            if w is None:
                ready.append({**p, "image_description": p.get("image_description"), "_captioned": False,
                              "_error": None, "_tokens": 0})
                continue
            s = w["samples"][0]
            key = cache_key(self.identity, w["messages"], s["sampling"]) if cache else ""
            entry = cache.get(key) if cache else None
            context = {"problem": p, **{k: w[k] for k in ("problem_id", "round", "teacher", "prompt", "messages")}, **s}
            if entry is not None:
                ready.append(self.complete(context, _result_from_cache(entry)))
                hits += 1
                continue
            misses.append((context, GenRequest(messages=json.loads(w["messages"]), sampling=dict(s["sampling"]),
                                               problem=json.loads(w["problem"]), request_id=s["chain_id"]), key))
        return ready, hits, misses

    def complete(self, context: dict[str, Any], res: GenResult) -> dict[str, Any]:
        p = context["problem"]
        text, err = _description(res)
        return {**p, "image_description": text if text is not None else p.get("image_description"),
                "_captioned": text is not None, "_error": err, "_tokens": res.completion_tokens if text else 0}

    def write(self, rows: list[dict[str, Any]], engine_rows: int, hits: int) -> dict[str, Any]:
        from teachers.stream import _node_id

        schema = self.plan.schema
        t = conform(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in _PRIVATE} for r in rows],
                                         schema=schema), schema)
        name = shard_name(t.column("problem_id").to_pylist())
        publish_shard(t, Path(self.plan.attempt), name, "problems")
        return {
            "shard": name, "rows": len(rows), "engine": engine_rows, "cache_hits": hits, "prompt_tokens": 0,
            "completion_tokens": sum(r["_tokens"] or 0 for r in rows), "engine_completion_tokens": 0, "retries": 0,
            "errors": json.dumps(Counter(r["_error"] for r in rows if r["_error"])), "finish": "{}",
            "node": _node_id(),
            "counts": json.dumps({"captioned": sum(1 for r in rows if r["_captioned"]),
                                  "without_images": sum(1 for r in rows if not r.get("images"))}),
        }

    # the vllm path: the problem row rides through ray.data.llm as one binary column
    def request_schema(self) -> pa.Schema:
        from teachers.stream import request_schema

        return request_schema().append(pa.field("_problem", pa.binary()))

    def request_row(self, context: dict[str, Any], key: str) -> dict[str, Any]:
        return {**{k: context[k] for k in ("chain_id", "problem_id", "round", "teacher", "sample_idx", "seed",
                                           "prompt", "messages", "sampling")},
                "_cache_key": key, "_problem": pickle.dumps(context["problem"], protocol=5)}

    def context(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"problem": pickle.loads(row["_problem"])}


def run(cfg: CaptionConfig, ctx: Any) -> Manifest:
    if cfg.workers == 0:
        return _run_in_driver(cfg, ctx)
    from teachers.stream import _problem_files, run_streaming

    m = ctx.manifest()
    m, a = run_streaming(cfg, ctx, m, _cache_dir(cfg, ctx) if cfg.cache else None, CaptionJob,
                         output_schema(_problem_files(ctx)))
    ids = (read_table(ctx.out_dir, ["problem_id"]).column("problem_id") if shard_files(ctx.out_dir)
           else pa.chunked_array([], pa.string()))
    n = len(ids)
    if pc.count_distinct(ids).as_py() != n:
        raise RuntimeError(f"step {ctx.step!r}: duplicate problem ids in {ctx.out_dir}")
    if n != a["expected"]:
        raise RuntimeError(f"step {ctx.step!r}: {n} problems written but {a['expected']} expected")
    m.kept = n
    m.outputs = {"problems": n}
    m.metrics.update({"captioned": a["counts"].get("captioned", 0), "requests": a["engine"],
                      "cache_hits": a["cache_hits"], "without_images": a["counts"].get("without_images", 0),
                      "completion_tokens": a["completion_tokens"], "errors": dict(a["errors"]),
                      "resumed": a["resumed"], "shards_by_node": dict(a["nodes"]), "nodes": len(a["nodes"])})
    log.info("caption: %d problems, %d captioned (%d engine requests, %d cached, %d resumed), errors %s", n,
             m.metrics["captioned"], a["engine"], a["cache_hits"], a["resumed"], dict(a["errors"]) or "none")
    return m


def _cache_dir(cfg: CaptionConfig, ctx: Any) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(ctx.run_config.run.root) / ".cache" / "generations"


def _run_in_driver(cfg: CaptionConfig, ctx: Any) -> Manifest:
    """workers: 0 — every problem passes through this process."""
    m = ctx.manifest()
    for f in shard_files(ctx.out_dir):  # no resume here: a killed attempt's shards are rewritten (cache hits)
        f.unlink()
    table = ctx.read_input("problems")
    m.rows_in = table.num_rows
    problems = table.to_pylist()
    requests = _requests(problems, cfg, ctx.run_config.run.seed)
    cache = GenerationCache(_cache_dir(cfg, ctx)) if cfg.cache else None
    desc: dict[str, str] = {}
    errors: Counter[str] = Counter()
    n_engine = n_cached = tokens = 0
    for batch, from_engine in generate_rows(requests, cfg, cache):
        for r in batch.select(["problem_id", "response", "completion", "error", "_error_kind",
                               "completion_tokens"]).to_pylist():
            text, err = _description(GenResult(text=r["completion"] or "", response=r["response"], error=r["error"],
                                               error_kind=r["_error_kind"]))
            if err:
                errors[err] += 1
                continue
            desc[r["problem_id"]] = text
            tokens += r["completion_tokens"] or 0
        n_engine += batch.num_rows if from_engine else 0
        n_cached += 0 if from_engine else batch.num_rows
    schema = extend(table.schema.remove_metadata(), DESCRIPTION)
    old = table.column("image_description").to_pylist() if "image_description" in table.column_names else [None] * len(problems)
    column = [desc.get(p["problem_id"], o) for p, o in zip(problems, old, strict=True)]
    out = table.drop_columns([c for c in ("image_description",) if c in table.column_names])
    out = out.append_column(DESCRIPTION, pa.array(column, pa.string()))
    with ctx.writer(schema, "problems") as w:
        w.write(out)
    m.kept = out.num_rows
    m.outputs = {"problems": out.num_rows}
    m.metrics.update({"captioned": len(desc), "requests": n_engine, "cache_hits": n_cached,
                      "without_images": sum(1 for p in problems if not p.get("images")),
                      "completion_tokens": tokens, "errors": dict(errors)})
    log.info("caption: %d problems, %d captioned (%d engine requests, %d cached), errors %s",
             out.num_rows, len(desc), n_engine, n_cached, dict(errors) or "none")
    return m
