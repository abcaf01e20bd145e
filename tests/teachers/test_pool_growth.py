"""A pool that grows keeps the chains it has: the demo's data steps on 60 problems, then on 120 (the same
first 60 plus 60 new ones): the engine is called only for the new problems' chains."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.config import load_config
from pipeline.rundir import Manifest, read_table
from pipeline.runner import Runner
from tests.pipeline.test_state import REPO

_DATA_ONLY = ["assemble=null", "train=null", "evaluate=null", "rl=null", "generate.workers=0", "caption.workers=0"]


def _run(tmp_path, n: int, *extra: str) -> Runner:
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [f"run.root={tmp_path / 'runs'}", f"ingest.sources.0.synthetic.n={n}", *_DATA_ONLY, *extra])
    runner = Runner(cfg)
    runner.run()
    return runner


def _gen_steps(runner: Runner) -> list[str]:
    return [s.name for s in runner.steps if s.stage == "generate"]


def _chains(runner: Runner, step: str):
    return read_table(runner.run_dir / step, ["chain_id", "problem_id", "completion"])


@pytest.mark.parametrize("normalise", ["frozen", "pool"])
def test_growing_the_pool_pays_only_for_new_problems(tmp_path, ray_local, normalise):
    small = _run(tmp_path, 60, f"assess.normalise={normalise}")
    old_problems = set(read_table(small.run_dir / "assess", ["problem_id"]).column("problem_id").to_pylist())
    before = {s: _chains(small, s) for s in _gen_steps(small)}
    big = _run(tmp_path, 120, f"assess.normalise={normalise}")
    am = Manifest.load(big.run_dir / "assess")
    assert am.rows_in > len(old_problems)
    calls, new_chains, same_text = 0, 0, 0
    for step in _gen_steps(big):
        m = Manifest.load(big.run_dir / step)
        t = _chains(big, step)
        is_new = pc.invert(pc.is_in(t.column("problem_id"), value_set=pa.array(sorted(old_problems))))
        new_chains += pc.sum(is_new).as_py() or 0
        calls += m.metrics["requests"]
        old = {r["chain_id"]: r["completion"] for r in before[step].to_pylist()}
        same_text += sum(1 for r in t.to_pylist() if old.get(r["chain_id"]) == r["completion"])
    print(f"\npool 60 -> 120 ({normalise}): {calls} engine calls for {new_chains} new-problem chains; "
          f"{same_text} chains identical to the first run's", file=sys.__stderr__)
    if normalise == "frozen":
        assert am.metrics["normalisation"]["from"] == "previous run"
        assert calls == new_chains > 0
    else:
        # re-normalising over the grown pool moves the old problems' penalties and budgets: chains re-bought
        assert am.metrics["normalisation"]["from"] == "pool"
        assert calls > new_chains


def test_manifest_counts_chain_and_say_what_differs(tmp_path, ray_local):
    """A text-only teacher without captions: generate quarantines those samples (bad_input) but keeps them
    in its table; filter's rows_in = generate's kept + those quarantined rows, stated in its manifest."""
    r = _run(tmp_path, 30, "caption=null", "generate.engine.text_only=true", "rounds.count=2")
    g, f = Manifest.load(r.run_dir / "generate"), Manifest.load(r.run_dir / "filter")
    q = sum(g.quarantined.values())
    assert q > 0 and g.kept > 0
    assert f.rows_in == g.kept + q
    assert f.inputs["steps"]["generate"] == {"rows": g.kept + q, "kept": g.kept, "carried_quarantined": q,
                                             "carried_dropped": 0}
    assert f.dropped["generation_error"] == q
    c = Manifest.load(r.run_dir / "curate")
    assert c.inputs["steps"]["filter"]["carried_dropped"] == sum(f.dropped.values())
    for step in r.steps:
        m = Manifest.load(r.run_dir / step.name)
        if m.inputs:
            assert m.inputs["chained"], (step.name, m.inputs, m.rows_in)
    # round 1's curate declares round 0's retry list as an input
    assert "curate" in Manifest.load(r.run_dir / "curate-r1").upstream
