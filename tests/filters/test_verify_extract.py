"""Answer extraction and chain splitting (filters/extract.py): literal inputs, exact outputs."""

from __future__ import annotations

import pytest

from filters.extract import choice_letter, clean_answer, extract_answer, find_boxed, split_chain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5} and later \\boxed{\\frac{1}{2}}", ["5", "\\frac{1}{2}"]),
        ("\\boxed{\\{1, \\{2\\}\\}}", ["\\{1, \\{2\\}\\}"]),
        ("\\boxed {x^{2}}", ["x^{2}"]),
        ("\\boxed 7.", ["7"]),
        ("\\fbox{B}", ["B"]),
        ("unbalanced \\boxed{1 + {2} then text", []),
        ("no box here", []),
    ],
)
def test_find_boxed(text, expected):
    assert find_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "atype", "expected"),
    [
        ("First \\boxed{3}, no wait: the answer is \\boxed{4}.", None, "4"),
        ("The answer is 12. That settles it.", None, "12"),
        ("So the final answer is $6.17\\%$.", None, "6.17\\%"),
        ("**Answer:** The coefficient is 384", None, "384"),
        ("**Answer:** \\(\\boxed{-\\dfrac{5}{12}}\\)", None, "-\\dfrac{5}{12}"),
        ("Final Answer: 2.5", None, "2.5"),
        ("<answer> (2, 3) </answer>", None, "(2, 3)"),
        ("Comparing all options...\n(C)", "choice", "C"),
        ("I am not sure what it is.", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(response, atype, expected):
    assert extract_answer(response, atype) == expected


def test_extract_looks_only_at_the_tail_for_markers():
    long = "the answer is 1\n" + "filler text. " * 2000 + "\nthe answer is 2"
    assert extract_answer(long) == "2"


@pytest.mark.parametrize(
    ("s", "expected"),
    [("B", "B"), ("(B)", "B"), ("B.", "B"), ("b)", "B"), ("B) 12", "B"), ("option C", "C"), ("\\text{(D)}", "D"),
     ("12", None), ("Because", None), ("F", None)],
)
def test_choice_letter(s, expected):
    assert choice_letter(s, n_choices=5) == expected


def test_clean_answer_strips_delimiters_and_bold():
    assert clean_answer("$\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert clean_answer("**73**") == "73"
    assert clean_answer("\\(x+1\\)") == "x+1"


def test_split_r1_formats():
    s = split_chain("<think>reason</think>\nanswer")
    assert (s.reasoning, s.response, s.fmt, s.closed) == ("reason", "answer", "think", True)
    s = split_chain("reason without opening tag</think>answer")  # the template opened <think>
    assert (s.reasoning, s.response, s.closed) == ("reason without opening tag", "answer", True)
    s = split_chain("reasoning that was cut off", starts_in_think=True)
    assert (s.response, s.closed) == ("", False)
    s = split_chain("<think>cut off")
    assert (s.reasoning, s.closed) == ("cut off", False)
    s = split_chain("a plain answer: 4")
    assert (s.fmt, s.response, s.closed) == ("plain", "a plain answer: 4", True)


def test_split_sky_t1_format():
    text = "<|begin_of_thought|> think <|end_of_thought|>\n<|begin_of_solution|> sol \\boxed{3} <|end_of_solution|>"
    s = split_chain(text)
    assert (s.reasoning, s.response, s.fmt, s.closed) == ("think", "sol \\boxed{3}", "sky", True)
    s = split_chain("<|begin_of_thought|> thinking forever")
    assert (s.fmt, s.closed, s.response) == ("sky", False, "")
    # a solution block without its end marker is open; only a cut text makes it truncated
    s = split_chain("<|begin_of_thought|> t <|end_of_thought|><|begin_of_solution|> half a solution")
    assert (s.closed, s.solution_open, s.response) == (True, True, "half a solution")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("So the solutions are $x = 2$ or $x = -3$.", "2, -3"),
        ("Thus $x=1$, $x=2$, and $x=5$.", "1, 2, 5"),
        ("Hence \\(t = 0\\) or \\(t = 4\\).", "0, 4"),
        # two unknowns are no alternatives: the last assignment stands, as a plain last-sentence answer
        ("Thus $a = 1$ and $b = 2$.", "b = 2"),
        ("Then $x = 2$.", "x = 2"),
    ],
)
def test_last_sentence_alternatives_of_one_variable_are_one_answer(response, expected):
    assert extract_answer(response) == expected
