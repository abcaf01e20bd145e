"""Redundancy and length scores of one chain, and the quality score that combines them with correctness.

Scores (all computed on the whole chain text: reasoning + response):

- `ngram_repetition`: share of word n-grams (n = `ngram_n`) that already occurred earlier in the chain.
- `compression_ratio`: raw bytes / zlib-compressed bytes (higher = more repetitive; ordinary long
  reasoning sits around 3-5, runaway loops above 10).
- `repeated_paragraph_frac`: share of paragraphs (>= `paragraph_min_chars`) that repeat an earlier one.
- `loop_detected`: the chain ends in a block repeated `loop_min_repeats` times back to back, or most of
  its paragraphs are repeats. A loop that also hit the length limit is still dropped as `truncated`
  (drop reasons are checked in order), but keeps `loop_detected=True` for reports.
- `reflection_density`: reflection markers ("wait", "alternatively", "let me double-check", ...; the list
  is config) per 1000 words.
- `language_mixing`: share of letters outside the chain's dominant script (Latin, CJK, Cyrillic, ...).
- `length_ratio`: completion tokens / the problem's token budget (`max_tokens` from assess, else the
  sampling max_tokens, else `default_budget`). Chains without a token count use chars / `chars_per_token`.

Quality on the 0-5 scale the iterative-SFT thresholds (tau = 2, 3, 4, 5) use:

    quality = 5 * [verdict == correct] * p(ngram) * p(compression) * p(reflection) * p(length) * p(mixing)

where each penalty p(x) = 1 for x <= soft, falls linearly to 0 at the hard limit, and is 0 beyond it
(soft/hard limits are config). So only a correct chain with every score under its soft limit gets 5,
and a chain past any hard limit gets 0 and is dropped with that reason.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

from pydantic import Field

from pipeline.config import StageConfig

DEFAULT_REFLECTION_MARKERS = [
    "wait",
    "alternatively",
    "let me double-check",
    "let me double check",
    "let me check",
    "let me verify",
    "let me re-examine",
    "let me reconsider",
    "hmm",
    "on second thought",
    "perhaps i made a mistake",
]


class Limits(StageConfig):
    soft: float = Field(description="at or below: no penalty")
    hard: float = Field(description="at or above: penalty 0 and the chain is dropped")


class RedundancyConfig(StageConfig):
    ngram_n: int = Field(10, ge=2, description="word n-gram size of ngram_repetition")
    ngram: Limits = Field(default_factory=lambda: Limits(soft=0.2, hard=0.5))
    compression: Limits = Field(default_factory=lambda: Limits(soft=5.0, hard=10.0))
    reflection: Limits = Field(
        default_factory=lambda: Limits(soft=15.0, hard=45.0), description="reflection markers per 1000 words"
    )
    length: Limits = Field(
        default_factory=lambda: Limits(soft=0.75, hard=1.0001), description="length_ratio; over hard = over_budget"
    )
    mixing: Limits = Field(default_factory=lambda: Limits(soft=0.02, hard=0.15), description="language_mixing")
    reflection_markers: list[str] = Field(default_factory=lambda: list(DEFAULT_REFLECTION_MARKERS))
    paragraph_min_chars: int = Field(30, ge=1, description="shorter paragraphs are ignored by loop detection")
    loop_paragraph_frac: float = Field(0.5, gt=0, le=1, description="repeated-paragraph share that counts as a loop")
    loop_min_paragraphs: int = Field(8, ge=2, description="paragraphs needed before the share test applies")
    loop_min_period: int = Field(20, ge=4, description="shortest repeated block (chars) at the end of a chain")
    loop_max_period: int = Field(4000, ge=20, description="longest repeated block (chars) searched for")
    loop_min_repeats: int = Field(3, ge=2, description="back-to-back copies of the block that make a loop")
    default_budget: int = Field(16384, ge=1, description="token budget when neither problem nor sampling has one")
    chars_per_token: float = Field(3.6, gt=0, description="token estimate for chains without a token count")


def ngram_repetition(words: list[str], n: int) -> float:
    if len(words) <= n:
        return 0.0
    hashes = [hash(w) for w in words]
    grams = [hash(tuple(hashes[i : i + n])) for i in range(len(hashes) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8", errors="replace")
    if not raw:
        return 0.0
    return len(raw) / len(zlib.compress(raw, 6))


def repeated_paragraphs(text: str, min_chars: int) -> tuple[float, int]:
    """(share of paragraphs that repeat an earlier one, number of paragraphs considered)."""
    paras = [" ".join(p.split()).lower() for p in text.splitlines()]
    paras = [p for p in paras if len(p) >= min_chars]
    if not paras:
        return 0.0, 0
    counts = Counter(paras)
    return sum(c - 1 for c in counts.values()) / len(paras), len(paras)


def tail_period(text: str, min_period: int, max_period: int, repeats: int) -> int:
    """Length of a block repeated `repeats` times back to back at the end of `text`, or 0.

    Candidate periods come from earlier occurrences of the last `min_period` characters (rfind), so the
    cost is a handful of slice comparisons, not a scan over every period.
    """
    t = text.rstrip()
    tail = t[-(repeats * max_period) :]
    n = len(tail)
    if n < repeats * min_period:
        return 0
    key = tail[-min_period:]
    pos = tail.rfind(key, 0, n - 1)
    while pos >= 0:
        p = n - min_period - pos
        if p * repeats > n or p > max_period:
            return 0
        if p >= min_period:
            block = tail[n - p :]
            if all(tail[n - (k + 1) * p : n - k * p] == block for k in range(1, repeats)):
                return p
        pos = tail.rfind(key, 0, pos + min_period - 1)
    return 0


_SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
    "devanagari": re.compile(r"[\u0900-\u097f]"),
    "thai": re.compile(r"[\u0e00-\u0e7f]"),
    "hebrew": re.compile(r"[\u0590-\u05ff]"),
}

_NON_LATIN = re.compile("|".join(rx.pattern for k, rx in _SCRIPTS.items() if k != "latin"))


def language_mixing(text: str) -> float:
    """Share of letters outside the dominant script (Greek is left out: it is math notation here)."""
    if text.isascii() or not _NON_LATIN.search(text):
        return 0.0  # the common case, decided without counting every letter
    counts = {k: len(rx.findall(text)) for k, rx in _SCRIPTS.items()}
    total = sum(counts.values())
    return 0.0 if total == 0 else 1.0 - max(counts.values()) / total


def penalty(x: float | None, lim: Limits) -> float:
    if x is None or x <= lim.soft:
        return 1.0
    if x >= lim.hard:
        return 0.0
    return 1.0 - (x - lim.soft) / (lim.hard - lim.soft)


class Scorer:
    """Scores chains; built once per actor (compiles the reflection-marker pattern)."""

    def __init__(self, cfg: RedundancyConfig) -> None:
        self.cfg = cfg
        words = sorted((m.strip().lower() for m in cfg.reflection_markers if m.strip()), key=len, reverse=True)
        body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words) or r"(?!x)x"
        self._reflect = re.compile(rf"\b(?:{body})\b", re.IGNORECASE)

    def score(self, text: str, tokens: int | None, budget: int | None) -> dict:
        c = self.cfg
        words = text.split()
        frac, n_paras = repeated_paragraphs(text, c.paragraph_min_chars)
        period = tail_period(text, c.loop_min_period, c.loop_max_period, c.loop_min_repeats)
        loop = period > 0 or (n_paras >= c.loop_min_paragraphs and frac >= c.loop_paragraph_frac)
        if tokens is None or tokens <= 0:
            tokens = int(round(len(text) / c.chars_per_token))
        budget = budget if budget and budget > 0 else c.default_budget
        return {
            "ngram_repetition": ngram_repetition(words, c.ngram_n),
            "compression_ratio": compression_ratio(text),
            "repeated_paragraph_frac": frac,
            "loop_period": period,
            "loop_detected": bool(loop),
            "reflection_density": 1000.0 * len(self._reflect.findall(text)) / max(1, len(words)),
            "language_mixing": language_mixing(text),
            "length_ratio": tokens / budget,
        }

    def quality(self, correct: bool, s: dict) -> float:
        c = self.cfg
        if not correct:
            return 0.0
        q = 5.0
        q *= penalty(s["ngram_repetition"], c.ngram)
        q *= penalty(s["compression_ratio"], c.compression)
        q *= penalty(s["reflection_density"], c.reflection)
        q *= penalty(s["length_ratio"], c.length)
        q *= penalty(s["language_mixing"], c.mixing)
        return round(q, 4)

    def failing(self, s: dict) -> str | None:
        """The first redundancy/length drop reason that applies, in a fixed order, or None."""
        c = self.cfg
        if s["loop_detected"]:
            return "looping"
        if s["length_ratio"] >= c.length.hard:
            return "over_budget"
        if (
            s["ngram_repetition"] >= c.ngram.hard
            or s["compression_ratio"] >= c.compression.hard
            or s["reflection_density"] >= c.reflection.hard
        ):
            return "redundant"
        if s["language_mixing"] >= c.mixing.hard:
            return "language_mixing"
        return None
