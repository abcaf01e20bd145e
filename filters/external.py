"""External chains: filter (and curate) generations the pipeline did not make, e.g. existing R1 traces.

    filter:
      source:
        path: ../shared/data/traces-dev/traces.jsonl
        columns: {question: problem, answer: gold_answer, trace: trace, id: id, teacher: model}

Each row gives a question, a gold answer, a trace and optionally images, choices, an answer type and a
finish reason. Rows become `problems` rows (same normalisation and `problem_id` as ingest, so an ingest
source over the same file yields the same ids) and `chains` rows (`chain_id` = stable hash of the
problem id and the trace; `teacher` from the mapped column or the source name). Traces keep their own
text: the format (think tags, Sky-T1 markers, none) is detected per row by the filter
(filters/formats.py); a declared `format` is checked against the rows, never trusted blindly, and the
filter's manifest warns when most rows disagree with it.

A row may hold several samples joined by a separator (`sample_separator`, a regex; by default
end-of-sequence tokens and "Sample 2"-style header lines, plus a format's opening marker starting again).
`samples: each` makes every sample a chain (`sample_idx` 0, 1, …; the row's finish_reason applies to
its last sample only); `samples: last_complete` keeps the last sample with no evidence of truncation
(a cut-off tail sample is never taken as clean; when every sample is cut, the last one is kept and the
filter drops it as truncated).
Chat records are detected, not assumed: a trace column holding an OpenAI message (`{"role", "content"}`,
content a string or a list of `{"type": "text", "text"}` parts) or a whole conversation (OpenAI
`messages`, ShareGPT `conversations` with `from` / `value`) gives the last assistant turn as the trace,
and its user turn as the question when the question column holds the same conversation or is absent.
An OpenAI API response (`{"choices": [{"message": {…}, "finish_reason": …}]}`, or its `choices` list)
gives one sample per choice, each with its own finish reason ("length" = cut off).
Reasoning kept apart from the answer (`reasoning_content` / `reasoning` / `thinking` in the message, or
a `reasoning` column) is joined as `<think>reasoning</think>answer`, so the chain reads as `think`;
with reasoning and no answer text it is an unclosed think span (cut off).
Bad rows (no question, no answer, no trace, unreadable images, a trace of a type that is none of these)
are counted by reason, never fatal; the message names the file, row and column.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from filters.extract import extract, split_chain, truncation
from filters.formats import DEFAULT_SAMPLE_SEPARATOR, THINK_CLOSE, THINK_OPEN, split_samples
from pipeline.config import StageConfig
from pipeline.rundir import stable_hash
from pipeline.schema import CHAINS, PROBLEMS

log = logging.getLogger(__name__)


class ChainColumns(StageConfig):
    """Names of the source's columns; None = not present."""

    question: str = "question"
    answer: str = "answer"
    trace: str = Field(
        "trace", description="the raw completion (reasoning and answer), an OpenAI message or a chat (messages / conversations)"
    )
    reasoning: str | None = Field(
        None, description="reasoning kept apart from the answer (e.g. reasoning_content): joined as <think>…</think>"
    )
    id: str | None = Field("id", description="source row id, kept in the problem's source_ref")
    images: str | None = Field(None, description="image path(s) relative to the file, or bytes")
    choices: str | None = None
    answer_type: str | None = None
    finish_reason: str | None = Field(None, description="'length' marks a cut-off trace")
    teacher: str | None = Field(None, description="model name column")
    completion_tokens: str | None = None


class ChainsSourceConfig(StageConfig):
    path: str = Field(description="Parquet file or JSONL file of chains")
    kind: Literal["auto", "jsonl", "parquet"] = Field("auto", description="format; auto = from the file suffix")
    name: str | None = Field(None, description="source label (default: file stem)")
    columns: ChainColumns = Field(default_factory=ChainColumns)
    teacher: str | None = Field(None, description="teacher name when no teacher column is mapped")
    format: Literal["auto", "think", "sky", "plain"] = Field(
        "auto",
        description="trace format: auto = detected per row; a declared one is checked against the rows "
        "(rows are still split by the markers they carry; the manifest warns when most rows disagree)",
    )
    starts_in_think: bool | None = Field(
        None, description="deprecated: true declares format think (rows are still detected one by one)"
    )
    samples: Literal["each", "last_complete"] = Field(
        "each", description="rows with several samples: every sample a chain, or the last complete one"
    )
    sample_separator: str | None = Field(
        DEFAULT_SAMPLE_SEPARATOR, description="regex between samples joined in one row (null: never split)"
    )
    max_tokens: int | None = Field(
        None, ge=1, description="the traces' generation budget: a chain whose completion_tokens reach it is truncated"
    )
    limit: int | None = Field(None, ge=1, description="read at most this many rows")
    image_check: Literal["structure", "draft", "full"] = Field(
        "structure", description="how images are checked (as ingest.image_check)"
    )

    def label(self) -> str:
        return self.name or Path(self.path).stem

    def declared_format(self) -> str:
        if self.format == "auto" and self.starts_in_think:
            return "think"
        return self.format


@dataclass
class LoadedChains:
    chains: pa.Table
    problems: pa.Table
    quarantined: dict[str, int] = field(default_factory=dict)
    bad_refs: list[str] = field(default_factory=list)
    rows: int = 0  # source rows that became chains
    multi_sample_rows: int = 0
    samples_skipped: int = 0  # samples left out by samples=last_complete
    invalid_utf8_rows: int = 0  # JSONL lines read with U+FFFD for bytes that are not UTF-8 (kept, counted)


def source_stats(cfg: ChainsSourceConfig | None) -> Any:
    if cfg is None:
        return None
    from pipeline.paths import file_stat

    return file_stat(cfg.path)


def _rows(cfg: ChainsSourceConfig, stats: dict) -> Any:
    """(ref, row or ValueError) per source row. Parquet: the mapped columns must exist (a clear error
    naming the key otherwise). JSONL: a line with bytes that are not UTF-8 is decoded with U+FFFD in their
    place and counted in `stats["invalid_utf8_rows"]` (its ref in `stats["invalid_utf8_refs"]`)."""
    p = Path(cfg.path)
    if not p.exists():
        raise FileNotFoundError(f"filter.source.path: file not found: {p}")
    kind = cfg.kind if cfg.kind != "auto" else ("parquet" if p.suffix in (".parquet", ".pq") else "jsonl")
    if kind == "parquet":
        try:
            f = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"filter.source.path: {p} is not a readable Parquet file ({e})") from e
        names = set(f.schema_arrow.names)
        c = cfg.columns
        for key in ("trace", "question", "answer"):
            col = getattr(c, key)
            if col not in names:
                raise ValueError(f"filter.source.columns.{key}: column {col!r} is not in {p} "
                                 f"(columns: {sorted(names)})")
        i = 0
        for batch in f.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{p}:row{i}", row
                i += 1
        return
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats["invalid_utf8_rows"] = stats.get("invalid_utf8_rows", 0) + 1
                stats.setdefault("invalid_utf8_refs", []).append(f"{p}:{lineno}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{lineno}", ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})")
                continue
            yield f"{p}:{lineno}", row if isinstance(row, dict) else ValueError(f"{p}:{lineno}: not an object")


_ASSISTANT = {"assistant", "gpt", "model", "bot", "chatgpt", "ai"}
_USER = {"user", "human", "prompter"}
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking", "thought")


class TraceError(ValueError):
    pass


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        texts = [p for p in parts if isinstance(p, str)]
        return "\n".join(texts) if texts else None
    return None


def _turn(msg: dict) -> tuple[str | None, str | None, str | None]:
    """(role, text, reasoning) of one chat message (OpenAI or ShareGPT keys)."""
    role = msg.get("role", msg.get("from"))
    text = _text(msg.get("content", msg.get("value", msg.get("text"))))
    reasoning = next((msg[k] for k in _REASONING_KEYS if isinstance(msg.get(k), str) and msg[k].strip()), None)
    return (role.lower() if isinstance(role, str) else None), text, reasoning


def read_trace(value: Any, column: str) -> tuple[str | None, str | None, str | None]:
    """(answer text, reasoning, question) of a trace column's value: a string, an OpenAI message or a
    chat (list of messages). Raises TraceError naming what the value is when it is none of these."""
    if isinstance(value, str) or value is None:
        return value, None, None
    if isinstance(value, dict):
        _role, text, reasoning = _turn(value)
        if text is None and reasoning is None:
            raise TraceError(f"column {column!r} is an object without content/value/text: keys {sorted(value)[:6]}")
        return text, reasoning, None
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        turns = [_turn(m) for m in value]
        idx = [i for i, (role, _t, _r) in enumerate(turns) if role in _ASSISTANT]
        if not idx:
            roles = sorted({str(r) for r, _t, _r in turns})
            raise TraceError(f"column {column!r} is a chat with no assistant turn (roles {roles})")
        last = idx[-1]
        question = next((t for role, t, _r in reversed(turns[:last]) if role in _USER and t), None)
        return turns[last][1], turns[last][2], question
    raise TraceError(f"column {column!r} is a {type(value).__name__}, not a string, message or chat")


def read_choices(value: Any) -> list[tuple[str | None, str | None, str | None]] | None:
    """(text, reasoning, finish_reason) per choice of an OpenAI response (`{"choices": [{"message": …,
    "finish_reason": …}]}`, a chat or a completions response, or the `choices` list itself); None when
    the value is no such response."""
    choices = value.get("choices") if isinstance(value, dict) else value
    if not isinstance(choices, list) or not choices or not all(isinstance(ch, dict) for ch in choices):
        return None
    if not all("message" in ch or "delta" in ch or ("text" in ch and ("index" in ch or "finish_reason" in ch))
               for ch in choices):
        return None
    out = []
    for ch in choices:
        msg = ch.get("message", ch.get("delta"))
        if isinstance(msg, dict):
            _role, text, reasoning = _turn(msg)
        else:
            text, reasoning = _text(ch.get("text")), None
        finish = ch.get("finish_reason")
        out.append((text, reasoning, finish if isinstance(finish, str) else None))
    return out


def join_reasoning(text: str | None, reasoning: str | None) -> str | None:
    """`<think>reasoning</think>text` (the think format), or the text alone when there is no reasoning
    or the text carries its own think span."""
    if not reasoning or not reasoning.strip():
        return text
    text = text or ""
    if THINK_CLOSE in text:
        return text
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{text.strip()}" if text.strip() else f"{THINK_OPEN}\n{reasoning.strip()}"


def _problem(row: dict, cfg: ChainsSourceConfig, ref: str) -> dict:
    """A problems row through ingest's own normalisation, so problem ids agree with an ingest source."""
    from pipeline.ingest import ColumnMap, SourceConfig, to_problem

    c = cfg.columns
    cmap = ColumnMap(id=c.id, question=c.question, answer=c.answer, images=c.images, choices=c.choices,
                     answer_type=c.answer_type, subject=None, difficulty=None)
    src = SourceConfig(kind="jsonl", path=cfg.path, name=cfg.label(), columns=cmap)
    return to_problem(row, src, ref, Path(cfg.path).parent, cfg.image_check)


def _complete(sample: str) -> bool:
    split = split_chain(sample)
    return truncation(split, extract(split.response)) is None


def _samples(trace: str, cfg: ChainsSourceConfig) -> tuple[list[tuple[int, str]], int]:
    """((sample index, text) to keep, samples left out) of one row's trace."""
    pieces = split_samples(trace, cfg.sample_separator)
    if len(pieces) == 1 or cfg.samples == "each":
        return list(enumerate(pieces)), 0
    for i in range(len(pieces) - 1, -1, -1):
        if _complete(pieces[i]):
            return [(i, pieces[i])], len(pieces) - 1
    return [(len(pieces) - 1, pieces[-1])], len(pieces) - 1


def _choice_samples(texts: list[str], finishes: list[str | None], cfg: ChainsSourceConfig) -> tuple[list, int]:
    """((index, text, finish_reason) to keep, samples left out) of an API response's choices."""
    every = [(i, t, f) for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
    if len(every) == 1 or cfg.samples == "each":
        return every, 0
    complete = [x for x in every if x[2] != "length" and _complete(x[1])]
    return [complete[-1] if complete else every[-1]], len(every) - 1


def load_chains(cfg: ChainsSourceConfig) -> LoadedChains:
    """Chains and the problems they imply from an external file; bad rows are counted by reason."""
    from pipeline.ingest import RowError

    chains, problems, seen = [], {}, set()
    quarantined: dict[str, int] = {}
    bad_refs: list[str] = []
    loaded = LoadedChains(chains=None, problems=None, quarantined=quarantined, bad_refs=bad_refs)  # type: ignore[arg-type]

    def bad(reason: str, ref: str, msg: str) -> None:
        quarantined[reason] = quarantined.get(reason, 0) + 1
        bad_refs.append(msg if msg.startswith(f"{ref}:") else f"{ref}: {msg}")
        log.warning("external chains: %s (%s)", msg, reason)

    c = cfg.columns
    stats: dict = {}
    absent = 0  # rows without the trace column at all: every row so = a wrong column name, not bad rows
    for n, (ref, row) in enumerate(_rows(cfg, stats)):
        if cfg.limit and n >= cfg.limit:
            break
        if isinstance(row, ValueError):
            bad("bad_row", ref, str(row))
            continue
        absent += c.trace not in row
        choices = read_choices(row.get(c.trace))
        chat_question = None
        try:
            if choices is None:
                trace, reasoning, chat_question = read_trace(row.get(c.trace), c.trace)
                if c.reasoning:
                    extra, _r, _q = read_trace(row.get(c.reasoning), c.reasoning)
                    reasoning = reasoning or extra
        except TraceError as e:
            bad("bad_trace", ref, str(e))
            continue
        if choices is not None:  # an API response: every choice is a sample with its own finish reason
            texts = [join_reasoning(t, r) for t, r, _f in choices]
            texts = [t for t in texts if isinstance(t, str) and t.strip()]
            trace = "\n".join(texts)
        else:
            trace = join_reasoning(trace, reasoning)
        if not isinstance(trace, str) or not trace.strip():
            bad("missing_trace", ref, f"no trace in column {c.trace!r}")
            continue
        if chat_question and not isinstance(row.get(c.question), str):
            row = {**row, c.question: chat_question}  # ShareGPT: the question lives in the conversation
        try:
            prob = _problem(row, cfg, ref)
        except RowError as e:
            bad(e.reason, ref, e.error)
            continue
        problems.setdefault(prob["problem_id"], prob)
        tokens = row.get(c.completion_tokens) if c.completion_tokens else None
        finish = row.get(c.finish_reason) if c.finish_reason else None
        if choices is not None:
            finishes = [f or finish for t, r, f in choices if (join_reasoning(t, r) or "").strip()]
            kept, skipped = _choice_samples(texts, finishes, cfg)
        else:
            kept, skipped = _samples(trace, cfg)
            n = len(kept) + skipped
            # the row's generation facts describe its last sample (the one the budget cut)
            kept = [(i, t, finish if i == n - 1 else ("stop" if finish == "length" else finish)) for i, t in kept]
        n_pieces = len(kept) + skipped
        loaded.multi_sample_rows += n_pieces > 1
        loaded.samples_skipped += skipped
        added = 0
        for idx, completion, finish_i in kept:
            last = idx == n_pieces - 1
            chain_id = stable_hash("external", prob["problem_id"], trace, *([idx] if n_pieces > 1 else []))
            if chain_id in seen:
                bad("duplicate_chain", ref, "the same trace for the same problem appears twice")
                continue
            seen.add(chain_id)
            split = split_chain(completion)
            chains.append(
                {
                    "chain_id": chain_id,
                    "problem_id": prob["problem_id"],
                    "round": 0,
                    "teacher": str(row.get(c.teacher) if c.teacher and row.get(c.teacher) else cfg.teacher or cfg.label()),
                    "sample_idx": idx,
                    "prompt": None,
                    "completion": completion if n_pieces == 1 else completion.strip(),
                    "reasoning": split.reasoning,
                    "response": split.response,
                    "finish_reason": finish_i,
                    "completion_tokens": int(tokens) if isinstance(tokens, (int, float)) and n_pieces == 1 else None,
                    "sampling": {"max_tokens": cfg.max_tokens} if cfg.max_tokens and last else None,
                    "simulated": False,
                }
            )
            added += 1
        loaded.rows += added > 0
    if not chains and not quarantined:
        raise ValueError(f"filter.source.path: {cfg.path} holds no rows")
    n_rows = sum(quarantined.values()) + loaded.rows
    if not chains and absent and absent == n_rows:
        raise ValueError(f"filter.source.columns.trace: no row of {cfg.path} has a column {c.trace!r}")
    loaded.invalid_utf8_rows = stats.get("invalid_utf8_rows", 0)
    if loaded.invalid_utf8_rows:
        log.warning("external chains: %d lines of %s are not valid UTF-8 (read with U+FFFD): %s",
                    loaded.invalid_utf8_rows, cfg.path, ", ".join(stats["invalid_utf8_refs"][:5]))
    log.info("external chains: %d chains of %d problems from %s", len(chains), len(problems), cfg.path)
    loaded.chains = pa.Table.from_pylist(chains, schema=CHAINS)
    loaded.problems = pa.Table.from_pylist(list(problems.values()), schema=PROBLEMS)
    return loaded
