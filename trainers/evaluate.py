"""The `evaluate` stage: the trained student answers an eval set; the filters' verifier grades it.

    r1v run configs/demo.yaml --stage evaluate        # the tiny student on the run's problems, CPU

Prompts are rendered exactly like the training data (filters.curate: the same system prompt file and
user turn: one `<image>` per image, then the question and choices), sent through a teacher engine
(`hf` on CPU or one GPU; `vllm`: a ray.data.llm processor fanned out over Ray's GPU workers, the exported
student is a standard LLaVA/InternVL checkpoint vLLM serves) and checked with filters.verify.verify_response (math-verify with hard deadlines).

Outputs: `predictions` (main table, one row per problem answered), `failed/` (problem ids answered
wrongly, with the verdict: the next iterative SFT round adds their curated chains). Manifest:
rows_in = eval problems, kept = answered, quarantined = engine errors; metrics: accuracy overall, per
subject and per difficulty, and the verdict counts.
The eval set: `sources` (ingest-style, pipeline.ingest.load_sources) or, by default, the run's problems
(input role `problems`), the first `limit` by a seeded order.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from filters.verify import VerifyConfig
from pipeline.config import StageConfig
from pipeline.ingest import SourceConfig
from pipeline.progress import Progress
from pipeline.rundir import Manifest, ShardWriter, stable_hash

log = logging.getLogger(__name__)

LOGIC_VERSION = 2  # 2: engine errors are wrong answers in the denominator (verdict engine_error)

FAILED_DIR = "failed"
TABLES = ("predictions", "failed")

PREDICTIONS = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("difficulty", pa.int32()),
        pa.field("answer", pa.string()),
        pa.field("pred_answer", pa.string()),
        pa.field("verdict", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("finish_reason", pa.string()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("completion", pa.string()),
        pa.field("latency_s", pa.float64()),
    ]
)
FAILED = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("round", pa.int32()),
        pa.field("verdict", pa.string()),
        pa.field("pred_answer", pa.string()),
    ]
)


class EvaluateConfig(StageConfig):
    """Student evaluation (section `evaluate`)."""

    sources: list[SourceConfig] | None = Field(
        None, description="eval set (ingest-style sources); default: the run's own problems"
    )
    limit: int | None = Field(64, ge=1, description="problems evaluated (a seeded sample of the eval set)")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate; vllm: on GPU workers")
    max_tokens: int = Field(1024, ge=1, description="completion tokens per answer")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (hf)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="more vllm engine settings (teachers.engines.VLLMEngineConfig: replicas, tensor_parallel_size, "
        "gpu_memory_utilization, max_model_len, ...); the answers come from a ray.data.llm processor on Ray's "
        "GPU workers, one run over the whole eval set",
    )
    system_prompt_file: str = Field("sft_system.txt", description="system prompt: a path, or a name in "
                                    "filters/prompts/ (the curate stage's default)")
    verify: VerifyConfig = Field(default_factory=VerifyConfig)


def fingerprint_extra(cfg: EvaluateConfig) -> dict:
    """The eval sources' files (and the images beside them), digested the way ingest does."""
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import fingerprint_extra as source_stats

    return source_stats(IngestConfig(sources=cfg.sources)) if cfg.sources else {}


# ---------------------------------------------------------------------------------------------------------
# per-batch logic (plain Python)


def messages(problem: dict, system: str) -> list[dict]:
    """OpenAI-style chat for one problem; renders to the same text as the SFT rows' first two turns."""
    from filters.curate import problem_text, user_turn
    from pipeline.images import data_uri

    images = problem.get("images") or []
    if not images:
        user: Any = user_turn(problem)
    else:
        # image part + "\n" per image, then the text == "<image>\n" * n + text in the SFT rows
        user = []
        for rec in images:
            user += [{"type": "image_url", "image_url": {"url": data_uri(rec)}}, {"type": "text", "text": "\n"}]
        user.append({"type": "text", "text": problem_text(problem)})
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def grade(problem: dict, result: Any, verify_cfg: VerifyConfig) -> dict:
    """One predictions row: the verifier's verdict on the completion."""
    from filters.verify import verify_response

    text = result.text or ""
    if result.finish_reason == "length":
        return _row(problem, result, text, "truncated", None)
    v = verify_response(text, problem, verify_cfg)
    return _row(problem, result, text, v.verdict, v.pred_answer)


def _error_row(problem: dict, result: Any) -> dict:
    """The predictions row of a problem the engine failed on: verdict `engine_error`, not correct."""
    return _row(problem, result, (result.error or "")[:2000], "engine_error", None)


def _row(problem: dict, result: Any, text: str, verdict: str, pred: str | None) -> dict:
    return {
        "problem_id": problem["problem_id"],
        "source": problem.get("source"),
        "subject": problem.get("subject"),
        "difficulty": problem.get("difficulty"),
        "answer": problem.get("answer"),
        "pred_answer": pred,
        "verdict": verdict,
        "correct": verdict == "correct",
        "finish_reason": result.finish_reason,
        "completion_tokens": result.completion_tokens,
        "completion": text,
        "latency_s": result.latency_s,
    }


def accuracy_table(rows: list[dict], key: str) -> dict[str, dict[str, float]]:
    """{group: {"n": count, "accuracy": share correct}} grouped by `key` (None -> "unknown")."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        g = r.get(key)
        groups["unknown" if g is None else str(g)].append(bool(r["correct"]))
    return {g: {"n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------------------
# the stage


def _eval_problems(cfg: EvaluateConfig, ctx: Any) -> list[dict]:
    if cfg.sources:
        from pipeline.ingest import load_sources

        rows = [row for kind, row in load_sources(cfg.sources) if kind == "problem"]
    else:
        rows = ctx.read_input("problems").to_pylist()
    # A seeded order, not the file order: `limit` then samples every source and difficulty.
    salt = ctx.run_config.run.seed
    rows.sort(key=lambda r: stable_hash(salt, r["problem_id"]))
    return rows[: cfg.limit] if cfg.limit else rows


def _engine(cfg: EvaluateConfig, model_dir: Path) -> Any:
    from teachers.engines import HFEngineConfig, VLLMEngineConfig, make_engine

    if cfg.engine == "hf":
        ecfg: Any = HFEngineConfig(
            model=str(model_dir), multimodal=True, batch_size=cfg.batch_size, dtype=cfg.dtype, teacher="student"
        )
    else:
        ecfg = VLLMEngineConfig(**{
            "max_model_len": None, **cfg.vllm, "model": str(model_dir), "multimodal": True, "teacher": "student",
            "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype, "engine_kwargs": cfg.engine_kwargs,
        })
    return make_engine(ecfg)


def run(cfg: EvaluateConfig, ctx: Any) -> Manifest:
    from filters.curate import CurateConfig, system_prompt
    from teachers.engines import GenRequest
    from trainers.assemble import find_checkpoint

    m = ctx.manifest()
    model_dir = find_checkpoint(ctx.input_dirs("model")[0])
    problems = _eval_problems(cfg, ctx)
    m.rows_in = len(problems)
    system = system_prompt(CurateConfig(system_prompt_file=cfg.system_prompt_file))
    engine = _engine(cfg, model_dir)
    sampling = {"temperature": cfg.temperature, "top_p": 1.0, "max_tokens": cfg.max_tokens, "seed": ctx.seed()}
    graded: list[dict] = []
    errors: Counter = Counter()
    try:
        # Not resumed: a restarted evaluation regenerates every answer (greedy: the same ones).
        with ShardWriter(ctx.out_dir, PREDICTIONS, "predictions", resume=False) as out, \
                Progress("evaluate", total=len(problems), unit="answers", logger=log) as progress:
            # vllm: one processor run over the whole set (each generate() call starts the engine replicas)
            step = len(problems) if cfg.engine == "vllm" else max(cfg.batch_size * 4, 1)
            for s in range(0, len(problems), step):
                chunk = problems[s : s + step]
                reqs = [GenRequest(messages=messages(p, system), sampling=dict(sampling), problem=p,
                                   request_id=p["problem_id"]) for p in chunk]
                rows = []
                for p, res in zip(chunk, engine.generate(reqs), strict=True):
                    if res.finish_reason == "error":
                        # counted as a wrong answer: an engine that fails on a problem has not solved it, and
                        # leaving it out of the denominator would raise the accuracy of a flaky engine
                        errors[res.error_kind or "engine_error"] += 1
                        log.warning("evaluate: %s: %s", p["problem_id"], res.error)
                        rows.append(_error_row(p, res))
                        continue
                    rows.append(grade(p, res, cfg.verify))
                out.write(rows)
                graded += rows
                progress.update(len(chunk), extra=f"{sum(r['correct'] for r in graded)} correct")
    finally:
        engine.close()
    # the wrong list feeds the next SFT round: an engine error says nothing about the model's answer
    failed = [r for r in graded if not r["correct"] and r["verdict"] != "engine_error"]
    with ShardWriter(ctx.out_dir / FAILED_DIR, FAILED, "failed", resume=False) as w:
        w.write([{"problem_id": r["problem_id"], "round": ctx.round, "verdict": r["verdict"],
                  "pred_answer": r["pred_answer"]} for r in failed])
    m.kept = len(graded)
    m.outputs = {"predictions": len(graded), "failed": len(failed)}
    m.metrics.update(
        {
            "accuracy": sum(r["correct"] for r in graded) / len(graded) if graded else 0.0,
            "by_subject": accuracy_table(graded, "subject"),
            "by_difficulty": accuracy_table(graded, "difficulty"),
            "verdicts": dict(Counter(r["verdict"] for r in graded)),
            # engine errors are in the denominator (as wrong answers) and reported here by kind
            "engine_errors": dict(errors),
            "model_dir": str(model_dir),
            "engine": cfg.engine,
        }
    )
    log.info("evaluate: accuracy %.3f on %d problems (%s)", m.metrics["accuracy"], len(graded), model_dir)
    assemble = getattr(ctx.run_config, "assemble", None)
    if graded and m.metrics["accuracy"] == 0 and getattr(assemble, "init", None) == "tiny_random":
        log.info("evaluate: expected for the demo's tiny random student (it is not trained to solve anything); "
                 "the figure shows the evaluation runs end to end")
    return m
