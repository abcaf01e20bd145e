"""The `evaluate` stage: the tiny student, taught the answers of a few synthetic problems, is graded by
the real verifier through the hf engine on a held-out set (decontaminated against the run's training
problems, k seeded samples: pass@1, majority vote) and on a sample of the training problems (the wrong
list); per-subject / per-difficulty accuracy; engine errors counted as wrong.

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
    from filters.curate import system_prompt
    from trainers.chat import student_prompt
    from trainers.model import load_student

    _, processor = load_student(tiny_student, dtype="float32")
    p = problems[0]
    sys_prompt = system_prompt()
    train_text = student_prompt(p, processor)
    eval_msgs = messages(p, sys_prompt)
    parts = [{"type": "image"} if x["type"] == "image_url" else x for x in eval_msgs[1]["content"]]
    eval_text = processor.apply_chat_template(
        [eval_msgs[0], {"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    assert eval_text == train_text


def test_evaluate_grades_with_the_verifier(taught_student, problems, tmp_path):
    # `sources`, the section's old spelling: the eval set answered once, greedily
    cfg = EvaluateConfig(sources=SOURCES, limit=0, max_tokens=48, batch_size=6)
    assert cfg.eval_set.samples == 1 and cfg.eval_set.temperature == 0
    m = run(cfg, _ctx(tmp_path, "evaluate", {"model": [taught_student]}))
    m.check_counts()
    assert m.rows_in == N and m.kept == N
    preds = {r["problem_id"]: r for r in read_table(tmp_path / "evaluate").to_pylist()}
    taught = {p["problem_id"] for p in problems[:4]}
    assert sum(preds[i]["correct"] for i in taught) >= 3, [(preds[i]["completion"], preds[i]["answer"]) for i in taught]
    for r in preds.values():  # the verdict is the verifier's, not a string compare
        assert r["verdict"] in ("correct", "wrong", "no_answer", "gold_unparsable", "timeout", "truncated")
        assert r["correct"] == (r["verdict"] == "correct")
        assert r["split"] == "heldout" and r["eval_set"] == "synthetic-eval"
    # no training problems here: no wrong list (held-out problems never feed training)
    assert read_table(tmp_path / "evaluate" / FAILED_DIR).num_rows == 0
    acc = sum(r["correct"] for r in preds.values()) / N
    assert m.metrics["headline"] == "heldout" and m.metrics["majority"] == pytest.approx(acc)
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
    assert m.metrics["headline"] == "train" and m.metrics["heldout"] is None
    preds = read_table(tmp_path / "evaluate").to_pylist()
    failed = read_table(tmp_path / "evaluate" / FAILED_DIR).column("problem_id").to_pylist()
    assert sorted(failed) == sorted(r["problem_id"] for r in preds if not r["correct"])


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


# --- pass@1 over k, majority vote --------------------------------------------------------------------


def _s(pred, verdict):
    return {"pred_answer": pred, "verdict": verdict, "correct": verdict == "correct"}


def test_pass_at_1_and_majority_arithmetic_on_a_hand_built_case():
    """Three problems, hand-graded samples: the scores follow by hand."""
    from trainers.scoring import score_problem, summary

    a = {"problem_id": "a", "answer": "6", "answer_type": "number", "subject": "s", "difficulty": 1}
    b = {"problem_id": "b", "answer": "6", "answer_type": "expression", "subject": "s", "difficulty": 2}
    c = {"problem_id": "c", "answer": "4", "answer_type": "number", "subject": "t", "difficulty": 2}
    # a: 6 and 6.0 are one answer (2 votes) against 7; a no-answer and an engine error do not vote
    sa = score_problem(a, [_s("6", "correct"), _s("7", "wrong"), _s("6.0", "correct"), _s(None, "no_answer"),
                           _s(None, "engine_error")])
    assert (sa["pass1"], sa["majority_votes"], sa["majority_correct"], sa["pass_k"]) == (2 / 5, 2, True, True)
    assert sa["engine_errors"] == 1 and sa["samples"] == 5
    # b: 7, 14/2 and 7 are one answer by the verifier's equivalence (3 votes) and beat the correct 6
    sb = score_problem(b, [_s("7", "wrong"), _s("6", "correct"), _s("\\frac{14}{2}", "wrong"), _s("7", "wrong")])
    assert (sb["pass1"], sb["majority_answer"], sb["majority_votes"], sb["majority_correct"]) == (0.25, "7", 3, False)
    assert sb["pass_k"]
    # c: a 1-1 tie goes to the answer given first (3, wrong)
    sc = score_problem(c, [_s("3", "wrong"), _s("4", "correct")])
    assert (sc["pass1"], sc["majority_answer"], sc["majority_correct"]) == (0.5, "3", False)
    tot = summary([sa, sb, sc])
    assert tot["pass1"] == pytest.approx((0.4 + 0.25 + 0.5) / 3)
    assert tot["majority"] == pytest.approx(1 / 3) and tot["pass_k"] == 1.0 and tot["engine_error_samples"] == 1
    assert tot["by_subject"]["s"]["majority"] == 0.5 and tot["by_subject"]["t"]["pass1"] == 0.5
    assert tot["by_difficulty"]["2"] == {"n": 2, "pass1": pytest.approx(0.375), "majority": 0.0, "pass_k": 1.0,
                                         "accuracy": pytest.approx(0.375)}


def _pool_with_copies(problems: list[dict]) -> list[dict]:
    """Training problems: two held-out problems copied (one verbatim, one re-typeset with its figure
    re-encoded as JPEG), one held-out question over a different figure (not a copy), and unrelated ones."""
    import io

    from PIL import Image

    from tests.trainers.conftest import make_image

    others = [{"problem_id": f"train-{i}", "question": f"How many sides does a polygon number {i} have in total?",
               "answer": str(i + 3), "answer_type": "number", "images": [make_image(i, 64, 48)],
               "subject": "counting", "difficulty": 1} for i in range(6)]

    verbatim = dict(problems[0], problem_id="train-copy-0")
    img = problems[1]["images"][0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(img["bytes"])).convert("RGB").save(buf, "JPEG", quality=85)
    retyped = dict(problems[1], problem_id="train-copy-1", question="Question:  " + problems[1]["question"].upper(),
                   images=[{**img, "bytes": buf.getvalue(), "format": "jpeg"}])
    other_fig = dict(problems[2], problem_id="train-other-figure", images=[make_image(99, 320, 240)])
    return [verbatim, retyped, other_fig, *others]


def test_held_out_set_contamination_removed_and_counted(taught_student, problems, tmp_path):
    pool = _pool_with_copies(problems)
    with ShardWriter(tmp_path / "ingest", PROBLEMS, "problems") as w:
        w.write([{k: p.get(k) for k in PROBLEMS.names} for p in pool])
    cfg = EvaluateConfig(eval_set={"sources": SOURCES, "samples": 3, "temperature": 0.8}, limit=4, max_tokens=24,
                         batch_size=8)
    ctx = _ctx(tmp_path, "evaluate", {"model": [taught_student], "problems": [tmp_path / "ingest"]})
    m = run(cfg, ctx)
    m.check_counts()
    held = m.metrics["heldout"]
    assert m.dropped == {"contaminated": 2} and held["contaminated"] == 2
    assert {x["train_problem_id"] for x in held["matches"]} == {"train-copy-0", "train-copy-1"}
    assert m.rows_in == N + 4 and m.kept == N - 2 + 4 and held["problems"] == N - 2
    preds = read_table(tmp_path / "evaluate").to_pylist()
    held_ids = {r["problem_id"] for r in preds if r["split"] == "heldout"}
    assert held_ids == {p["problem_id"] for p in problems[2:]}  # the copied two are gone, the look-alike stays
    assert len([r for r in preds if r["split"] == "heldout"]) == 3 * (N - 2)  # k samples each
    # the wrong list: training problems only
    train_ids = {p["problem_id"] for p in pool}
    failed = read_table(tmp_path / "evaluate" / FAILED_DIR).column("problem_id").to_pylist()
    assert set(failed) <= train_ids and not set(failed) & held_ids
    # the manifest's pass@1 and majority are those of the scores table
    scores = [s for s in read_table(tmp_path / "evaluate" / "scores").to_pylist() if s["split"] == "heldout"]
    assert len(scores) == N - 2
    assert m.metrics["accuracy"] == pytest.approx(sum(s["pass1"] for s in scores) / len(scores))
    assert m.metrics["majority"] == pytest.approx(sum(s["majority_correct"] for s in scores) / len(scores))
    for s in scores:
        mine = [r for r in preds if r["split"] == "heldout" and r["problem_id"] == s["problem_id"]]
        assert s["correct_samples"] == sum(r["correct"] for r in mine) and s["samples"] == 3
    # seeded: a second run answers identically
    again = tmp_path / "again"
    m2 = run(cfg, _ctx(again, "evaluate", {"model": [taught_student], "problems": [tmp_path / "ingest"]}))
    key = lambda r: (r["split"], r["problem_id"], r["sample_idx"])  # noqa: E731
    assert sorted((key(r), r["completion"]) for r in read_table(again / "evaluate").to_pylist()) == \
        sorted((key(r), r["completion"]) for r in preds)
    assert m2.metrics["accuracy"] == m.metrics["accuracy"]


def test_the_held_out_set_cannot_change_between_rounds():
    from pipeline.config import ConfigError

    raw = {"run": {"name": "t"}, "evaluate": {"eval_set": {"sources": SOURCES}},
           "rounds": {"count": 2, "overrides": [{}, {"evaluate": {"eval_set": {"samples": 8}}}]}}
    with pytest.raises(ConfigError, match="held-out set is the same for every phase"):
        validate_config(raw)
