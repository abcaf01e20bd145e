"""Image-text pairs for alignment: image+caption or image+question+short-answer rows -> SFT samples.

    align:
      pairs:
        sources:
          - {kind: jsonl, path: captions.jsonl}          # {"image": "img/1.jpg", "caption": "a red bar chart ..."}
          - {kind: parquet, path: vqa/, columns: {question: q, answer: a}}
          - {kind: hf, path: pairs_saved/, split: train}  # datasets `save_to_disk`, an Image column
          - {kind: synthetic, synthetic: {n: 64, seed: 2}} # the generator's figures with their questions

The formats and readers are ingest's (pipeline.ingest: JSONL with image paths relative to the file, Parquet
files or directories, HF datasets saved to disk, the synthetic generator); images are read and checked
the same way and stored as bytes. A row becomes one SFT sample (pipeline.schema.SFT) that trainers.data
consumes as it is: the user turn is one `<image>` line per image, then the question (VQA rows) or
`caption_prompt` (caption rows); the assistant turn is the caption or the short answer, with no think span.
A row with text in the caption column is a caption row, else a VQA row (question + answer columns).

Bad rows never stop the run: each goes to `<step>/quarantine/` with its file and line and is counted in the
manifest by reason: `missing_image` (no image value, a file that is not there), `unreadable_image` (bytes
that are no image, a truncated file), `empty_caption` / `empty_answer` (no target text), `bad_json`,
`bad_row`; exact duplicates (same image bytes, prompt and target) are dropped as `duplicate`. The step
runs in the plan as `align-data` (stage `pairs`, configured by `align.pairs`; pipeline/plan.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.ingest import (
    _READERS,
    ROW_GROUP_BYTES,
    IngestError,
    RowError,
    SourceBase,
    _load_images,
    _quarantine_row,
    normalise_answer,
    normalise_choices,
    write_sorted,
)
from pipeline.ingest import fingerprint_extra as _source_stamps
from pipeline.rundir import Manifest, ShardWriter, stable_hash
from pipeline.schema import QUARANTINE, SFT

log = logging.getLogger(__name__)

TABLES = ("sft", "quarantine")
IMAGE_PLACEHOLDER = "<image>"
_BATCH_ROWS = 32


class PairColumns(StageConfig):
    """Names of the source's columns (JSONL keys / Parquet / HF columns); None = the source has no such column."""

    id: str | None = Field("id", description="source row id, kept in the quarantine reference (optional)")
    images: str = Field("image", description="image path(s) relative to the file, bytes, or an HF Image")
    caption: str | None = Field("caption", description="the caption (the assistant answer of a caption row)")
    question: str | None = Field("question", description="VQA: the question (the user turn)")
    answer: str | None = Field("answer", description="VQA: the short answer (the assistant answer)")
    choices: str | None = Field(None, description="VQA: option texts, listed after the question as (A) ... (optional)")


# The synthetic generator's rows: its figures with their questions and gold answers (VQA pairs).
_SYNTHETIC_COLUMNS = PairColumns(images="images", caption=None, question="question", answer="answer", choices="choices")


class PairSourceConfig(SourceBase):
    columns: PairColumns = Field(default_factory=PairColumns)

    def column_map(self) -> PairColumns:
        return _SYNTHETIC_COLUMNS if self.kind == "synthetic" else self.columns


class PairsConfig(StageConfig):
    """Alignment pairs (section `align.pairs`)."""

    sources: list[PairSourceConfig] = Field(min_length=1, description="pair sources, read in order")
    limit: int | None = Field(None, ge=1, description="stop after this many rows in total")
    caption_prompt: str = Field(
        "Describe the image briefly.", description="the user turn of a caption row (after its image lines)"
    )
    dedupe: bool = Field(True, description="drop exact duplicates (same images, prompt and answer)")
    image_check: Literal["structure", "draft", "full"] = Field(
        "structure", description="how images are checked (pipeline.images.image_record), as in ingest"
    )
    rows_per_shard: int = Field(5000, ge=1)


def fingerprint_extra(cfg: PairsConfig) -> dict:
    """Stamps of exactly the files read (each source file and every image file its rows name), as ingest."""
    return _source_stamps(cfg)


def preflight(cfg: PairsConfig, key: str = "align.pairs") -> list[str]:
    problems = []
    for i, s in enumerate(cfg.sources):
        where = f"{key}.sources.{i}"
        if s.kind == "synthetic":
            if s.path:
                problems.append(f"{where}.path: synthetic sources take no path (got {s.path!r})")
        elif not s.path:
            problems.append(f"{where}.path: required for kind {s.kind!r}")
        elif not Path(s.path).exists():
            problems.append(f"{where}.path: file not found: {s.path}")
    return problems


def _text(row: dict, key: str | None) -> str | None:
    if not key:
        return None
    v = row.get(key)
    if isinstance(v, (list, tuple)):  # several reference captions / answers: the first non-empty one
        v = next((x for x in v if isinstance(x, str) and x.strip()), None)
    if v is None or isinstance(v, (dict, bytes, bytearray)):
        return None
    s = str(v).strip()
    return s or None


def to_pair(row: dict, src: PairSourceConfig, ref: str, base: Path | None, check: str = "structure",
            caption_prompt: str = "Describe the image briefly.") -> dict:
    """One source row as an SFT row (messages [user, assistant]); raises RowError with the drop reason."""
    from filters.curate import user_turn

    c = src.column_map()
    value = row.get(c.images)
    if value is None or (isinstance(value, (str, bytes, bytearray, list, tuple)) and len(value) == 0):
        raise RowError("missing_image", f"{ref}: no image in column {c.images!r}")
    try:
        images = _load_images(value, base, ref, check)
    except RowError as e:
        if e.reason == "corrupt_image":
            raise RowError("unreadable_image", e.error) from e
        raise
    if not images:
        raise RowError("missing_image", f"{ref}: no image in column {c.images!r}")
    caption, question = _text(row, c.caption), _text(row, c.question)
    if caption is not None:
        kind, prompt, target = "caption", question or caption_prompt, caption
    elif question is not None:
        kind, prompt, target = "vqa", question, normalise_answer(_text(row, c.answer))
        if target is None:
            raise RowError("empty_answer", f"{ref}: question without an answer in column {c.answer!r}")
    else:
        cols = " or ".join(repr(k) for k in (c.caption, c.answer if c.question else None) if k)
        raise RowError("empty_caption", f"{ref}: no caption text in column {cols or '(none configured)'}")
    choices = normalise_choices(row.get(c.choices)) if kind == "vqa" and c.choices else None
    user = user_turn({"question": prompt, "images": images, "choices": choices})
    sid = stable_hash(user, [stable_hash(im["bytes"]) for im in images], target)
    return {
        "sample_id": sid,
        "problem_id": sid,
        "chain_id": None,
        "round": 0,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": target}],
        "images": images,
        "quality": None,
        "_kind": kind,
    }


def load_pairs(cfg: PairsConfig) -> Iterator[tuple[str, str, dict]]:
    """Yield (kind, source label, row) for every row read: kind "pair" (an SFT row), "quarantine" (a
    QUARANTINE row) or "duplicate". Raises IngestError at once for a missing file."""
    seen: set[str] = set()
    total = 0
    for i, src in enumerate(cfg.sources):
        if src.kind != "synthetic" and (not src.path or not Path(src.path).exists()):
            raise IngestError(f"align.pairs.sources.{i}.path: file not found: {src.path}")
        p = Path(src.path) if src.path else None
        base = (p.parent if p.is_file() else p) if p else None
        label, n_src = src.label(), 0
        for ref, raw in _READERS[src.kind](src):
            if (src.limit and n_src >= src.limit) or (cfg.limit and total >= cfg.limit):
                break
            n_src += 1
            total += 1
            try:
                if isinstance(raw, RowError):
                    raise raw
                pair = to_pair(raw, src, ref, base, cfg.image_check, cfg.caption_prompt)
            except RowError as bad:
                yield "quarantine", label, _quarantine_row(src, ref, bad, None if isinstance(raw, RowError) else raw)
                continue
            except Exception as e:  # noqa: BLE001 - one malformed row is quarantined, never the end of the run
                bad = RowError("bad_row", f"{ref}: {type(e).__name__}: {e}")
                yield "quarantine", label, _quarantine_row(src, ref, bad, raw if isinstance(raw, dict) else None)
                continue
            if cfg.dedupe and pair["sample_id"] in seen:
                yield "duplicate", label, pair
                continue
            seen.add(pair["sample_id"])
            yield "pair", label, pair


def run(cfg: PairsConfig, ctx) -> Manifest:
    problems = preflight(cfg)
    if problems:
        raise IngestError("; ".join(problems))
    m = ctx.manifest()
    per_source: dict[str, dict[str, int]] = {}
    kinds = {"caption": 0, "vqa": 0}
    out = ShardWriter(ctx.out_dir, SFT, "sft", rows_per_shard=cfg.rows_per_shard, resume=False,
                      row_group_bytes=ROW_GROUP_BYTES)

    def counted():
        for kind, label, row in load_pairs(cfg):
            if kind == "pair":
                kinds[row.pop("_kind")] += 1
            yield kind, label, row

    with out, ctx.writer(QUARANTINE, "quarantine", sub="quarantine") as quar:
        write_sorted(counted(), "pair", "align-data", out, quar, m, per_source)
    m.outputs = {"sft": m.kept, "quarantine": sum(m.quarantined.values())}
    m.metrics.update({"per_source": per_source, "caption_rows": kinds["caption"], "vqa_rows": kinds["vqa"]})
    if m.kept == 0:
        raise IngestError(
            f"align-data: none of the {m.rows_in} rows read is a usable pair (quarantined: {m.quarantined}, "
            f"dropped: {m.dropped}); see {ctx.out_dir / 'quarantine'}"
        )
    log.info("align-data: %d pairs (%d caption, %d VQA) of %d rows", m.kept, kinds["caption"], kinds["vqa"],
             m.rows_in)
    return m


__all__ = ["PairColumns", "PairSourceConfig", "PairsConfig", "TABLES", "fingerprint_extra", "load_pairs",
           "preflight", "run", "to_pair"]
