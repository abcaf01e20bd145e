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

Dropped rows are counted as `contaminated` in the manifest; which eval item each one matched (set, id,
overlap) is written to the secondary table `<step>/matches/`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
from pydantic import Field, field_validator

from pipeline.config import StageConfig
from pipeline.rundir import Manifest
from pipeline.schema import PROBLEMS

log = logging.getLogger(__name__)

TABLES = ("problems", "decontam_matches")

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
    """One evaluation set to protect: a JSONL or Parquet file with a question column."""

    path: str = Field(description="JSONL (.jsonl/.json) or Parquet (.parquet, or a directory of shards) file")
    name: str | None = Field(None, description="label in the matches table (default: the file name)")
    question_column: str = Field("question", description="column/key holding the question text")
    id_column: str | None = Field(None, description="column/key holding the item id (default: the row index)")

    def label(self) -> str:
        return self.name or Path(self.path).name


class DecontaminateConfig(StageConfig):
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="evaluation sets whose questions must not appear in the training pool"
    )
    ngram: int = Field(8, ge=2, le=50, description="word n-gram length used for overlap")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="drop when |shared n-grams| / min(|A|,|B|) reaches this value"
    )
    min_words: int = Field(
        5, ge=1, description="questions shorter than `ngram` words but at least this long match as one verbatim k-gram"
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
    """Eval files live outside the run directory: their size and mtime join the fingerprint."""
    out = {}
    for e in cfg.eval_sets:
        p = Path(e.path)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        out[e.label()] = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.exists()]
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

    def __init__(self, items: list[tuple[str, str, str]], n: int, min_words: int) -> None:
        self.items = items  # (eval_set, eval_id, question)
        self.n = n
        self.min_words = min_words
        self.words = [normalize(q) for _, _, q in items]
        self.exact: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self.exact.setdefault(" ".join(w), i)
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

    def best_match(self, question: str) -> tuple[int, float] | None:
        """(eval item index, overlap) of the closest eval item, or None when nothing overlaps."""
        words = normalize(question)
        if not words:
            return None
        hit = self.exact.get(" ".join(words))
        if hit is not None:
            return hit, 1.0
        if len(words) < self.min_words:
            return None
        k = min(self.n, len(words))
        index, sizes = self._grams(k)
        grams = ngrams(words, k)
        counts: dict[int, int] = defaultdict(int)
        for g in grams:
            for i in index.get(g, ()):
                counts[i] += 1
        if not counts:
            return None
        # Ties go to the lowest eval index so the recorded match is deterministic.
        best_i, best = min(
            ((i, c / max(1, min(len(grams), sizes[i]))) for i, c in counts.items()), key=lambda t: (-t[1], t[0])
        )
        return best_i, best


def load_eval_items(sets: list[EvalSetConfig]) -> list[tuple[str, str, str]]:
    """(set label, item id, question) of every eval item; raises naming the file, row or column."""
    items: list[tuple[str, str, str]] = []
    for e in sets:
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
        else:
            import pyarrow.parquet as pq

            files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
            rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
        for i, row in enumerate(rows):
            if e.question_column not in row:
                raise KeyError(f"{p}: row {i} has no column {e.question_column!r} (has {sorted(row)[:10]})")
            q = row[e.question_column]
            if q is None:
                continue
            rid = str(row.get(e.id_column)) if e.id_column else str(i)
            items.append((e.label(), rid, str(q)))
    return items


def run(cfg: DecontaminateConfig, ctx) -> Manifest:
    m = ctx.manifest()
    problems = ctx.read_input("problems")
    m.rows_in = problems.num_rows
    items = load_eval_items(cfg.eval_sets)
    index = EvalIndex(items, cfg.ngram, cfg.min_words)
    questions = problems.column("question").to_pylist()
    ids = problems.column("problem_id").to_pylist()
    keep_mask, matches = [], []
    per_set: dict[str, int] = defaultdict(int)
    for pid, q in zip(ids, questions, strict=True):
        hit = index.best_match(q) if items else None
        bad = hit is not None and hit[1] >= cfg.threshold
        keep_mask.append(not bad)
        if bad:
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
    schema = problems.schema.remove_metadata() if "problem_id" in problems.column_names else PROBLEMS
    with ctx.writer(schema, "problems") as w:
        w.write(kept)
    with ctx.writer(MATCHES, "decontam_matches", sub="matches") as w:
        w.write(matches)
    m.kept = kept.num_rows
    if matches:
        m.drop("contaminated", len(matches))
    m.outputs = {"problems": kept.num_rows, "matches": len(matches)}
    m.metrics = {"eval_items": len(items), "contaminated_by_set": dict(per_set)}
    log.info("decontaminate: %d eval items, %d of %d problems contaminated", len(items), len(matches), m.rows_in)
    return m
