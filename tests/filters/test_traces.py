"""The filter's per-chain logic on real long traces (../shared/data/traces-dev): both trace formats.

Source labels (`source_is_correct`) are noisy; where we disagree, the trace was inspected by hand and
the reason is written down in KNOWN_DISAGREEMENTS. Everything else must agree.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from filters.deadline import DeadlinePool
from filters.external import ChainsSourceConfig, load_chains
from filters.filter import FilterConfig, _problem_columns, score_batch
from filters.verify import check_answer

# id -> why our verdict differs from the source label (and why ours is right)
KNOWN_DISAGREEMENTS = {
    # no <|end_of_solution|>: cut at the length limit mid-sentence ("Similarly, for k=3,"); the source
    # graded the last number of a partial trace as the answer. A cut-off chain is not training data.
    "skythought-Sky-T1-math-correct-5K-14B-amc23-7": "truncated",
}
COLUMNS = {"question": "problem", "answer": "gold_answer", "trace": "trace", "id": "id", "teacher": "model"}


@pytest.fixture(scope="module")
def scored(traces_path):
    src = ChainsSourceConfig(path=str(traces_path), columns=COLUMNS)
    loaded = load_chains(src)
    problems = {p["problem_id"]: p for p in loaded.problems.to_pylist()}
    rows = _problem_columns(loaded.chains, problems).to_pylist()
    cfg = FilterConfig(workers=0)
    with DeadlinePool(check_answer, timeout_s=cfg.verify.timeout_s) as pool:
        out = score_batch(rows, cfg, pool)
    source = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
    assert len(source) == len(out) == 160
    return list(zip(source, out, strict=True))


def test_every_trace_without_its_end_marker_is_truncated(scored):
    cut = [(s, r) for s, r in scored if not s["has_end_marker"]]
    assert len(cut) == 23
    for s, r in cut:
        assert (r["verdict"], r["drop_reason"], r["keep"]) == ("truncated", "truncated", False), s["id"]
    for s, r in scored:
        if s["has_end_marker"]:
            assert r["verdict"] != "truncated", s["id"]


def test_runaway_loops_are_detected_and_complete_traces_are_not(scored):
    # every cut-off trace in this set is a runaway loop ("Wait, perhaps ..." until the length limit):
    # their zlib ratios are 11-63 against at most ~5 for complete traces
    for s, r in scored:
        assert r["loop_detected"] == (not s["has_end_marker"]), (s["id"], r["compression_ratio"])


def test_verdicts_agree_with_source_labels_except_inspected_ones(scored):
    confusion = Counter((r["verdict"], s["source_is_correct"]) for s, r in scored)
    disagree = {s["id"]: r["verdict"] for s, r in scored if (r["verdict"] == "correct") != s["source_is_correct"]}
    assert disagree == KNOWN_DISAGREEMENTS, confusion
    assert confusion == {("correct", True): 105, ("wrong", False): 32, ("truncated", False): 22, ("truncated", True): 1}


def test_extracted_answers_match_the_source_predictions(scored):
    for s, r in scored:
        if s["has_end_marker"]:
            verdict, _ = check_answer(r["pred_answer"] or "", s["source_pred"], "number", None, {})
            assert verdict == "correct", (s["id"], r["pred_answer"], s["source_pred"])


def test_both_formats_are_split(scored):
    fmts = Counter()
    for s, r in scored:
        sky = "<|begin_of_thought|>" in s["trace"]
        fmts["sky" if sky else "r1"] += 1
        if s["has_end_marker"]:
            assert r["response"] and r["reasoning"], s["id"]
            assert "<|end_of_thought|>" not in r["reasoning"] and "</think>" not in r["reasoning"]
    assert fmts == {"sky": 120, "r1": 40}


def test_kept_chains_are_correct_with_quality_on_the_0_5_scale(scored):
    kept = [r for _s, r in scored if r["keep"]]
    assert len(kept) == 105
    assert all(r["verdict"] == "correct" and 0 < r["quality"] <= 5 for r in kept)
    assert all(r["quality"] == 0 for _s, r in scored if r["verdict"] != "correct")
