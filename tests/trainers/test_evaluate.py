"""The `evaluate` stage: the tiny student, taught the answers of a few synthetic problems, is graded by
the real verifier through the hf engine; per-subject / per-difficulty accuracy and failed ids.

Run: .venv/bin/pytest -q tests/trainers/test_evaluate.py
"""

from __future__ import annotations

import pytest

from pipeline.config import validate_config
from pipeline.rundir import ShardWriter, read_table
from pipeline.runner import StageContext
from pipeline.schema import PROBLEMS
from trainers.evaluate import FAILED_DIR, EvaluateConfig, accuracy_table, messages, run

N = 6
SOURCES = [{"kind": "synthetic", "name": "synthetic-eval", "synthetic": {"n": N, "seed": 0}}]


@pytest.fixture(scope="module")
def problems():
    from pipeline.ingest import SourceConfig, load_sources

    rows = [row for kind, row in load_sources([SourceConfig.model_validate(s) for s in SOURCES]) if kind == "problem"]
    assert len(rows) == N
    return rows


def _ctx(tmp_path, step: str, inputs: dict) -> StageContext:
    out = tmp_path / step
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=tmp_path, step=step, stage="evaluate", round=0, out_dir=out, inputs=inputs,
                        run_config=validate_config({"run": {"name": "t"}}), fingerprint="test")


@pytest.fixture(scope="module")
def taught_student(tiny_student, problems, tmp_path_factory):
    """The tiny student trained on a short answer for problems 0-3 (4 and 5 never seen)."""
    from tests.trainers.teach import teach_answers

    d = tmp_path_factory.mktemp("taught")
    res = teach_answers(tiny_student, problems[:4], d, lr=1e-2, warmup_ratio=0.05, max_steps=80)
    assert res.losses[-1] < 0.05, res.losses[-5:]
    return d / "train"


def test_messages_render_like_the_training_rows(tiny_student, problems):
    from filters.curate import system_prompt, user_turn
    from trainers.model import load_student

    _, processor = load_student(tiny_student, dtype="float32")
    p = problems[0]
    sys_prompt = system_prompt()
    train_text = processor.apply_chat_template(
        [{"role": "system", "content": sys_prompt}, {"role": "user", "content": user_turn(p)}],
        tokenize=False, add_generation_prompt=True,
    )
    eval_msgs = messages(p, sys_prompt)
    parts = [{"type": "image"} if x["type"] == "image_url" else x for x in eval_msgs[1]["content"]]
    eval_text = processor.apply_chat_template(
        [eval_msgs[0], {"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    assert eval_text == train_text


def test_evaluate_grades_with_the_verifier(taught_student, problems, tmp_path):
    cfg = EvaluateConfig(sources=SOURCES, limit=None, max_tokens=48, batch_size=6)
    m = run(cfg, _ctx(tmp_path, "evaluate", {"model": [taught_student]}))
    m.check_counts()
    assert m.rows_in == N and m.kept == N
    preds = {r["problem_id"]: r for r in read_table(tmp_path / "evaluate").to_pylist()}
    taught = {p["problem_id"] for p in problems[:4]}
    assert sum(preds[i]["correct"] for i in taught) >= 3, [(preds[i]["completion"], preds[i]["answer"]) for i in taught]
    for r in preds.values():  # the verdict is the verifier's, not a string compare
        assert r["verdict"] in ("correct", "wrong", "no_answer", "gold_unparsable", "timeout", "truncated")
        assert r["correct"] == (r["verdict"] == "correct")
    failed = read_table(tmp_path / "evaluate" / FAILED_DIR).column("problem_id").to_pylist()
    assert sorted(failed) == sorted(i for i, r in preds.items() if not r["correct"])
    acc = sum(r["correct"] for r in preds.values()) / N
    assert m.metrics["accuracy"] == pytest.approx(acc)
    by_subject = m.metrics["by_subject"]
    assert sum(v["n"] for v in by_subject.values()) == N
    assert set(by_subject) == {p["subject"] for p in problems}
    assert set(m.metrics["by_difficulty"]) == {str(p["difficulty"]) for p in problems}


def test_evaluate_reads_the_runs_problems_by_default(taught_student, problems, tmp_path):
    with ShardWriter(tmp_path / "ingest", PROBLEMS, "problems") as w:
        w.write([{k: p.get(k) for k in PROBLEMS.names} for p in problems])
    m = run(EvaluateConfig(limit=3, max_tokens=8), _ctx(tmp_path, "evaluate", {"model": [taught_student],
                                                                              "problems": [tmp_path / "ingest"]}))
    m.check_counts()
    assert m.rows_in == 3 and read_table(tmp_path / "evaluate").num_rows == 3


def test_accuracy_table_groups_unknown():
    rows = [{"subject": "a", "correct": True}, {"subject": "a", "correct": False}, {"subject": None, "correct": True}]
    assert accuracy_table(rows, "subject") == {"a": {"n": 2, "accuracy": 0.5}, "unknown": {"n": 1, "accuracy": 1.0}}


def test_engine_errors_count_as_wrong_and_are_reported(tiny_student, problems, tmp_path):
    """A problem the engine fails on (here: a figure whose bytes are not an image, which the hf engine's
    processor refuses) stays in the denominator as a wrong answer, with its own verdict and count."""
    rows = [{k: p.get(k) for k in PROBLEMS.names} for p in problems[:3]]
    bad = rows[0]["problem_id"]
    rows[0]["images"] = [{**rows[0]["images"][0], "bytes": b"not an image at all"}]
    with ShardWriter(tmp_path / "ingest", PROBLEMS, "problems") as w:
        w.write(rows)
    m = run(EvaluateConfig(limit=None, max_tokens=8, batch_size=1),
            _ctx(tmp_path, "evaluate", {"model": [tiny_student], "problems": [tmp_path / "ingest"]}))
    m.check_counts()
    preds = {r["problem_id"]: r for r in read_table(tmp_path / "evaluate").to_pylist()}
    assert m.rows_in == 3 and m.kept == 3 and len(preds) == 3
    assert preds[bad]["verdict"] == "engine_error" and preds[bad]["correct"] is False
    assert sum(m.metrics["engine_errors"].values()) == 1
    assert m.metrics["verdicts"]["engine_error"] == 1
    assert m.metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in preds.values()) / 3)
    # the wrong list feeds the next SFT round: an engine failure is not a wrong answer of the model
    failed = read_table(tmp_path / "evaluate" / FAILED_DIR).column("problem_id").to_pylist()
    assert bad not in failed
