"""The run directory: Parquet shards, manifests, fingerprints (DESIGN.md, "Run directory and re-runs").

Layout of one step (a stage in one round) under `runs/<run>/`:

    <step>/part-00000.parquet ...        the step's main table, read with pl.scan_parquet("<step>/*.parquet")
    <step>/<table>/part-00000.parquet    a secondary table (e.g. curate/retry, ingest/quarantine)
    <step>/config.yaml                   the resolved run config this step ran with
    <step>/_manifest.json                written last: its presence means "done"

Every shard is written to `.tmp-<name>` and renamed, so a killed run never leaves a partial file under
a real name; the reader ignores dot-files. Shards are numbered in write order and a writer that resumes
continues after the last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline.schema import SCHEMA_VERSIONS, conform

MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
SHARD_GLOB = "part-*.parquet"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex digest of JSON-serialised parts; the same inputs give the same id on every machine."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:n]


def fingerprint(stage: str, step: str, stage_config: dict, upstream: dict[str, str], tables: Iterable[str]) -> str:
    versions = {t: SCHEMA_VERSIONS.get(t, 0) for t in sorted(set(tables))}
    return stable_hash(stage, step, stage_config, dict(sorted(upstream.items())), versions, n=24)


def _arrow_metadata(table: str) -> dict[bytes, bytes]:
    return {b"r1v.table": table.encode(), b"r1v.schema_version": str(SCHEMA_VERSIONS.get(table, 0)).encode()}


class ShardWriter:
    """Buffers rows of one table and writes numbered Parquet shards atomically.

    `resume=True` keeps the shards already in `directory` and numbers new ones after them; otherwise
    the directory's shards are removed first. Use as a context manager, or call close().

    `row_group_bytes` streams each shard to its tmp file in row groups of about that many (Arrow)
    bytes, encoded and compressed on one background thread while the caller produces the next rows
    (Parquet encoding releases the GIL), and keeps only a few row groups in memory instead of a whole
    shard. Meant for image tables, where compression is most of a stage's write time; shards still
    hold exactly `rows_per_shard` rows and appear under their real name only when complete. A failed
    background write is raised by the next write/flush/close.
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        table: str,
        rows_per_shard: int = 50_000,
        resume: bool = False,
        row_group_bytes: int | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.table = table
        self.schema = schema.with_metadata(_arrow_metadata(table))
        self.rows_per_shard = rows_per_shard
        self._buf: list[pa.Table] = []
        self._pending: list[dict] = []
        self._buffered = 0
        self.rows_written = 0
        self.row_group_bytes = row_group_bytes
        self._buf_bytes = 0  # Arrow bytes buffered (streaming mode)
        self._open_rows = 0  # rows already sent to the shard being streamed
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: deque[Future] = deque()
        self._pw: pq.ParquetWriter | None = None  # the streamed shard's writer; background thread only
        for tmp in self.dir.glob(".tmp-*"):
            tmp.unlink()
        existing = sorted(self.dir.glob(SHARD_GLOB))
        if not resume:
            for p in existing:
                p.unlink()
            existing = []
        self._next = (int(existing[-1].stem.split("-")[1]) + 1) if existing else 0
        self.files: list[str] = [p.name for p in existing]

    def write(self, rows: pa.Table | pa.RecordBatch | list[dict]) -> None:
        """Append rows: an Arrow table/batch, or a list of dicts (converted in blocks)."""
        if isinstance(rows, list):
            self._pending.extend(rows)
            if len(self._pending) >= min(1024, self.rows_per_shard):
                self._convert_pending()
            return
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if rows.num_rows == 0:
            return
        rows = conform(rows, self.schema)
        self._buf.append(rows)
        self._buffered += rows.num_rows
        if self.row_group_bytes:
            self._buf_bytes += rows.nbytes
            self._stream()
            return
        while self._buffered >= self.rows_per_shard:
            self._emit(self.rows_per_shard)

    def _convert_pending(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            self.write(pa.Table.from_pylist(rows, schema=self.schema.remove_metadata()))

    def _take(self, n: int) -> pa.Table:
        """The first n buffered rows, removed from the buffer."""
        table = pa.concat_tables(self._buf)
        head, rest = table.slice(0, n), table.slice(n)
        self._buf = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        self._buf_bytes = rest.nbytes if rest.num_rows else 0
        return head

    def _emit(self, n: int) -> None:
        """Write the first n buffered rows as the next shard (tmp name, then rename)."""
        head = self._take(n)
        name = f"part-{self._next:05d}.parquet"
        tmp = self.dir / f".tmp-{name}"
        pq.write_table(head.replace_schema_metadata(self.schema.metadata), tmp, compression="zstd")
        os.replace(tmp, self.dir / name)
        self.files.append(name)
        self._next += 1
        self.rows_written += head.num_rows

    # ---- streaming mode (row_group_bytes): the background thread owns self._pw

    def _stream(self, final: bool = False) -> None:
        """Send row groups that are due; close the shard once it holds rows_per_shard rows."""
        while self._buffered:
            room = self.rows_per_shard - self._open_rows
            if self._buffered >= room:
                self._send(room, last=True)
            elif final or self._buf_bytes >= self.row_group_bytes:
                self._send(self._buffered, last=final)
            else:
                return
        if final and self._open_rows:
            self._send(0, last=True)

    def _send(self, n: int, last: bool) -> None:
        name = f"part-{self._next:05d}.parquet"
        if n:
            self._submit(self._write_group, name, self._take(n))
            self._open_rows += n
        if last:
            self._submit(self._finish_shard, name)
            self.files.append(name)
            self._next += 1
            self.rows_written += self._open_rows
            self._open_rows = 0

    def _submit(self, fn, *args) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shards-{self.table}")
        self._jobs.append(self._pool.submit(fn, *args))
        # at most a few row groups in flight; a failed write surfaces here, in the caller's thread
        while len(self._jobs) > 3 or (self._jobs and self._jobs[0].done()):
            self._jobs.popleft().result()

    def _drain(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    def _write_group(self, name: str, table: pa.Table) -> None:
        if self._pw is None:
            # small row groups would dictionary-encode every encoded image/blob (one hash table per
            # group, never a repeat): dictionaries only for flat text/number columns
            flat = [f.name for f in self.schema if not pa.types.is_nested(f.type) and not pa.types.is_binary(f.type)]
            self._pw = pq.ParquetWriter(self.dir / f".tmp-{name}", self.schema, compression="zstd", use_dictionary=flat)
        self._pw.write_table(table)

    def _finish_shard(self, name: str) -> None:
        pw, self._pw = self._pw, None
        pw.close()
        os.replace(self.dir / f".tmp-{name}", self.dir / name)

    def _shutdown(self) -> None:
        """Stop the background thread. After an error the open shard stays a tmp file (the next writer
        on this directory removes it); pending row groups are dropped."""
        if self._pool is not None:
            for job in self._jobs:
                job.cancel()
            self._pool.shutdown(wait=True)
            self._pool, self._jobs = None, deque()
        if self._pw is not None:
            self._pw.close()
            self._pw = None

    def flush(self) -> None:
        """Write everything buffered (the last shard may be short)."""
        self._convert_pending()
        if self.row_group_bytes:
            self._stream(final=True)
            self._drain()
        elif self._buffered:
            self._emit(self._buffered)

    def close(self) -> None:
        """Flush; a table that received no rows still gets one empty shard carrying its schema, so
        downstream stages and `pl.scan_parquet` read an empty table instead of a missing one."""
        try:
            self.flush()
        finally:
            self._shutdown()
        if not self.files:
            self._buf = [self.schema.remove_metadata().empty_table()]
            self._emit(0)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._shutdown()


# ---------------------------------------------------------------- shards written by workers
#
# A stage whose workers write their own shards opens an *attempt*: a fresh `.attempt-<token>/` folder in
# the step directory where workers write each shard before renaming it to its real name beside it. The
# next attempt first renames every older attempt folder away (one atomic rename each), so a straggling
# worker of a killed driver can no longer publish anything: its tmp path is gone and its rename fails.
# Shards published before that rename are there when the new attempt reads what is done.

ATTEMPT_PREFIX = ".attempt-"


class AttemptFenced(RuntimeError):
    """A worker of an attempt that a newer attempt has replaced tried to publish a shard."""


def open_attempt(directory: Path) -> Path:
    """Fence off older attempts on `directory` and return a fresh attempt folder (the driver calls this
    before reading which shards are done)."""
    import shutil
    import uuid

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(ATTEMPT_PREFIX + "*"):
        dead = old.with_name(f".dead-{old.name[len(ATTEMPT_PREFIX):]}-{uuid.uuid4().hex[:6]}")
        os.replace(old, dead)
    for dead in directory.glob(".dead-*"):
        shutil.rmtree(dead, ignore_errors=True)  # a straggler may still hold a file open there
    for tmp in directory.glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
    attempt = directory / f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:12]}"
    attempt.mkdir()
    return attempt


def close_attempt(attempt: Path) -> None:
    import shutil

    shutil.rmtree(attempt, ignore_errors=True)


def shard_name(ids: Iterable[str], prefix: str = "part") -> str:
    """A shard's name from the row ids it holds: a retried task rewrites the same file, never a second one."""
    return f"{prefix}-{stable_hash(sorted(ids), n=20)}.parquet"


def publish_shard(rows: pa.Table, attempt: Path, name: str, table: str, sub: str | None = None) -> str:
    """Write `rows` as shard `name` of the step directory that holds `attempt` (or of its `sub` table
    folder): to the attempt folder, then renamed. Never creates the attempt folder: a fenced attempt
    raises AttemptFenced."""
    attempt = Path(attempt)
    tmp = attempt / f"{sub}-{name}" if sub else attempt / name
    target = attempt.parent / sub if sub else attempt.parent
    rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}), **_arrow_metadata(table)})
    try:
        pq.write_table(rows, tmp, compression="zstd")
        os.replace(tmp, target / name)
    except FileNotFoundError as e:
        if not attempt.exists():
            raise AttemptFenced(f"{attempt} was replaced by a newer attempt; shard {name} not published") from e
        raise
    return name


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def read_table(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """All complete shards of a table directory as one Arrow table (empty dirs give an empty table)."""
    files = shard_files(directory)
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {directory}")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="default")


def iter_batches(directory: Path, batch_size: int = 1024, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    for f in shard_files(directory):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(directory))


class Manifest(BaseModel):
    """What a finished step did. Written last; `rows_in == kept + sum(dropped) + sum(quarantined)`."""

    stage: str
    step: str = ""
    round: int = 0
    fingerprint: str = ""
    upstream: dict[str, str] = Field(default_factory=dict, description="input step -> its fingerprint")
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = Field(default_factory=dict, description="drop reason -> rows")
    quarantined: dict[str, int] = Field(default_factory=dict, description="quarantine reason -> rows")
    outputs: dict[str, int] = Field(default_factory=dict, description="table -> rows written")
    metrics: dict[str, Any] = Field(default_factory=dict, description="stage-specific figures")
    config: dict[str, Any] = Field(default_factory=dict, description="the resolved stage config")
    started_at: float = 0.0
    wall_s: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="where rows_in came from: per input step the rows of its table read, its kept count, and "
        "the rows it dropped or quarantined yet kept in its table (so rows_in = their sum, said exactly)",
    )

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def quarantine(self, reason: str, n: int = 1) -> None:
        self.quarantined[reason] = self.quarantined.get(reason, 0) + n

    def check_counts(self) -> None:
        out = self.kept + sum(self.dropped.values()) + sum(self.quarantined.values())
        if out != self.rows_in:
            raise RuntimeError(
                f"step {self.step!r}: counts do not add up: rows_in={self.rows_in} but kept={self.kept} "
                f"+ dropped={self.dropped} + quarantined={self.quarantined} = {out}"
            )

    def write(self, directory: Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST, self.model_dump(mode="json"))

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        p = Path(directory) / MANIFEST
        if not p.exists():
            return None
        return cls.model_validate_json(p.read_text())


def versions() -> dict[str, str]:
    import pyarrow

    out = {"python": platform.python_version(), "pyarrow": pyarrow.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    from importlib import metadata

    # The libraries whose behaviour changes a stage's output, read from package metadata (nothing imported).
    for dist in ("math-verify", "sympy", "transformers", "torch", "deepspeed", "vllm", "openai"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    from pipeline import __version__

    out["r1v"] = __version__
    return out


def now() -> float:
    return time.time()
