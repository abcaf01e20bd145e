"""report: works with whatever steps a run has; sections say what is missing; numbers match manifests."""

from __future__ import annotations

import pyarrow as pa
import pytest

from filters import curate
from filters.curate import CurateConfig
from filters.report import load_run, round_yield, write_report
from pipeline.schema import CHAINS, PROBLEMS, extend
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

FILTERED = extend(CHAINS, pa.field("verdict", pa.string()), pa.field("quality", pa.float64()),
                  pa.field("keep", pa.bool_()), pa.field("drop_reason", pa.string()))


def _problems(n: int) -> list[dict]:
    out = []
    for i in range(n):
        p = make_problem(0, i)
        out.append({"problem_id": f"p{i}", "question": p["question"], "images": p["images"], "answer": p["answer"],
                    "answer_type": p["answer_type"], "difficulty": p["difficulty"]})
    return out


def _chain(i: int, pid: str, verdict: str, tokens: int, penalty: float) -> dict:
    keep = verdict == "correct"
    return {"chain_id": f"c{i}", "problem_id": pid, "round": 0, "teacher": "t", "sample_idx": i % 3,
            "reasoning": f"step {i} " * (tokens // 2), "response": "\\boxed{1}", "completion_tokens": tokens,
            "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 512, "repetition_penalty": penalty, "seed": i},
            "verdict": verdict, "quality": 4.0 if keep else 0.0, "keep": keep,
            "drop_reason": None if keep else verdict}


def test_report_on_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems(3))
    page = write_report(run).read_text()
    assert "<h2>Steps and counts</h2>" in page and "<td>ingest</td>" in page
    assert page.count('class="missing"') == 4  # lengths, correctness, penalty, rounds
    assert "no filter step output" in page and "no generate / filter / curate step" in page
    assert not list((run / "report").glob("*.png"))  # no drop happened, nothing to plot


def test_report_numbers_follow_the_run(tmp_path):
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", _problems(4))
    chains = [_chain(i, f"p{i % 4}", "correct" if i % 3 else "wrong", 100 + 40 * i, 1.0 + 0.02 * i)
              for i in range(12)]
    write_step(run, "filter", FILTERED, "chains", chains)
    m = run_stage(curate, CurateConfig(n_per_problem=1), run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    d = load_run(run)
    assert d.chains.height == 12 and d.sft.height == m.kept
    [y] = round_yield(d)
    assert y == {"round": 0, "chains": 12, "kept_by_filter": 12, "sft_samples": m.kept,
                 "problems_attempted": 4, "problems_solved": m.metrics["problems_solved"],
                 "problems_to_retry": m.metrics["problems_to_retry"]}
    page = write_report(run).read_text()
    assert 'class="missing"' not in page
    for png in ("chain_lengths", "correctness_by_difficulty", "penalty_vs_length", "drop_reasons", "yield_per_round"):
        assert (run / "report" / f"{png}.png").exists()
    # 12 chains, penalties 1.00 .. 1.22, tokens rising with them: a perfect positive correlation.
    assert "12 chains; penalty range 1.000–1.220; Pearson r(penalty, tokens) = 1.000" in page


def test_report_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")
