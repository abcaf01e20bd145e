"""Redundancy and length scores, loop detection and the quality formula (filters/redundancy.py)."""

from __future__ import annotations

import random

import pytest

from filters.redundancy import (
    Limits,
    RedundancyConfig,
    Scorer,
    compression_ratio,
    language_mixing,
    ngram_repetition,
    penalty,
    repeated_paragraphs,
    tail_period,
)

WORDS = ("angle triangle side length area ratio sum term root factor prime digit square circle radius chord "
         "tangent slope line point vertex edge face volume height base median mean mode count choose order").split()


def prose(n_words: int, seed: int = 0) -> str:
    """Varied text: random words in sentences, no loops."""
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(WORDS) + str(rng.randint(0, 99)))
        if i % 12 == 11:
            out.append(" ".join(line) + ".")
            line = []
    return "\n".join(out)


LOOP = "Wait, perhaps I made a mistake in the count. Let me recount the pairs from the start.\n"


def test_ngram_repetition_counts_repeated_ngrams():
    assert ngram_repetition("a b c d e f".split(), 2) == 0.0
    assert ngram_repetition(("x y " * 50).split(), 2) == pytest.approx(1 - 2 / 99)
    assert ngram_repetition(["a"], 3) == 0.0


def test_compression_ratio_is_high_for_repeats():
    assert compression_ratio(LOOP * 200) > 20
    assert compression_ratio(prose(2000)) < 5
    assert compression_ratio("") == 0.0


def test_tail_period_finds_the_repeated_block():
    text = prose(300) + "\n" + LOOP * 5
    assert tail_period(text, 20, 4000, 3) == len(LOOP)
    # cut mid-block (as a length limit does): still periodic
    assert tail_period(text[:-17], 20, 4000, 3) == len(LOOP)
    assert tail_period(prose(3000), 20, 4000, 3) == 0
    assert tail_period(prose(300) + LOOP * 2, 20, 4000, 3) == 0  # two copies are not a loop


def test_repeated_paragraphs():
    frac, n = repeated_paragraphs(LOOP * 9 + "something else entirely, long enough to count\n", 30)
    assert n == 10 and frac == pytest.approx(0.8)


def test_language_mixing():
    assert language_mixing("plain English with math π ≈ 3.14") == 0.0
    assert language_mixing("全部都是中文的句子") == 0.0
    mixed = language_mixing("the area is 12 所以答案是十二 and we are done")
    assert 0.1 < mixed < 0.5


def test_penalty_ramp():
    lim = Limits(soft=1.0, hard=3.0)
    assert [penalty(x, lim) for x in (0.5, 1.0, 2.0, 3.0, 9.0)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert penalty(None, lim) == 1.0


def test_scorer_flags_loops_and_keeps_clean_chains():
    s = Scorer(RedundancyConfig())
    clean = s.score(prose(3000), None, None)
    assert not clean["loop_detected"] and s.failing(clean) is None
    assert s.quality(True, clean) == 5.0
    assert s.quality(False, clean) == 0.0
    looped = s.score(prose(500) + "\n" + LOOP * 60, None, None)
    assert looped["loop_detected"] and s.failing(looped) == "looping"
    assert s.quality(True, looped) < 1.0


def test_loop_by_repeated_paragraphs_without_an_exact_tail():
    # the same paragraphs recur, interleaved with fresh ones, so the tail is not exactly periodic
    paras = [prose(20, seed=i) for i in range(5)]
    text = "\n".join(paras[i % 5] + f" step {i}" if i % 7 == 0 else paras[i % 5] for i in range(60))
    s = Scorer(RedundancyConfig())
    assert s.score(text, None, None)["loop_detected"]


def test_reflection_density_uses_the_configured_markers():
    text = prose(1000) + " wait, alternatively, let me double-check this. Hmm."
    default = Scorer(RedundancyConfig()).score(text, None, None)["reflection_density"]
    assert default == pytest.approx(4000 / len(text.split()))
    only_wait = Scorer(RedundancyConfig(reflection_markers=["wait"])).score(text, None, None)
    assert only_wait["reflection_density"] == pytest.approx(1000 / len(text.split()))


def test_length_ratio_uses_tokens_or_an_estimate_and_the_budget():
    s = Scorer(RedundancyConfig(default_budget=1000, chars_per_token=4.0))
    assert s.score("x" * 400, 500, 2000)["length_ratio"] == 0.25
    assert s.score("x" * 400, None, None)["length_ratio"] == pytest.approx(0.1)
    over = s.score(prose(100), 1200, 1000)
    assert s.failing(over) == "over_budget" and s.quality(True, over) == 0.0
    near = s.score(prose(100), 875, 1000)  # halfway between soft 0.75 and hard 1.0
    assert s.quality(True, near) == pytest.approx(2.5, abs=0.01)


def test_language_mixing_drop():
    s = Scorer(RedundancyConfig())
    rng = random.Random(1)
    hanzi = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(300))
    text = prose(300) + "\n" + hanzi
    sc = s.score(text, None, None)
    assert s.failing(sc) == "language_mixing"
