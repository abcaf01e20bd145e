"""The caption stage: problems → problems + `image_description`, for text-only teachers such as R1.

    r1v run configs/r1v-38b.yaml --stage caption      # a multimodal model describes every image

Any multimodal engine writes one description per problem (all its images in one request, the prompt
from `prompt_file`), fanned out like generate (Ray Data actor pool, the same generation cache, so a
re-run costs no engine call). The generate stage puts the description into the prompt instead of the
images when its engine says `text_only`. Problems without images pass with a null description.
Every problem is written: a failed caption leaves the description null and is counted in
`metrics.errors` (a text-only teacher then counts that problem as `bad_input`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline.config import StageConfig
from pipeline.rundir import Manifest, stable_hash
from pipeline.schema import extend
from teachers.cache import GenerationCache
from teachers.engines import EngineConfig
from teachers.generate import generate_rows
from teachers.render import prompt_record, read_prompt_file

log = logging.getLogger(__name__)

TABLES = ("problems",)
ROWS_FROM = "problems"
DESCRIPTION = pa.field("image_description", pa.string())


class CaptionConfig(StageConfig):
    engine: EngineConfig = Field(description="a multimodal engine (scripted: the simulated captioner)")
    prompt_file: str = Field("caption.txt", description="the captioning instruction (teachers/prompts/ or a path)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy: one faithful description")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    workers: int = Field(1, ge=0, description="engine actors; 0 = in-process")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    cache: bool = Field(True, description="use the generation cache")
    cache_dir: str | None = Field(None, description="default: <run.root>/.cache/generations")
    overwrite: bool = Field(False, description="re-caption problems that already carry a description")


def _requests(problems: list[dict[str, Any]], cfg: CaptionConfig, run_seed: int) -> list[dict[str, Any]]:
    from pipeline.images import data_uri

    instruction = read_prompt_file(cfg.prompt_file)
    name = cfg.engine.teacher_name()
    out = []
    for p in problems:
        images = p.get("images") or []
        if not images or (p.get("image_description") and not cfg.overwrite):
            continue
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
        parts.append({"type": "text", "text": instruction})
        messages = [{"role": "user", "content": parts}]
        cid = stable_hash(p["problem_id"], "caption", name)
        seed = int(stable_hash(run_seed, cid, n=8), 16) & 0x7FFFFFFF
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                    "repetition_penalty": 1.0, "seed": seed}
        out.append({  # a generate work row with one sample
            "problem_id": p["problem_id"], "round": 0, "teacher": name, "prompt": prompt_record(messages),
            "messages": json.dumps(messages),
            "problem": json.dumps({"problem_id": p["problem_id"], "question": p.get("question")}),
            "samples": [{"chain_id": cid, "sample_idx": 0, "seed": seed, "sampling": sampling}],
        })
    return out


def run(cfg: CaptionConfig, ctx: Any) -> Manifest:
    m = ctx.manifest()
    table = ctx.read_input("problems")
    m.rows_in = table.num_rows
    problems = table.to_pylist()
    requests = _requests(problems, cfg, ctx.run_config.run.seed)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(ctx.run_config.run.root) / ".cache" / "generations"
    cache = GenerationCache(cache_dir) if cfg.cache else None
    desc: dict[str, str] = {}
    errors: Counter[str] = Counter()
    n_engine = n_cached = tokens = 0
    for batch, from_engine in generate_rows(requests, cfg, cache):
        for r in batch.select(["problem_id", "response", "completion", "error", "_error_kind",
                               "completion_tokens"]).to_pylist():
            if r["error"]:
                errors[r["_error_kind"] or "error"] += 1
                continue
            text = (r["response"] or r["completion"] or "").strip()
            if not text:
                errors["empty"] += 1
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
