"""Traces in the shapes other teams hand over (tests/filters/trace_variants.py): OpenAI / ShareGPT chat
records, reasoning in its own field, other think markers, answer styles (Final answer:, **Answer:**, a
JSON tail, full-width digits, \\text{} boxes, ...), multiple choice answered by letter or by option text,
gold answers in other datasets' spellings. Each class goes the user's way in (filter.source ->
filters.external.load_chains -> the filter's score_batch); every row must get its true verdict, none may be
lost or quarantined, and the filter must agree with the truth at least as often as bare math-verify."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from filters.deadline import DeadlinePool
from filters.external import ChainsSourceConfig, load_chains
from filters.filter import FilterConfig, _problem_columns, score_batch
from filters.verify import check_answer
from tests.filters.trace_variants import (
    bare_math_verify,
    clean_traces,
    matches,
    trace_classes,
    variant_classes,
)

COLUMNS = {"question": "problem", "answer": "gold_answer", "trace": "trace", "id": "id", "teacher": "model"}


def _score(path, columns, pool, cfg) -> tuple[list[dict], object]:
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=columns))
    problems = {p["problem_id"]: p for p in loaded.problems.to_pylist()}
    rows = _problem_columns(loaded.chains, problems).to_pylist()
    return score_batch(rows, cfg, pool), loaded


@pytest.fixture(scope="module")
def scored(traces_path, shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    cfg = FilterConfig(workers=0)
    traces = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
    mv = shared_data / "mathv-testmini" / "testmini.jsonl"
    mathv = [json.loads(line) for line in mv.read_text().splitlines() if line.strip()] if mv.exists() else None
    out = {}
    with DeadlinePool(check_answer, timeout_s=cfg.verify.timeout_s) as pool:
        orig, _ = _score(traces_path, COLUMNS, pool, cfg)
        clean = clean_traces(traces, [r["verdict"] for r in orig])
        for name, v in variant_classes(clean, mathv).items():
            p = tmp / f"{name.replace(':', '_')}.jsonl"
            p.write_text("\n".join(json.dumps(r) for r in v.records) + "\n")
            rows, loaded = _score(p, v.columns, pool, cfg)
            out[name] = (v, rows, loaded)
    return clean, out


CLASSES = sorted(trace_classes([]))  # the traces-dev classes (MATH-V ones are added when the data is there)


def test_the_truth_set_is_large(scored):
    clean, out = scored
    assert len(clean) >= 120
    assert Counter(c["_truth"] for c in clean)["wrong"] >= 25
    assert len(out) >= len(CLASSES)


@pytest.mark.parametrize("name", CLASSES + ["gold:forms", "choice:*", "mathv:free_form_boxed"])
def test_every_row_gets_its_true_verdict(scored, name):
    _clean, out = scored
    names = [n for n in out if n.startswith(name[:-1])] if name.endswith("*") else [name]
    if not names or names[0] not in out:
        pytest.skip("mathv-testmini not found")
    for n in names:
        v, rows, loaded = out[n]
        # nothing lost: every record is one chain, none quarantined, and the rows keep their order
        assert loaded.quarantined == {} and len(rows) == len(v.records), (n, loaded.bad_refs[:3])
        got = [r["verdict"] for r in rows]
        diff = [(rec["id"], t, g, r["pred_answer"]) for rec, t, g, r in zip(v.records, v.truth, got, rows, strict=True)
                if not matches(g, t)]
        assert diff == [], (n, diff[:5])
        # keep follows the verdict: a wrong or truncated chain is dropped with its reason counted
        for t, r in zip(v.truth, rows, strict=True):
            if t != "correct":
                assert not r["keep"] and r["drop_reason"] in ("wrong", "truncated", "no_answer"), (n, r["chain_id"])


@pytest.mark.parametrize("name", [c for c in CLASSES if c.startswith(("marker:", "record:"))])
def test_reasoning_is_split_off_for_curate(scored, name):
    """Other markers and chat records become think chains with the trace's own reasoning (curate drops a
    chain without reasoning, so a missed split would lose every row at curation)."""
    clean, out = scored
    v, rows, _ = out[name]
    assert {r["trace_format"] for r in rows} == {"think"}
    for c, r in zip(clean, rows, strict=True):
        assert r["reasoning"] == c["_r"].strip() and r["response"] == c["_a"].strip()


def test_never_below_bare_math_verify(scored):
    """Per class, the filter's verdicts match the truth (correct or not) at least as often as bare
    math-verify's (`parse(gold)`, `parse(text)`, `verify`) on the same text."""
    _clean, out = scored
    worse = {}
    for n, (v, rows, _) in out.items():
        ours = sum((r["verdict"] == "correct") == (t == "correct") for r, t in zip(rows, v.truth, strict=True))
        bare = sum((bare_math_verify(g, x) == "correct") == (t == "correct")
                   for g, x, t in zip(v.golds, v.bare_text, v.truth, strict=True))
        if ours < bare:
            worse[n] = (ours, bare, len(rows))
    assert worse == {}


@pytest.mark.parametrize(
    ("response", "atype", "choices", "answer", "source"),
    [
        ('Done.\n\n{"answer": "-\\\\dfrac{5}{12}"}', None, None, "-\\dfrac{5}{12}", "answer_tag"),
        ('Done.\n```json\n{"answer": [2, 3]}\n```', None, None, "2, 3", "answer_tag"),
        ('Result:\n{"answer": "12", "explanation": "we add the two numbers, then double the sum and check it twice"}',
         None, None, "12", "answer_tag"),
        ('{"answer": 12} was my first guess, but the rest of this paragraph goes on to change it entirely.', None,
         None, None, None),
        ("Thus, the final answer is:\n\nFinal answer: 7", None, None, "7", "final_answer"),
        ("The answer is in the form \\(\\frac{m}{n}\\). So m + n = 13.\n\nTherefore, the result is 13.", None, None,
         "13", "last_sentence"),
        ("答案：１２", None, None, "12", "answer_tag"),
        ("So the value is −3.", None, None, "-3", "last_sentence"),
        ("First $\\boxed{71}$. Checking again, that was a slip.\n\nFinal answer: 7", None, None, "7", "final_answer"),
        ("So $\\boxed{7}$.\n\nFinal Answer: The final answer is $7$. I hope it is correct.", None, None, "7",
         "final_answer"),
        ("The correct option is either $R$ or $S$, but no others.", "choice",
         ["only $Q$", "only $R$", "either $R$ or $S$, but no others"], "either $R$ or $S$, but no others", "option_text"),
        ("I compared them all.\nIt is only $R$ here.", "choice", ["only $Q$", "only $R$", "only $S$"], "only $R$",
         "option_text"),
        ("Both only $Q$ and only $R$ fit.", "choice", ["only $Q$", "only $R$"], None, None),
    ],
)
def test_extraction_of_other_answer_styles(response, atype, choices, answer, source):
    from filters.extract import extract

    found = extract(response, atype, None, choices)
    assert (found.answer if found else None, found.source if found else None) == (answer, source)


@pytest.mark.parametrize(
    ("pred", "gold", "verdict"),
    [("\\text{-\\dfrac{1}{4}}", "-\\frac{1}{4}", "correct"), ("\\text{45^\\circ}", "45", "correct"),
     ("３", "3", "correct"), ("3{,}5", "3.5", "correct"), ("1{,}000", "1000", "correct"), ("3{,}4", "3.5", "wrong"),
     ("12", "１２", "correct"), ("\\text{Yes}", "yes", "correct")],
)
def test_answer_forms(pred, gold, verdict):
    from pipeline.ingest import infer_answer_type

    opts = {"float_rounding": 6, "percent_either_way": True}
    assert check_answer(pred, gold, infer_answer_type(gold, None), None, opts)[0] == verdict


C = ["12 cm", "15 cm", "18 cm", "20 cm", "24 cm"]
# whole chains through verify_response: (text, gold, choices, verdict)
OTHER_ANSWERS = [
 ("<think>x</think>The answer is (C) 18 cm.", "C", C, "correct"),
 ("<think>x</think>C: 18 cm", "C", C, "correct"),
 ("<think>x</think>answer: c", "C", C, "correct"),
 ("<think>x</think>答案是 C", "C", C, "correct"),
 ("<think>x</think>故选C。", "C", C, "correct"),
 ("<think>x</think>Therefore the answer is **(C)**.", "C", C, "correct"),
 ("<think>x</think>The answer is 18 cm.", "C", C, "correct"),
 ("<think>x</think>The answer is 18.", "C", C, "correct"),
 ("<think>x</think>The answer is (B) 18 cm.", "C", C, "wrong"),
 ("<think>x</think>So x = 5", "5", None, "correct"),
 ("<think>x</think>So the probability is 0.25.", "25\\%", None, "correct"),
 ("<think>x</think>\\boxed{\\dfrac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}", None, "correct"),
 ("<think>x</think>\\boxed{East}", "\\text{east}", None, "correct"),
 ("<think>x</think>\\boxed{x \\in [1, 3]}", "[1,3]", None, "correct"),
 ("<think>x</think>\\boxed{1, 2, 3}", "\\{1,2,3\\}", None, "correct"),
 ("<think>x</think>\\boxed{(1,2)}", "(2,1)", None, "wrong"),
 ("<think>x</think>The answer is $\\boxed{5}$ and $\\boxed{7}$.", "5, 7", None, "correct"),
 ("<think>x</think>\\boxed{\\text{5 apples}}", "5", None, "correct"),
 ("<think>x</think>\\boxed{5\\%}", "5", None, "correct"),
 ("<think>x</think>\\boxed{50^{\\circ}}", "50", None, "correct"),
 ("<think>x</think>\\boxed{1\\,000}", "1000", None, "correct"),
 ("<think>x</think>\\boxed{\\frac12}", "0.5", None, "correct"),
 ("<think>x</think>\\boxed{ \\frac{1}{2} }", "\\dfrac{1}{2}", None, "correct"),
 ("<think>x</think>Final answer: 1/2", "\\frac{1}{2}", None, "correct"),
 ("<think>x</think>**Final Answer:** $\\frac{1}{2}$", "0.5", None, "correct"),
 ("<think>x</think>The answer is: $-\\frac{1}{2}$", "-0.5", None, "correct"),
 ("<think>x</think>The answer is −½.", "-\\frac{1}{2}", None, "correct"),
 ("<think>x</think>The answer is ½.", "\\frac{1}{2}", None, "correct"),
 ("<think>x</think>The answer is 2².", "4", None, "correct"),
 ("<think>x</think>The answer is √2.", "\\sqrt{2}", None, "correct"),
 ("<think>x</think>The answer is 3π.", "3\\pi", None, "correct"),
 ("<think>x</think>The answer is 90°.", "90", None, "correct"),
 ("<think>x</think>The answer is \\(\\boxed{12}\\)", "12", None, "correct"),
 ("<think>x</think>ANSWER: 12\n\n</s>", "12", None, "correct"),
]


@pytest.mark.parametrize(("text", "gold", "choices", "verdict"), OTHER_ANSWERS)
def test_chains_answered_the_ways_other_teams_write(text, gold, choices, verdict):
    """Chinese answer phrases, option letter and text together, Unicode math (½, ², √), \\text{} units."""
    from filters.verify import verify_response
    from pipeline.ingest import infer_answer_type

    r = verify_response(text, {"answer": gold, "answer_type": infer_answer_type(gold, choices), "choices": choices})
    assert r.verdict == verdict, (r.pred_answer, r.detail)


@pytest.mark.parametrize(
    ("choices", "expected"),
    [("(A) 12 (B) 15 (C) 18", ["12", "15", "18"]), ("A) 12; B) 15; C) 18", ["12", "15", "18"]),
     ("A. 12\nB. 15", ["12", "15"]), (["A．12", "B．15"], ["12", "15"]), ({"A": "12", "B": "15"}, ["12", "15"]),
     ("Vitamin A. B. C. rule", ["Vitamin A. B. C. rule"])],
)
def test_option_lists_as_other_datasets_write_them(choices, expected):
    from pipeline.ingest import normalise_choices

    assert normalise_choices(choices) == expected


@pytest.mark.parametrize(
    ("gold", "letter"),
    [("(C)", "C"), ("C. 18", "C"), ("C: 18", "C"), ("Option C", "C"), ("choice (C)", "C"), ("c", "C"), ("18", "C"),
     ("A. 18", "A. 18")],  # a letter with another option's text is left as it is (not guessed)
)
def test_golds_naming_an_option_become_its_letter(gold, letter):
    from pipeline.ingest import _choice_fields, normalise_answer

    assert _choice_fields(normalise_answer(gold), ["12", "15", "18"], None)[0] == letter


@pytest.mark.parametrize(
    ("text", "cut", "answer"),
    [
        ("We subtract: 3183 - 318 = 2865. Wait, that might not be the correct way.", "ends mid-reasoning", None),
        ("Expanding the product gives the terms.\n\nLet me simplify this step by step.", "ends mid-reasoning", None),
        ("So, the total number of subsets is 144.", None, "144"),
        ("The answer is 12. Let me double-check: 3*4 = 12.", None, "12"),
        ("The answer is $12$. Let me know if anything is unclear.", None, "12"),
        ("**Answer:** The number of", "ends mid-sentence", None),
    ],
)
def test_a_chain_ending_on_more_work_is_cut_unless_it_answered(text, cut, answer):
    from filters.extract import extract, split_chain, truncation

    split = split_chain(text)
    found = extract(split.response)
    assert (truncation(split, found), found.answer if found else None) == (cut, answer)
