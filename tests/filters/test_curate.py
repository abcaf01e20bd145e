"""curate: n best per problem, ties to the shorter, near-duplicates removed, SFT rendering, retry list."""

from __future__ import annotations

import pyarrow as pa
import pytest

from filters import curate
from filters.curate import (
    CurateConfig,
    problem_text,
    select_chains,
    system_prompt,
    user_turn,
)
from pipeline.rundir import read_table, stable_hash
from pipeline.schema import CHAINS, PROBLEMS, SFT, extend
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

FILTERED = extend(
    CHAINS,
    pa.field("pred_answer", pa.string()),
    pa.field("verdict", pa.string()),
    pa.field("quality", pa.float64()),
    pa.field("keep", pa.bool_()),
    pa.field("drop_reason", pa.string()),
)

_TOPICS = ["angles", "sides", "areas", "ratios", "bars", "slopes", "counts", "sums", "products", "roots"]


def _reasoning(seed: int, words: int = 60) -> str:
    """Distinct texts for distinct seeds (different word orders), the same text for the same seed."""
    import random

    rng = random.Random(seed)
    vocab = [f"{t}{i}" for t in _TOPICS for i in range(8)]
    return " ".join(rng.choice(vocab) for _ in range(words))


def _chain(cid: str, pid: str, quality=4.0, tokens=100, keep=True, verdict="correct", reasoning=None,
           round_=0, drop_reason=None) -> dict:
    return {
        "chain_id": cid, "problem_id": pid, "round": round_, "teacher": "t", "sample_idx": 0,
        "reasoning": reasoning if reasoning is not None else _reasoning(int(stable_hash(cid), 16) % 10_000),
        "response": "The answer is \\boxed{5}.", "completion_tokens": tokens, "quality": quality,
        "keep": keep, "verdict": verdict, "drop_reason": drop_reason, "finish_reason": "stop",
    }


def _problem(pid: str, i: int = 0, **kw) -> dict:
    p = make_problem(0, i)
    row = {"problem_id": pid, "question": p["question"], "images": p["images"], "answer": p["answer"],
           "choices": p["choices"], "answer_type": p["answer_type"], "source": "synthetic", "difficulty": 1}
    return row | kw


# --- selection ---------------------------------------------------------------------------------------


def test_select_n_best_by_quality():
    cfg = CurateConfig(n_per_problem=2, quality_tie=0.0)
    chains = [_chain("a", "p", 3.0), _chain("b", "p", 4.5), _chain("c", "p", 4.0), _chain("d", "p", 2.0)]
    picked, reasons = select_chains(chains, cfg)
    assert [c["chain_id"] for c in picked] == ["b", "c"]
    assert reasons == {"a": "not_best_n", "d": "not_best_n"}


def test_ties_go_to_the_shorter_chain():
    cfg = CurateConfig(n_per_problem=1, quality_tie=0.25)
    chains = [_chain("long", "p", 4.1, tokens=900), _chain("short", "p", 4.2, tokens=300),
              _chain("mid", "p", 4.05, tokens=500)]
    picked, reasons = select_chains(chains, cfg)
    assert [c["chain_id"] for c in picked] == ["short"]
    # A clearly better chain still wins over a shorter one.
    chains.append(_chain("best", "p", 4.9, tokens=2000))
    picked, _ = select_chains(chains, cfg)
    assert [c["chain_id"] for c in picked] == ["best"]
    # With exact ties only (quality_tie=0) the 4.2 chain wins on quality.
    picked, _ = select_chains(chains[:3], CurateConfig(n_per_problem=1, quality_tie=0.0))
    assert [c["chain_id"] for c in picked] == ["short"]


def test_near_duplicates_removed():
    cfg = CurateConfig(n_per_problem=3, near_dup_threshold=0.8, quality_tie=0.0)
    text = _reasoning(1, 120)
    words = text.split()
    almost = " ".join(words[:-2] + ["different", "ending"])  # ~97% of shingles shared
    chains = [
        _chain("orig", "p", 4.5, reasoning=text),
        _chain("dup", "p", 4.4, reasoning=almost),
        _chain("other", "p", 4.0, reasoning=_reasoning(2, 120)),
        _chain("third", "p", 3.0, reasoning=_reasoning(3, 120)),
    ]
    picked, reasons = select_chains(chains, cfg)
    assert [c["chain_id"] for c in picked] == ["orig", "other", "third"]
    assert reasons == {"dup": "near_duplicate"}


def test_ineligible_reasons():
    cfg = CurateConfig()
    chains = [
        _chain("f", "p", keep=False, verdict="wrong", drop_reason="wrong"),
        _chain("nc", "p", keep=True, verdict="no_answer"),
        _chain("empty", "p", reasoning="  "),
        _chain("ok", "p"),
    ]
    picked, reasons = select_chains(chains, cfg)
    assert [c["chain_id"] for c in picked] == ["ok"]
    assert reasons == {"f": "filtered_out", "nc": "not_correct", "empty": "no_reasoning"}


# --- rendering ---------------------------------------------------------------------------------------


def test_user_turn_placeholders_and_choices():
    img = make_problem(0, 0)["images"][0]
    p = {"question": "Which bar is tallest?\n<image1>", "images": [img], "choices": ["red", "blue", "green"]}
    u = user_turn(p)
    assert u.startswith("<image>\nWhich bar is tallest?")
    assert u.count("<image>") == 1 and "<image1>" not in u
    assert u.endswith("Choices:\n(A) red\n(B) blue\n(C) green")
    # Choices already listed in the question are not repeated.
    listed = {"question": "Pick one.\n(A) 1\n(B) 2", "images": [], "choices": ["1", "2"]}
    assert problem_text(listed).count("(A)") == 1 and user_turn(listed) == "Pick one.\n(A) 1\n(B) 2"
    two = {"question": "Compare <image1> and <image2>.", "images": [img, img], "choices": None}
    assert user_turn(two) == "<image>\n<image>\nCompare (image 1) and (image 2)."


# --- the stage ----------------------------------------------------------------------------------------


def _setup(tmp_path, chains, problems, round_=0, step_sfx=""):
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", problems)
    write_step(run, f"filter{step_sfx}", FILTERED, "chains", chains, round_=round_)
    return run


def test_curate_stage_outputs_and_counts(tmp_path):
    problems = [_problem("p1", 0), _problem("p2", 1), _problem("p3", 2), _problem("p4", 3)]
    base = _reasoning(7, 80)
    chains = [
        _chain("p1a", "p1", 4.5, 300), _chain("p1b", "p1", 4.4, 200), _chain("p1c", "p1", 3.0, 100),
        _chain("p1d", "p1", 4.45, 250, reasoning=None),
        _chain("p2a", "p2", 4.0, reasoning=base), _chain("p2b", "p2", 4.0, reasoning=base + " done"),
        _chain("p3a", "p3", keep=False, verdict="wrong", drop_reason="wrong"),
        _chain("p3b", "p3", keep=False, verdict="correct", drop_reason="loop"),
        _chain("orphan", "nope"),
    ]
    # p4 gets no chain at all: it must still be retried in round 0.
    run = _setup(tmp_path, chains, problems)
    cfg = CurateConfig(n_per_problem=2)
    m = run_stage(curate, cfg, run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    assert m.rows_in == 9
    assert m.kept == 3  # p1: two of its 4 eligible chains, p2: one (its twin is a near-duplicate)
    assert m.dropped == {"not_best_n": 2, "near_duplicate": 1, "filtered_out": 2}
    assert m.quarantined == {"unknown_problem": 1}
    assert m.metrics["problems_solved"] == 2 and m.metrics["problems_to_retry"] == 2
    assert m.metrics["filter_drop_reasons"] == {"wrong": 1, "loop": 1}

    sft = read_table(run / "curate")
    assert sft.schema.remove_metadata().equals(SFT.remove_metadata(), check_metadata=False)
    rows = {r["chain_id"]: r for r in sft.to_pylist()}
    # p1: qualities 4.5/4.4/4.45 are within 0.25 of the best, so the two shorter ones (200, 250) win.
    assert set(rows) == {"p1b", "p1d", "p2a"}
    r = rows["p1b"]
    assert r["sample_id"] == stable_hash("sft", "p1b") and r["round"] == 0 and r["quality"] == 4.4
    roles = [msg["role"] for msg in r["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert r["messages"][0]["content"] == system_prompt(cfg)
    assert r["messages"][1]["content"] == user_turn(problems[0])
    assert r["messages"][1]["content"].startswith("<image>\n")
    asst = r["messages"][2]["content"]
    assert asst.startswith("<think>\n") and "</think>" in asst
    assert asst.split("</think>")[1].strip() == "The answer is \\boxed{5}."
    assert r["images"][0]["bytes"] == problems[0]["images"][0]["bytes"]

    retry = {x["problem_id"]: x for x in read_table(run / "curate" / "retry").to_pylist()}
    assert set(retry) == {"p3", "p4"}
    assert retry["p3"]["reason"] == "all_rejected" and retry["p3"]["n_chains"] == 2
    assert retry["p4"]["reason"] == "no_chains" and retry["p4"]["round"] == 0


def test_curate_round_one_uses_previous_retry_list(tmp_path):
    problems = [_problem("p1", 0), _problem("p2", 1), _problem("p3", 2)]
    run = _setup(tmp_path, [_chain("x", "p1")], problems)
    run_stage(curate, CurateConfig(), run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    assert {x["problem_id"] for x in read_table(run / "curate" / "retry").to_pylist()} == {"p2", "p3"}
    # Round 1 generated only for p2 and p3; p3 failed again, p2 is solved now.
    chains_r1 = [_chain("y", "p2", round_=1), _chain("z", "p3", keep=False, verdict="wrong", round_=1)]
    write_step(run, "filter-r1", FILTERED, "chains", chains_r1, round_=1)
    m = run_stage(curate, CurateConfig(), run, "curate-r1",
                  {"chains": ["filter-r1"], "problems": ["assess"], "retry": ["curate"]}, round_=1)
    assert (m.rows_in, m.kept, m.dropped) == (2, 1, {"filtered_out": 1})
    assert m.metrics["problems_attempted"] == 2
    retry = read_table(run / "curate-r1" / "retry").to_pylist()
    assert [(x["problem_id"], x["round"], x["reason"]) for x in retry] == [("p3", 1, "no_correct")]
    assert read_table(run / "curate-r1").column("round").to_pylist() == [1]


def test_curate_empty_round(tmp_path):
    """A round with no chains upstream (nothing left to retry) finishes with zero rows, counts adding up."""
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", [_problem("p1", 0)])
    with pytest.raises(FileNotFoundError):
        read_table(run / "curate" / "retry")
    (run / "filter-r1").mkdir(parents=True)
    m = run_stage(curate, CurateConfig(), run, "curate-r1", {"chains": ["filter-r1"], "problems": ["assess"]},
                  round_=1)
    assert (m.rows_in, m.kept, m.metrics["problems_to_retry"]) == (0, 0, 0)


def test_missing_columns_named(tmp_path):
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", [_problem("p1", 0)])
    write_step(run, "filter", CHAINS, "chains", [_chain("a", "p1")])  # no keep/verdict/quality columns
    with pytest.raises(KeyError, match="keep"):
        run_stage(curate, CurateConfig(), run, "curate", {"chains": ["filter"], "problems": ["assess"]})


def test_curate_reads_the_retry_list_it_is_given_as_an_input(tmp_path):
    """The previous round's retry list is a declared input (any step name), not a path curate guesses:
    a retried problem that got no chain at all stays on the list as no_chains."""
    problems = [_problem("p1", 0), _problem("p2", 1), _problem("p3", 2)]
    run = _setup(tmp_path, [_chain("x", "p1")], problems)
    run_stage(curate, CurateConfig(), run, "curate-a", {"chains": ["filter"], "problems": ["assess"]})
    write_step(run, "filter-b", FILTERED, "chains", [_chain("y", "p2", round_=1)], round_=1)
    m = run_stage(curate, CurateConfig(), run, "curate-b",
                  {"chains": ["filter-b"], "problems": ["assess"], "retry": ["curate-a"]}, round_=1)
    assert m.metrics["problems_attempted"] == 3 - 1  # p2, p3 (p1 was solved in round 0)
    retry = read_table(run / "curate-b" / "retry").to_pylist()
    assert [(x["problem_id"], x["reason"]) for x in retry] == [("p3", "no_chains")]
