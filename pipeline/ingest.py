"""Ingest: HF datasets (`save_to_disk`), Parquet, JSONL (+ image files) or synthetic problems → `problems`.

    r1v run configs/demo.yaml --stage ingest
    r1v run configs/mathv.yaml --stage ingest ingest.limit=50

Per row: images are read and fully decoded once (corrupt or missing files are quarantined with the
reason, never passed on), stored as bytes with format/width/height; the gold answer and multiple-choice
options are normalised (a letter gold keeps its option text in `answer_text`); `problem_id` is a stable
hash of question + image bytes + answer (+ the options of a multiple-choice problem), so exact duplicates (also across sources) are removed and
counted. Rows without an answer, unreadable JSON lines and unreadable records are quarantined into
`ingest/quarantine/` with the file and line they came from.

Throughput (benchmarks/ingest.py): Parquet encoding and zstd are most of the cost, so `problems` is
streamed to its shard in ~2 MiB row groups compressed on a background thread while the next rows are
read. Each image file is read once (its bytes are copied once more, into the Arrow column), and plain
JPEG headers are checked without PIL's Python header parser (pipeline.images).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.config import StageConfig
from pipeline.images import ImageError, image_record
from pipeline.paths import file_stat, source_files
from pipeline.progress import track
from pipeline.rundir import Manifest, ShardWriter, stable_hash
from pipeline.schema import PROBLEMS, QUARANTINE

log = logging.getLogger(__name__)
TABLES = ("problems", "quarantine")
# Bumped whenever a code change changes the rows ingest writes (2: multiple-choice ids include the options).
LOGIC_VERSION = 3  # 3: bytes golds read as text, object golds quarantined (bad_answer), one-line option lists, golds naming an option ("C. 18", "Option C")

# Row groups of image tables: small enough that compressing one overlaps reading the next (and that a
# reader fetching one problem decodes little), large enough that text-only sources get big groups.
ROW_GROUP_BYTES = 2 << 20
_BATCH_ROWS = 32  # problems per Arrow batch handed to the shard writer


class IngestError(RuntimeError):
    """A source that cannot be ingested at all (missing file, every row bad)."""


class ColumnMap(StageConfig):
    """Names of the source's columns (JSONL keys / Parquet / HF columns)."""

    id: str | None = Field("id", description="source row id, kept in source_ref (optional)")
    question: str = "question"
    answer: str = "answer"
    images: str | None = Field("images", description="image path(s) relative to the file, bytes, or HF Image")
    choices: str | None = Field("choices", description="list of option texts (optional)")
    answer_text: str | None = Field(None, description="option text of the gold choice (optional)")
    answer_type: str | None = "answer_type"
    subject: str | None = "subject"
    difficulty: str | None = "difficulty"


class SyntheticConfig(StageConfig):
    n: int = Field(200, ge=1, description="problems to draw")
    seed: int = Field(0, description="the same seed always gives the same problems")
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3])
    kinds: list[str] = Field(default_factory=list, description="subset of pipeline.synthetic.KINDS; empty = all")


class SourceBase(StageConfig):
    """Where a source's rows are and how many to read; each kind of source adds its column map."""

    kind: Literal["jsonl", "parquet", "hf", "synthetic"] = Field(description="source format")
    path: str | None = Field(None, description="file or directory (not for synthetic)")
    name: str | None = Field(None, description="label written to the `source` column (default: file stem)")
    split: str | None = Field(None, description="split of an HF DatasetDict")
    limit: int | None = Field(None, ge=1, description="read at most this many rows of this source")
    synthetic: SyntheticConfig | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "synthetic":
            return "synthetic"
        return Path(self.path or "").stem or "source"


class SourceConfig(SourceBase):
    columns: ColumnMap = Field(default_factory=ColumnMap)


class IngestConfig(StageConfig):
    sources: list[SourceConfig] = Field(min_length=1, description="problem sources, read in order")
    limit: int | None = Field(None, ge=1, description="stop after this many rows in total")
    dedupe: bool = Field(True, description="drop exact duplicates (same problem_id)")
    image_check: Literal["structure", "draft", "full"] = Field(
        "structure",
        description="how images are checked: container structure and end markers (fast), a reduced-size "
        "pixel decode, or a full decode (pipeline.images.image_record)",
    )
    image_threads: int = Field(
        1,
        ge=1,
        description="threads reading and checking images; 1 = in the reading thread, the fastest measured "
        "(benchmarks/ingest.py): header checks hold the GIL and the shard writer uses the other core",
    )
    rows_per_shard: int = Field(5000, ge=1)


def fingerprint_extra(cfg: IngestConfig) -> dict:
    """Stamps (pipeline.paths.file_stat: path, size, mtime_ns) of exactly the files ingest reads: each
    source file (or a Parquet directory's shards, an HF dataset directory's files) and every image file
    its rows name, digested per source, so an edited input or a replaced image re-runs ingest and nothing
    else beside the data (run directories, .git, a venv) does. `limit`s are honoured as ingest honours them."""
    out = {}
    left = getattr(cfg, "limit", None)  # decontaminate and evaluate pass a bare namespace of sources
    for s in cfg.sources:
        if left is not None and left <= 0:
            break
        lim = min([x for x in (s.limit, left) if x is not None], default=None)
        if s.path:
            files, refs, n = source_files(s, lim)
            out[s.path] = stable_hash([file_stat(f) for f in files], [file_stat(r) for r in sorted(refs)])
        else:
            n = (s.synthetic or SyntheticConfig()).n if s.kind == "synthetic" else 0
            n = min(n, lim) if lim is not None else n
        if left is not None:
            left -= n
    return out


def preflight(cfg: IngestConfig) -> list[str]:
    """Problems found without reading any data (used by `r1v validate` and before a run)."""
    problems = []
    for i, s in enumerate(cfg.sources):
        key = f"ingest.sources.{i}"
        if s.kind == "synthetic":
            if s.path:
                problems.append(f"{key}.path: synthetic sources take no path (got {s.path!r})")
            continue
        if not s.path:
            problems.append(f"{key}.path: required for kind {s.kind!r}")
        elif not Path(s.path).exists():
            problems.append(f"{key}.path: file not found: {s.path}")
    return problems


# ---------------------------------------------------------------- normalisation

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.S)
_LETTER = re.compile(r"^\(?([A-Ha-h])\)?[.:]?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$", re.I)
_OPTION_PREFIX = re.compile(r"^\(?([A-H])[).:．：、]\s*")
# options written on one line: "(A) 12 (B) 15 (C) 18", "A) 12; B) 15", "A. 12  B. 15"
_INLINE_OPTION = re.compile(r"(?:^|(?<=[\s;,]))\(?([A-H])[).:．：]\s+")
# a gold naming an option: "C. 18 cm", "(C) 18", "C: 18", "Option C", "choice (C)"
_LETTER_WITH_TEXT = re.compile(r"^\(?([A-Ha-h])\)?\s*[.:：．)]\s*(.+)$", re.S)
_OPTION_WORD = re.compile(r"^(?:option|choice|answer)\s*[:：]?\s*\(?([A-Ha-h])\)?\.?$", re.I)


def normalise_answer(raw: Any) -> str | None:
    """A gold answer as a clean string, or None when there is none."""
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)):
        raw = ", ".join(str(x) for x in raw)
    s = str(raw).strip()
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s.strip("$").strip()
    m = _BOXED.match(s)
    if m:
        s = m.group(1).strip()
    s = s.rstrip(".").strip()
    return s or None


def normalise_choices(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = [x for x in re.split(r"\n+", raw) if x.strip()]
    if isinstance(raw, dict):
        raw = [raw[k] for k in sorted(raw)]
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = _inline_options(raw[0]) or raw
    out = [_OPTION_PREFIX.sub("", str(c).strip()) for c in raw]
    return out or None


def _inline_options(s: str) -> list[str] | None:
    """The options of a one-line list ("(A) 12 (B) 15 (C) 18"), when its markers run A, B, C, … in order."""
    s = s.strip()
    marks = list(_INLINE_OPTION.finditer(s))
    if len(marks) < 2 or marks[0].start() != 0 or [m.group(1) for m in marks] != [chr(65 + i) for i in range(len(marks))]:
        return None
    ends = [m.start() for m in marks[1:]] + [len(s)]
    out = [s[m.end() : e].strip(" ;,") for m, e in zip(marks, ends, strict=True)]
    return out if all(out) else None


def infer_answer_type(answer: str, choices: list[str] | None) -> str:
    if choices and _LETTER.match(answer):
        return "choice"
    a = answer.replace(" ", "")
    if _NUMBER.match(a.replace(",", "")) or re.fullmatch(r"-?\\[dt]?frac\{\d+\}\{\d+\}", a):
        return "number"
    if "\\begin{" in a and "matrix" in a:
        return "matrix"
    if re.fullmatch(r"[\(\[].*,.*[\)\]]", a) and ("infty" in a or a[0] != a[-1]) and (a[0] == "[" or a[-1] == "]" or "infty" in a):
        return "interval"
    if re.fullmatch(r"\\\{.*\\\}", a) or re.fullmatch(r"\{.*,.*\}", a):
        return "set"
    if re.fullmatch(r"\(.*,.*\)", a):
        return "tuple"
    if re.search(r"[\\^=+\-*/]|\d", a):
        return "expression"
    return "text"


def _choice_fields(answer: str, choices: list[str] | None, answer_text: str | None) -> tuple[str, str | None]:
    """(answer, answer_text): a letter gold keeps its option text; an option-text gold becomes its letter."""
    if not choices:
        return answer, answer_text
    m = _LETTER.match(answer) or _OPTION_WORD.match(answer)
    if m is None:
        # "C. 18 cm": the letter, when the text after it is that option's (or no option's at all)
        lt = _LETTER_WITH_TEXT.match(answer)
        if lt:
            idx = ord(lt.group(1).upper()) - ord("A")
            rest = lt.group(2).strip().rstrip(".").lower()
            texts = [c.strip().rstrip(".").lower() for c in choices]
            if idx < len(choices) and (texts[idx] == rest or rest not in texts):
                m = lt
    if m:
        idx = ord(m.group(1).upper()) - ord("A")
        text = answer_text or (choices[idx] if idx < len(choices) else None)
        return m.group(1).upper(), text
    for i, c in enumerate(choices):
        if c.strip().lower() == answer.strip().lower():
            return chr(ord("A") + i), c
    return answer, answer_text


# ---------------------------------------------------------------- readers


class RowError(Exception):
    """One row that cannot become a problem: `reason` is the counted quarantine reason."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason, self.error = reason, error


def _iter_jsonl(src: SourceConfig) -> Iterator[tuple[str, dict | RowError]]:
    path = Path(src.path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            ref = f"{path}:{lineno}"
            try:  # bytes that are not UTF-8 would reach the question or the gold answer as U+FFFD
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ref, RowError("invalid_utf8", f"{ref}: bytes that are not UTF-8 at byte {e.start} of the line "
                                                    f"({raw[max(0, e.start - 10):e.end + 10]!r})")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield ref, RowError("bad_json", f"{ref}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield ref, RowError("bad_json", f"{ref}: a JSON object per line is required, got {type(row).__name__}")
                continue
            yield ref, row


def _iter_parquet(src: SourceConfig) -> Iterator[tuple[str, dict | RowError]]:
    import pyarrow.parquet as pq

    p = Path(src.path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    for f in files:
        i = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=512):
            for row in batch.to_pylist():
                yield f"{f}#{i}", row
                i += 1


def _iter_hf(src: SourceConfig) -> Iterator[tuple[str, dict | RowError]]:
    import datasets

    ds = datasets.load_from_disk(src.path)
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or next(iter(ds))
        if split not in ds:
            raise IngestError(f"{src.path}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))) and isinstance(getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(col, datasets.Sequence(datasets.Image(decode=False)))
    for i, row in enumerate(ds):
        yield f"{src.path}#{i}", row


def _iter_synthetic(src: SourceConfig) -> Iterator[tuple[str, dict | RowError]]:
    from pipeline.synthetic import KINDS, make_problem

    sc = src.synthetic or SyntheticConfig()
    kinds = tuple(sc.kinds) if sc.kinds else KINDS
    for k in kinds:
        if k not in KINDS:
            raise IngestError(f"ingest synthetic.kinds: unknown kind {k!r} (known: {', '.join(KINDS)})")
    for i in range(sc.n):
        yield f"synthetic:{sc.seed}:{i}", make_problem(sc.seed, i, kinds, tuple(sc.levels))


_READERS = {"jsonl": _iter_jsonl, "parquet": _iter_parquet, "hf": _iter_hf, "synthetic": _iter_synthetic}


def _load_images(value: Any, base: Path | None, ref: str, check: str) -> list[dict]:
    """Image structs from paths (relative to the source file), raw bytes, or {bytes, path} dicts."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for j, item in enumerate(items):
        where = f"{ref} image {j}"
        if isinstance(item, dict) and item.get("bytes") is not None and "width" in item and "format" in item:
            data = item["bytes"]
        elif isinstance(item, dict) and item.get("bytes") is not None:
            data = item["bytes"]
        elif isinstance(item, (bytes, bytearray)):
            data = bytes(item)
        else:
            path = item.get("path") if isinstance(item, dict) else item
            if not isinstance(path, (str, Path)):
                raise RowError("missing_image", f"{where}: expected an image path, bytes or {{bytes, path}}, got {type(path).__name__}")
            if not path:
                raise RowError("missing_image", f"{where}: no image bytes or path")
            p = base / path if base is not None else Path(path)  # an absolute path replaces base
            try:
                with open(p, "rb", buffering=0) as f:  # unbuffered: one read into the final bytes object
                    data = f.readall()
            except OSError as e:
                raise RowError("missing_image", f"{where}: cannot read {p}: {e.strerror}") from e
            where = f"{where} ({p})"
        try:
            out.append(image_record(data, where, check))
        except ImageError as e:
            raise RowError("corrupt_image", str(e)) from e
    return out


def _get(row: dict, key: str | None) -> Any:
    return row.get(key) if key else None


def to_problem(row: dict, src: SourceConfig, ref: str, base: Path | None, check: str = "structure") -> dict:
    """One source row as a `problems` row (stable problem_id); raises RowError with the reason.

    Public so that other readers of raw rows (external chains) give the same ids as ingest.
    """
    c = src.columns
    question = _get(row, c.question)
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing_question", f"{ref}: no question in column {c.question!r}")
    raw_answer = _get(row, c.answer)
    if isinstance(raw_answer, (bytes, bytearray)):
        raw_answer = bytes(raw_answer).decode("utf-8", errors="replace")
    elif isinstance(raw_answer, dict) or (isinstance(raw_answer, (list, tuple)) and any(isinstance(x, (dict, list)) for x in raw_answer)):
        raise RowError("bad_answer", f"{ref}: column {c.answer!r} holds a {type(raw_answer).__name__} with objects in it, not an answer")
    answer = normalise_answer(raw_answer)
    if answer is None:
        raise RowError("missing_answer", f"{ref}: no answer in column {c.answer!r}")
    choices = normalise_choices(_get(row, c.choices))
    answer, answer_text = _choice_fields(answer, choices, _get(row, c.answer_text))
    images = _load_images(_get(row, c.images), base, ref, check)
    atype = _get(row, c.answer_type)
    if atype not in ("number", "expression", "interval", "set", "tuple", "matrix", "choice", "text"):
        atype = infer_answer_type(answer, choices)
    diff = _get(row, c.difficulty)
    try:
        diff = int(diff) if diff is not None else None
    except (TypeError, ValueError):
        diff = None
    subject = _get(row, c.subject)
    if isinstance(subject, (int, float)) and not isinstance(subject, bool):
        subject = str(subject)  # a numeric category code is still a label
    elif subject is not None and not isinstance(subject, str):
        raise RowError("bad_row", f"{ref}: column {c.subject!r} is a {type(subject).__name__}, not a string")
    question = question.strip()
    pid = problem_id(question, [im["bytes"] for im in images], answer, choices)
    needs = row.get("needs_image")
    return {
        "problem_id": pid,
        "question": question,
        "images": images,
        "answer": answer,
        "choices": choices,
        "answer_text": answer_text,
        "answer_type": atype,
        "source": src.label(),
        "subject": subject,
        "difficulty": diff,
        "needs_image": bool(needs) if needs is not None else (bool(images) or None),
        "source_ref": f"{ref} id={row.get(c.id)}" if c.id and row.get(c.id) is not None else ref,
    }


# json.dumps(x, sort_keys=True, default=str) as stable_hash spells it, without building an encoder per call
_JSON = json.JSONEncoder(sort_keys=True, default=str)


def problem_id(question: str, images: list[bytes], answer: str, choices: list[str] | None = None) -> str:
    """`stable_hash(question, [stable_hash(image) for image in images], answer[, choices])`, computed
    directly: ingest hashes every row, and the same ids must come out (tests compare them with stable_hash).

    The options are part of a multiple-choice problem (same stem, figure and letter with other options is
    another problem); a problem without options hashes as before, so its id and cached chains stay.
    """
    digests = []
    for data in images:
        if not isinstance(data, bytes):
            digests.append(stable_hash(data))
            continue
        h = hashlib.sha256(data)  # releases the GIL on large buffers
        h.update(b"\x1f")
        digests.append(h.hexdigest()[:16])
    h = hashlib.sha256()
    for part in (question, digests, answer, *([list(choices)] if choices else [])):
        h.update(_JSON.encode(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def _quarantine_row(src: SourceConfig, ref: str, bad: RowError, row: dict | None) -> dict:
    def _jsonable(v: Any) -> Any:
        return f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else v

    row_json = None
    if row is not None:
        row_json = json.dumps({k: _jsonable(v) for k, v in row.items() if not isinstance(v, (list, dict))}, default=str)
    return {"source": src.label(), "source_ref": ref, "reason": bad.reason, "error": bad.error, "row_json": row_json}


def _process_chunk(chunk: list, src: SourceConfig, base: Path | None, check: str) -> list[tuple[str, dict]]:
    out = []
    for ref, raw in chunk:
        try:
            if isinstance(raw, RowError):
                raise raw
            out.append(("ok", to_problem(raw, src, ref, base, check)))
        except RowError as bad:
            out.append(("quarantine", _quarantine_row(src, ref, bad, None if isinstance(raw, RowError) else raw)))
        except Exception as e:  # noqa: BLE001 - one malformed row is quarantined, never the end of the run
            bad = RowError("bad_row", f"{ref}: {type(e).__name__}: {e}")
            out.append(("quarantine", _quarantine_row(src, ref, bad, raw if isinstance(raw, dict) else None)))
    return out


def load_sources(
    sources: list[SourceConfig],
    limit: int | None = None,
    dedupe: bool = True,
    threads: int = 1,
    image_check: str = "structure",
) -> Iterator[tuple[str, dict]]:
    """Yield ("problem", row) / ("quarantine", row) / ("duplicate", row) for every row read, in order.

    The one place that reads sources: the ingest stage and evaluate's eval sets both use it. Rows are
    processed in chunks, on a thread pool when threads > 1 (image reads and hashing release the GIL),
    results kept in order, with a bounded look-ahead so memory stays flat on big sources. threads=1
    processes them in the calling thread: where the checks are mostly Python (small images), handing
    chunks between threads costs more than it overlaps.
    Raises IngestError at once for a missing file.
    """
    seen: set[str] = set()
    total = 0
    with ThreadPoolExecutor(max_workers=threads) if threads > 1 else nullcontext() as pool:
        for i, src in enumerate(sources):
            if src.kind != "synthetic" and (not src.path or not Path(src.path).exists()):
                raise IngestError(f"ingest.sources.{i}.path: file not found: {src.path}")
            p = Path(src.path) if src.path else None
            base = (p.parent if p.is_file() else p) if p else None
            n_src = 0
            chunk: list = []
            futures: list = []
            for ref, raw in _READERS[src.kind](src):
                if (src.limit and n_src >= src.limit) or (limit and total >= limit):
                    break
                n_src += 1
                total += 1
                chunk.append((ref, raw))
                if len(chunk) >= 32:
                    if pool is None:
                        yield from _dedupe(_process_chunk(chunk, src, base, image_check), seen, dedupe)
                    else:
                        futures.append(pool.submit(_process_chunk, chunk, src, base, image_check))
                    chunk = []
                if len(futures) > 2 * threads:
                    yield from _dedupe(futures.pop(0).result(), seen, dedupe)
            if chunk:
                if pool is None:
                    yield from _dedupe(_process_chunk(chunk, src, base, image_check), seen, dedupe)
                else:
                    futures.append(pool.submit(_process_chunk, chunk, src, base, image_check))
            for fut in futures:
                yield from _dedupe(fut.result(), seen, dedupe)


def _dedupe(items, seen: set[str], dedupe: bool) -> Iterator[tuple[str, dict]]:
    for kind, row in items:
        if kind == "ok":
            if dedupe and row["problem_id"] in seen:
                yield "duplicate", row
                continue
            seen.add(row["problem_id"])
            yield "problem", row
        else:
            yield kind, row


def write_sorted(rows: Iterable[tuple[str, str, dict]], keep: str, stage: str, out: ShardWriter, quar: ShardWriter,
                 m: Manifest, per_source: dict[str, dict[str, int]]) -> None:
    """Route (kind, source label, row) items as ingest does: rows of kind `keep` to `out` in Arrow batches,
    `duplicate` counted as a drop, anything else quarantined with its reason; counts per source in
    `per_source` and in the manifest (rows_in, kept, dropped, quarantined)."""
    batch: list[dict] = []
    for kind, label, row in track(rows, stage, total=None, unit="rows", logger=log):
        m.rows_in += 1
        stats = per_source.setdefault(label, {"rows": 0, "kept": 0})
        stats["rows"] += 1
        if kind == keep:
            batch.append(row)
            if len(batch) >= _BATCH_ROWS:
                out.write(pa.Table.from_pylist(batch, schema=out.schema.remove_metadata()))
                batch = []
            m.kept += 1
            stats["kept"] += 1
        elif kind == "duplicate":
            m.drop("duplicate")
        else:
            quar.write([row])
            m.quarantine(row["reason"])
            log.warning("%s: quarantined %s", stage, row["error"])
    if batch:
        out.write(pa.Table.from_pylist(batch, schema=out.schema.remove_metadata()))


def run(cfg: IngestConfig, ctx) -> Manifest:
    problems = preflight(cfg)
    if problems:
        raise IngestError("; ".join(problems))
    m = ctx.manifest()
    per_source: dict[str, dict[str, int]] = {}
    # ctx.writer's directory and resume rule, streamed in row groups (see ROW_GROUP_BYTES)
    problems_out = ShardWriter(ctx.out_dir, PROBLEMS, "problems", rows_per_shard=cfg.rows_per_shard,
                               resume=ctx.resume, row_group_bytes=ROW_GROUP_BYTES)
    with problems_out as out, ctx.writer(QUARANTINE, "quarantine", sub="quarantine") as quar:
        rows = load_sources(cfg.sources, cfg.limit, cfg.dedupe, cfg.image_threads, cfg.image_check)
        write_sorted(((kind, row["source"], row) for kind, row in rows), "problem", "ingest", out, quar, m, per_source)
    m.outputs = {"problems": m.kept, "quarantine": sum(m.quarantined.values())}
    m.metrics["per_source"] = per_source
    if m.kept == 0:
        raise IngestError(
            f"ingest: none of the {m.rows_in} rows read is usable (quarantined: {m.quarantined}, "
            f"dropped: {m.dropped}); see {ctx.out_dir / 'quarantine'}"
        )
    return m
