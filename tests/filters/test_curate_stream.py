"""curate on Ray tasks over buckets of problems gives the in-driver tables and counts exactly."""

from __future__ import annotations

import random

from filters import curate
from filters.curate import CurateConfig
from pipeline.rundir import read_table
from tests.filters.stagectx import run_stage, write_step
from tests.filters.test_curate import FILTERED, _chain, _problem, _setup

_SAME = ("rows_in", "kept", "dropped", "quarantined", "outputs")


def _tables(run, step):
    sft = sorted(read_table(run / step).to_pylist(), key=lambda r: r["sample_id"])
    retry = sorted(read_table(run / step / "retry").to_pylist(), key=lambda r: r["problem_id"])
    return sft, retry


def _both(run, inputs, round_=0, **kw):
    """(in-driver manifest, bucketed manifest) for the same inputs, tables compared."""
    m0 = run_stage(curate, CurateConfig(**kw), run, "curate" if round_ == 0 else "curate-r1", inputs, round_=round_)
    step0 = "curate" if round_ == 0 else "curate-r1"
    t0 = _tables(run, step0)
    m1 = run_stage(curate, CurateConfig(workers=2, bucket_problems=3, **kw), run,
                   "curate" if round_ == 0 else "curate-r1", inputs, round_=round_)
    assert _tables(run, step0) == t0
    for k in _SAME:
        assert getattr(m1, k) == getattr(m0, k), k
    assert {k: v for k, v in m1.metrics.items() if not k.startswith("bucket")} == m0.metrics
    assert m1.metrics["buckets"] > 1
    return m0, m1


def test_bucketed_curate_matches_in_driver(tmp_path, ray_local):
    rng = random.Random(5)
    problems = [_problem(f"p{i:02d}", i % 10) for i in range(23)]
    chains = []
    for i, p in enumerate(problems[:20]):  # three problems get no chain: retried as no_chains
        for s in range(4):
            ok = rng.random() < 0.6
            chains.append(_chain(f"c{i}-{s}", p["problem_id"], quality=round(rng.uniform(2, 5), 2),
                                 tokens=rng.randint(50, 400), keep=ok, verdict="correct" if ok else "wrong",
                                 drop_reason=None if ok else "wrong"))
    chains.append(_chain("orphan", "nope"))
    run = _setup(tmp_path, chains, problems)
    m0, _ = _both(run, {"chains": ["filter"], "problems": ["assess"]}, n_per_problem=2)
    assert m0.rows_in == 81 and m0.quarantined == {"unknown_problem": 1}
    assert m0.metrics["problems_attempted"] == 23


def test_bucketed_curate_round_one_reads_the_retry_list(tmp_path, ray_local):
    problems = [_problem(f"p{i}", i) for i in range(7)]
    run = _setup(tmp_path, [_chain("x", "p1"), _chain("w", "p2")], problems)
    run_stage(curate, CurateConfig(), run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    chains_r1 = [_chain("y", "p3", round_=1), _chain("z", "p4", keep=False, verdict="wrong", round_=1)]
    write_step(run, "filter-r1", FILTERED, "chains", chains_r1, round_=1)
    m0, _ = _both(run, {"chains": ["filter-r1"], "problems": ["assess"], "retry": ["curate"]}, round_=1)
    assert m0.metrics["problems_attempted"] == 5 and m0.kept == 1
