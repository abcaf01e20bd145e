"""Trace formats detected per row, truncation only on evidence, multi-sample rows, the extraction cascade
with its pred_source, and the filter stage's manifest (format counts, warnings) on mixed external traces."""

from __future__ import annotations

import json

import pytest

from filters import filter as filter_stage
from filters.extract import extract, split_chain, truncation
from filters.filter import FilterConfig
from filters.formats import detect_format, ends_cut, split_samples
from pipeline.rundir import read_table
from tests.filters.stagectx import run_stage


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("<think>a</think>b", "think"),
        ("reasoning</think>answer", "think"),
        ("<think>open", "think"),
        ("<|begin_of_thought|>x<|end_of_thought|><|begin_of_solution|>y<|end_of_solution|>", "sky"),
        ("x<|end_of_thought|>y", "sky"),
        ("<|begin_of_solution|>y", "sky"),
        ("A plain worked solution. The answer is 4.", "plain"),
        ("", "plain"),
    ],
)
def test_detect_format(text, fmt):
    assert detect_format(text) == fmt


# (text, truncation evidence or None, extracted answer, pred_source)
CHAINS = [
    ("<think>long thought and then", "unclosed think span", None, None),
    ("<|begin_of_thought|> thinking forever", "unclosed thought span", None, None),
    # a solution block without its end marker: cut only if its text is
    ("<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>So \\boxed{5}.", None, "5", "boxed"),
    ("<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>First we add the two", "solution block cut off (ends mid-sentence)", None, None),
    # plain traces: clean endings of every kind, and cut ones
    ("We count them: so the number of such pairs is 12.", None, "12", "last_sentence"),
    ("Hence the side is 4 cm.", None, "4 cm", "last_sentence"),
    ("Using the law of sines,\n$$\\sin B = 3/5$$", None, "\\sin B = 3/5", "display_formula"),
    ("Work.\n\n**Final Answer**\n\n$$\\frac{7}{2}$$", None, "\\frac{7}{2}", "final_answer"),
    ("Work.\n\n## Final Answer\nThe area is 24.", None, "The area is 24", "final_answer"),
    ("Thus the answer is $-3$. This is consistent with the check.", None, "-3", "answer_is"),
    ("Answer: 17", None, "17", "answer_tag"),
    ("steps\n#### 72", None, "72", "answer_tag"),
    ("<answer>(2, 3)</answer>", None, "(2, 3)", "answer_tag"),
    ("Both roots: $\\boxed{3}$ and $\\boxed{4}$.", None, "3, 4", "boxed_list"),
    ("Therefore $y \\leq 2$.", None, "y \\leq 2", "last_sentence"),
    ("Let me verify: 5*3 = 15, so the result checks out and is correct.", None, None, None),
    ("Similarly, for k=3,", "ends mid-sentence", None, None),
    ("so we need $\\frac{a}{b", "ends mid-formula", None, None),
    ("The answer is \\boxed{5}. Let me double check this by substituting back into the first", "ends mid-sentence", "5", "boxed"),
    ("The most Carlos can pay is $50.", None, "$50", "last_sentence"),
]


@pytest.mark.parametrize(("text", "cut", "answer", "source"), CHAINS)
def test_truncation_evidence_and_extraction(text, cut, answer, source):
    split = split_chain(text)
    found = extract(split.response)
    assert truncation(split, found) == cut
    assert (found.answer if found else None, found.source if found else None) == (answer, source)


def test_verdict_words_are_answers_only_when_the_gold_is_one():
    text = "We checked every case, so the claim is true."
    assert extract(text) is None
    assert extract(text, "text", gold="true").answer == "true"
    assert extract("\\boxed{\\text{Yes}}").answer == "\\text{Yes}"  # boxed: the teacher's own answer


def test_ends_cut():
    assert ends_cut("The answer is 12") is None
    assert ends_cut("x = 3 +") == "ends mid-sentence"
    assert ends_cut("Wait, perhaps...") == "ends mid-sentence"
    assert ends_cut("$$x^2$$") is None


def test_split_samples():
    a = "<think>a</think>\\boxed{1}"
    assert split_samples(f"{a}\n\n=== Sample 2 ===\n\n{a}") == [f"{a}\n\n", f"\n\n{a}"]
    assert len(split_samples(f"{a}<|endoftext|>{a}<|im_end|>{a}")) == 3
    # a format's opening marker starting again is a new sample, with or without a separator
    assert split_samples(f"{a}{a}") == [a, a]
    assert len(split_samples("<|begin_of_thought|>x<|end_of_thought|>y<|begin_of_thought|>z")) == 2
    # markdown rules and a "Sample" word inside prose are no separators
    assert len(split_samples("a\n\n---\n\nb. See sample 2 above.")) == 1
    assert split_samples("one", None) == ["one"]


ROWS = [
    {"id": 1, "q": "2+3?", "gold": "5", "out": "2+3=5</think>The answer is \\boxed{5}."},
    {"id": 2, "q": "2+4?", "gold": "6", "out": "<think>x</think>So the total is 6."},
    {"id": 3, "q": "2+5?", "gold": "7", "out": "Adding gives 7, so the answer is 7."},
    {"id": 4, "q": "2+6?", "gold": "8", "out": "We add them. Then the sum of the two numbers is"},
    {"id": 5, "q": "2+7?", "gold": "9", "out": "<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>\\boxed{9}"},
    {"id": 6, "q": "2+8?", "gold": "10", "out": "<think>a</think>\\boxed{10}\n=== Sample 2 ===\n<think>b</think>\\boxed{11}"},
    {"id": 7, "q": "2+9?", "gold": "11", "out": 42},  # not a string: counted, never a crash
    {"id": 8, "q": "3+3?", "gold": "6", "out": "\x00\ufffd garbage \\boxed{"},  # ends in an open formula: cut
    {"id": 11, "q": "3+6?", "gold": "9", "out": "I do not know how to solve this."},
    {"id": 9, "q": "3+4?", "gold": "7", "out": "\\boxed{" + "9^{9^{9^{9^{9}}}}+" * 300 + "1}"},  # check times out
    {"id": 10, "q": "3+5?", "gold": "begin{pmatrix}1 & 2end{pmatrix}", "out": "\\boxed{\\begin{pmatrix}1&2\\end{pmatrix}}"},
]


def test_filter_stage_counts_formats_and_warns(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n{broken\n")
    cols = {"question": "q", "answer": "gold", "trace": "out", "id": "id"}
    cfg = FilterConfig(workers=0, source={"path": str(path), "columns": cols, "format": "sky"},
                       verify={"timeout_s": 2.0})
    m = run_stage(filter_stage, cfg, tmp_path / "run", "filter", {"problems": [], "chains": []})
    assert m.rows_in == 13  # 11 rows, one of them two samples, plus the broken line
    assert m.quarantined == {"bad_trace": 1, "bad_row": 1}
    assert m.metrics["trace_formats"] == {"think": 4, "plain": 6, "sky": 1}
    assert m.metrics["verdicts"] == {"correct": 5, "wrong": 1, "truncated": 2, "no_answer": 1, "timeout": 1,
                                     "gold_unparsable": 1}
    assert m.kept + sum(m.dropped.values()) == 11
    assert any("filter.source.format is 'sky'" in w for w in m.metrics["warnings"])
    assert (m.metrics["external_rows"], m.metrics["multi_sample_rows"]) == (10, 1)
    rows = read_table(tmp_path / "run" / "filter").to_pylist()
    assert sorted(r["sample_idx"] for r in rows) == [0] * 10 + [1]
    verdicts = sorted((r["verdict"], r["pred_source"] or "") for r in rows)
    assert verdicts == sorted([
        ("correct", "boxed"), ("correct", "last_sentence"), ("correct", "answer_is"), ("truncated", ""),
        ("correct", "boxed"), ("correct", "boxed"), ("wrong", "boxed"), ("no_answer", ""), ("truncated", ""), ("timeout", "boxed"),
        ("gold_unparsable", "boxed"),
    ])


def test_status_shows_the_format_warning(tmp_path, capsys):
    """A declared format most rows lack is a warning in the manifest and in `r1v status`."""
    import yaml

    from pipeline.cli import main

    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:5]) + "\n")
    cols = {"question": "q", "answer": "gold", "trace": "out", "id": "id"}
    ingest_cols = {"id": "id", "question": "q", "answer": "gold", "images": None, "choices": None,
                   "answer_type": None}
    cfg = {"run": {"name": "t", "root": str(tmp_path / "runs")}, "ray": {"num_cpus": 2},
           "ingest": {"sources": [{"kind": "jsonl", "path": str(path), "columns": ingest_cols}]},
           "filter": {"workers": 0, "source": {"path": str(path), "columns": cols, "format": "think"}},
           "curate": {"n_per_problem": 2}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(cfg_path)]) == 0
    capsys.readouterr()
    assert main(["status", str(tmp_path / "runs" / "t")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning filter: filter.source.format is 'think' but only 2 of 5 chains carry it" in out


def test_token_count_at_the_budget_is_evidence_only_without_a_finish_reason():
    from filters.filter import _generation_cut

    sampling = {"max_tokens": 800}
    assert _generation_cut({"finish_reason": None, "completion_tokens": 800, "sampling": sampling})
    assert _generation_cut({"finish_reason": None, "completion_tokens": 799, "sampling": sampling}) is None
    assert _generation_cut({"finish_reason": "stop", "completion_tokens": 800, "sampling": sampling}) is None
    assert _generation_cut({"finish_reason": "length", "completion_tokens": 10, "sampling": None})


# whole chains in the shapes the answers come in, through the real check (verify_response)
RESPONSES = [
    ("We list them all, so the number of such pairs is 12.", "12", "correct", "12"),
    ("By the Pythagorean theorem the side is 4 cm.", "4", "correct", "4 cm"),
    ("By the law of sines,\n$$\\sin B = 3/5$$", "\\frac{3}{5}", "correct", "\\sin B = 3/5"),
    ("Work.\n\n**Final Answer**\n\\[\n2\\,500.75\n\\]", "2500.75", "correct", "2\\,500.75"),
    ("Both values work: $\\boxed{3}$ and $\\boxed{4}$.", "3,4", "correct", "3, 4"),
    ("So the answer is 7. Substituting back, the result checks out and is correct.", "7", "correct", "7"),
    ("Substituting back, the result checks out and is correct.", "7", "no_answer", None),
    ("Hence $0 \\le t \\le 3$.", "t \\in [0,3]", "correct", "0 \\le t \\le 3"),
    ("So the meeting starts at 9:30 and the start time is 9:30.", "9:30", "correct", "9:30"),
    ("It costs $5 in total, so we need $x \\ge 5$.", "x \\geq 5", "correct", "x \\ge 5"),
    ("So $(m, n) = (1, 4)$.", "(m,n)=(1,4)", "correct", "(m, n) = (1, 4)"),
    ("The solutions are $(1,2)$ and $(2,1)$, i.e. \\boxed{(1,2),(2,1)}", "(2,1),(1,2)", "correct", "(1,2),(2,1)"),
    ("Thus \\boxed{(3,2,1)}", "(1,2,3)", "wrong", "(3,2,1)"),
    ("<think>so</think>The answer is $\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}$.",
     "\\begin{pmatrix}1 & 2 \\ 3 & 4\\end{pmatrix}", "gold_unparsable", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("We are still computing the value of", "12", "truncated", None),
]


@pytest.mark.parametrize(("text", "gold", "verdict", "pred"), RESPONSES)
def test_chains_in_every_answer_style(text, gold, verdict, pred):
    from filters.verify import verify_response
    from pipeline.ingest import infer_answer_type

    r = verify_response(text, {"answer": gold, "answer_type": infer_answer_type(gold, None)})
    assert (r.verdict, r.pred_answer) == (verdict, pred), r.detail


def test_garbage_is_a_verdict_never_a_crash():
    """Random fragments of markers, math and prose: every chain gets a verdict and a counted reason."""
    import random

    from filters.deadline import DeadlinePool
    from filters.filter import score_batch
    from filters.verify import VERDICTS, check_answer

    rng = random.Random(0)
    parts = ["<think>", "</think>", "<|begin_of_thought|>", "<|end_of_solution|>", "\\boxed{", "}", "{", "$",
             "$$", "\\[", "\\]", "the answer is", "Final Answer", "\n\n", "=", " 12", " x", "\\frac{1}{",
             "(1,2)", " or ", "é", "\x00", "\\begin{pmatrix}", "&", "\\\\", ".", ",", " is ", "correct", "%"]
    rows = []
    for i in range(150):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        gold = "".join(rng.choice(parts) for _ in range(rng.randint(0, 4))) if i % 3 == 0 else str(rng.randint(0, 20))
        rows.append({"chain_id": str(i), "problem_id": "p", "completion": text, "reasoning": None, "response": None,
                     "finish_reason": rng.choice([None, "stop", "length"]), "completion_tokens": None,
                     "sampling": None, "_gold": gold, "_answer_type": rng.choice([None, "number", "set", "text"]),
                     "_choices": None, "_budget": None})
    cfg = FilterConfig(workers=0, verify={"timeout_s": 2.0})
    with DeadlinePool(check_answer, timeout_s=2.0) as pool:
        out = score_batch(rows, cfg, pool)
    assert len(out) == len(rows)
    assert all(r["verdict"] in VERDICTS for r in out)
    assert all(r["keep"] == (r["drop_reason"] is None) for r in out)


def test_last_complete_sample(tmp_path):
    """samples=last_complete keeps the last sample with no cut; when every sample is cut, the last one
    (which the filter then drops as truncated), and never a cut tail as if it were clean."""
    from filters.external import ChainsSourceConfig, load_chains

    whole, cut = "<think>a</think>So \\boxed{5}.", "<think>b</think>We now add the first and"
    sep = "\n<|endoftext|>\n"
    rows = [{"q": "one?", "gold": "5", "out": whole + sep + cut},
            {"q": "two?", "gold": "5", "out": cut + sep + cut},
            {"q": "three?", "gold": "5", "out": cut + sep + whole}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cols = {"question": "q", "answer": "gold", "trace": "out", "id": None}
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=cols, samples="last_complete"))
    chains = loaded.chains.to_pylist()
    assert [(c["sample_idx"], c["completion"]) for c in chains] == [(0, whole), (1, cut), (1, whole)]
    assert (loaded.multi_sample_rows, loaded.samples_skipped) == (3, 3)
    each = load_chains(ChainsSourceConfig(path=str(path), columns=cols)).chains
    assert each.num_rows == 6
