"""`r1v report RUN_DIR`: one self-contained HTML page (plus the PNGs beside it) about a pipeline run.

    r1v report runs/demo            # -> runs/demo/report/index.html, runs/demo/report/*.png
    python -m filters.report runs/demo

Sections: the steps and their counts, chain-length distributions before and after filtering (and after
curation), correctness by difficulty bucket, repetition penalty against chain length, drop reasons,
and yield per self-distillation round. It reads whatever steps exist (from their manifests and Parquet
shards, with polars); a section whose inputs are missing says so instead of failing. Plots are drawn
with matplotlib's Agg backend, saved as PNG and embedded as base64, so the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.rundir import MANIFEST, Manifest, atomic_write_bytes, shard_files

log = logging.getLogger(__name__)

_STAGE_ORDER = ("ingest", "decontaminate", "assess", "caption", "generate", "filter", "curate")


@dataclass
class Section:
    key: str
    title: str
    body: str = ""
    images: list[str] = field(default_factory=list)


@dataclass
class RunData:
    run_dir: Path
    manifests: list[Manifest]
    chains: pl.DataFrame | None  # all filter outputs, every round
    problems: pl.DataFrame | None  # the last problems-table step (assess if it ran)
    sft: pl.DataFrame | None

    def steps(self, stage: str) -> list[Manifest]:
        return [m for m in self.manifests if m.stage == stage]


# --- loading -----------------------------------------------------------------------------------------


def _order(m: Manifest) -> tuple:
    rank = _STAGE_ORDER.index(m.stage) if m.stage in _STAGE_ORDER else len(_STAGE_ORDER)
    in_loop = m.stage in ("generate", "filter", "curate")
    return (m.round if in_loop else -1, rank, m.started_at, m.step)


def _scan(directory: Path, columns: list[str]) -> pl.DataFrame | None:
    files = shard_files(directory)
    if not files:
        return None
    lf = pl.scan_parquet([str(f) for f in files])
    have = lf.collect_schema().names()
    return lf.select([c for c in columns if c in have]).collect()


def load_run(run_dir: Path) -> RunData:
    manifests = []
    for p in sorted(Path(run_dir).glob(f"*/{MANIFEST}")):
        m = Manifest.load(p.parent)
        if m is not None:
            manifests.append(m)
    manifests.sort(key=_order)
    chain_cols = ["chain_id", "problem_id", "round", "completion_tokens", "sampling", "verdict", "keep",
                  "drop_reason", "quality", "length_ratio", "finish_reason"]
    parts = [d for m in manifests if m.stage == "filter" and (d := _scan(run_dir / m.step, chain_cols)) is not None]
    chains = pl.concat(parts, how="diagonal_relaxed") if parts else None
    problems = None
    for stage in ("assess", "caption", "decontaminate", "ingest"):
        ms = [m for m in manifests if m.stage == stage]
        if ms:
            problems = _scan(run_dir / ms[-1].step, ["problem_id", "difficulty", "repetition_penalty", "max_tokens",
                                                      "complexity", "s_v", "s_t", "s_i"])
            if problems is not None:
                break
    sparts = [d for m in manifests if m.stage == "curate"
              if (d := _scan(run_dir / m.step, ["sample_id", "chain_id", "problem_id", "round", "quality"])) is not None]
    sft = pl.concat(sparts, how="diagonal_relaxed") if sparts else None
    return RunData(Path(run_dir), manifests, chains, problems, sft)


# --- plotting helpers --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str, sec: Section) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    data = buf.getvalue()
    atomic_write_bytes(out_dir / f"{name}.png", data)
    sec.images.append(f"{name}.png")
    b64 = base64.b64encode(data).decode()
    sec.body += f'<figure><img alt="{name}" src="data:image/png;base64,{b64}"><figcaption>{name}.png</figcaption></figure>'


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, dict):
            v = ", ".join(f"{k}: {n}" for k, n in v.items()) or "–"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(sec: Section, what: str) -> Section:
    sec.body = f'<p class="missing">Not available: {html.escape(what)}</p>'
    return sec


# --- sections ----------------------------------------------------------------------------------------


def section_steps(d: RunData) -> Section:
    sec = Section("steps", "Steps and counts")
    if not d.manifests:
        nested = sorted({p.parent.parent.name for p in d.run_dir.glob(f"*/*/{MANIFEST}")})
        hint = f" (runs found one level down: {', '.join(nested)}; pass <root>/<name>)" if nested else ""
        return _missing(sec, f"no finished step (no _manifest.json) in this run directory{hint}")
    rows = []
    for m in d.manifests:
        out = m.kept + sum(m.dropped.values()) + sum(m.quarantined.values())
        rows.append([m.step, m.stage, m.round, m.rows_in, m.kept, m.dropped, m.quarantined,
                     "yes" if out == m.rows_in else f"NO ({out})", round(m.wall_s, 2)])
    sec.body = _table(["step", "stage", "round", "rows in", "kept", "dropped", "quarantined", "adds up", "wall s"], rows)
    return sec


def section_lengths(d: RunData, out_dir: Path) -> Section:
    sec = Section("lengths", "Chain length before and after filtering")
    if d.chains is None or "completion_tokens" not in d.chains.columns:
        return _missing(sec, "no filter step output with completion_tokens")
    ch = d.chains.filter(pl.col("completion_tokens").is_not_null())
    groups = {"generated (before filter)": ch, "kept by filter": ch.filter(pl.col("keep").fill_null(False))}
    if d.sft is not None:
        groups["curated (SFT)"] = ch.join(d.sft.select("chain_id"), on="chain_id", how="semi")
    rows = []
    for name, g in groups.items():
        t = g["completion_tokens"]
        rows.append([name, g.height, t.mean() or 0.0, t.median() or 0.0,
                     t.quantile(0.9) if g.height else 0.0, t.max() if g.height else 0])
    sec.body = _table(["chains", "n", "mean tokens", "median", "p90", "max"], rows)
    if ch.height:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        hi = max(1, int(ch["completion_tokens"].max()))
        bins = min(40, max(5, ch.height // 3))
        for name, g in groups.items():
            if g.height:
                ax.hist(g["completion_tokens"].to_list(), bins=bins, range=(0, hi), alpha=0.5, label=f"{name} ({g.height})")
        ax.set_xlabel("completion tokens")
        ax.set_ylabel("chains")
        ax.legend()
        _save(fig, out_dir, "chain_lengths", sec)
    return sec


def section_correctness(d: RunData, out_dir: Path) -> Section:
    sec = Section("correctness", "Correctness by difficulty bucket")
    if d.chains is None or "verdict" not in d.chains.columns:
        return _missing(sec, "no filter step output with verdicts")
    if d.problems is None or "difficulty" not in d.problems.columns:
        return _missing(sec, "no problems table with a difficulty column")
    j = d.chains.join(d.problems.select("problem_id", "difficulty"), on="problem_id", how="left")
    j = j.with_columns(pl.col("difficulty").cast(pl.Utf8).fill_null("unknown").alias("bucket"))
    agg = (
        j.group_by("bucket")
        .agg(
            pl.len().alias("chains"),
            (pl.col("verdict") == "correct").mean().alias("correct"),
            pl.col("keep").fill_null(False).mean().alias("kept"),
            pl.col("problem_id").n_unique().alias("problems"),
        )
        .sort("bucket")
    )
    sec.body = _table(["difficulty", "problems", "chains", "share correct", "share kept"],
                      [[r["bucket"], r["problems"], r["chains"], r["correct"], r["kept"]] for r in agg.to_dicts()])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = list(range(agg.height))
    ax.bar([x - 0.2 for x in xs], agg["correct"].to_list(), width=0.4, label="correct")
    ax.bar([x + 0.2 for x in xs], agg["kept"].to_list(), width=0.4, label="kept by filter")
    ax.set_xticks(xs, agg["bucket"].to_list())
    ax.set_xlabel("difficulty")
    ax.set_ylabel("share of chains")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, out_dir, "correctness_by_difficulty", sec)
    return sec


def section_penalty(d: RunData, out_dir: Path) -> Section:
    sec = Section("penalty", "Repetition penalty against chain length")
    if d.chains is None or "completion_tokens" not in d.chains.columns:
        return _missing(sec, "no filter step output")
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
        return _missing(sec, "no chain with both a repetition penalty and a token count")
    corr = ch.select(pl.corr("penalty", "completion_tokens")).item() if ch.height > 2 else None
    sec.body = (f"<p>{ch.height} chains; penalty range {ch['penalty'].min():.3f}–{ch['penalty'].max():.3f}; "
                f"Pearson r(penalty, tokens) = {'n/a' if corr is None or corr != corr else f'{corr:.3f}'}.</p>")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    verdicts = ch["verdict"].fill_null("none") if "verdict" in ch.columns else pl.Series(["none"] * ch.height)
    for v in sorted(set(verdicts.to_list())):
        mask = (verdicts == v).to_list()
        sub = ch.filter(pl.Series(mask))
        ax.scatter(sub["penalty"].to_list(), sub["completion_tokens"].to_list(), s=10, alpha=0.6, label=v)
    ax.set_xlabel("repetition penalty")
    ax.set_ylabel("completion tokens")
    ax.legend(fontsize=8)
    _save(fig, out_dir, "penalty_vs_length", sec)
    return sec


def section_drops(d: RunData, out_dir: Path) -> Section:
    sec = Section("drops", "Drop reasons")
    rows = [[m.step, m.dropped, m.quarantined] for m in d.manifests if m.dropped or m.quarantined]
    if not d.manifests:
        return _missing(sec, "no manifests")
    sec.body = _table(["step", "dropped", "quarantined"], rows) if rows else "<p>No step dropped or quarantined rows.</p>"
    totals: dict[str, int] = {}
    for m in d.manifests:
        for reason, n in {**m.dropped, **{f"quarantine:{k}": v for k, v in m.quarantined.items()}}.items():
            key = f"{m.stage}:{reason}"
            totals[key] = totals.get(key, 0) + n
    if totals:
        plt = _plt()
        items = sorted(totals.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.2))
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set_xlabel("rows")
        _save(fig, out_dir, "drop_reasons", sec)
    return sec


def round_yield(d: RunData) -> list[dict[str, Any]]:
    """Per round: chains generated / kept by filter, SFT samples, problems attempted / solved / to retry."""
    rounds = sorted({m.round for m in d.manifests if m.stage in ("generate", "filter", "curate")})
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
        return _missing(sec, "no generate / filter / curate step")
    keys = list(ys[0])
    sec.body = _table([k.replace("_", " ") for k in keys], [["–" if y[k] is None else y[k] for k in keys] for y in ys])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    series = ("chains", "kept_by_filter", "sft_samples", "problems_solved")
    w = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar([y["round"] + (i - 1.5) * w for y in ys], [y[s] or 0 for y in ys], width=w, label=s.replace("_", " "))
    ax.set_xticks([y["round"] for y in ys])
    ax.set_xlabel("round")
    ax.legend(fontsize=8)
    _save(fig, out_dir, "yield_per_round", sec)
    return sec


# --- page --------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}figure{margin:0 0 1em}img{max-width:100%}.missing{color:#a60}
figcaption{font-size:11px;color:#777}"""


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report/index.html` (+ PNGs) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    out_dir = run_dir / "report"
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
    ]
    nav = " · ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    summary = {"run_dir": str(run_dir), "steps": len(d.manifests), "images": [i for s in sections for i in s.images]}
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>r1v report: {html.escape(run_dir.name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>r1v report: {html.escape(run_dir.name)}</h1><p>{nav}</p>{body}"
        f"<script type='application/json' id='summary'>{html.escape(json.dumps(summary))}</script></body></html>"
    )
    path = out_dir / "index.html"
    atomic_write_bytes(path, page.encode())
    log.info("report: %s (%d steps, %d plots)", path, len(d.manifests), len(summary["images"]))
    return path


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    print(write_report(ap.parse_args().run_dir))


if __name__ == "__main__":
    _main()
