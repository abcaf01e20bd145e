"""Stage `assess`: QDAM + VTIA scores and the DRLC repetition penalty / token budget per problem.

    r1v run configs/demo.yaml --stage assess          # heuristic scorers, CPU, no model
    r1v run configs/demo.yaml --stage assess assess.workers=0   # same, in-process without Ray

Scores (DESIGN.md, "AL-CoTD"): S_v (vision: image clarity and necessity), S_t (text: question quality,
difficulty, reasoning demand), S_I (image-text integration). They come from heuristic scorers that need
no model (filters/assess_heuristics.py: pixel statistics and text cues) and, optionally, from a judge
model behind any teacher engine (filters/judge.py; replies cached like chains), blended by `judge.weight`.
Each score is min-max normalised, then

    c = (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma)          (problem complexity, in [0, 1])
    P = min(2, exp(alpha * (1 - c)))                               (repetition penalty, in [1, min(2, e^alpha)])
    max_tokens = min_tokens + (max_tokens - min_tokens) * c**exponent, rounded up to `multiple_of`

so a hard, image-dependent problem gets a low penalty and a long budget, an easy one a high penalty and
a short budget.

Normalisation bounds (and the top difficulty level) are frozen: taken from the pool on this step's first
run, recorded in the manifest (`metrics.normalisation`) and reused when the pool changes, new scores
outside them clipped. Min-max over the whole pool would move every problem's penalty and budget when
problems are added, and with them every generation cache key: growing 60 -> 120 problems re-bought every
chain. Frozen bounds keep the paper's spread on the first pool and change nothing for problems already
there; quantising penalties instead would still move the problems near a step. `normalise: pool`
re-normalises on every run; `bounds` pins them explicitly. Both are written per row for `generate`; the raw sub-scores are kept in `qa_*` columns.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.config import StageConfig
from pipeline.rundir import Manifest
from pipeline.schema import QUARANTINE, extend
from teachers.engines import EngineConfig

log = logging.getLogger(__name__)

TABLES = ("problems", "quarantine")
ROWS_FROM = "problems"
# Bumped whenever a code change changes assess's output (2: normalisation against recorded bounds).
LOGIC_VERSION = 2

SUBSCORES = (
    "qa_sharpness",
    "qa_contrast",
    "qa_clarity",
    "qa_image_necessity",
    "qa_text_quality",
    "qa_difficulty",
    "qa_reasoning_demand",
    "qa_integration",
)
SCORE_FIELDS = (
    pa.field("s_v", pa.float64()),
    pa.field("s_t", pa.float64()),
    pa.field("s_i", pa.float64()),
    pa.field("complexity", pa.float64()),
    pa.field("repetition_penalty", pa.float64()),
    pa.field("max_tokens", pa.int64()),
    *(pa.field(name, pa.float64()) for name in SUBSCORES),
    pa.field("assess_source", pa.string()),
)


class BudgetConfig(StageConfig):
    """Completion-token budget as a function of complexity c in [0, 1]."""

    min_tokens: int = Field(2048, ge=16, description="budget of the simplest problem (c = 0)")
    max_tokens: int = Field(16384, ge=16, description="budget of the most complex problem (c = 1)")
    exponent: float = Field(
        1.0, gt=0.0, description="curve shape: >1 saves tokens on middling problems, <1 is generous to them"
    )
    multiple_of: int = Field(64, ge=1, description="round budgets up to a multiple of this")

    @model_validator(mode="after")
    def _ordered(self) -> BudgetConfig:
        if self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self


class HeuristicConfig(StageConfig):
    """Knobs of the model-free scorers (filters/assess_heuristics.py)."""

    image_max_side: int = Field(
        512, ge=32, description="images are downscaled to this side before pixel statistics (scale-free sharpness)"
    )
    sharpness_half: float = Field(
        0.01,
        gt=0.0,
        description="Laplacian variance (on [0,1] grey levels) that scores 0.5; MATH-V figures median ~0.026",
    )
    resolution_target: int = Field(448, ge=1, description="sqrt(width*height) that counts as full resolution")


class JudgeConfig(StageConfig):
    """An optional judge model, called through any teacher engine (teachers.engines.make_engine)."""

    engine: EngineConfig = Field(
        description="teacher engine section, typed and checked like generate.engine "
        "(e.g. {kind: openai, model: ..., base_url: ..., api_key_env: ...}; a key goes in the environment, never here)"
    )
    rubric_file: str = Field("judge_rubric.md", description="rubric prompt file: a path, or a name in filters/prompts/")
    weight: float = Field(1.0, ge=0.0, le=1.0, description="share of the judge in each score (rest: heuristics)")
    max_retries: int = Field(2, ge=0, le=10, description="re-asks after a malformed reply (with the error quoted)")
    temperature: float = Field(0.0, ge=0.0, description="judge sampling temperature (retries add 0.3 each)")
    max_tokens: int = Field(512, ge=16, description="judge reply budget")
    on_failure: Literal["heuristic", "quarantine"] = Field(
        "heuristic", description="a problem whose judge replies stay malformed: heuristic scores, or quarantine"
    )
    cache: bool = Field(True, description="keep judge replies in the generation cache: re-assessing (new alpha, "
                        "a grown pool) pays the judge only for problems it has not seen")
    cache_dir: str | None = Field(None, description="cache directory (default: <run.root>/.cache/generations)")


class BoundsConfig(StageConfig):
    """Explicit normalisation bounds (lo, hi) of the raw scores, instead of the pool's."""

    s_v: tuple[float, float] = (0.0, 1.0)
    s_t: tuple[float, float] = (0.0, 1.0)
    s_i: tuple[float, float] = (0.0, 1.0)
    level_scale: float = Field(0.0, ge=0, description="difficulty level that counts as hardest (0: text cues only)")


class AssessConfig(StageConfig):
    alpha: float = Field(
        0.2, gt=0.0, le=5.0, description="DRLC steepness; easiest problem gets P = min(2, e^alpha) (0.2 -> 1.22)"
    )
    beta: float = Field(1.0, ge=0.0, description="DRLC weight of the text score S_t (S_v has weight 1)")
    gamma: float = Field(1.0, ge=0.0, description="DRLC weight of the integration score S_I")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="completion-token budget curve")
    heuristics: HeuristicConfig = Field(default_factory=HeuristicConfig, description="model-free scorers")
    judge: JudgeConfig | None = Field(None, description="optional judge model; heuristics only when unset")
    workers: int = Field(1, ge=0, le=256, description="Ray Data workers for pixel statistics; 0 = in-process")
    compute: Literal["tasks", "actors"] = Field(
        "tasks",
        description="tasks: the scorer is stateless, so Ray's warm worker processes run it with no start-up; "
        "actors: a fixed ActorPoolStrategy pool (new processes per run; pays off only on long runs)",
    )
    batch_size: int = Field(64, ge=1, description="problems per scoring batch")
    normalise: Literal["frozen", "pool"] = Field(
        "frozen",
        description="frozen: min-max bounds (and the top difficulty level) come from this step's first run and are "
        "reused when the pool changes (recorded in the manifest; new scores outside them are clipped), so a grown "
        "pool keeps every existing problem's penalty, budget and cached chains; pool: re-normalise over the "
        "current pool on every run (the paper's reading; growing the pool changes every problem's sampling)",
    )
    bounds: BoundsConfig | None = Field(None, description="explicit bounds; overrides frozen/pool")


# --- DRLC --------------------------------------------------------------------------------------------


def complexity(s_v: float, s_t: float, s_i: float, beta: float, gamma: float) -> float:
    return (s_v + beta * s_t + gamma * s_i) / (1.0 + beta + gamma)


def drlc_penalty(s_v: float, s_t: float, s_i: float, alpha: float, beta: float, gamma: float) -> float:
    """P = min(2, exp(alpha * (1 - (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma)))) on normalised scores."""
    return min(2.0, math.exp(alpha * (1.0 - complexity(s_v, s_t, s_i, beta, gamma))))


def token_budget(c: float, cfg: BudgetConfig) -> int:
    c = min(1.0, max(0.0, c))
    raw = cfg.min_tokens + (cfg.max_tokens - cfg.min_tokens) * c**cfg.exponent
    rounded = int(math.ceil(raw / cfg.multiple_of) * cfg.multiple_of)
    return max(cfg.min_tokens, min(cfg.max_tokens, rounded))


def minmax(values: list[float], bounds: tuple[float, float] | None = None) -> list[float]:
    """Min-max normalise to [0, 1] over `bounds` (default: the values' own range), clipped; a constant
    column carries no ranking information and maps to 0.5."""
    lo, hi = bounds if bounds is not None else (min(values, default=0.0), max(values, default=0.0))
    if hi - lo < 1e-12:
        return [0.5] * len(values)
    return [min(1.0, max(0.0, (v - lo) / (hi - lo))) for v in values]


def _scorer_identity(cfg: AssessConfig) -> str:
    """What the raw scores' scale depends on: bounds recorded under another scorer are not reused."""
    from pipeline.rundir import stable_hash

    judge = None
    if cfg.judge is not None:
        judge = [cfg.judge.engine.cache_identity(), cfg.judge.rubric_file, cfg.judge.weight]
    return stable_hash(cfg.heuristics.model_dump(), judge, LOGIC_VERSION)


def _bounds(cfg: AssessConfig, ctx, sub: dict[int, dict], good: list[int], pool_scale: float) -> dict:
    """The normalisation record: bounds per score, the top level, and where they came from."""
    if cfg.bounds is not None:
        b = cfg.bounds
        return {"s_v": list(b.s_v), "s_t": list(b.s_t), "s_i": list(b.s_i), "level_scale": b.level_scale,
                "from": "config"}
    scorer = _scorer_identity(cfg)
    prev = getattr(ctx, "previous", None)
    rec = (prev.metrics.get("normalisation") if prev is not None else None) or {}
    if cfg.normalise == "frozen" and rec.get("scorer") == scorer and rec.get("s_v") is not None:
        return {**rec, "from": "previous run"}
    out: dict[str, Any] = {"level_scale": pool_scale, "scorer": scorer, "from": "pool"}
    for k in ("s_v", "s_t", "s_i"):
        vals = [sub[i][k] for i in good]
        out[k] = [min(vals), max(vals)] if vals else None
    return out


# --- scoring -----------------------------------------------------------------------------------------

_SCORE_COLUMNS = ("problem_id", "question", "images", "choices", "difficulty", "needs_image")


_RAW = pa.schema(
    [
        pa.field("_row", pa.int64()),
        pa.field("problem_id", pa.string()),
        pa.field("error", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("n_images", pa.int64()),
        pa.field("difficulty_cue", pa.float64()),
        *(pa.field(n, pa.float64()) for n in SUBSCORES if n != "qa_difficulty"),
    ]
)


def _score_table(table: pa.Table, hcfg: dict) -> pa.Table:
    """Raw heuristic sub-scores of one batch (plain Python; Ray tasks and actors call this too).

    The explicit schema keeps every column even when a batch starts with an unreadable image's row.
    """
    from filters.assess_heuristics import score_problem

    cfg = HeuristicConfig.model_validate(hcfg)
    out = [score_problem(r, cfg) | {"_row": r["_row"]} for r in table.to_pylist()]
    return pa.Table.from_pylist([{k: r.get(k) for k in _RAW.names} for r in out], schema=_RAW)


class _Scorer:
    """Ray Data actor: scores batches of problems (images decoded in the actor, not the driver)."""

    def __init__(self, hcfg: dict) -> None:
        self.hcfg = hcfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _score_table(batch, self.hcfg)


def heuristic_raw(problems: pa.Table, cfg: AssessConfig) -> list[dict]:
    """Per-row raw sub-scores (dicts, in input order), fanned out over Ray Data when cfg.workers > 0."""
    cols = [c for c in _SCORE_COLUMNS if c in problems.column_names]
    table = problems.select(cols).append_column("_row", pa.array(range(problems.num_rows), pa.int64()))
    hcfg = cfg.heuristics.model_dump()
    if cfg.workers == 0 or problems.num_rows == 0:
        parts = [
            _score_table(table.slice(i, cfg.batch_size), hcfg) for i in range(0, table.num_rows, cfg.batch_size)
        ]
    else:
        import ray

        # One block per batch, so every actor gets work (from_arrow of one table is a single block).
        blocks = [table.slice(i, cfg.batch_size) for i in range(0, table.num_rows, cfg.batch_size)]
        ds = ray.data.from_arrow(blocks)
        if cfg.compute == "actors":
            ds = ds.map_batches(
                _Scorer,
                fn_constructor_kwargs={"hcfg": hcfg},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
                compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            )
        else:
            ds = ds.map_batches(
                _score_table,
                fn_kwargs={"hcfg": hcfg},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
                compute=ray.data.TaskPoolStrategy(size=cfg.workers),
            )
        from pipeline.progress import track

        parts = list(track(ds.iter_batches(batch_format="pyarrow", batch_size=None), "assess", total=table.num_rows,
                           unit="problems", size=lambda b: b.num_rows, logger=log))
    rows = [r for p in parts for r in p.to_pylist()]
    rows.sort(key=lambda r: r["_row"])
    return rows


def _level_scale(problems: pa.Table) -> float:
    if "difficulty" not in problems.column_names:
        return 0.0
    levels = [d for d in problems.column("difficulty").to_pylist() if d is not None]
    return float(max(levels)) if levels else 0.0


def _blend(h: dict, j: dict | None, w: float) -> dict:
    if j is None:
        return h
    # The judge has no pixel statistics (sharpness, contrast): those stay heuristic.
    return {k: (1.0 - w) * h[k] + w * j[k] if k in j else h[k] for k in h}


def run(cfg: AssessConfig, ctx) -> Manifest:
    from filters.assess_heuristics import combine_scores

    m = ctx.manifest()
    problems = ctx.read_input("problems")
    m.rows_in = problems.num_rows
    raw = heuristic_raw(problems, cfg)
    bad = {i for i, r in enumerate(raw) if r.get("error")}
    levels = problems.column("difficulty").to_pylist() if "difficulty" in problems.column_names else [None] * len(raw)
    pool_scale = _level_scale(problems)
    prev = (getattr(ctx, "previous", None) and ctx.previous.metrics.get("normalisation")) or {}
    scale = pool_scale
    if cfg.bounds is not None:
        scale = cfg.bounds.level_scale
    elif cfg.normalise == "frozen" and prev.get("scorer") == _scorer_identity(cfg) and "level_scale" in prev:
        scale = prev["level_scale"]
    heur = [combine_scores(r, lvl, scale) for r, lvl in zip(raw, levels, strict=True)]

    judged: dict[int, dict] = {}
    if cfg.judge is not None and problems.num_rows:
        from filters.judge import judge_problems, load_engine

        todo = [i for i in range(problems.num_rows) if i not in bad]
        rows = problems.take(pa.array(todo, pa.int64())).to_pylist() if todo else []
        cache = _judge_cache(cfg.judge, ctx)
        engine = load_engine(cfg.judge)
        try:
            # the seed depends on the problem, not its position: a grown pool asks the judge the same questions
            results = judge_problems(engine, rows, cfg.judge, seed=ctx.seed("judge"), cache=cache)
        finally:
            engine.close()
        m.metrics["judge_requests"] = sum(r.requests for r in results)
        m.metrics["judge_cache_hits"] = sum(r.attempts - r.requests for r in results)
        for i, res in zip(todo, results, strict=True):
            if res.scores is not None:
                judged[i] = res.scores.as_subscores()
            elif cfg.judge.on_failure == "quarantine":
                raw[i]["error"] = f"judge reply invalid after {res.attempts} attempts: {res.error}"
                raw[i]["reason"] = "judge_invalid"
                bad.add(i)
        m.metrics["judge_ok"] = len(judged)
        m.metrics["judge_failed"] = len(todo) - len(judged)
        m.metrics["judge_attempts"] = sum(r.attempts for r in results)

    good = [i for i in range(problems.num_rows) if i not in bad]
    w = cfg.judge.weight if cfg.judge else 0.0
    sub = {i: _blend(heur[i], judged.get(i), w) for i in good}
    norm = _bounds(cfg, ctx, sub, good, scale)
    m.metrics["normalisation"] = norm
    s_v = minmax([sub[i]["s_v"] for i in good], _pair(norm["s_v"]))
    s_t = minmax([sub[i]["s_t"] for i in good], _pair(norm["s_t"]))
    s_i = minmax([sub[i]["s_i"] for i in good], _pair(norm["s_i"]))
    cols: dict[str, list] = {f.name: [] for f in SCORE_FIELDS}
    for k, i in enumerate(good):
        c = complexity(s_v[k], s_t[k], s_i[k], cfg.beta, cfg.gamma)
        cols["s_v"].append(s_v[k])
        cols["s_t"].append(s_t[k])
        cols["s_i"].append(s_i[k])
        cols["complexity"].append(c)
        cols["repetition_penalty"].append(drlc_penalty(s_v[k], s_t[k], s_i[k], cfg.alpha, cfg.beta, cfg.gamma))
        cols["max_tokens"].append(token_budget(c, cfg.budget))
        for name in SUBSCORES:
            cols[name].append(sub[i][name])
        cols["assess_source"].append("judge" if i in judged else "heuristic")

    base = problems.schema.remove_metadata()
    schema = extend(base, *SCORE_FIELDS)
    kept = problems.take(pa.array(good, pa.int64())) if good else problems.slice(0, 0)
    for f in SCORE_FIELDS:
        arr = pa.array(cols[f.name], f.type)
        idx = kept.schema.get_field_index(f.name)
        kept = kept.set_column(idx, f, arr) if idx >= 0 else kept.append_column(f, arr)
    with ctx.writer(schema, "problems") as wr:
        wr.write(kept)
    _write_quarantine(ctx, problems, raw, sorted(bad), m)
    m.kept = kept.num_rows
    m.outputs = {"problems": kept.num_rows, "quarantine": len(bad)}
    if good:
        pens = cols["repetition_penalty"]
        m.metrics.update(
            {
                "penalty_min": round(min(pens), 4),
                "penalty_max": round(max(pens), 4),
                "penalty_mean": round(sum(pens) / len(pens), 4),
                "max_tokens_mean": round(sum(cols["max_tokens"]) / len(good), 1),
            }
        )
    log.info("assess: %d problems scored (%d by judge), %d quarantined", m.kept, len(judged), len(bad))
    return m


def _pair(b: list | None) -> tuple[float, float] | None:
    return (float(b[0]), float(b[1])) if b else None


def _judge_cache(jcfg: JudgeConfig, ctx) -> Any:
    from teachers.cache import GenerationCache

    if not jcfg.cache:
        return None
    if jcfg.cache_dir:
        return GenerationCache(jcfg.cache_dir)
    root = getattr(getattr(ctx.run_config, "run", None), "root", None)
    return GenerationCache(Path(root) / ".cache" / "generations") if root else None


def _write_quarantine(ctx, problems: pa.Table, raw: list[dict], bad: list[int], m: Manifest) -> None:
    import json

    rows = []
    for i in bad:
        one = problems.slice(i, 1)
        row = (one.drop_columns(["images"]) if "images" in one.column_names else one).to_pylist()[0]
        reason = raw[i].get("reason", "image_unreadable")
        m.quarantine(reason)
        rows.append(
            {
                "source": row.get("source"),
                "source_ref": row.get("source_ref") or row.get("problem_id"),
                "reason": reason,
                "error": raw[i]["error"],
                "row_json": json.dumps(row, default=str),
            }
        )
    with ctx.writer(QUARANTINE, "quarantine", sub="quarantine") as wr:
        wr.write(rows)
