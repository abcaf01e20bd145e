"""Self-distillation rounds end to end: ingest -> decontaminate -> assess -> generate (scripted) -> filter
-> curate, then generate -> filter -> curate again on each retry list, on local Ray, every manifest
adding up. Then the report over the finished run.
"""

from __future__ import annotations

import json

import pytest

from pipeline.rundir import Manifest, read_table
from tests.pipeline.helpers import run_config, write_config

ROUND1 = {"generate": {"samples_per_problem": 6, "temperature": 0.9, "use_row_sampling": False,
                       "repetition_penalty": 1.0, "max_tokens": 1024,
                       "engine": {"p_correct": 1.0, "p_loop": 0.0, "p_truncate": 0.0}}}


def _sections(rounds: int = 3) -> dict:
    return {
        "ingest": {"sources": [{"kind": "synthetic", "name": "syn", "synthetic": {"n": 30, "seed": 0}}]},
        "decontaminate": {"eval_sets": [{"source": {"kind": "synthetic", "name": "ev", "synthetic": {"n": 40, "seed": 1}}}]},
        "assess": {"alpha": 0.3, "workers": 0, "budget": {"min_tokens": 256, "max_tokens": 1024}},
        "generate": {"engine": {"kind": "scripted", "p_correct": 0.3, "p_loop": 0.1, "p_truncate": 0.05},
                     "samples_per_problem": 3, "workers": 0},
        "filter": {"workers": 0},
        "curate": {"n_per_problem": 2},
        "rounds": {"count": rounds, "overrides": [{}, ROUND1]},
    }


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("rounds")
    runner, results = run_config(write_config(tmp, _sections(), name="rounds"))
    return runner, results


def test_rounds_loop_over_retry_lists(rounds_run):
    runner, results = rounds_run
    run = runner.run_dir
    names = [s.name for s in runner.steps]
    assert names == ["ingest", "decontaminate", "assess", "generate", "filter", "curate",
                     "generate-r1", "filter-r1", "curate-r1", "generate-r2", "filter-r2", "curate-r2"]
    for name in names:
        m = Manifest.load(run / name)
        m.check_counts()  # every row in is kept, dropped or quarantined
    problems = {r["problem_id"] for r in read_table(run / "assess", ["problem_id"]).to_pylist()}
    retry0 = read_table(run / "curate" / "retry").to_pylist()
    assert retry0, "with p_correct=0.3 and 3 samples some problems must stay unsolved in round 0"
    assert all(r["round"] == 0 for r in retry0)
    solved0 = {r["problem_id"] for r in read_table(run / "curate").to_pylist()}
    assert solved0 | {r["problem_id"] for r in retry0} == problems
    assert not solved0 & {r["problem_id"] for r in retry0}

    # Round 1 generates only for the retry list, with its own sampling; its chains carry round 1.
    chains1 = read_table(run / "generate-r1").to_pylist()
    assert {c["problem_id"] for c in chains1} == {r["problem_id"] for r in retry0}
    assert len(chains1) == 6 * len(retry0)
    assert {c["round"] for c in chains1} == {1}
    assert {c["sampling"]["temperature"] for c in chains1} == {0.9}
    assert {c["sampling"]["repetition_penalty"] for c in chains1} == {1.0}
    sft1 = read_table(run / "curate-r1").to_pylist()
    assert sft1 and {r["round"] for r in sft1} == {1}
    assert {r["problem_id"] for r in sft1} <= {r["problem_id"] for r in retry0}

    # Round 1 solves everything, so round 2 has nothing to do and finishes empty.
    assert results["curate-r1"].metrics["problems_to_retry"] == 0
    for name in ("generate-r2", "filter-r2", "curate-r2"):
        assert (results[name].rows_in, results[name].kept) == (0, 0), name

    # Round 0 used assess's per-problem penalty and budget.
    assessed = {r["problem_id"]: r for r in read_table(run / "assess").to_pylist()}
    for c in read_table(run / "generate").to_pylist()[:20]:
        assert c["sampling"]["repetition_penalty"] == pytest.approx(assessed[c["problem_id"]]["repetition_penalty"])
        assert c["sampling"]["max_tokens"] == assessed[c["problem_id"]]["max_tokens"]


def test_report_over_the_rounds_run(rounds_run):
    from filters.report import write_report

    runner, results = rounds_run
    path = write_report(runner.run_dir)
    page = path.read_text()
    for title in ("Steps and counts", "Chain length before and after filtering", "Correctness by difficulty bucket",
                  "Repetition penalty against chain length", "Drop reasons", "Yield per round"):
        assert f"<h2>{title}</h2>" in page
    curation = page.split('<section id="training">')[0]  # this run stops at curation: no train / evaluate
    assert 'class="missing"' not in curation
    for png in ("chain_lengths", "correctness_by_difficulty", "penalty_vs_length", "drop_reasons", "yield_per_round"):
        f = path.parent / f"{png}.png"
        assert f.exists() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(page.split("id='summary'>")[1].split("</script>")[0].replace("&quot;", '"'))
    assert summary["steps"] == len(results)
    # The yield table lists every round with the curate counts.
    assert page.count("<tr><td>2</td>") >= 1 and str(results["curate"].kept) in page


def test_assessed_penalty_follows_difficulty_and_image_need(rounds_run):
    """On the synthetic pool, harder and image-dependent problems get lower penalties, longer budgets."""
    import polars as pl

    runner, _ = rounds_run
    d = pl.read_parquet(str(runner.run_dir / "assess" / "*.parquet"))
    by_level = d.group_by("difficulty").agg(pl.col("repetition_penalty").mean(), pl.col("max_tokens").mean())
    by_level = by_level.sort("difficulty")
    assert by_level["difficulty"].to_list() == [1, 2, 3]
    pens, toks = by_level["repetition_penalty"].to_list(), by_level["max_tokens"].to_list()
    assert pens[0] > pens[1] > pens[2] and toks[0] < toks[1] < toks[2]
    by_img = {r["needs_image"]: r["repetition_penalty"]
              for r in d.group_by("needs_image").agg(pl.col("repetition_penalty").mean()).to_dicts()}
    assert by_img[True] < by_img[False]
