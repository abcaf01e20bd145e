"""Where a config's paths point, and the one way files outside the run directory are stamped.

Relative paths in a config file resolve against the folder of that file, never the working directory:
`r1v validate configs/traces.yaml` means the same thing from the project root, from `configs/` and from
Ray's unpacked copy of the working directory. Paths given on the command line (`run.root=/x`,
`ingest.sources.0.path=data.jsonl`) resolve against the working directory, where the user typed them.

The run root (`run.root`, holding every run and the shared caches) is chosen in this order:
an absolute `run.root` (config or command line), else the environment variable `R1V_ROOT`, else the
config's relative root resolved against the config file's folder. Under `ray job submit` the driver runs
in a temporary copy of the working directory that Ray deletes, so a relative run root or cache
directory there is refused at validation (set `R1V_ROOT` in the job's runtime env, or an absolute
`run.root`), and a relative input path that does not exist in that copy is refused with the same advice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT_ENV = "R1V_ROOT"

# Config keys whose string values are filesystem paths (in any section, at any depth).
PATH_KEYS = frozenset({"path", "root", "cache_dir", "deepspeed_config", "vision_path", "llm_path", "init_from"})
# Keys that may hold a path or a package resource name (prompt files, models): resolved only when the
# value is explicitly relative (./ or ../) or names a file that exists beside the config.
MAYBE_PATH_SUFFIXES = ("_file",)
MAYBE_PATH_KEYS = frozenset({"model"})
# Keys that must survive a driver restart: outputs, not inputs.
OUTPUT_KEYS = frozenset({"root", "cache_dir"})


def file_stat(path: str | Path, content_hash: bool = False) -> list:
    """[path, size, mtime_ns] of a file (plus its sha256 with content_hash), or [path, None] when it is
    missing: the one stamp every fingerprint and cache identity uses for files outside a run."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return [str(p), None]
    out: list = [str(p), st.st_size, st.st_mtime_ns]
    if content_hash:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append(h.hexdigest())
    return out


def tree_stats(directory: str | Path) -> list[list]:
    """file_stat of every file directly in a directory (model checkpoints), by name."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted([f.name, *file_stat(f)[1:]] for f in d.iterdir() if f.is_file())


def under_ray_job(cwd: Path | None = None) -> bool:
    """True when this driver runs under `ray job submit` in Ray's unpacked working-dir copy."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by the job supervisor for the entrypoint
        return True
    parts = Path(cwd or os.getcwd()).resolve().parts
    return "runtime_resources" in parts and any(p.startswith("_ray_pkg_") for p in parts)


def _is_explicit_relative(v: str) -> bool:
    return v.startswith("./") or v.startswith("../")


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_tree(node: Any, base: Path, _key: str | None = None) -> Any:
    """The config tree with its relative paths made absolute against `base`."""
    if isinstance(node, dict):
        return {k: resolve_tree(v, base, k) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_tree(v, base, _key) for v in node]
    if not isinstance(node, str) or not node or _key is None:
        return node
    if _key in PATH_KEYS:
        return _resolve(node, base)
    if _key in MAYBE_PATH_KEYS or _key.endswith(MAYBE_PATH_SUFFIXES):
        if _is_explicit_relative(node) or (not Path(node).is_absolute() and (base / node).is_file()):
            return _resolve(node, base)
    return node


def relative_outputs(raw: dict) -> list[str]:
    """Dotted keys of output locations (run root, cache dirs) that are relative in the raw tree."""
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                if k in OUTPUT_KEYS and isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                    found.append(f"{key}={v!r}")
                else:
                    walk(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}.{i}")

    walk(raw, "")
    return found


def missing_inputs(tree: Any, original: Any, where: str = "") -> list[str]:
    """Dotted keys whose relative input path (in `original`) resolved to nothing (in `tree`)."""
    out: list[str] = []
    if isinstance(tree, dict) and isinstance(original, dict):
        for k, v in tree.items():
            key = f"{where}.{k}" if where else str(k)
            o = original.get(k)
            if (k in PATH_KEYS and k not in OUTPUT_KEYS and isinstance(v, str) and isinstance(o, str)
                    and not Path(o).expanduser().is_absolute() and not Path(v).exists()):
                out.append(f"{key}={o!r} (resolved to {v})")
            else:
                out += missing_inputs(v, o, key)
    elif isinstance(tree, list) and isinstance(original, list):
        for i, (v, o) in enumerate(zip(tree, original, strict=False)):
            out += missing_inputs(v, o, f"{where}.{i}")
    return out


def job_problems(raw: dict, resolved: dict) -> list[str]:
    """Why this config cannot run under `ray job submit` as it stands (empty when it can)."""
    problems = []
    outputs = relative_outputs(raw)
    root = (raw.get("run") or {}).get("root", "runs")
    if os.environ.get(ROOT_ENV):
        outputs = [o for o in outputs if not o.startswith("run.root=")]
    elif "run" in raw and "root" not in (raw.get("run") or {}):
        outputs.insert(0, f"run.root={root!r} (the default)")
    for o in outputs:
        problems.append(
            f"{o}: a relative output path under `ray job submit` lands in Ray's temporary copy of the working "
            f"directory, which is deleted when the job ends. Set {ROOT_ENV} to a directory every node sees "
            f"(ray job submit --runtime-env-json '{{\"env_vars\": {{\"{ROOT_ENV}\": \"/shared/r1v\"}}}}' ...) "
            f"or give an absolute path"
        )
    for m in missing_inputs(resolved, raw):
        problems.append(
            f"{m}: not found; under `ray job submit` relative inputs resolve inside Ray's copy of the working "
            f"directory, which holds only the files under it: give an absolute path on storage every node sees"
        )
    return problems


# ---------------------------------------------------------------- the files an ingest source reads


def _image_refs(value: Any) -> list[str]:
    """Image file names in one row's image column (paths, or {path} dicts without bytes)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, dict) and item.get("bytes") is None and isinstance(item.get("path"), str) and item["path"]:
            out.append(item["path"])
    return out


_REFS_MEMO: dict[tuple, tuple[list[Path], set[str], int]] = {}


def source_files(src: Any, limit: int | None) -> tuple[list[Path], set[str], int]:
    """(files read, image files its rows name (resolved like ingest resolves them), rows read) of one
    ingest source (pipeline.ingest.SourceConfig); memoised on the files' stamps, so `r1v status` and a
    re-run parse a source only after it changed."""
    p = Path(src.path)
    if src.kind == "hf":  # the dataset directory is the data (images inline in its Arrow files)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        return files, set(), limit or 0
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    col = src.columns.images
    key = (tuple(tuple(file_stat(f)) for f in files), col, limit)
    if key in _REFS_MEMO:
        return _REFS_MEMO[key]
    base = p if p.is_dir() else p.parent
    refs: set[str] = set()
    n = 0
    if col and p.exists():
        for value in _image_column(src, files, col, limit):
            n += 1
            refs.update(str(base / r) for r in _image_refs(value))
    _REFS_MEMO[key] = (files, refs, n)
    return files, refs, n


def _image_column(src: Any, files: list[Path], col: str, limit: int | None) -> Iterator[Any]:
    """The image column of every row ingest would read (one value per row, None where absent)."""
    n = 0
    if src.kind == "jsonl":
        with open(files[0], encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                if limit is not None and n >= limit:
                    return
                n += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield None
                    continue
                yield row.get(col) if isinstance(row, dict) else None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        typ = pf.schema_arrow.field(col).type if col in names else None
        # Only path-typed columns name files; inline bytes are covered by the Parquet file's own stamp.
        if not (typ is not None and (pa.types.is_string(typ) or pa.types.is_large_string(typ) or (
                pa.types.is_list(typ) and pa.types.is_string(typ.value_type)))):
            k = pf.metadata.num_rows if limit is None else min(pf.metadata.num_rows, limit - n)
            n += k
            yield from [None] * k
            continue
        for batch in pf.iter_batches(batch_size=4096, columns=[col]):
            for v in batch.column(0).to_pylist():
                if limit is not None and n >= limit:
                    return
                n += 1
                yield v
