"""Stage `curate`: the best chains per problem become SFT samples; unsolved problems go to a retry list.

    r1v run configs/demo.yaml --stage curate

Input: the filter step's chains (every chain, with `keep`, `verdict`, `quality`, `drop_reason`) and the
problems table. Per problem, the eligible chains (kept by the filter, verdict `correct`, non-empty
reasoning) are ranked by quality (scores within `quality_tie` of a tier's best count as a tie),
then by fewer completion tokens (ties go to the shorter), then by chain id; walking that order, a chain
whose reasoning is a near-duplicate (word-shingle Jaccard >= `near_dup_threshold`) of one already
picked is dropped, until `n_per_problem` are picked. Each pick becomes one `sft` row:

    system    the prompt in `system_prompt_file` (default filters/prompts/sft_system.txt)
    user      "<image>\\n" once per image, then the question (and the lettered choices)
    assistant "<think>\\n{reasoning}\\n</think>\\n\\n{response}"

with the problem's images. Problems attempted this round with no pick are written to `<step>/retry/`
(problem_id, round, reason) for the next round's `generate`. Manifest: rows_in = chains in; kept =
SFT samples; dropped by reason (filtered_out, not_correct, no_reasoning, near_duplicate, not_best_n);
quarantined `unknown_problem` (a chain whose problem is not in the problems table).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline.config import StageConfig
from pipeline.rundir import Manifest, read_table, shard_files, stable_hash
from pipeline.schema import SFT

log = logging.getLogger(__name__)

TABLES = ("sft", "retry")
ROWS_FROM = "chains"  # rows_in = the rows of the chains input (pipeline.runner checks and records it)

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_PROMPT = Path(__file__).resolve().parent / "prompts" / "sft_system.txt"

RETRY = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("n_chains", pa.int32()),
        pa.field("n_correct", pa.int32()),
    ]
)


class CurateConfig(StageConfig):
    n_per_problem: int = Field(2, ge=1, description="SFT samples kept per problem (the n best chains)")
    near_dup_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="drop a chain whose reasoning shingle-Jaccard with a picked one is >= this"
    )
    shingle_words: int = Field(5, ge=1, le=20, description="words per shingle for near-duplicate detection")
    quality_tie: float = Field(
        0.25, ge=0.0, description="qualities within this of a tier's best tie (then the shorter chain wins); 0 = exact"
    )
    require_correct: bool = Field(True, description="only verdict == 'correct' chains are eligible")
    workers: int = Field(
        0, ge=0, description="0: curate in the driver; N: Ray tasks, N at a time, over buckets of problems "
        "(chains and problems hash-partitioned by problem_id), so no table passes through the driver")
    bucket_problems: int = Field(20_000, ge=1, description="problems per bucket when workers > 0")
    system_prompt_file: str = Field("sft_system.txt", description="system prompt file: a path, or a name in filters/prompts/")


# --- prompt rendering (shared with trainers' evaluate) ------------------------------------------------

_IMAGE_TAG = re.compile(r"<image\s*(\d*)>", re.IGNORECASE)


def system_prompt(cfg: CurateConfig | None = None) -> str:
    p = Path(cfg.system_prompt_file) if cfg is not None and cfg.system_prompt_file else DEFAULT_SYSTEM_PROMPT
    if not p.exists() and (DEFAULT_SYSTEM_PROMPT.parent / p).is_file():
        p = DEFAULT_SYSTEM_PROMPT.parent / p
    if not p.exists():
        raise FileNotFoundError(f"curate.system_prompt_file: {p} not found")
    return p.read_text().strip()


def problem_text(problem: dict[str, Any]) -> str:
    """The question with its lettered choices (unless the question already lists them).

    Inline source tags such as MATH-V's `<image1>` are rewritten to plain words, so the only `<image>`
    tokens a model sees are the placeholders that stand for real image inputs.
    """
    n_img = len(problem.get("images") or [])

    def _tag(m: re.Match) -> str:
        return f"(image {m.group(1)})" if n_img > 1 and m.group(1) else ("(the image)" if n_img <= 1 else "(image)")

    q = (problem.get("question") or "").strip()
    q = re.sub(r"\n?\s*" + _IMAGE_TAG.pattern + r"\s*$", "", q, flags=re.IGNORECASE) if n_img <= 1 else q
    q = _IMAGE_TAG.sub(_tag, q).strip()
    choices = problem.get("choices") or []
    if choices:
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if not all(f"({L})" in q for L in letters):
            q += "\n\nChoices:\n" + "\n".join(f"({L}) {c}" for L, c in zip(letters, choices, strict=True))
    return q


def user_turn(problem: dict[str, Any]) -> str:
    """The user message exactly as in training data: one `<image>` line per image, then the text."""
    n_img = len(problem.get("images") or [])
    return (IMAGE_PLACEHOLDER + "\n") * n_img + problem_text(problem)


def assistant_turn(reasoning: str, response: str) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{response.strip()}"


# --- selection (plain Python) -------------------------------------------------------------------------


def shingles(text: str, k: int) -> set[tuple[str, ...]]:
    words = re.sub(r"\s+", " ", (text or "").lower()).split()
    if len(words) < k:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def eligibility(chain: dict[str, Any], cfg: CurateConfig) -> str | None:
    """None when the chain may be picked, else the drop reason."""
    if not chain.get("keep"):
        return "filtered_out"
    if cfg.require_correct and chain.get("verdict") not in (None, "correct"):
        return "not_correct"
    if not (chain.get("reasoning") or "").strip():
        return "no_reasoning"
    return None


def _tokens(chain: dict[str, Any]) -> int:
    tokens = chain.get("completion_tokens")
    if tokens is None:
        tokens = len((chain.get("completion") or chain.get("reasoning") or "").split())
    return int(tokens)


def rank(chains: list[dict[str, Any]], cfg: CurateConfig) -> list[dict[str, Any]]:
    """Best first: quality tiers (a tier holds the chains within `quality_tie` of its best), then
    fewer completion tokens inside a tier (ties go to the shorter), then chain id for determinism."""
    by_q = sorted(chains, key=lambda c: (-float(c.get("quality") or 0.0), c["chain_id"]))
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(by_q):
        top = float(by_q[i].get("quality") or 0.0)
        j = i
        while j < len(by_q) and top - float(by_q[j].get("quality") or 0.0) <= cfg.quality_tie + 1e-12:
            j += 1
        out += sorted(by_q[i:j], key=lambda c: (_tokens(c), c["chain_id"]))
        i = j
    return out


def select_chains(chains: list[dict[str, Any]], cfg: CurateConfig) -> tuple[list[dict], dict[str, str]]:
    """(picked chains in rank order, {chain_id: drop reason} for the rest) for one problem's chains."""
    reasons: dict[str, str] = {}
    eligible = []
    for c in chains:
        r = eligibility(c, cfg)
        if r is None:
            eligible.append(c)
        else:
            reasons[c["chain_id"]] = r
    eligible = rank(eligible, cfg)
    picked: list[dict] = []
    picked_sh: list[set] = []
    for c in eligible:
        if len(picked) >= cfg.n_per_problem:
            reasons[c["chain_id"]] = "not_best_n"
            continue
        sh = shingles(c["reasoning"], cfg.shingle_words)
        if any(jaccard(sh, p) >= cfg.near_dup_threshold for p in picked_sh):
            reasons[c["chain_id"]] = "near_duplicate"
            continue
        picked.append(c)
        picked_sh.append(sh)
    return picked, reasons


def retry_reason(chains: list[dict[str, Any]]) -> str:
    if not chains:
        return "no_chains"
    if not any(c.get("verdict") == "correct" for c in chains):
        return "no_correct"
    return "all_rejected"


def sft_row(chain: dict[str, Any], problem: dict[str, Any], sys_prompt: str) -> dict[str, Any]:
    return {
        "sample_id": stable_hash("sft", chain["chain_id"]),
        "problem_id": chain["problem_id"],
        "chain_id": chain["chain_id"],
        "round": chain.get("round"),
        "messages": [
            {"role": "system", "content": sys_prompt},
            {"role": "user", "content": user_turn(problem)},
            {"role": "assistant", "content": assistant_turn(chain["reasoning"], chain.get("response") or "")},
        ],
        "images": problem.get("images") or [],
        "quality": chain.get("quality"),
    }


# --- stage --------------------------------------------------------------------------------------------

_CHAIN_COLUMNS = (
    "chain_id", "problem_id", "round", "reasoning", "response", "completion", "completion_tokens",
    "quality", "keep", "verdict", "drop_reason",
)


def _read_chains(ctx) -> list[dict[str, Any]]:
    """The filter output's chains; an empty round (no shards upstream) is zero chains, not an error."""
    dirs = [d for d in ctx.input_dirs("chains") if shard_files(d)]
    if not dirs:
        return []
    table = pa.concat_tables([read_table(d) for d in dirs], promote_options="default")
    missing = [c for c in ("chain_id", "problem_id", "keep") if c not in table.column_names]
    if missing:
        raise KeyError(f"step {ctx.step!r}: chains input {[str(d) for d in dirs]} lacks columns {missing}")
    return table.select([c for c in _CHAIN_COLUMNS if c in table.column_names]).to_pylist()


def problem_dirs(ctx) -> list[Path]:
    """The folders of the run's problems; a run with no ingest step (external chains only,
    filter.source) has the problems its filter step wrote beside the chains (`<filter>/problems/`)."""
    dirs = [d for d in (ctx.input_dirs("problems") if "problems" in ctx.inputs else []) if shard_files(d)]
    if dirs:
        return dirs
    beside = [d / "problems" for d in ctx.input_dirs("chains") if shard_files(d / "problems")]
    if not beside:
        raise FileNotFoundError(f"step {ctx.step!r}: no problems (no ingest step, and the chains input "
                                f"{[str(d) for d in ctx.input_dirs('chains')]} has no problems table)")
    return beside


def _read_problems(ctx) -> pa.Table:
    return pa.concat_tables([read_table(d) for d in problem_dirs(ctx)], promote_options="default")


def _attempted(ctx, problem_ids: list[str], chains: list[dict]) -> set[str]:
    """Problems this round tried: all of them in round 0, else the previous round's retry list.

    A retried problem whose generation produced no chain at all must still be retried (reason
    `no_chains`), so the set cannot come from the chains alone.
    """
    seen = {c["problem_id"] for c in chains}
    if ctx.round == 0:
        return set(problem_ids) | seen
    wanted: set[str] = set()
    for d in (ctx.input_dirs("retry") if "retry" in ctx.inputs else []):  # declared by the plan for round > 0
        if shard_files(d / "retry"):
            wanted |= set(read_table(d / "retry", ["problem_id"]).column("problem_id").to_pylist())
    return wanted | seen


def curate_rows(chains: list[dict[str, Any]], problems: dict[str, dict[str, Any]], attempted: set[str],
                round_: int, cfg: CurateConfig, sys_prompt: str, m: Manifest
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter]:
    """(SFT rows, retry rows, filter drop reasons) for the chains of a set of problems; drops and
    quarantines are counted in `m`. Plain Python: the whole table in the driver, or one bucket of
    problems in a Ray task (filters/curate_stream.py)."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for c in chains:
        if c["problem_id"] in problems:
            by_problem[c["problem_id"]].append(c)
        else:
            m.quarantine("unknown_problem")
    filter_reasons: Counter = Counter()
    rows, retry = [], []
    for pid in sorted(attempted):
        group = by_problem.get(pid, [])
        picked, reasons = select_chains(group, cfg)
        for reason in reasons.values():
            m.drop(reason)
        for c in group:
            if reasons.get(c["chain_id"]) == "filtered_out":
                filter_reasons[c.get("drop_reason") or "unknown"] += 1
        rows += [sft_row(c, problems[pid], sys_prompt) for c in picked]
        if not picked:
            n_correct = sum(c.get("verdict") == "correct" for c in group)
            retry.append(
                {"problem_id": pid, "round": round_, "reason": retry_reason(group),
                 "n_chains": len(group), "n_correct": n_correct}
            )
    # Chains of problems outside this round's attempted set (e.g. a stale retry list) still count.
    for pid, group in by_problem.items():
        if pid not in attempted:
            m.drop("not_attempted", len(group))
    return rows, retry, filter_reasons


def _metrics(m: Manifest, n_attempted: int, n_sft: int, solved: int, retry_reasons: Counter,
             filter_reasons: Counter, n_retry: int) -> None:
    m.kept = n_sft
    m.outputs = {"sft": n_sft, "retry": n_retry}
    m.metrics.update({
        "problems_attempted": n_attempted,
        "problems_solved": solved,
        "problems_to_retry": n_retry,
        "retry_reasons": dict(retry_reasons),
        "filter_drop_reasons": dict(filter_reasons),
        "samples_per_solved": round(n_sft / solved, 3) if solved else 0.0,
    })


def run(cfg: CurateConfig, ctx) -> Manifest:
    if cfg.workers > 0:
        from filters.curate_stream import run_streaming

        return run_streaming(cfg, ctx)
    m = ctx.manifest()
    sys_prompt = system_prompt(cfg)
    chains = _read_chains(ctx)
    m.rows_in = len(chains)
    problems = {p["problem_id"]: p for p in _read_problems(ctx).to_pylist()}
    attempted = _attempted(ctx, list(problems), chains) & set(problems)
    rows, retry, filter_reasons = curate_rows(chains, problems, attempted, ctx.round, cfg, sys_prompt, m)
    with ctx.writer(SFT, "sft") as w:
        w.write(rows)
    with ctx.writer(RETRY, "retry", sub="retry") as w:
        w.write(retry)
    solved = len({r["problem_id"] for r in rows})
    _metrics(m, len(attempted), len(rows), solved, Counter(r["reason"] for r in retry), filter_reasons, len(retry))
    log.info("%s: %d chains -> %d SFT samples; %d/%d problems solved, %d to retry",
             ctx.step, len(chains), len(rows), solved, len(attempted), len(retry))
    return m
