"""Building blocks of the run report (filters/report.py): sections, tables, plots, colours."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.rundir import atomic_write_bytes, shard_files

# One colour per verdict on every plot and badge: correct is green, wrong is red, the rest neither.
VERDICT_COLOURS = {
    "correct": "#1a9850",
    "wrong": "#d73027",
    "truncated": "#f28e2b",
    "no_answer": "#8c6bb1",
    "error": "#7f7f7f",
    "timeout": "#b07aa1",
}
_OTHER = ("#17becf", "#bcbd22", "#8c564b", "#e377c2", "#9edae5", "#c49c94")
# Series that are not verdicts (steps, stages, rounds): no green or red, so nothing reads as right / wrong.
SERIES = ("#4c72b0", "#8172b3", "#937860", "#64b5cd", "#555555", "#da8bc3", "#ccb974", "#2b3a67")

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}figure{margin:0 0 1em}img{max-width:100%}.missing{color:#a60}
figcaption,.small{font-size:11px;color:#666}nav{margin-bottom:1em;line-height:1.8}
section{border-top:1px solid #ddd;margin-top:1.5em}
.badge{display:inline-block;color:#fff;border-radius:3px;padding:0 6px;margin:0 2px;font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;font-size:13px;overflow:hidden}
.card.kept{border:2px solid #1a9850}.card.dropped{border:2px solid #d73027}
.card pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:6px;font-size:12px}
mark.reason{background:#fdd;color:#900;font-weight:bold;padding:0 3px}
mark.answer{background:#ffe9a8;font-weight:bold;padding:0 3px}.cut{color:#999}
ul.warn{color:#a60}.note{color:#555;font-style:italic}"""


@dataclass
class Section:
    key: str
    title: str
    body: str = ""
    images: list[str] = field(default_factory=list)
    missing: bool = False


def verdict_colour(v: str) -> str:
    if v in VERDICT_COLOURS:
        return VERDICT_COLOURS[v]
    return _OTHER[sum(map(ord, v)) % len(_OTHER)]


def scan(directory: Path, columns: list[str]) -> pl.DataFrame | None:
    """The listed columns (those present) of a table directory's shards, or None without shards."""
    files = shard_files(directory)
    if not files:
        return None
    lf = pl.scan_parquet([str(f) for f in files])
    have = lf.collect_schema().names()
    return lf.select([c for c in columns if c in have]).collect()


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, out_dir: Path, name: str, sec: Section) -> None:
    """The figure as `<out_dir>/<name>.png` and embedded in the section."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt().close(fig)
    data = buf.getvalue()
    atomic_write_bytes(out_dir / f"{name}.png", data)
    sec.images.append(f"{name}.png")
    b64 = base64.b64encode(data).decode()
    sec.body += (f'<figure><img alt="{name}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{name}.png</figcaption></figure>")


def cell(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    elif isinstance(v, dict):
        v = ", ".join(f"{k}: {n}" for k, n in v.items()) or "–"
    elif v is None:
        v = "–"
    return html.escape(str(v))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def missing(sec: Section, what: str) -> Section:
    sec.body = f'<p class="missing">Not available: {html.escape(what)}</p>'
    sec.missing = True
    return sec


def shortened_html(text: str, keep: int = 400) -> str:
    """Escaped text with its middle cut (the start of a chain and its conclusion stay)."""
    if len(text) <= 2 * keep + 80:
        return html.escape(text)
    cut = len(text) - 2 * keep
    return (html.escape(text[:keep]) + f'<span class="cut">\n… [{cut:,} characters cut] …\n</span>'
            + html.escape(text[-keep:]))
