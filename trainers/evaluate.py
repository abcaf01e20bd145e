"""The `evaluate` stage: the trained student answers a held-out eval set; the filters' verifier grades it.

    r1v run configs/demo.yaml --stage evaluate        # the tiny student on the demo's held-out set, CPU

Two sets, one engine run:
- the held-out set (`eval_set`: ingest-style sources, the kinds training ingests), the source of the
  headline figures. Held out for real: every eval problem that a training problem of the run (the
  step's `problems` input) matches by the decontaminate stage's rule (filters.decontaminate: n-gram
  overlap, and a matching figure where both have one) is left out and counted (`contaminated`). Each
  problem is answered `samples` (k) times, sampled with seeds that depend on the run seed, the set and
  the problem only, so every phase's student answers with the same seeds. Scores (trainers.scoring):
  pass@1 over k, majority vote over the k extracted answers (grouped by the verifier's equivalence),
  pass@k, per subject and per difficulty. An engine error is a wrong sample, counted in the
  denominator, and reported by kind.
- a seeded sample (`limit`) of the run's training problems, answered greedily: its wrong answers are the
  `failed/` list the next iterative SFT round adds (never held-out problems). Without an `eval_set`
  the headline comes from this sample, as a figure on training problems (`metrics.headline: train`).

Every evaluate step of the plan reads the same `evaluate` section, so the student of every phase is
scored on the same set: a new phase evaluates its student with one plan entry,
`Entry("evaluate", {"model": Use("model"), "problems": PROBLEMS}, ("wrong",), name="evaluate-<phase>")`.

Prompts are the student's own (trainers.chat.student_prompt: its chat template, the SFT rows' system
prompt and user turn), sent through a teacher engine (`hf` on CPU or one GPU; `vllm`: a ray.data.llm
processor fanned out over Ray's GPU workers, the exported student is a standard LLaVA/InternVL
checkpoint vLLM serves) and checked with filters.verify.verify_response (math-verify with hard deadlines).

Outputs: `predictions` (main table, one row per answer: split heldout/train, sample_idx), `scores/`
(table `eval_scores`, one row per problem and split: pass1, majority answer and votes, majority_correct,
engine errors), `failed/` (training problems answered wrongly, with the verdict). Manifest: rows_in =
eval rows read + training problems sampled; kept = problems answered; dropped contaminated / not_sampled;
quarantined = unreadable eval rows. Metrics: accuracy (= pass@1 of the headline set), majority, pass_k,
by_subject, by_difficulty, engine_errors, and `heldout` / `train` blocks (r1v report tabulates them
per phase).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from pydantic import Field, model_validator

from filters.decontaminate import MatchConfig
from filters.verify import VerifyConfig
from pipeline.config import StageConfig
from pipeline.ingest import SourceConfig
from pipeline.progress import Progress
from pipeline.rundir import Manifest, ShardWriter, stable_hash

log = logging.getLogger(__name__)

# 2: engine errors are wrong answers in the denominator (verdict engine_error); 3: held-out set, k samples
LOGIC_VERSION = 3

FAILED_DIR = "failed"
SCORES_DIR = "scores"
TABLES = ("predictions", "eval_scores", "failed")

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
        pa.field("split", pa.string()),
        pa.field("sample_idx", pa.int32()),
        pa.field("eval_set", pa.string()),
    ]
)
SCORES = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("eval_set", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("difficulty", pa.int32()),
        pa.field("answer", pa.string()),
        pa.field("samples", pa.int32()),
        pa.field("correct_samples", pa.int32()),
        pa.field("engine_errors", pa.int32()),
        pa.field("pass1", pa.float64()),
        pa.field("pass_k", pa.bool_()),
        pa.field("majority_answer", pa.string()),
        pa.field("majority_votes", pa.int32()),
        pa.field("majority_correct", pa.bool_()),
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


class HeldOutConfig(StageConfig):
    """The held-out eval set every phase's student is scored on (section `evaluate.eval_set`)."""

    name: str | None = Field(None, description="the set's label in metrics and the report (default: its first source's)")
    sources: list[SourceConfig] = Field(min_length=1, description="ingest-style sources (the kinds training ingests)")
    limit: int | None = Field(None, ge=1, description="problems scored: a seeded sample of the clean set (None = all)")
    samples: int = Field(4, ge=1, description="k: sampled answers per problem (pass@1 over k, majority vote over k)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature of the k answers (0 with k=1: greedy)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling of the k answers")
    decontaminate: bool = Field(
        True, description="drop eval problems that a training problem (the step's `problems` input) matches, by the "
        "decontaminate stage's rule; counted as `contaminated`"
    )
    match: MatchConfig = Field(default_factory=MatchConfig, description="the matching rule (decontaminate's fields)")

    def label(self) -> str:
        return self.name or self.sources[0].label()


class EvaluateConfig(StageConfig):
    """Student evaluation (section `evaluate`)."""

    eval_set: HeldOutConfig | None = Field(
        None, description="the held-out set the headline figures come from; none: the training-problem sample"
    )
    limit: int | None = Field(
        64, ge=0, description="training problems answered greedily for the wrong list of the next SFT round (a seeded "
        "sample of the run's problems); None = all, 0 = none"
    )
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate; vllm: on GPU workers")
    max_tokens: int = Field(1024, ge=1, description="completion tokens per answer")
    temperature: float = Field(0.0, ge=0, description="the training-problem answers; 0 = greedy")
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

    @model_validator(mode="before")
    @classmethod
    def _sources(cls, data: Any) -> Any:
        # `sources` (an eval set answered once, greedily) is what this section had before `eval_set`
        if isinstance(data, dict) and "sources" in data:
            data = dict(data)
            sources = data.pop("sources")
            if sources:
                if data.get("eval_set"):
                    raise ValueError("give the eval set once: evaluate.eval_set.sources (evaluate.sources is its old name)")
                data["eval_set"] = {"sources": sources, "samples": 1, "temperature": data.get("temperature", 0.0)}
        return data


def fingerprint_extra(cfg: EvaluateConfig) -> dict:
    """The eval sources' files (and the images beside them), digested the way ingest does."""
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import fingerprint_extra as source_stats

    return source_stats(IngestConfig(sources=cfg.eval_set.sources)) if cfg.eval_set else {}


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


def _seeded(rows: list[dict], salt: Any, limit: int | None) -> tuple[list[dict], int]:
    """A seeded order, not the file order (a limit then samples every source and difficulty); (rows, left out)."""
    rows = sorted(rows, key=lambda r: stable_hash(salt, r["problem_id"]))
    return (rows[:limit], max(0, len(rows) - limit)) if limit else (rows, 0)


def _pool(ctx: Any) -> pa.Table | None:
    """The run's training problems (input role `problems`), or None when the step has no such input."""
    if not ctx.inputs.get("problems"):
        return None
    try:
        return ctx.read_input("problems")
    except FileNotFoundError:
        return None


def held_out(cfg: HeldOutConfig, pool: pa.Table | None, salt: Any, m: Manifest) -> tuple[list[dict], dict]:
    """The clean held-out problems, and what was removed: eval rows a training problem matches are dropped
    (`contaminated`, with the match), unreadable rows quarantined, repeats and rows past `limit` dropped
    (`duplicate`, `not_sampled`); every read row is counted in `m.rows_in`."""
    from filters.decontaminate import contaminated_items, image_hashes
    from pipeline.ingest import load_sources

    rows, unreadable, repeated = [], 0, 0
    for kind, row in load_sources(cfg.sources):
        if kind == "problem":
            rows.append(row)
        elif kind == "quarantine":
            unreadable += 1
            log.warning("evaluate: eval set %s: unreadable row %s (%s)", cfg.label(), row.get("source_ref"), row.get("error"))
        else:  # the same problem twice in the eval set: scored once
            repeated += 1
    m.rows_in += len(rows) + unreadable + repeated
    if unreadable:
        m.quarantine("eval_row_unreadable", unreadable)
    if repeated:
        m.drop("duplicate", repeated)
    matches: list[dict] = []
    checked = cfg.decontaminate and pool is not None
    if checked:
        mode = cfg.match.image_match if cfg.match.image_aware else None
        items = [(cfg.label(), r["problem_id"], r["question"], image_hashes(r.get("images"), mode) if mode else [])
                 for r in rows]
        hits = contaminated_items(items, pool, cfg.match)
        matches = [{"problem_id": rows[i]["problem_id"], "train_problem_id": pid, "overlap": round(ov, 6)}
                   for i, (pid, ov) in sorted(hits.items())]
        rows = [r for i, r in enumerate(rows) if i not in hits]
        if hits:
            m.drop("contaminated", len(hits))
            log.info("evaluate: %d of the %d problems of eval set %s match a training problem: left out",
                     len(hits), len(rows) + len(hits), cfg.label())
    elif cfg.decontaminate:
        log.warning("evaluate: step has no training problems input: eval set %s is not checked against them", cfg.label())
    rows, left = _seeded(rows, (salt, cfg.label()), cfg.limit)
    if left:
        m.drop("not_sampled", left)
    return rows, {"contaminated": len(matches), "matches": matches[:20], "unreadable": unreadable,
                  "not_sampled": left, "decontaminated": checked}


def _requests(cfg: EvaluateConfig, heldout: list[dict], train: list[dict], system: str, ctx: Any) -> list:
    """(split, sample_idx, problem, GenRequest) per answer: k seeded samples per held-out problem (the
    same seeds for every phase's student), one greedy answer per training problem."""
    from teachers.engines import GenRequest

    out = []
    h = cfg.eval_set
    run_seed = ctx.run_config.run.seed
    for p in heldout:
        for j in range(h.samples):
            seed = int(stable_hash(run_seed, "eval_set", h.label(), p["problem_id"], j, n=8), 16)
            sampling = {"temperature": h.temperature, "top_p": h.top_p if h.temperature > 0 else 1.0,
                        "max_tokens": cfg.max_tokens, "seed": seed}
            out.append(("heldout", j, p, GenRequest(messages=messages(p, system), sampling=sampling, problem=p,
                                                     request_id=f"{p['problem_id']}#{j}")))
    sampling = {"temperature": cfg.temperature, "top_p": 1.0, "max_tokens": cfg.max_tokens, "seed": ctx.seed()}
    for p in train:
        out.append(("train", 0, p, GenRequest(messages=messages(p, system), sampling=dict(sampling), problem=p,
                                               request_id=p["problem_id"])))
    return out


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


def _scores(rows: list[dict], problems: dict[tuple[str, str], dict], verify_cfg: VerifyConfig) -> list[dict]:
    from trainers.scoring import score_problem

    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["split"], r["problem_id"])].append(r)
    out = []
    for (split, pid), samples in by.items():
        samples.sort(key=lambda r: r["sample_idx"])
        out.append({"split": split, "eval_set": samples[0]["eval_set"],
                    **score_problem(problems[(split, pid)], samples, verify_cfg)})
    return out


def run(cfg: EvaluateConfig, ctx: Any) -> Manifest:
    from filters.curate import CurateConfig, system_prompt
    from trainers.assemble import find_checkpoint
    from trainers.scoring import summary

    m = ctx.manifest()
    model_dir = find_checkpoint(ctx.input_dirs("model")[0])
    salt = ctx.run_config.run.seed
    pool = _pool(ctx)
    heldout, removed = held_out(cfg.eval_set, pool, salt, m) if cfg.eval_set else ([], {})
    train: list[dict] = []
    if pool is not None and cfg.limit != 0:
        ids, _ = _seeded([{"problem_id": x} for x in pool.column("problem_id").to_pylist()], salt, cfg.limit)
        want = {r["problem_id"] for r in ids}
        train = sorted((r for r in pool.filter(pa.compute.is_in(pool.column("problem_id"),
                                                                 pa.array(sorted(want), pa.string()))).to_pylist()),
                       key=lambda r: stable_hash(salt, r["problem_id"]))
    m.rows_in += len(train)
    if not heldout and not train:
        log.warning("evaluate: nothing to answer (no eval set problems left, no training problems sampled)")
    system = system_prompt(CurateConfig(system_prompt_file=cfg.system_prompt_file))
    reqs = _requests(cfg, heldout, train, system, ctx)
    label = cfg.eval_set.label() if cfg.eval_set else None
    engine = _engine(cfg, model_dir)
    graded: list[dict] = []
    errors: Counter = Counter()
    try:
        # Not resumed: a restarted evaluation regenerates every answer (seeded: the same ones).
        with ShardWriter(ctx.out_dir, PREDICTIONS, "predictions", resume=False) as out, \
                Progress("evaluate", total=len(reqs), unit="answers", logger=log) as progress:
            # vllm: one processor run over the whole set (each generate() call starts the engine replicas)
            step = max(len(reqs), 1) if cfg.engine == "vllm" else max(cfg.batch_size * 4, 1)
            for s in range(0, len(reqs), step):
                chunk = reqs[s : s + step]
                rows = []
                for (split, j, p, _req), res in zip(chunk, engine.generate([c[3] for c in chunk]), strict=True):
                    if res.finish_reason == "error":
                        # counted as a wrong answer: an engine that fails on a problem has not solved it, and
                        # leaving it out of the denominator would raise the accuracy of a flaky engine
                        errors[res.error_kind or "engine_error"] += 1
                        log.warning("evaluate: %s: %s", p["problem_id"], res.error)
                        row = _error_row(p, res)
                    else:
                        row = grade(p, res, cfg.verify)
                    rows.append({**row, "split": split, "sample_idx": j,
                                 "eval_set": label if split == "heldout" else None})
                out.write(rows)
                graded += rows
                progress.update(len(chunk), extra=f"{sum(r['correct'] for r in graded)} correct")
    finally:
        engine.close()
    problems = {**{("heldout", p["problem_id"]): p for p in heldout}, **{("train", p["problem_id"]): p for p in train}}
    scores = _scores(graded, problems, cfg.verify)
    with ShardWriter(ctx.out_dir / SCORES_DIR, SCORES, "eval_scores", resume=False) as w:
        w.write(scores)
    # the wrong list feeds the next SFT round: training problems only (the held-out set never enters
    # training), and an engine error says nothing about the model's answer
    train_rows = [r for r in graded if r["split"] == "train"]
    failed = [r for r in train_rows if not r["correct"] and r["verdict"] != "engine_error"]
    with ShardWriter(ctx.out_dir / FAILED_DIR, FAILED, "failed", resume=False) as w:
        w.write([{"problem_id": r["problem_id"], "round": ctx.round, "verdict": r["verdict"],
                  "pred_answer": r["pred_answer"]} for r in failed])
    m.kept = len(heldout) + len(train)
    m.outputs = {"predictions": len(graded), "eval_scores": len(scores), "failed": len(failed)}
    h_scores = [x for x in scores if x["split"] == "heldout"]
    t_scores = [x for x in scores if x["split"] == "train"]
    split = "heldout" if cfg.eval_set else "train"
    head_rows = [r for r in graded if r["split"] == split]
    head = summary(h_scores if cfg.eval_set else t_scores)
    m.metrics.update(
        {
            # headline: pass@1 on the held-out set when one is configured, else on the training-problem sample
            "accuracy": head["pass1"],
            "headline": split,
            "eval_set": label,
            **{k: head[k] for k in ("pass1", "majority", "pass_k", "samples", "by_subject", "by_difficulty")},
            "verdicts": dict(Counter(r["verdict"] for r in head_rows)),
            # engine errors are in the denominator (as wrong answers) and reported here by kind
            "engine_errors": dict(errors),
            "heldout": {**summary(h_scores), "problems": len(h_scores), **removed,
                        "verdicts": dict(Counter(r["verdict"] for r in graded if r["split"] == "heldout"))}
            if cfg.eval_set else None,
            "train": {"problems": len(t_scores), "accuracy": summary(t_scores)["pass1"], "wrong": len(failed),
                      "verdicts": dict(Counter(r["verdict"] for r in train_rows))} if train else None,
            "model_dir": str(model_dir),
            "model_step": ctx.input_dirs("model")[0].name,
            "engine": cfg.engine,
        }
    )
    log.info("evaluate: %s pass@1 %.3f, maj@%d %.3f on %d problems (%s)", label or "training problems",
             head["pass1"], head["samples"], head["majority"], head["n"], model_dir)
    assemble = getattr(ctx.run_config, "assemble", None)
    if graded and head["pass1"] == 0 and getattr(assemble, "init", None) == "tiny_random":
        log.info("evaluate: expected for the demo's tiny random student (it is not trained to solve anything); "
                 "the figure shows the evaluation runs end to end")
    return m
