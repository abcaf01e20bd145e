"""Stage `decontaminate`: drop problems whose text overlaps an evaluation set, before any generation.

    r1v run configs/demo.yaml --stage decontaminate

Every eval question and every problem is normalised (lowercase, LaTeX commands and image tags removed,
punctuation to spaces, whitespace collapsed) and cut into word n-grams (n=8 by default: long enough that
shared boilerplate such as "what is the value of" does not match, short enough to catch a reworded
copy). A problem is contaminated when the share of n-grams it has in common with one eval item,
`|A & B| / min(|A|, |B|)`, reaches `threshold`: dividing by the smaller set catches an eval question
embedded in a longer problem as well as the reverse.

Short texts need care: a question of k < n words has no n-gram. When k >= `min_words` it is compared as
one k-gram (so it matches when it appears verbatim, after normalisation, inside an eval item); below
`min_words` only an exact match of the whole normalised text counts, because a 3-word question such as
"find the area" is not evidence of anything.

Visual problems need more than text: "How many squares are in the picture?" over two different figures
is two different problems. With `image_aware` (default), when both the problem and the eval item carry
images, a text match counts only if some pair of their images also matches. By default
(`image_match: perceptual`) figures match by a 256-bit perceptual hash (DCT of a 64x64 grey thumbnail,
the 16x16 lowest frequencies against their median) within `image_hash_distance` bits, so a re-compressed,
resized or re-encoded copy of an eval figure is caught. Measured on MATH-V testmini's 304 figures: a JPEG
re-encoding moves the hash by at most 8 bits, a WebP one by at most 20, an upscaled copy by at most 10,
a half-size JPEG copy 99% within 14 (the worst, a thin-line drawing, 38), while the closest two different
figures are 30 bits apart; hence the default 24. `image_match: exact` compares decoded pixels instead (any lossless re-encoding matches, nothing else).
Eval sets given as JSONL/Parquet paths carry no images, so text decides alone for them; give an
ingest-style `source` to compare images.

Dropped rows are counted as `contaminated` in the manifest; which eval item each one matched (set, id,
overlap) is written to the secondary table `<step>/matches/`.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipeline.config import StageConfig
from pipeline.ingest import SourceConfig
from pipeline.rundir import Manifest

log = logging.getLogger(__name__)

TABLES = ("problems", "decontam_matches")
ROWS_FROM = "problems"
LOGIC_VERSION = 2  # 2: figures matched by perceptual hash

MATCHES = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("eval_set", pa.string(), nullable=False),
        pa.field("eval_id", pa.string()),
        pa.field("overlap", pa.float64()),
        pa.field("eval_question", pa.string()),
        pa.field("question", pa.string()),
    ]
)


class EvalSetConfig(StageConfig):
    """One evaluation set to protect: a JSONL/Parquet file with a question column, or an ingest source."""

    path: str | None = Field(None, description="JSONL (.jsonl/.json) or Parquet (.parquet, or a directory of shards)")
    source: SourceConfig | None = Field(
        None, description="an ingest-style source instead of `path` (images included, so figures are compared)"
    )
    name: str | None = Field(None, description="label in the matches table (default: the file name)")
    question_column: str = Field("question", description="column/key holding the question text (with `path`)")
    id_column: str | None = Field(None, description="column/key holding the item id (default: the row index)")

    @model_validator(mode="after")
    def _one_of(self) -> EvalSetConfig:
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of `path` or `source`")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).name if self.path else self.source.label()


class MatchConfig(StageConfig):
    """How a problem is matched against an evaluation item (shared by this stage and evaluate's held-out check)."""

    ngram: int = Field(8, ge=2, le=50, description="word n-gram length used for overlap")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="drop when |shared n-grams| / min(|A|,|B|) reaches this value"
    )
    min_words: int = Field(
        5, ge=1, description="questions shorter than `ngram` words but at least this long match as one verbatim k-gram"
    )
    image_aware: bool = Field(
        True, description="when both sides have images, a text match also needs a matching image"
    )
    image_match: Literal["exact", "perceptual"] = Field(
        "perceptual",
        description="perceptual: 256-bit DCT hash within image_hash_distance (catches resized, re-compressed "
        "and re-encoded copies); exact: the same decoded pixels only",
    )
    image_hash_distance: int = Field(
        24, ge=0, le=256, description="perceptual mode: max Hamming distance (of 256 bits) between two figures' hashes"
    )


class DecontaminateConfig(MatchConfig):
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="evaluation sets whose questions must not appear in the training pool"
    )

    @field_validator("eval_sets")
    @classmethod
    def _unique_labels(cls, v: list[EvalSetConfig]) -> list[EvalSetConfig]:
        labels = [e.label() for e in v]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"eval set names must be unique, repeated: {sorted(dup)}")
        return v


def fingerprint_extra(cfg: DecontaminateConfig) -> dict:
    """Eval files live outside the run directory: their stamps (path, size, mtime_ns) join the fingerprint."""
    from pipeline.paths import file_stat

    out = {}
    for e in cfg.eval_sets:
        if e.path is None:
            from pipeline.ingest import fingerprint_extra as source_stats

            out[e.label()] = source_stats(SimpleNamespace(sources=[e.source]))
            continue
        p = Path(e.path)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        out[e.label()] = [file_stat(f) for f in files if f.exists()]
    return out


_LATEX_CMD = re.compile(r"\\[a-zA-Z]+")
_IMAGE_TAG = re.compile(r"<image\s*\d*>", re.IGNORECASE)
_NON_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)


def normalize(text: str | None) -> list[str]:
    """Words of `text` after lowercasing and removing LaTeX commands, image tags and punctuation.

    `\\frac{1}{2}` becomes `1 2` and `$x^2$` becomes `x 2`: the digits and variables stay, so two copies
    of one problem typeset differently still share their n-grams.
    """
    if not text:
        return []
    t = _IMAGE_TAG.sub(" ", text.lower())
    t = _LATEX_CMD.sub(" ", t)
    t = _NON_WORD.sub(" ", t)
    return t.split()


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class EvalIndex:
    """Inverted index eval n-gram -> eval items, built once, queried per problem (plain Python, no Ray).

    Indexes for shorter k-grams (for short problems) are built lazily, one per k actually needed.
    """

    def __init__(self, items: list[tuple], n: int, min_words: int) -> None:
        self.items = items  # (eval_set, eval_id, question[, image hashes])
        self.n = n
        self.min_words = min_words
        self.words = [normalize(it[2]) for it in items]
        self.exact_all: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(self.words):
            self.exact_all[" ".join(w)].append(i)
        self._index: dict[int, dict[tuple[str, ...], list[int]]] = {}
        self._sizes: dict[int, list[int]] = {}

    def _grams(self, k: int) -> tuple[dict[tuple[str, ...], list[int]], list[int]]:
        if k not in self._index:
            index: dict[tuple[str, ...], list[int]] = defaultdict(list)
            sizes = []
            for i, w in enumerate(self.words):
                g = ngrams(w, k)
                sizes.append(len(g))
                for gram in g:
                    index[gram].append(i)
            self._index[k], self._sizes[k] = index, sizes
        return self._index[k], self._sizes[k]

    def matches(self, question: str, threshold: float) -> list[tuple[int, float]]:
        """(eval item index, overlap) of every eval item with overlap >= threshold, best first."""
        words = normalize(question)
        if not words:
            return []
        out: dict[int, float] = {}
        for i in self.exact_all.get(" ".join(words), ()):
            out[i] = 1.0
        if len(words) >= self.min_words:
            k = min(self.n, len(words))
            index, sizes = self._grams(k)
            grams = ngrams(words, k)
            counts: dict[int, int] = defaultdict(int)
            for g in grams:
                for i in index.get(g, ()):
                    counts[i] += 1
            for i, c in counts.items():
                out[i] = max(out.get(i, 0.0), c / max(1, min(len(grams), sizes[i])))
        # Ties go to the lowest eval index so the recorded match is deterministic.
        return sorted(((i, v) for i, v in out.items() if v >= threshold), key=lambda t: (-t[1], t[0]))

    def best_match(self, question: str) -> tuple[int, float] | None:
        """(eval item index, overlap) of the closest eval item, or None when nothing overlaps."""
        found = self.matches(question, 1e-12)
        return found[0] if found else None


_HASH_SIDE, _HASH_FREQS = 64, 16


def _dct_matrix(n: int) -> Any:
    import numpy as np

    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = None


def perceptual_hash(record: dict[str, Any]) -> int:
    """256-bit perceptual hash: 2-D DCT of a 64x64 grey thumbnail; one bit per coefficient of the 16x16
    lowest frequencies, set when it is above their median (the DC term left out of the median).

    The low frequencies carry the figure's layout, not its pixels, so resizing, JPEG re-compression and
    re-encoding move only a few bits (the pHash construction, with a larger thumbnail than the usual
    32x32 so that figures drawn from one template still differ).
    """
    global _DCT
    import numpy as np
    from PIL import Image

    if _DCT is None:
        _DCT = _dct_matrix(_HASH_SIDE)
    with Image.open(io.BytesIO(record["bytes"])) as im:
        g = im.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    px = np.asarray(g, dtype=np.float64)
    coeffs = (_DCT @ px @ _DCT.T)[:_HASH_FREQS, :_HASH_FREQS].ravel()
    bits = coeffs > np.median(coeffs[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pixel_hash(record: dict[str, Any]) -> int:
    """Hash of the decoded RGB pixels and size: the same figure re-saved in any lossless format matches."""
    import hashlib

    from PIL import Image

    with Image.open(io.BytesIO(record["bytes"])) as im:
        rgb = im.convert("RGB")
        h = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes())
    return int.from_bytes(h.digest()[:8], "big")


def image_hashes(images: list[dict] | None, mode: str) -> list[int]:
    """Hashes of the images that decode; an unreadable one is skipped (assess quarantines it later)."""
    fn = pixel_hash if mode == "exact" else perceptual_hash
    out = []
    for rec in images or []:
        try:
            out.append(fn(rec))
        except (OSError, ValueError, SyntaxError):  # what PIL raises for bad data
            continue
    return out


def images_match(a: list[int], b: list[int], cfg: MatchConfig) -> bool:
    if cfg.image_match == "exact":
        return bool(set(a) & set(b))
    return any(hash_distance(x, y) <= cfg.image_hash_distance for x in a for y in b)


def _read_rows(e: EvalSetConfig) -> list[dict]:
    p = Path(e.path)
    if not p.exists():
        raise FileNotFoundError(f"decontaminate.eval_sets: {p} not found")
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with open(p) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({err})") from err
        return rows
    import pyarrow.parquet as pq

    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def load_eval_items(
    sets: list[EvalSetConfig], image_mode: str | None = "exact"
) -> tuple[list[tuple[str, str, str, list[int]]], int]:
    """((set label, item id, question, image hashes) of every eval item, rows skipped as unreadable).

    Raises naming the file, row or column when an eval set cannot be read at all.
    """
    items: list[tuple[str, str, str, list[int]]] = []
    skipped = 0
    for e in sets:
        if e.source is not None:
            from pipeline.ingest import load_sources

            for kind, row in load_sources([e.source]):
                if kind == "quarantine":
                    skipped += 1
                    log.warning("decontaminate: eval set %s: unreadable row %s skipped (%s)",
                                e.label(), row.get("source_ref"), row.get("error"))
                if kind == "problem":
                    hashes = image_hashes(row.get("images"), image_mode) if image_mode else []
                    items.append((e.label(), str(row.get("source_ref") or row["problem_id"]), row["question"], hashes))
            continue
        for i, row in enumerate(_read_rows(e)):
            if e.question_column not in row:
                raise KeyError(f"{e.path}: row {i} has no column {e.question_column!r} (has {sorted(row)[:10]})")
            q = row[e.question_column]
            if q is None:
                continue
            rid = str(row.get(e.id_column)) if e.id_column else str(i)
            items.append((e.label(), rid, str(q), []))
    return items, skipped


def _contaminating(index: EvalIndex, question: str, images: list | None, cfg: MatchConfig):
    """The best eval match that counts (text overlap, and an image match where both sides have images)."""
    found = index.matches(question, cfg.threshold)
    if not found or not cfg.image_aware:
        return found[0] if found else None
    mine: list[int] | None = None
    for i, overlap in found:
        theirs = index.items[i][3]
        if not theirs or not images:
            return i, overlap
        if mine is None:
            mine = image_hashes(images, cfg.image_match)
        if not mine or images_match(mine, theirs, cfg):
            return i, overlap
    return None


def contaminated_items(items: list[tuple], pool: Any, cfg: MatchConfig) -> dict[int, tuple[str, float]]:
    """The eval items some pool problem contaminates, by this stage's rule (a pool problem matching an
    item: text overlap, and an image match where both sides have images): {item index: (problem_id,
    overlap)} with the best match per item. `items` as load_eval_items gives them (hashes computed with
    `cfg.image_match`); `pool` a table with problem_id, question and (optionally) images. Images of the
    pool are decoded only for problems whose text matches."""
    if not items:
        return {}
    index = EvalIndex(items, cfg.ngram, cfg.min_words)
    ids = pool.column("problem_id").to_pylist()
    questions = pool.column("question").to_pylist()
    has_images = "images" in pool.column_names
    hits: dict[int, tuple[str, float]] = {}
    for row, (pid, q) in enumerate(zip(ids, questions, strict=True)):
        found = index.matches(q, cfg.threshold)
        if not found:
            continue
        mine: list[int] | None = None
        for i, overlap in found:
            theirs = index.items[i][3]
            if cfg.image_aware and theirs and has_images:
                if mine is None:
                    mine = image_hashes(pool.column("images")[row].as_py(), cfg.image_match)
                if mine and not images_match(mine, theirs, cfg):
                    continue
            if i not in hits or overlap > hits[i][1]:
                hits[i] = (pid, overlap)
    return hits


def run(cfg: DecontaminateConfig, ctx) -> Manifest:
    m = ctx.manifest()
    problems = ctx.read_input("problems")
    m.rows_in = problems.num_rows
    items, skipped = load_eval_items(cfg.eval_sets, cfg.image_match if cfg.image_aware else None)
    index = EvalIndex(items, cfg.ngram, cfg.min_words)
    questions = problems.column("question").to_pylist()
    ids = problems.column("problem_id").to_pylist()
    images = problems.column("images").to_pylist() if "images" in problems.column_names else [None] * len(ids)
    keep_mask, matches = [], []
    per_set: dict[str, int] = defaultdict(int)
    for pid, q, imgs in zip(ids, questions, images, strict=True):
        hit = _contaminating(index, q, imgs, cfg) if items else None
        keep_mask.append(hit is None)
        if hit is not None:
            i, overlap = hit
            per_set[items[i][0]] += 1
            matches.append(
                {
                    "problem_id": pid,
                    "eval_set": items[i][0],
                    "eval_id": items[i][1],
                    "overlap": round(overlap, 6),
                    "eval_question": items[i][2][:500],
                    "question": (q or "")[:500],
                }
            )
    kept = problems.filter(pa.array(keep_mask, pa.bool_()))
    with ctx.writer(problems.schema.remove_metadata(), "problems") as w:
        w.write(kept)
    with ctx.writer(MATCHES, "decontam_matches", sub="matches") as w:
        w.write(matches)
    m.kept = kept.num_rows
    if matches:
        m.drop("contaminated", len(matches))
    m.outputs = {"problems": kept.num_rows, "matches": len(matches)}
    m.metrics = {"eval_items": len(items), "eval_rows_unreadable": skipped, "contaminated_by_set": dict(per_set)}
    log.info("decontaminate: %d eval items, %d of %d problems contaminated", len(items), len(matches), m.rows_in)
    return m
