"""Regression tables for four verifier defects: unit stripping, relation unions, bare "answer", dead idle workers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from filters.deadline import DeadlinePool
from filters.extract import extract_answer
from filters.verify import check_answer, verify_response

OPTS = {"float_rounding": 6, "percent_either_way": True}
UNION = "(-\\infty,2)\\cup(3,\\infty)"


# 1. a trailing unit is stripped, a trailing second number / conjunction / variable is not
@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("5 and 6", "5", False),
        ("2 or 3", "2", False),
        ("2 to 3", "2", False),
        ("3 hours 20 minutes", "3", False),
        ("3x", "3", False),
        ("5 cm", "5", True),
        ("5cm", "5", True),
        ("12 dollars", "12", True),
        ("30 degrees", "30", True),
        ("3 hours", "3", True),
        ("5 m^2", "5", True),
        ("5.8 \\text{ cm}", "5.8", True),
        ("1e5", "100000", True),
    ],
)
def test_number_tail_is_stripped_only_when_it_is_a_unit(pred, gold, ok):
    verdict, detail = check_answer(pred, gold, "number", None, OPTS)
    if ok:
        assert verdict == "correct", f"{pred!r} vs {gold!r}: {verdict} ({detail})"
    else:
        assert verdict in ("wrong", "no_answer"), f"{pred!r} vs {gold!r}: {verdict} ({detail})"


# 2. "x<2 or x>3" is the union of its relations' sets
@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("x<2 or x>3", UNION, "correct"),
        ("x<2 \\text{ or } x>3", UNION, "correct"),
        ("x>3 \\text{ or } x<2", UNION, "correct"),
        ("x<2 or x>4", UNION, "wrong"),
        ("x \\leq 2 or x>3", UNION, "wrong"),
        ("x<2 or y>3", UNION, "wrong"),
        ("x>2", "(2,\\infty)", "correct"),
    ],
)
def test_relations_joined_by_or_are_a_union(pred, gold, expected):
    verdict, detail = check_answer(pred, gold, "interval", None, OPTS)
    assert verdict == expected, f"{pred!r} vs {gold!r}: {verdict} ({detail})"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("<think>x</think>The answer is $\\boxed{x<2 \\text{ or } x>3}$.", "correct"),
        ("<think>x</think>\\boxed{x<2 or x>3}", "correct"),
        ("<think>x</think>\\boxed{x<1 or x>3}", "wrong"),
    ],
)
def test_verify_response_relation_union(text, verdict):
    r = verify_response(text, {"answer": UNION, "answer_type": "interval"})
    assert r.verdict == verdict, r.detail


# 3. a bare "answer" is a marker only with is / : / =
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 5.\nThis answer makes sense.", "5"),
        ("Answer: 3\nNo other answer fits the data.", "3"),
        ("So the answer = 9\nThat answer checks out", "9"),
        ("**Answer:** 7\nI verified this answer twice", "7"),
        ("The final answer is 42.", "42"),
        ("Final answer 8", "8"),
        ("This answer makes sense.", None),
    ],
)
def test_bare_answer_word_is_not_a_marker(response, expected):
    assert extract_answer(response) == expected


# 4. a worker that died while idle is replaced; the next map still returns every result
def _ready_pool(workers: int) -> DeadlinePool:
    pool = DeadlinePool("operator:mul", workers=workers, timeout_s=10.0)
    deadline = time.monotonic() + 60
    while not all(w.ready for w in pool._workers):  # ready messages are read during map()
        assert time.monotonic() < deadline, "workers did not start"
        assert pool.map([(1, 1)])[0].value == 1
        time.sleep(0.01)
    return pool


@pytest.mark.parametrize(
    ("workers", "kill", "n_tasks"),
    [
        (1, 0, 3),  # the task is sent to the dead worker (broken pipe)
        (2, 0, 4),  # same, another live worker takes the requeued task
        (2, 1, 1),  # the dead idle worker's EOF is read while another works (no task to fail)
    ],
)
def test_idle_worker_death_does_not_break_the_pool(workers, kill, n_tasks):
    pool = _ready_pool(workers)
    try:
        first = pool.map([(i, 2) for i in range(n_tasks)])
        assert [o.value for o in first] == [2 * i for i in range(n_tasks)]
        victim = pool._workers[kill].proc
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        outs = pool.map([(i, 3) for i in range(n_tasks)])
        assert all(o.ok for o in outs), [o.error for o in outs]
        assert [o.value for o in outs] == [3 * i for i in range(n_tasks)]
        assert pool.replaced == 1
    finally:
        pool.close()
