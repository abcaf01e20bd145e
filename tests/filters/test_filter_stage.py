"""The `filter` stage end to end: real Parquet in and out, real Ray Data actors, real math-verify."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from filters.filter import FILTERED, FilterConfig, run
from pipeline.rundir import ShardWriter, read_table
from pipeline.runner import StageContext
from pipeline.schema import CHAINS, PROBLEMS
from tests.filters.test_verify import tower

LOOP = "Wait, let me re-check the computation from the start, because a slip would change the value.\n"


def _problem(pid: str, answer: str, atype: str, choices=None) -> dict:
    return {"problem_id": pid, "question": f"question {pid}", "answer": answer, "answer_type": atype,
            "choices": choices, "source": "test"}


def _chain(cid: str, pid: str, completion: str | None, finish: str = "stop", tokens: int = 100,
           error: str | None = None, max_tokens: int = 4096) -> dict:
    reasoning, response = None, None
    if completion is not None and "</think>" in completion:
        head, _, response = completion.partition("</think>")
        reasoning = head.replace("<think>", "").strip()
    return {"chain_id": cid, "problem_id": pid, "round": 0, "teacher": "test", "sample_idx": 0, "seed": 0,
            "completion": completion, "reasoning": reasoning, "response": response, "finish_reason": finish,
            "completion_tokens": tokens, "error": error,
            "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": max_tokens, "repetition_penalty": 1.0, "seed": 0}}


PROBLEMS_ROWS = [
    _problem("p-num", "\\$10", "number"),
    _problem("p-tuple", "(1,2,3)", "tuple"),
    _problem("p-choice", "B", "choice", ["10", "12", "14"]),
    _problem("p-budget", "7", "number"),
]
# (chain, expected verdict, expected drop_reason)
CASES = [
    (_chain("c-correct", "p-num", "<think>10 dollars</think>The answer is $\\boxed{10}$."), "correct", None),
    (_chain("c-wrong", "p-num", "<think>eleven</think>\\boxed{11}"), "wrong", "wrong"),
    (_chain("c-order", "p-tuple", "<think>t</think>\\boxed{(3,2,1)}"), "wrong", "wrong"),
    (_chain("c-tuple", "p-tuple", "<think>t</think>\\boxed{(1,2,3)}"), "correct", None),
    (_chain("c-choice", "p-choice", "<think>it is 12</think>**Answer:** (B)"), "correct", None),
    (_chain("c-cut", "p-num", "<think>I keep thinking and", finish="length"), "truncated", "truncated"),
    (_chain("c-unclosed", "p-num", "<think>no end marker but finish says stop"), "truncated", "truncated"),
    (_chain("c-none", "p-num", "<think>hmm</think>I do not know."), "no_answer", "no_answer"),
    (_chain("c-error", "p-num", None, finish="error", error="http: 503"), "no_answer", "generation_error"),
    (_chain("c-loop", "p-num", "<think>" + LOOP * 40 + "</think>\\boxed{10}"), "correct", "looping"),
    (_chain("c-tower", "p-num", f"<think>big</think>\\boxed{{{tower()}}}"), "timeout", "timeout"),
    (_chain("c-after-tower", "p-num", "<think>ok</think>\\boxed{10}"), "correct", None),
    (dict(_chain("c-plain", "p-num", "The answer is $\\boxed{10}$."), reasoning="",
          response="The answer is $\\boxed{10}$."), "correct", None),  # a teacher that does not think
    (_chain("c-over", "p-budget", "<think>long</think>\\boxed{7}", tokens=900, max_tokens=800), "correct", "over_budget"),
]
ORPHAN = _chain("c-orphan", "p-missing", "<think>x</think>\\boxed{1}")


def _write(directory: Path, schema: pa.Schema, table: str, rows: list[dict]) -> Path:
    with ShardWriter(directory, schema, table) as w:
        w.write(rows)
    return directory


def _ctx(tmp_path: Path, name: str, chains_dir: Path | None, problems_dir: Path) -> StageContext:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=tmp_path, step="filter", stage="filter", round=0, out_dir=out,
                        inputs={"chains": [chains_dir] if chains_dir else [], "problems": [problems_dir]},
                        run_config=None, fingerprint="test")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("filter-in")
    probs = _write(d / "assess", PROBLEMS, "problems", PROBLEMS_ROWS)
    chains = _write(d / "generate", CHAINS, "chains", [c for c, _v, _r in CASES] + [ORPHAN])
    return d, chains, probs


def _check(table: pa.Table, m) -> None:
    rows = {r["chain_id"]: r for r in table.to_pylist()}
    assert [r for r in table.column("chain_id").to_pylist()] == [c["chain_id"] for c, _v, _r in CASES]
    for chain, verdict, reason in CASES:
        r = rows[chain["chain_id"]]
        assert (r["verdict"], r["drop_reason"], r["keep"]) == (verdict, reason, reason is None), (chain["chain_id"], r)
    assert m.rows_in == len(CASES) + 1
    assert m.kept == sum(reason is None for _c, _v, reason in CASES)
    assert m.quarantined == {"unknown_problem": 1}
    m.check_counts()
    assert rows["c-over"]["length_ratio"] == pytest.approx(900 / 800)
    assert rows["c-correct"]["length_ratio"] == pytest.approx(100 / 4096)
    assert rows["c-loop"]["loop_detected"] and not rows["c-correct"]["loop_detected"]
    assert rows["c-correct"]["quality"] == 5.0 and rows["c-wrong"]["quality"] == 0.0


def test_filter_stage_on_ray_actors(ray_local, inputs, tmp_path):
    d, chains, probs = inputs
    cfg = FilterConfig(workers=2, batch_size=4, verify={"timeout_s": 2.0})
    m = run(cfg, _ctx(tmp_path, "filter", chains, probs))
    table = read_table(tmp_path / "filter")
    assert table.schema.remove_metadata().equals(FILTERED.remove_metadata())
    _check(table, m)
    tower_row = table.filter(pa.compute.equal(table.column("chain_id"), "c-tower")).to_pylist()[0]
    # the 10,000-character tower hit the deadline inside an actor, and the run went on
    assert 2.0 <= tower_row["verify_s"] < 2.0 + 1.5
    assert m.metrics["verdicts"]["timeout"] == 1

    # the same inputs without Ray (workers=0) give the same table: scoring is deterministic
    m0 = run(cfg.model_copy(update={"workers": 0}), _ctx(tmp_path, "filter-local", chains, probs))
    local = read_table(tmp_path / "filter-local")
    cols = [c for c in table.column_names if c != "verify_s"]
    assert local.select(cols).equals(table.select(cols))
    assert (m0.kept, m0.dropped) == (m.kept, m.dropped)


def test_filter_fails_clearly_without_chains_or_source(inputs, tmp_path):
    _d, _chains, probs = inputs
    with pytest.raises(ValueError, match="filter.source is not set"):
        run(FilterConfig(workers=0), _ctx(tmp_path, "filter", None, probs))


def test_filter_refuses_both_generate_and_source(inputs, tmp_path):
    _d, chains, probs = inputs
    cfg = FilterConfig(workers=0, source={"path": str(probs)})
    with pytest.raises(ValueError, match="remove one of them"):
        run(cfg, _ctx(tmp_path, "filter", chains, probs))


def test_empty_generate_output_is_zero_chains(inputs, tmp_path):
    _d, _chains, probs = inputs
    empty = tmp_path / "generate-empty"
    empty.mkdir()
    m = run(FilterConfig(workers=0), _ctx(tmp_path, "filter", empty, probs))
    assert (m.rows_in, m.kept) == (0, 0)
    m.check_counts()



def test_a_killed_step_is_rewritten_not_appended(inputs, tmp_path):
    """Shards of a killed attempt (resume=True from the runner) must not duplicate chains."""
    _d, chains, probs = inputs
    cfg = FilterConfig(workers=0, verify={"timeout_s": 2.0})
    first = run(cfg, _ctx(tmp_path, "filter", chains, probs))
    before = read_table(tmp_path / "filter")
    ctx = _ctx(tmp_path, "filter", chains, probs)
    ctx.resume = True
    again = run(cfg, ctx)
    after = read_table(tmp_path / "filter")
    assert after.num_rows == before.num_rows == len(CASES)
    cols = [c for c in after.column_names if c != "verify_s"]
    assert after.select(cols).equals(before.select(cols))
    assert (again.kept, again.dropped) == (first.kept, first.dropped)
