"""Table-driven verifier tests: literal (prediction, gold, answer_type) pairs through the real math-verify."""

from __future__ import annotations

import threading
import time

import pytest

from filters.verify import VERIFIERS, VerifyConfig, check_answer, verify_response

OPTS = {"float_rounding": 6, "percent_either_way": True}
ABC = ["10", "12", "14"]
FG = ["$f(x)=-g(x)+2$", "$f(x)=-g(x)-2$", "$f(x)=-g(x+2)$", "$f(x+2)=-g(x)$", "$f(x+1)=-g(x-1)$"]
COS = ["$\\cos \\beta+\\tg \\beta$", "$\\frac{1}{\\cos (2 \\beta)}$", "$\\cos ^{2} \\beta$", "$\\cos (2 \\beta)$",
       "$\\frac{1}{\\cos ^{2} \\beta}$"]

# (prediction, gold, answer_type, choices, expected verdict)
CASES = [
    # numbers: fractions, decimals, currency, percent, units, degrees, thousands separators
    ("\\frac{1}{2}", "0.5", "number", None, "correct"),
    ("-\\dfrac{1}{4027}", "-\\frac{1} { 4027}", "number", None, "correct"),
    ("\\$10", "10", "number", None, "correct"),
    ("10", "\\$10", "number", None, "correct"),
    ("\\$10.00", "10", "number", None, "correct"),
    ("$50", "50", "number", None, "correct"),
    ("11", "\\$10", "number", None, "wrong"),
    ("6.17\\%", "6.17", "number", None, "correct"),
    ("0.5", "50\\%", "number", None, "correct"),
    ("6.07", "6.17", "number", None, "wrong"),
    ("45^\\circ", "45", "number", None, "correct"),
    ("45°", "45", "number", None, "correct"),
    ("5.8 \\text{ cm}", "5.8", "number", None, "correct"),
    ("5.8 cm", "5.8", "number", None, "correct"),
    ("1,000", "1000", "number", None, "correct"),
    ("1e5", "100000", "number", None, "correct"),
    ("1e5", "1", "number", None, "wrong"),
    ("1{,}000", "1000", "number", None, "correct"),
    ("r = 6.17", "6.17", "number", None, "correct"),
    ("2\\sqrt{2}", "\\sqrt{8}", "number", None, "correct"),
    ("banana", "3", "number", None, "wrong"),
    # expressions and equations (whole equations, not right-hand sides)
    ("1+x^2", "x^2+1", "expression", None, "correct"),
    ("\\frac{x^2-1}{x-1}", "x+1", "expression", None, "correct"),
    ("x^2", "x^3", "expression", None, "wrong"),
    ("2x-y+1=0", "y=2x+1", "expression", None, "correct"),
    ("y=3x+1", "y=2x+1", "expression", None, "wrong"),
    ("z=2x+1", "y=2x+1", "expression", None, "wrong"),
    ("y=2", "x=2", "expression", None, "wrong"),
    ("2", "x=2", "expression", None, "correct"),
    # intervals: relations and interval notation are the same set; a set of endpoints is not
    ("x>2", "(2,\\infty)", "interval", None, "correct"),
    ("(2,\\infty)", "x>2", "interval", None, "correct"),
    ("x \\geq 2", "(2,\\infty)", "interval", None, "wrong"),
    ("[1,2)", "[1,2)", "interval", None, "correct"),
    ("(1,2]", "[1,2)", "interval", None, "wrong"),
    ("\\{1,2\\}", "(1,2)", "interval", None, "wrong"),
    ("(-\\infty,0)\\cup(1,\\infty)", "(-\\infty,0)\\cup(1,\\infty)", "interval", None, "correct"),
    # sets: exact, unordered; a subset or superset is wrong
    ("\\{2,1\\}", "\\{1,2\\}", "set", None, "correct"),
    ("2, 1", "\\{1,2\\}", "set", None, "correct"),
    ("x=2 \\text{ or } x=1", "\\{1,2\\}", "set", None, "correct"),
    ("\\{1,2,3\\}", "\\{1,2\\}", "set", None, "wrong"),
    ("1", "\\{1,2\\}", "set", None, "wrong"),
    ("\\{1,1\\}", "\\{1,2\\}", "set", None, "wrong"),
    # tuples: ordered
    ("(1,2,3)", "(1,2,3)", "tuple", None, "correct"),
    ("1, 2, 3", "(1,2,3)", "tuple", None, "correct"),
    ("(3,2,1)", "(1,2,3)", "tuple", None, "wrong"),
    ("3, 2, 1", "1, 2, 3", "tuple", None, "wrong"),
    ("(1,2)", "(1,2,3)", "tuple", None, "wrong"),
    ("(\\frac{1}{2}, -3)", "(0.5, -3)", "tuple", None, "correct"),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "matrix", None, "correct"),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "matrix", None, "correct"),
    ("\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "matrix", None, "wrong"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "matrix", None, "wrong"),
    # multiple choice: letter forms, option text, an equal value, another option
    ("B", "B", "choice", ABC, "correct"),
    ("(B)", "B", "choice", ABC, "correct"),
    ("B.", "B", "choice", ABC, "correct"),
    ("B) 12", "B", "choice", ABC, "correct"),
    ("\\text{(B)}", "B", "choice", ABC, "correct"),
    ("12", "B", "choice", ABC, "correct"),
    ("\\frac{24}{2}", "B", "choice", ABC, "correct"),
    ("14", "B", "choice", ABC, "wrong"),
    ("C", "B", "choice", ABC, "wrong"),
    ("13", "B", "choice", ABC, "wrong"),
    # option texts that differ only in brackets or exponents (MATH-V): loose text matching would merge them
    ("$f(x)=-g(x+2)$", "C", "choice", FG, "correct"),
    ("f(x) = -g(x) + 2", "C", "choice", FG, "wrong"),
    ("\\frac{1}{\\cos ^{2} \\beta}", "E", "choice", COS, "correct"),
    # a bare letter gold, without option texts and with another answer_type
    ("B", "B", None, None, "correct"),
    ("(B)", "B", "text", None, "correct"),
    ("C", "B", "text", None, "wrong"),
    # text
    ("\\text{East}", "east", "text", None, "correct"),
    ("the north pole", "North Pole", "text", None, "correct"),
    ("south", "north", "text", None, "wrong"),
    # a gold that cannot be checked is kept apart from a wrong chain
    ("\\frac{1}{2}", "???", "number", None, "gold_unparsable"),
    ("A", "Z", "choice", ABC, "gold_unparsable"),
]


@pytest.mark.parametrize(("pred", "gold", "atype", "choices", "expected"), CASES)
def test_answer_pairs(pred, gold, atype, choices, expected):
    verdict, detail = check_answer(pred, gold, atype, choices, OPTS)
    assert verdict == expected, f"{pred!r} vs gold {gold!r} ({atype}): {verdict} ({detail})"


def test_every_answer_type_has_a_verifier_and_cases():
    assert set(VERIFIERS) == {"number", "expression", "interval", "set", "tuple", "matrix", "choice", "text"}
    covered = {c[2] for c in CASES}
    assert set(VERIFIERS) <= covered


@pytest.mark.parametrize(
    ("pred", "gold", "atype"),
    [
        ("\\$10", "10", "number"),  # currency does not parse
        ("B", "B", "choice"),  # a bare letter needs string extraction
        ("\\boxed{3, 2, 1}", "\\boxed{1, 2, 3}", "tuple"),  # a bare list parses to a set: order lost
        ("$x>2$", "$(2,\\infty)$", "interval"),  # relation vs interval is never compared
    ],
)
def test_raw_math_verify_gets_these_wrong_and_we_do_not(pred, gold, atype):
    from math_verify import parse, verify

    raw = verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None)
    expected = "wrong" if atype == "tuple" else "correct"
    ours, _ = check_answer(pred.strip("$"), gold.strip("$"), atype, None, OPTS)
    assert ours == expected
    assert raw != (expected == "correct"), "raw math-verify now agrees: the wrapper may be redundant"


@pytest.mark.parametrize(
    ("text", "problem", "verdict", "pred"),
    [
        ("<think>so 1/2</think>The answer is $\\boxed{\\frac{1}{2}}$.", {"answer": "0.5", "answer_type": "number"},
         "correct", "\\frac{1}{2}"),
        ("<|begin_of_thought|>hmm<|end_of_thought|><|begin_of_solution|>\\boxed{7}<|end_of_solution|>",
         {"answer": "6", "answer_type": "number"}, "wrong", "7"),
        ("<think>still thinking about it", {"answer": "6", "answer_type": "number"}, "truncated", None),
        ("<|begin_of_thought|>cut off here", {"answer": "6", "answer_type": "number"}, "truncated", None),
        ("<think>done</think>I could not finish.", {"answer": "6", "answer_type": "number"}, "no_answer", None),
        ("<think>x</think>**Answer:** (B)", {"answer": "B", "answer_type": "choice", "choices": ABC}, "correct", "(B)"),
        ("<think>x</think>\\boxed{5}", {"answer": "???", "answer_type": "number"}, "gold_unparsable", "5"),
    ],
)
def test_verify_response(text, problem, verdict, pred):
    r = verify_response(text, problem)
    assert (r.verdict, r.pred_answer) == (verdict, pred), r.detail


def tower(chars: int = 10_000) -> str:
    """Nested exponent towers: sympy tries to evaluate 9^(9^(9^(9^9))) and never finishes."""
    one = "9^{9^{9^{9^{9}}}}"
    return "+".join([one] * (chars // (len(one) + 1) + 1))


def test_adversarial_answer_times_out_off_the_main_thread():
    """The deadline holds from a non-main thread (no signal.alarm), and the next check works at once."""
    cfg = VerifyConfig(timeout_s=1.5)
    answer = tower()
    assert len(answer) >= 9_900
    results = {}

    def worker():
        # the first call starts the shared pool's worker; the deadline is measured on the second
        results["warm"] = verify_response("<think>x</think>\\boxed{2}", {"answer": "2", "answer_type": "number"}, cfg)
        t0 = time.monotonic()
        results["bad"] = verify_response(f"<think>x</think>\\boxed{{{answer}}}", {"answer": "1", "answer_type": "number"}, cfg)
        results["bad_s"] = time.monotonic() - t0
        results["good"] = verify_response("<think>x</think>\\boxed{3}", {"answer": "3", "answer_type": "number"}, cfg)

    th = threading.Thread(target=worker)
    th.start()
    th.join(timeout=60)
    assert not th.is_alive()
    assert results["warm"].verdict == "correct"
    assert results["bad"].verdict == "timeout"
    assert results["bad_s"] < cfg.timeout_s + 1.0
    assert results["good"].verdict == "correct"
