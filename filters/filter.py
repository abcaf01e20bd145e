"""Stage `filter`: verify every chain's answer and score its redundancy and length; keep or drop it.

    r1v run configs/demo.yaml --stage filter
    r1v run configs/demo.yaml --stage filter filter.workers=1 filter.verify.timeout_s=2

Input: the generate step's chains and the problems (joined on problem_id; the budget is the problem's
`max_tokens` from assess, else the chain's sampling max_tokens). With no generate step, the chains come
from `filter.source` (existing generations in Parquet/JSONL, see filters/external.py) and the problems
they imply are written to `<step>/problems/` for curate.

Per chain (plain Python in `score_batch`; Ray Data fans batches out over an actor pool, `workers`
actors, each with its own deadline worker process for the sympy checks):

1. format and verdict: the trace format is detected per row (`trace_format`: think / sky / plain,
   filters/formats.py); truncated only on evidence (finish_reason "length", completion tokens at the
   generation budget, a think/thought span never closed, a text that stops mid-sentence or mid-formula
   with no answer ending it); else the answer is extracted (`pred_answer`, and the rule that found it in
   `pred_source`, filters/extract.py) and checked against the gold (filters/verify.py): correct / wrong /
   no_answer / gold_unparsable / timeout;
2. redundancy and length scores and `quality` (0-5; formula in filters/redundancy.py);
3. keep, or drop with the first failing reason in this order: generation_error, truncated, looping,
   wrong, no_answer, timeout, gold_unparsable, over_budget, redundant, language_mixing, low_quality.

Every chain is written (kept and dropped, with `keep` and `drop_reason`), so reports compare before and
after; a killed step is scored again from the start (its shards are rewritten, never appended to). Manifest: rows_in = chains; kept; dropped by reason; quarantined `unknown_problem` (a chain whose
problem is in no problems table; not written); metrics = verdict counts, trace formats, answer sources,
truncation evidence, loops, mean quality, timings, and `warnings` (a declared format most rows disagree
with, a large share of chains with no extractable answer) shown by `r1v status`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from filters.external import ChainsSourceConfig
from filters.extract import extract, split_chain, truncation
from filters.redundancy import RedundancyConfig, Scorer
from filters.verify import VerifyConfig, check_many
from pipeline.config import StageConfig
from pipeline.rundir import Manifest, ShardWriter, shard_files
from pipeline.schema import CHAINS, PROBLEMS, extend

log = logging.getLogger(__name__)

TABLES = ("chains", "problems")
ROWS_FROM = "chains"  # rows_in = the rows of the chains input (pipeline.runner records how they chain)
LOGIC_VERSION = 3  # 2: trace formats, extraction cascade, equivalence classes. 3: other teams' answer styles, markers and chat records. Bump with any change of verify / extract / redundancy that changes verdicts or keep

FILTERED = extend(
    CHAINS,
    pa.field("trace_format", pa.string()),
    pa.field("pred_answer", pa.string()),
    pa.field("pred_source", pa.string()),
    pa.field("verdict", pa.string()),
    pa.field("verify_detail", pa.string()),
    pa.field("verify_s", pa.float64()),
    pa.field("ngram_repetition", pa.float64()),
    pa.field("compression_ratio", pa.float64()),
    pa.field("repeated_paragraph_frac", pa.float64()),
    pa.field("reflection_density", pa.float64()),
    pa.field("language_mixing", pa.float64()),
    pa.field("length_ratio", pa.float64()),
    pa.field("loop_detected", pa.bool_()),
    pa.field("quality", pa.float64()),
    pa.field("keep", pa.bool_()),
    pa.field("drop_reason", pa.string()),
)
DROP_ORDER = (
    "generation_error", "truncated", "looping", "wrong", "no_answer", "timeout", "gold_unparsable",
    "over_budget", "redundant", "language_mixing", "low_quality",
)
# problem fields a chain is scored against, attached to each row before fan-out
_PROBLEM_COLS = {"_gold": "answer", "_answer_type": "answer_type", "_choices": "choices", "_budget": "max_tokens"}


class FilterConfig(StageConfig):
    workers: int = Field(2, ge=0, description="Ray Data actors scoring chains (0 = in the driver, no Ray)")
    batch_size: int = Field(32, ge=1, description="chains per batch sent to an actor")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per actor (its check worker included)")
    starts_in_think: bool = Field(
        False,
        description="raw completions (no reasoning/response columns) start inside <think>: no </think> = cut off",
    )
    min_quality: float = Field(0.0, ge=0, le=5, description="drop correct chains below this quality (low_quality)")
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    redundancy: RedundancyConfig = Field(default_factory=RedundancyConfig)
    source: ChainsSourceConfig | None = Field(
        None, description="external chains (Parquet/JSONL) to filter when the run has no generate step"
    )


def preflight(cfg: FilterConfig) -> list[str]:
    """Problems found without reading data (`r1v validate`, and before a run)."""
    if cfg.source is not None and not Path(cfg.source.path).is_file():
        return [f"filter.source.path: file not found: {cfg.source.path}"]
    return []


def fingerprint_extra(cfg: FilterConfig) -> dict:
    from filters.external import source_stats

    return {"source": source_stats(cfg.source)} if cfg.source is not None else {}


# ------------------------------------------------------------------ per-batch logic (no Ray needed)


def _split(row: dict, starts_in_think: bool):
    """The chain's Split (filters/formats.py), from its raw completion; engine-split columns win."""
    completion = row.get("completion")
    if row.get("reasoning") is not None or row.get("response") is not None:
        # the engine split it already (with finish_reason); only an explicit unclosed marker is news here.
        # A teacher that does not think writes no markers at all: that is a complete answer, not a cut one.
        split = split_chain(completion, False) if completion else split_chain("")
        fmt = split.fmt if split.fmt != "plain" or not row.get("reasoning") else "think"
        return split.__class__(row.get("reasoning") or "", row.get("response") or "", fmt, split.closed,
                               split.solution_open)
    return split_chain(completion, starts_in_think)


def _generation_cut(row: dict) -> str | None:
    """Evidence from the generation itself: finish_reason "length", or (where the engine gave no finish
    reason, as ray.data.llm and many trace files do) the completion tokens at the generation budget."""
    if row.get("finish_reason") == "length":
        return "finish_reason=length"
    if row.get("finish_reason"):
        return None  # the engine said why it stopped
    budget = (row.get("sampling") or {}).get("max_tokens")
    tokens = row.get("completion_tokens")
    if budget and tokens and tokens >= budget:
        return f"completion_tokens {tokens} at the budget {budget}"
    return None


def _budget(row: dict) -> int | None:
    """The token budget the chain was generated under (a later round may widen the assessed one with
    generate.budget_scale), else the problem's assessed budget (external chains carry no sampling)."""
    sampling = row.get("sampling") or {}
    if sampling.get("max_tokens"):
        return int(sampling["max_tokens"])
    return int(row["_budget"]) if row.get("_budget") else None


def score_batch(rows: list[dict], cfg: FilterConfig, pool: Any, scorer: Scorer | None = None) -> list[dict]:
    """Verdict, scores, keep and drop_reason for each chain row (rows carry `_gold`, `_answer_type`, ...).

    `pool` is a filters.deadline.DeadlinePool running filters.verify.check_answer.
    """
    scorer = scorer or Scorer(cfg.redundancy)
    out, to_check = [], []
    for i, row in enumerate(rows):
        split = _split(row, cfg.starts_in_think)
        atype = row.get("_answer_type")
        found = extract(split.response, atype, row.get("_gold"), row.get("_choices"))
        errored = row.get("finish_reason") == "error" or bool(row.get("error"))
        cut = _generation_cut(row) or truncation(split, found)
        text = f"{split.reasoning}\n{split.response}" if split.reasoning else split.response
        s = scorer.score(text, row.get("completion_tokens"), _budget(row))
        r = {**row, **s, "trace_format": split.fmt, "pred_answer": found.answer if found else None,
             "pred_source": found.source if found else None, "verify_detail": None, "verify_s": None}
        if errored:
            r["verdict"], r["verify_detail"] = "no_answer", f"generation error: {row.get('error') or 'finish_reason=error'}"
        elif cut:
            r["verdict"], r["verify_detail"] = "truncated", cut
        else:
            r["verdict"] = None
            problem = {"answer": row.get("_gold"), "answer_type": atype, "choices": row.get("_choices")}
            # nothing our rules read: math-verify's own extraction on the last paragraph gets a try
            to_check.append((i, found.answer if found else None, problem, None if found else _last_part(split.response)))
        out.append(r)
    if to_check:
        results = check_many([(pred, prob, tail) for _i, pred, prob, tail in to_check], cfg.verify, pool)
        for (i, pred, _prob, _tail), (verdict, detail, secs, used) in zip(to_check, results, strict=True):
            out[i].update(verdict=verdict, verify_detail=detail or None, verify_s=secs)
            if pred is None and used is not None:
                out[i].update(pred_answer=used, pred_source="math_verify")
    for r in out:
        r["quality"] = scorer.quality(r["verdict"] == "correct", r)
        reason = _drop_reason(r, scorer, cfg)
        r["keep"], r["drop_reason"] = reason is None, reason
        del r["loop_period"]
    return out


def _last_part(text: str, chars: int = 600) -> str:
    """The text's last paragraph (at most `chars`): where a final answer without a marker sits."""
    t = text.rstrip()[-chars:]
    return t[t.rfind("\n\n") + 2 :] if "\n\n" in t else t


def _drop_reason(r: dict, scorer: Scorer, cfg: FilterConfig) -> str | None:
    if r.get("finish_reason") == "error" or r.get("error"):
        return "generation_error"
    if r["verdict"] == "truncated":
        return "truncated"
    if r["loop_detected"]:
        return "looping"
    if r["verdict"] != "correct":
        return r["verdict"]  # wrong / no_answer / timeout / gold_unparsable
    failing = scorer.failing(r)
    if failing is not None:
        return failing
    if r["quality"] < cfg.min_quality:
        return "low_quality"
    return None


class _FilterActor:
    """One Ray Data actor: a redundancy scorer and a persistent deadline worker for the sympy checks."""

    def __init__(self, cfg: dict) -> None:
        from filters.deadline import DeadlinePool
        from filters.verify import check_answer

        self.cfg = FilterConfig.model_validate(cfg)
        v = self.cfg.verify
        self.pool = DeadlinePool(check_answer, workers=1, timeout_s=v.timeout_s, memory_mb=v.memory_mb)
        self.scorer = Scorer(self.cfg.redundancy)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = score_batch(batch.to_pylist(), self.cfg, self.pool, self.scorer)
        return pa.Table.from_pylist([_output_row(r) for r in rows], schema=_OUT_SCHEMA)


_OUT_SCHEMA = FILTERED.append(pa.field("_idx", pa.int64()))


def _output_row(r: dict) -> dict:
    return {f.name: r.get(f.name) for f in _OUT_SCHEMA}


# ------------------------------------------------------------------ the stage


def _problem_columns(chains: pa.Table, problems: dict[str, dict]) -> pa.Table:
    pids = chains.column("problem_id").to_pylist()
    for col, key in _PROBLEM_COLS.items():
        values = [problems[p].get(key) for p in pids]
        typ = pa.list_(pa.string()) if col == "_choices" else pa.int64() if col == "_budget" else pa.string()
        chains = chains.append_column(col, pa.array(values, type=typ))
    return chains


def _load_inputs(cfg: FilterConfig, ctx, m: Manifest) -> tuple[pa.Table, dict[str, dict]]:
    """(chains, {problem_id: problem}) from the generate step, or from `cfg.source` when there is none."""
    problems: dict[str, dict] = {}
    # a run of external chains alone (filter.source, no ingest step) has no problems input
    prob_dirs = [d for d in ctx.inputs.get("problems", []) if shard_files(d)]
    if prob_dirs:
        for p in ctx.read_input("problems").to_pylist():
            problems[p["problem_id"]] = p
    chain_dirs = ctx.input_dirs("chains")
    if chain_dirs:
        if cfg.source is not None:
            raise ValueError("filter.source is set but the run has a generate step: remove one of them")
        if not any(shard_files(d) for d in chain_dirs):
            return pa.Table.from_pylist([], schema=CHAINS), problems
        return ctx.read_input("chains"), problems
    if cfg.source is None:
        raise ValueError(
            f"step {ctx.step!r}: no generate step feeds this filter and filter.source is not set "
            "(configure a `generate` section, or filter.source with the path of existing chains)"
        )
    from filters.external import load_chains

    loaded = load_chains(cfg.source)
    for reason, n in loaded.quarantined.items():
        m.quarantine(reason, n)
    m.rows_in += sum(loaded.quarantined.values())
    with ShardWriter(ctx.out_dir / "problems", PROBLEMS, "problems", resume=False) as w:
        w.write(loaded.problems)
    for p in loaded.problems.to_pylist():
        problems.setdefault(p["problem_id"], p)
    m.metrics["external_source"] = cfg.source.path
    m.metrics["external_problems"] = loaded.problems.num_rows
    m.metrics["external_rows"] = loaded.rows
    if loaded.invalid_utf8_rows:
        m.metrics["invalid_utf8_rows"] = loaded.invalid_utf8_rows  # kept, with U+FFFD for the bad bytes
    if loaded.multi_sample_rows:
        m.metrics["multi_sample_rows"] = loaded.multi_sample_rows
        m.metrics["samples_skipped"] = loaded.samples_skipped  # samples=last_complete: not chains, not rows
    return loaded.chains, problems


def _run_batches(table: pa.Table, cfg: FilterConfig, actor_cls: type = _FilterActor) -> list[pa.Table]:
    if cfg.workers == 0:
        from filters.deadline import DeadlinePool
        from filters.verify import check_answer

        v = cfg.verify
        with DeadlinePool(check_answer, workers=1, timeout_s=v.timeout_s, memory_mb=v.memory_mb) as pool:
            scorer = Scorer(cfg.redundancy)
            parts = []
            for off in range(0, table.num_rows, cfg.batch_size):
                rows = score_batch(table.slice(off, cfg.batch_size).to_pylist(), cfg, pool, scorer)
                parts.append(pa.Table.from_pylist([_output_row(r) for r in rows], schema=_OUT_SCHEMA))
            return parts
    import ray

    from pipeline.ray_utils import init_ray

    init_ray()
    # more actors than the cluster has CPUs for would wait for resources forever
    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_worker))
    if cfg.workers > fits:
        log.warning("filter.workers=%d but the cluster fits %d actors of %g CPU; using %d",
                    cfg.workers, fits, cfg.cpus_per_worker, fits)
        cfg = cfg.model_copy(update={"workers": fits})
    # one block per batch, so the actor pool gets work to share from the start. from_blocks keeps the
    # blocks as given and computes their metadata here; from_arrow would start a remote task per block
    blocks = [table.slice(off, cfg.batch_size) for off in range(0, table.num_rows, cfg.batch_size)]
    make = getattr(ray.data, "from_blocks", ray.data.from_arrow)
    ds = make(blocks).map_batches(
        actor_cls,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json")},
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_worker,
    )
    from pipeline.progress import track

    return list(track(ds.iter_batches(batch_format="pyarrow", batch_size=None), "filter", total=table.num_rows,
                      unit="chains", size=lambda b: b.num_rows, logger=log))


def _run_streaming(cfg: FilterConfig, ctx) -> Manifest:
    """workers >= 1 over a generate step's chains: scored and written by the actors (filters/filter_stream.py)."""
    from filters.filter_stream import run_streaming
    from pipeline.ray_utils import init_ray

    init_ray()
    m = ctx.manifest()
    t0 = time.perf_counter()
    a = run_streaming(cfg, ctx, m)
    m.rows_in += a["n_in"]
    if a["unknown"]:
        log.warning("filter: %d chains name a problem in no problems table; quarantined", a["unknown"])
        m.quarantine("unknown_problem", a["unknown"])
    m.kept = a["kept"]
    for reason, n in a["drops"].items():
        m.drop(reason, n)
    m.outputs["chains"] = a["rows"]
    m.metrics.update(
        verdicts=dict(a["verdicts"]), loops=a["loops"],
        mean_kept_quality=round(a["q_sum"] / m.kept, 4) if m.kept else None,
        trace_formats=dict(a["formats"]), pred_sources=dict(a["sources"]), truncation=dict(a["cuts"]),
        verify_s_total=round(a["t_verify"], 3),
        chains_per_s=round(a["rows"] / max(1e-9, time.perf_counter() - t0), 2),
        workers=cfg.workers, shards_by_node=dict(a["nodes"]),
    )
    warnings = _warnings(cfg, a["formats"], a["verdicts"], a["rows"])
    if warnings:
        m.metrics["warnings"] = warnings
        for w in warnings:
            log.warning("filter: %s", w)
    log.info("filter: %d chains | kept %d | verdicts %s | formats %s", a["rows"], m.kept, dict(a["verdicts"]),
             dict(a["formats"]))
    return m


def run(cfg: FilterConfig, ctx) -> Manifest:
    chain_dirs = ctx.input_dirs("chains")
    if cfg.workers > 0 and cfg.source is None and any(shard_files(d) for d in chain_dirs):
        return _run_streaming(cfg, ctx)
    m = ctx.manifest()
    t0 = time.perf_counter()
    chains, problems = _load_inputs(cfg, ctx, m)
    known = pa.array([p in problems for p in chains.column("problem_id").to_pylist()], type=pa.bool_())
    n_unknown = chains.num_rows - sum(known.to_pylist())
    if n_unknown:
        log.warning("filter: %d chains name a problem in no problems table; quarantined", n_unknown)
        m.quarantine("unknown_problem", n_unknown)
    m.rows_in += chains.num_rows
    chains = chains.filter(known)
    chains = chains.append_column("_idx", pa.array(range(chains.num_rows), type=pa.int64()))
    chains = _problem_columns(chains, problems)
    verdicts: Counter = Counter()
    formats: Counter = Counter()
    sources: Counter = Counter()
    cuts: Counter = Counter()
    n_loop, q_sum, t_verify = 0, 0.0, 0.0
    parts = _run_batches(chains, cfg) if chains.num_rows else []
    # always rewritten whole (resume=False): scoring is cheap next to generation, and shards left by a
    # killed attempt would otherwise be kept and the same chains written twice
    with ShardWriter(ctx.out_dir, FILTERED, "chains", resume=False) as w:
        if parts:
            result = pa.concat_tables(parts).sort_by("_idx")  # the input order, whatever the actors' order
            if result.num_rows != chains.num_rows:
                raise RuntimeError(f"filter: {chains.num_rows} chains in but {result.num_rows} scored")
            d = result.select(["verdict", "keep", "drop_reason", "loop_detected", "quality", "verify_s", "trace_format",
                               "pred_source", "verify_detail"]).to_pydict()
            for verdict, keep, reason, loop, q, vs, fmt, psrc, detail in zip(*d.values(), strict=True):
                verdicts[verdict] += 1
                formats[fmt] += 1
                sources[psrc or "none"] += 1
                if verdict == "truncated":
                    cuts[_cut_kind(detail)] += 1
                n_loop += bool(loop)
                t_verify += vs or 0.0
                if keep:
                    m.kept += 1
                    q_sum += q or 0.0
                else:
                    m.drop(reason)
            w.write(result.drop(["_idx"]))
    m.outputs["chains"] = chains.num_rows
    m.metrics.update(
        verdicts=dict(verdicts),
        loops=n_loop,
        mean_kept_quality=round(q_sum / m.kept, 4) if m.kept else None,
        trace_formats=dict(formats),
        pred_sources=dict(sources),
        truncation=dict(cuts),
        verify_s_total=round(t_verify, 3),
        chains_per_s=round(chains.num_rows / max(1e-9, time.perf_counter() - t0), 2),
        workers=cfg.workers,
    )
    warnings = _warnings(cfg, formats, verdicts, chains.num_rows)
    if warnings:
        m.metrics["warnings"] = warnings
        for w in warnings:
            log.warning("filter: %s", w)
    log.info("filter: %d chains | kept %d | verdicts %s | formats %s", chains.num_rows, m.kept, dict(verdicts),
             dict(formats))
    return m


def _cut_kind(detail: str | None) -> str:
    """The truncation evidence without its numbers: "finish_reason=length", "ends mid-sentence", …"""
    d = detail or "unknown"
    return "completion_tokens at the budget" if d.startswith("completion_tokens") else d


def _warnings(cfg: FilterConfig, formats: Counter, verdicts: Counter, n: int) -> list[str]:
    """What a user should look at before trusting the counts: a declared trace format most rows do not
    carry, or most chains without an extractable answer (a format or answer style the filter misreads)."""
    out = []
    declared = cfg.source.declared_format() if cfg.source is not None else "auto"
    if declared != "auto" and n:
        agree = formats.get(declared, 0)
        if agree * 2 < n:
            out.append(f"filter.source.format is {declared!r} but only {agree} of {n} chains carry it "
                       f"(detected: {dict(formats)}); rows are split by what they carry")
    if n >= 20 and verdicts.get("no_answer", 0) * 5 > n:
        out.append(f"{verdicts['no_answer']} of {n} chains have no extractable answer: check pred_source and "
                   "the traces' answer format")
    return out
