"""`r1v inspect`: one step's Parquet table, readable in a terminal.

    r1v inspect runs/demo filter                                  # schema, the columns that fit, describe
    r1v inspect runs/demo filter -c chain_id,verdict,drop_reason -n 20
    r1v inspect runs/demo filter --where "(verdict == 'wrong') & (completion_tokens > 500)"
    r1v inspect runs/demo filter --where "drop_reason = 'looping'"  # SQL works too
    r1v inspect runs/demo filter --row <chain_id>                   # one chain, vertically
    r1v inspect runs/demo ingest --table quarantine

Wide tables show the leading columns that fit the terminal and name the others; `describe` covers the
numeric and boolean columns only (and is skipped when there are none); binary and image columns are
summarised, never dumped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError, UnknownStepError, did_you_mean
from pipeline.rundir import MANIFEST, shard_files

# Columns a row is looked up by (--row), in order.
ID_COLUMNS = ("chain_id", "sample_id", "problem_id", "request_id", "id", "step")
# With --row: these come first (the verdict of a chain and why it was kept or dropped), then the rest.
FIRST = ("chain_id", "sample_id", "problem_id", "round", "keep", "drop_reason", "verdict", "pred_answer", "gold_answer", "answer",
         "quality", "finish_reason", "completion_tokens", "length_ratio", "ngram_repetition",
         "repeated_paragraph_frac", "reflection_density", "language_mixing", "loop_detected", "verify_detail")
_NUMERIC = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64, pl.Float32,
            pl.Float64, pl.Boolean)


def plan_order(run_dir: Path) -> list[str]:
    """Step names in the order of the run's plan (from its config.yaml), or [] when it does not load."""
    from pipeline.config import ConfigError, load_config
    from pipeline.runner import plan

    try:
        return [s.name for s in plan(load_config(run_dir / "config.yaml"))]
    except (ConfigError, ValueError, OSError, ImportError):
        return []


def step_dirs(run_dir: Path) -> list[str]:
    """The run's step directories (those with a manifest or shards), in plan order, else the order they ran."""
    from pipeline.rundir import Manifest

    planned = {name: i for i, name in enumerate(plan_order(run_dir))}

    def started(p: Path) -> tuple:
        m = Manifest.load(p) if (p / MANIFEST).exists() else None
        return (planned.get(p.name, len(planned)), m is None, m.started_at if m else 0.0, p.name)

    return [p.name for p in sorted((p for p in run_dir.iterdir()
                                    if p.is_dir() and ((p / MANIFEST).exists() or shard_files(p))), key=started)]


def tables_of(step_dir: Path) -> dict[str, int]:
    """Secondary tables of a step (sub-directories with shards) -> shard count."""
    return {p.name: len(shard_files(p)) for p in sorted(step_dir.iterdir()) if p.is_dir() and shard_files(p)}


def _resolve(run_dir: Path, step: str, table: str | None) -> Path:
    d = run_dir / step
    if not d.is_dir():
        raise UnknownStepError(step, step_dirs(run_dir), what="step", where=str(run_dir))
    if table:
        if not shard_files(d / table):
            raise UnknownStepError(table, tables_of(d), what="table", where=f"step {step}")
        return d / table
    if not shard_files(d):
        extra = tables_of(d)
        hint = f"; its tables: {', '.join(extra)} (--table NAME)" if extra else ""
        raise InputError(f"step {step} has no main table in {d} (it may write no rows, e.g. assemble){hint}")
    return d


class _Columns(dict):
    """eval() namespace where a bare name is the column of that name (`verdict == 'wrong'`)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(pl=pl, col=pl.col, lit=pl.lit)
        self.names = names

    def __missing__(self, key: str) -> Any:
        if key in self.names:
            return pl.col(key)
        raise NameError(f"no column {key!r}{did_you_mean(key, self.names)}")


def parse_where(expr: str, names: list[str]) -> pl.Expr:
    """A polars expression over column names (`(verdict == 'wrong') & (keep == False)`, or
    `pl.col("x").str.contains("y")`), else an SQL condition (`verdict = 'wrong' AND keep = false`)."""
    try:
        out = eval(expr, {"__builtins__": {}}, _Columns(names))  # noqa: S307 - the user's own expression
    except NameError as e:
        raise InputError(f"--where {expr!r}: {e}; columns: {', '.join(names)}") from None
    except SyntaxError:
        try:
            out = pl.sql_expr(expr)
        except Exception as e:  # noqa: BLE001 - polars raises several SQL error types
            raise InputError(f"--where {expr!r}: neither a polars expression nor SQL ({e})") from None
    if not isinstance(out, pl.Expr):
        raise InputError(f"--where {expr!r} is not an expression over columns (got {type(out).__name__})")
    return out


def _is_blob(dtype: pl.DataType) -> bool:
    s = str(dtype)
    return dtype == pl.Binary or "Binary" in s or s.startswith("List(Struct")


def shorten(text: str, width: int) -> str:
    """Long text kept at both ends: the start of a chain and its final answer."""
    if len(text) <= width:
        return text
    half = max(10, (width - 30) // 2)
    return f"{text[:half]} …[{len(text) - 2 * half:,} chars]… {text[-half:]}"


def _value(v: Any, width: int) -> str:
    if isinstance(v, str):
        return shorten(v, width)
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v):,} bytes>"
    if isinstance(v, list) and v and isinstance(v[0], dict) and any(isinstance(x, bytes) for x in v[0].values()):
        return f"[{len(v)} item(s) of {', '.join(k for k in v[0] if not isinstance(v[0][k], bytes))}, bytes]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return shorten(repr(v) if not isinstance(v, (int, bool)) and v is not None else str(v), width)


def _fit(df: pl.DataFrame, width: int) -> list[str]:
    """The leading columns whose cells (name or first values, up to 40 characters) fit in `width`."""
    chosen, used = [], 1
    for name in df.columns:
        cells = [len(name), len(str(df.schema[name]))] + [min(40, len(str(v))) for v in df[name].head(5).to_list()]
        w = min(40, max(cells)) + 3
        if chosen and used + w > width:
            break
        chosen.append(name)
        used += w
    return chosen


def print_row(row: dict[str, Any], full: bool, width: int) -> None:
    text_width = 10**9 if full else max(200, 3 * width)
    keys = [k for k in FIRST if k in row] + [k for k in row if k not in FIRST]
    pad = max(len(k) for k in keys)
    for k in keys:
        v = row[k]
        mark = ">" if k in ("keep", "drop_reason", "verdict", "pred_answer", "gold_answer", "answer") else " "
        if isinstance(v, dict):
            print(f"{mark} {k:<{pad}}  " + ", ".join(f"{a}={_value(b, 60)}" for a, b in v.items()))
            continue
        s = _value(v, text_width)
        if "\n" in s:
            print(f"{mark} {k:<{pad}}  │ " + s.replace("\n", "\n" + " " * (pad + 4) + "│ "))
        else:
            print(f"{mark} {k:<{pad}}  {s}")


def _gold(run_dir: Path, problem_id: str) -> str | None:
    """The gold answer of a problem (from the ingest table), shown next to a chain's extracted answer."""
    files = shard_files(run_dir / "ingest")
    if not files:
        return None
    lf = pl.scan_parquet([str(f) for f in files])
    if "answer" not in lf.collect_schema().names():
        return None
    hit = lf.filter(pl.col("problem_id") == problem_id).select("answer").head(1).collect()
    return hit["answer"][0] if hit.height else None


def summary(df: pl.DataFrame) -> pl.DataFrame:
    """describe() turned on its side: one line per column, so a wide table stays readable."""
    rows = []
    for c in df.columns:
        x = df[c].cast(pl.Float64)
        rows.append({"column": c, "count": x.count(), "nulls": x.null_count(), "mean": x.mean(), "std": x.std(),
                     "min": x.min(), "median": x.median(), "max": x.max()})
    return pl.DataFrame(rows, schema={"column": pl.Utf8, "count": pl.Int64, "nulls": pl.Int64, "mean": pl.Float64,
                                      "std": pl.Float64, "min": pl.Float64, "median": pl.Float64, "max": pl.Float64})


def inspect_step(run_dir: Path, step: str, table: str | None = None, columns: str | None = None,
                 where: str | None = None, limit: int = 5, row: str | None = None, describe: bool | None = None,
                 full: bool = False) -> None:
    d = _resolve(run_dir, step, table)
    files = shard_files(d)
    lf = pl.scan_parquet([str(f) for f in files])
    schema = lf.collect_schema()
    names = list(schema.names())
    total = lf.select(pl.len()).collect().item()
    width = shutil.get_terminal_size((int(os.environ.get("COLUMNS", 160)), 40)).columns
    if where:
        lf = lf.filter(parse_where(where, names))
    if columns:
        want = [c.strip() for c in columns.split(",") if c.strip()]
        for c in want:
            if c not in names:
                raise InputError(f"--columns: no column {c!r}{did_you_mean(c, names)}; columns: {', '.join(names)}")
        lf = lf.select(want)
    try:
        matched = lf.select(pl.len()).collect().item() if where else total
    except pl.exceptions.PolarsError as e:  # a type mismatch in --where shows only when it runs
        raise InputError(f"--where {where!r}: {str(e).strip().splitlines()[0]}") from None
    others = tables_of(run_dir / step) if not table else {}
    extra = f"; tables: {', '.join(others)} (--table NAME)" if others else ""
    print(f"{d}: {len(files)} shard(s), {total} rows" + (f", {matched} matching --where" if where else "") + extra)

    if row is not None:
        keys = [c for c in ID_COLUMNS if c in names]
        if not keys:
            raise InputError(f"--row: {d} has no id column ({', '.join(ID_COLUMNS)})")
        cond = pl.any_horizontal([pl.col(k).cast(pl.Utf8) == row for k in keys])
        hit = pl.scan_parquet([str(f) for f in files]).filter(cond)
        if where:
            hit = hit.filter(parse_where(where, names))
        hit = hit.head(2).collect()
        if hit.height == 0:
            sample = pl.scan_parquet([str(f) for f in files]).select(keys[0]).head(3).collect()[keys[0]].to_list()
            raise InputError(f"--row {row!r}: no row with {' or '.join(keys)} = {row!r} in {d} (e.g. {sample})")
        r = hit.row(0, named=True)
        if "problem_id" in r and "answer" not in r:
            r = {**r, "gold_answer": _gold(run_dir, r["problem_id"])}
        if columns:
            r = {k: r[k] for k in [c.strip() for c in columns.split(",")]}
        note = " (first of several rows with this id; --where narrows)" if hit.height > 1 else ""
        print(f"row {row}{note}:")
        print_row(r, full, width)
        return

    print("schema:")
    for name, dtype in schema.items():
        print(f"  {name}: {dtype}")
    cols = lf.collect_schema().names()
    if not columns:  # the columns that say what happened to a row first, then the rest in table order
        cols = [c for c in FIRST if c in cols] + [c for c in cols if c not in FIRST]
    view = lf.select([c for c in cols if not _is_blob(schema.get(c, pl.Utf8))])
    head = view.head(limit).collect()
    blobs = [c for c in lf.collect_schema().names() if _is_blob(schema.get(c, pl.Utf8))]
    shown = list(head.columns) if columns else _fit(head, width)
    hidden = [c for c in head.columns if c not in shown]
    with pl.Config(tbl_cols=-1, fmt_str_lengths=40, tbl_width_chars=width, tbl_hide_dataframe_shape=True):
        print(f"first {head.height} row(s):")
        print(head.select(shown))
    if hidden or blobs:
        parts = []
        if hidden:
            parts.append(f"{len(hidden)} more column(s): {', '.join(hidden)}")
        if blobs:
            parts.append(f"not shown (binary): {', '.join(blobs)}")
        print("  " + "; ".join(parts) + " (--columns A,B to choose, --row ID for one row in full)")
    numeric = [c for c, t in view.collect_schema().items() if t in _NUMERIC]
    if describe is None:
        describe = bool(numeric)
    if describe and numeric:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=max(width, 100), tbl_hide_dataframe_shape=True,
                       float_precision=4):
            print(f"describe ({len(numeric)} numeric column(s), one per line):")
            print(summary(view.select(numeric).collect()))
