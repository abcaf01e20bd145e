"""`r1v report RUN_DIR`: one self-contained HTML page (plus the PNGs beside it) about a pipeline run.

    r1v report runs/demo                     # -> runs/demo/report/index.html, runs/demo/report/*.png
    r1v report runs/demo --out /tmp/rep      # elsewhere
    python -m filters.report runs/demo

Sections, in pipeline order: the steps and their counts (in the order the run's plan has them; "adds up"
checks rows in = kept + dropped + quarantined), chain length before and after filtering (and after
curation), correctness by difficulty, repetition penalty against chain length (only when assess set
the penalties), drop reasons (each drop counted once: curate's `filtered_out` are the filter's drops),
yield per round, training (loss, learning rate and gradient norm per optimizer step, every train step
and round), evaluation (accuracy per phase, per subject and per difficulty) and example chains (the best
kept chain beside one dropped chain per drop reason, its reason and extracted answer highlighted).
RL reward curves belong to an RL stage, which this pipeline does not have.

It reads whatever steps exist (their manifests and Parquet shards, with polars); a section whose inputs
are missing says so and draws nothing. Plots are drawn with matplotlib's Agg backend, saved as PNG and
embedded as base64, so the page needs no other file.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from filters.report_parts import (
    CSS,
    SERIES,
    VERDICT_COLOURS,
    Section,
    missing,
    plt,
    save,
    scan,
    table,
    verdict_colour,
)
from filters.report_train import section_evaluation, section_examples, section_rl, section_training
from pipeline.rundir import MANIFEST, Manifest, atomic_write_bytes

log = logging.getLogger(__name__)

_STAGE_ORDER = ("ingest", "decontaminate", "assess", "caption", "generate", "filter", "curate", "assemble", "train",
                "evaluate")
_LOOP = ("generate", "filter", "curate")


class RunData:
    """A run's manifests in pipeline order plus the tables the sections share."""

    def __init__(self, run_dir: Path, manifests: list[Manifest], chains: pl.DataFrame | None,
                 problems: pl.DataFrame | None, sft: pl.DataFrame | None) -> None:
        self.run_dir, self.manifests, self.chains, self.problems, self.sft = run_dir, manifests, chains, problems, sft

    def steps(self, stage: str) -> list[Manifest]:
        return [m for m in self.manifests if m.stage == stage]

    def has(self, stage: str) -> bool:
        return any(m.stage == stage for m in self.manifests)


# --- loading -----------------------------------------------------------------------------------------


def _plan_order(run_dir: Path) -> list[str]:
    from pipeline.tableview import plan_order

    order = plan_order(run_dir)
    if not order:
        log.info("report: step order from the manifests (no loadable config.yaml in %s)", run_dir)
    return order


def _fallback_order(m: Manifest) -> tuple:
    rank = _STAGE_ORDER.index(m.stage) if m.stage in _STAGE_ORDER else len(_STAGE_ORDER)
    if m.stage in _LOOP:
        return (1, m.round, rank, m.started_at, m.step)
    return (0 if rank < _STAGE_ORDER.index("generate") else 2, 0, rank, m.round, m.started_at, m.step)


def order_manifests(run_dir: Path, manifests: list[Manifest]) -> list[Manifest]:
    planned = {name: i for i, name in enumerate(_plan_order(run_dir))}
    return sorted(manifests, key=lambda m: (0, planned[m.step], ()) if m.step in planned else (1, 0, _fallback_order(m)))


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    manifests = [m for p in sorted(run_dir.glob(f"*/{MANIFEST}")) if (m := Manifest.load(p.parent)) is not None]
    manifests = order_manifests(run_dir, manifests)
    chain_cols = ["chain_id", "problem_id", "round", "completion_tokens", "sampling", "verdict", "keep",
                  "drop_reason", "quality", "length_ratio", "finish_reason", "pred_answer"]
    parts = [d for m in manifests if m.stage == "filter" and (d := scan(run_dir / m.step, chain_cols)) is not None]
    chains = pl.concat(parts, how="diagonal_relaxed") if parts else None
    problems = None
    for stage in ("assess", "caption", "decontaminate", "ingest"):
        ms = [m for m in manifests if m.stage == stage]
        if ms:
            problems = scan(run_dir / ms[-1].step, ["problem_id", "difficulty", "repetition_penalty", "max_tokens",
                                                    "complexity", "s_v", "s_t", "s_i", "subject"])
            if problems is not None:
                break
    sparts = [d for m in manifests if m.stage == "curate"
              if (d := scan(run_dir / m.step, ["sample_id", "chain_id", "problem_id", "round", "quality"])) is not None]
    sft = pl.concat(sparts, how="diagonal_relaxed") if sparts else None
    return RunData(run_dir, manifests, chains, problems, sft)


def repeated_drops(d: RunData, m: Manifest) -> dict[str, int]:
    """Drops of a step that repeat an earlier step's: curate's `filtered_out` are the chains its round's
    filter step already dropped (counted there)."""
    if m.stage == "curate" and "filtered_out" in m.dropped and any(f.round == m.round for f in d.steps("filter")):
        return {"filtered_out": m.dropped["filtered_out"]}
    return {}


# --- sections ----------------------------------------------------------------------------------------


def section_steps(d: RunData) -> Section:
    sec = Section("steps", "Steps and counts")
    if not d.manifests:
        nested = sorted({p.parent.parent.name for p in d.run_dir.glob(f"*/*/{MANIFEST}")})
        hint = f" (runs found one level down: {', '.join(nested)}; pass <root>/<name>)" if nested else ""
        return missing(sec, f"no finished step (no _manifest.json) in this run directory{hint}")
    rows, warned = [], []
    for m in d.manifests:
        out = m.kept + sum(m.dropped.values()) + sum(m.quarantined.values())
        rep = repeated_drops(d, m)
        dropped = {k: (f"{v} (dropped by filter)" if k in rep else v) for k, v in m.dropped.items()}
        rows.append([m.step, m.stage, m.round, m.rows_in, m.kept, dropped, m.quarantined,
                     "yes" if out == m.rows_in else f"NO ({out})", round(m.wall_s, 2)])
        for w in (getattr(m, "warnings", None) or []) + list(m.metrics.get("warnings") or []):
            warned.append(f"<li><b>{html.escape(m.step)}</b>: {html.escape(str(w))}</li>")
    sec.body = (
        "<p>Every step of the run in pipeline order. <b>adds up</b>: the step's rows in equal kept + dropped + "
        "quarantined, so no row was lost (each drop and quarantine has a reason). Rounds of self-distillation "
        "are the <code>-rN</code> steps; iterative training rounds the <code>-tN</code> steps.</p>"
        + table(["step", "stage", "round", "rows in", "kept", "dropped", "quarantined", "adds up", "wall s"], rows)
    )
    if warned:
        sec.body += f"<h3>Warnings</h3><ul class='warn'>{''.join(warned)}</ul>"
    return sec


def section_lengths(d: RunData, out_dir: Path) -> Section:
    sec = Section("lengths", "Chain length before and after filtering")
    if d.chains is None or "completion_tokens" not in d.chains.columns:
        return missing(sec, "no filter step output with completion_tokens")
    ch = d.chains.filter(pl.col("completion_tokens").is_not_null())
    groups = {"generated (before filter)": ch, "kept by filter": ch.filter(pl.col("keep").fill_null(False))}
    if d.sft is not None:
        groups["curated (SFT)"] = ch.join(d.sft.select("chain_id"), on="chain_id", how="semi")
    rows = []
    for name, g in groups.items():
        t = g["completion_tokens"]
        rows.append([name, g.height, t.mean() or 0.0, t.median() or 0.0,
                     t.quantile(0.9) if g.height else 0.0, t.max() if g.height else 0])
    sec.body = table(["chains", "n", "mean tokens", "median", "p90", "max"], rows)
    if ch.height:
        p = plt()
        fig, ax = p.subplots(figsize=(7, 3.6))
        hi = max(1, int(ch["completion_tokens"].max()))
        bins = min(40, max(5, ch.height // 3))
        colours = ("#404040", "#2166ac", "#1a9850")
        for (name, g), colour in zip(groups.items(), colours, strict=False):
            if g.height:  # outlines, so the smaller groups stay visible inside the larger ones
                ax.hist(g["completion_tokens"].to_list(), bins=bins, range=(0, hi), histtype="step", linewidth=1.8,
                        color=colour, label=f"{name} ({g.height})")
        ax.set_xlabel("completion tokens")
        ax.set_ylabel("chains")
        ax.legend()
        save(fig, out_dir, "chain_lengths", sec)
    return sec


def section_correctness(d: RunData, out_dir: Path) -> Section:
    sec = Section("correctness", "Correctness by difficulty bucket")
    if d.chains is None or "verdict" not in d.chains.columns:
        return missing(sec, "no filter step output with verdicts")
    if d.problems is None or "difficulty" not in d.problems.columns:
        return missing(sec, "no problems table with a difficulty column")
    j = d.chains.join(d.problems.select("problem_id", "difficulty"), on="problem_id", how="left")
    j = j.with_columns(pl.col("difficulty").cast(pl.Utf8).fill_null("unknown").alias("bucket"),
                       pl.col("verdict").fill_null("none"))
    agg = (j.group_by("bucket").agg(pl.len().alias("chains"), (pl.col("verdict") == "correct").mean().alias("correct"),
                                    pl.col("keep").fill_null(False).mean().alias("kept"),
                                    pl.col("problem_id").n_unique().alias("problems")).sort("bucket"))
    sec.body = table(["difficulty", "problems", "chains", "share correct", "share kept"],
                     [[r["bucket"], r["problems"], r["chains"], r["correct"], r["kept"]] for r in agg.to_dicts()])
    shares = j.group_by("bucket", "verdict").len().join(agg.select("bucket", "chains"), on="bucket")
    verdicts = sorted(set(shares["verdict"].to_list()), key=lambda v: (v != "correct", v != "wrong", v))
    p = plt()
    fig, ax = p.subplots(figsize=(6.5, 3.4))
    buckets = agg["bucket"].to_list()
    bottom = [0.0] * len(buckets)
    for v in verdicts:  # stacked shares per verdict; a black tick marks the share the filter kept
        sub = {r["bucket"]: r["len"] / r["chains"] for r in shares.filter(pl.col("verdict") == v).to_dicts()}
        vals = [sub.get(b, 0.0) for b in buckets]
        ax.bar(range(len(buckets)), vals, bottom=bottom, width=0.6, color=verdict_colour(v), label=v)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.scatter(range(len(buckets)), agg["kept"].to_list(), marker="_", s=600, color="black", zorder=3,
               label="kept by filter")
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("share of chains")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, out_dir, "correctness_by_difficulty", sec)
    return sec


def section_penalty(d: RunData, out_dir: Path) -> Section:
    sec = Section("penalty", "Repetition penalty against chain length")
    if not d.has("assess"):
        return missing(sec, "no assess step: every chain had the config's repetition penalty, nothing to plot")
    if d.chains is None or "completion_tokens" not in d.chains.columns:
        return missing(sec, "no filter step output")
    ch = d.chains
    if "sampling" in ch.columns and isinstance(ch.schema["sampling"], pl.Struct):
        ch = ch.with_columns(pl.col("sampling").struct.field("repetition_penalty").alias("penalty"))
    else:
        ch = ch.with_columns(pl.lit(None, pl.Float64).alias("penalty"))
    if d.problems is not None and "repetition_penalty" in d.problems.columns:
        ch = ch.join(d.problems.select("problem_id", pl.col("repetition_penalty").alias("assessed")),
                     on="problem_id", how="left")
        ch = ch.with_columns(pl.coalesce("penalty", "assessed").alias("penalty"))
    ch = ch.filter(pl.col("penalty").is_not_null() & pl.col("completion_tokens").is_not_null())
    if ch.height == 0:
        return missing(sec, "no chain with both a repetition penalty and a token count")
    corr = ch.select(pl.corr("penalty", "completion_tokens")).item() if ch.height > 2 else None
    sec.body = (f"<p>{ch.height} chains; penalty range {ch['penalty'].min():.3f}–{ch['penalty'].max():.3f}; "
                f"Pearson r(penalty, tokens) = {'n/a' if corr is None or corr != corr else f'{corr:.3f}'}.</p>")
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.6))
    verdicts = ch["verdict"].fill_null("none") if "verdict" in ch.columns else pl.Series(["none"] * ch.height)
    for v in sorted(set(verdicts.to_list()), key=lambda v: (v != "correct", v != "wrong", v)):
        sub = ch.filter(verdicts == v)
        ax.scatter(sub["penalty"].to_list(), sub["completion_tokens"].to_list(), s=12, alpha=0.7,
                   color=verdict_colour(v), label=f"{v} ({sub.height})")
    ax.set_xlabel("repetition penalty")
    ax.set_ylabel("completion tokens")
    ax.legend(fontsize=8)
    save(fig, out_dir, "penalty_vs_length", sec)
    return sec


def drop_totals(d: RunData) -> dict[str, int]:
    """`stage:reason` -> rows over all steps, every row counted once (see `repeated_drops`)."""
    totals: dict[str, int] = {}
    for m in d.manifests:
        rep = repeated_drops(d, m)
        reasons = {k: v for k, v in m.dropped.items() if k not in rep}
        reasons.update({f"quarantine:{k}": v for k, v in m.quarantined.items()})
        for reason, n in reasons.items():
            if n:
                totals[f"{m.stage}:{reason}"] = totals.get(f"{m.stage}:{reason}", 0) + n
    return totals


def section_drops(d: RunData, out_dir: Path) -> Section:
    sec = Section("drops", "Drop reasons")
    if not d.manifests:
        return missing(sec, "no manifests")
    totals = drop_totals(d)
    if not totals:
        sec.body = "<p>No step dropped or quarantined rows.</p>"
        return sec
    reps = sum(n for m in d.manifests for n in repeated_drops(d, m).values())
    note = (f" Curate's <code>filtered_out</code> ({reps} rows) are the chains the filter dropped; they are "
            "counted once, under filter." if reps else "")
    rows = sorted(([k.split(":", 1)[0], k.split(":", 1)[1], v] for k, v in totals.items()), key=lambda r: -r[2])
    sec.body = f"<p>Rows dropped or quarantined, over all rounds, by stage and reason.{note}</p>" + table(
        ["stage", "reason", "rows"], rows)
    p = plt()
    items = sorted(totals.items(), key=lambda kv: kv[1])
    stages = sorted({k.split(":", 1)[0] for k in totals}, key=lambda s: _STAGE_ORDER.index(s) if s in _STAGE_ORDER else 99)
    palette = {s: SERIES[i % len(SERIES)] for i, s in enumerate(stages)}
    fig, ax = p.subplots(figsize=(7, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color=[palette[k.split(":", 1)[0]] for k, _ in items])
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    save(fig, out_dir, "drop_reasons", sec)
    return sec


def round_yield(d: RunData) -> list[dict[str, Any]]:
    """Per round: chains generated / kept by filter, SFT samples, problems attempted / solved / to retry."""
    rounds = sorted({m.round for m in d.manifests if m.stage in _LOOP})
    out = []
    for r in rounds:
        f = [m for m in d.steps("filter") if m.round == r]
        c = [m for m in d.steps("curate") if m.round == r]
        g = [m for m in d.steps("generate") if m.round == r]
        cm = c[0].metrics if c else {}
        out.append({
            "round": r,
            "chains": f[0].rows_in if f else (g[0].kept if g else None),
            "kept_by_filter": f[0].kept if f else None,
            "sft_samples": c[0].kept if c else None,
            "problems_attempted": cm.get("problems_attempted"),
            "problems_solved": cm.get("problems_solved"),
            "problems_to_retry": cm.get("problems_to_retry"),
        })
    return out


def section_rounds(d: RunData, out_dir: Path) -> Section:
    sec = Section("rounds", "Yield per round")
    ys = round_yield(d)
    if not ys:
        return missing(sec, "no generate / filter / curate step")
    keys = list(ys[0])
    sec.body = ("<p>Round 0 samples every problem; each later round re-generates only the problems the previous "
                "round left unsolved.</p>"
                + table([k.replace("_", " ") for k in keys], [["–" if y[k] is None else y[k] for k in keys] for y in ys]))
    series = [s for s in ("chains", "kept_by_filter", "sft_samples", "problems_solved") if any(y[s] for y in ys)]
    if not series:
        return sec
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.4))
    w = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar([y["round"] + (i - (len(series) - 1) / 2) * w for y in ys], [y[s] or 0 for y in ys], width=w,
               color=SERIES[i], label=s.replace("_", " "))
    ax.set_xticks([y["round"] for y in ys])
    ax.set_xlabel("round")
    ax.legend(fontsize=8)
    save(fig, out_dir, "yield_per_round", sec)
    return sec


# --- page --------------------------------------------------------------------------------------------


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write `<out_dir or run_dir/report>/index.html` (+ PNGs) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    d = load_run(run_dir)
    sections = [
        section_steps(d),
        section_lengths(d, out_dir),
        section_correctness(d, out_dir),
        section_penalty(d, out_dir),
        section_drops(d, out_dir),
        section_rounds(d, out_dir),
        section_training(d, out_dir),
        section_rl(d, out_dir),
        section_evaluation(d, out_dir),
        section_examples(d),
    ]
    nav = " · ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    summary = {"run_dir": str(run_dir), "steps": len(d.manifests), "step_names": [m.step for m in d.manifests],
               "sections": {s.key: not s.missing for s in sections}, "images": [i for s in sections for i in s.images]}
    summary_json = json.dumps(summary).replace("</", "<\\/")  # inert inside <script>
    legend = "".join(f'<span class="badge" style="background:{c}">{v}</span>' for v, c in VERDICT_COLOURS.items())
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>r1v report: {html.escape(run_dir.name)}"
        f"</title><style>{CSS}</style></head><body><h1>r1v report: {html.escape(run_dir.name)}</h1>"
        f"<p class='small'>{html.escape(str(run_dir.resolve()))} · verdict colours: {legend}</p><nav>{nav}</nav>{body}"
        f"<script type='application/json' id='summary'>{summary_json}</script></body></html>"
    )
    path = out_dir / "index.html"
    atomic_write_bytes(path, page.encode())
    log.info("report: %s (%d steps, %d plots)", path, len(d.manifests), len(summary["images"]))
    return path


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path)
    print(write_report(ap.parse_args().run_dir, ap.parse_args().out))


if __name__ == "__main__":
    _main()
