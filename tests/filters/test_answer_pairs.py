"""The answer-pair table (tests/filters/answer_pairs.py) through the real checks, and against bare
math-verify on the same pairs: we agree with the expected verdicts wherever math-verify does, and more."""

from __future__ import annotations

from collections import Counter

import pytest

from filters.verify import check_answer
from pipeline.ingest import infer_answer_type
from tests.filters.answer_pairs import PAIRS

OPTS = {"float_rounding": 6, "percent_either_way": True}


def _type(gold: str, atype: str, choices) -> str:
    return infer_answer_type(gold, choices) if atype == "auto" else atype


def bare_math_verify(pred: str, gold: str) -> str:
    """What math-verify alone says: both sides wrapped in `$…$`, parse, verify(gold, pred)."""
    from math_verify import parse, verify

    g = parse(f"${gold}$", parsing_timeout=None)
    if not g:
        return "gold_unparsable"
    p = parse(f"${pred}$", parsing_timeout=None)
    return "correct" if p and verify(g, p, timeout_seconds=None) else "wrong"


def test_the_table_is_large_and_covers_every_verdict():
    assert len(PAIRS) >= 250
    assert len({(p, g, t) for p, g, t, _c, _e in PAIRS}) == len(PAIRS), "duplicate pairs"
    assert set(Counter(e for *_x, e in PAIRS)) == {"correct", "wrong", "gold_unparsable"}


@pytest.mark.parametrize(("pred", "gold", "atype", "choices", "expected"), PAIRS)
def test_answer_pair(pred, gold, atype, choices, expected):
    verdict, detail = check_answer(pred, gold, _type(gold, atype, choices), choices, OPTS)[:2]
    assert verdict == expected, f"{pred!r} vs gold {gold!r} ({_type(gold, atype, choices)}): {verdict} ({detail})"


def agreement() -> dict:
    """Share of pairs where ours / bare math-verify give the expected verdict (gold_unparsable counts as
    a match for bare math-verify only when it cannot parse the gold)."""
    ours = bare = 0
    for pred, gold, atype, choices, expected in PAIRS:
        v = check_answer(pred, gold, _type(gold, atype, choices), choices, OPTS)[0]
        ours += v == expected
        bare += bare_math_verify(pred, gold) == expected
    return {"pairs": len(PAIRS), "ours": ours / len(PAIRS), "bare_math_verify": bare / len(PAIRS)}


def test_never_below_math_verify_on_the_table():
    missed = []
    for pred, gold, atype, choices, expected in PAIRS:
        if bare_math_verify(pred, gold) == expected:
            v = check_answer(pred, gold, _type(gold, atype, choices), choices, OPTS)[0]
            if v != expected:
                missed.append((pred, gold, v))
    assert missed == []
    a = agreement()
    assert a["ours"] == 1.0 and a["bare_math_verify"] < 0.9, a
