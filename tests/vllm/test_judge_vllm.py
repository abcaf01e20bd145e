"""The assess judge on the vllm engine: every attempt is one ray.data.llm run over the pending problems.

The tiny random model never writes the rubric's JSON, so each problem is re-asked once with its own
reply and the correction turn (an assistant message in the conversation: string content through the
R1-style template), then falls back to the heuristic scores, counted.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from filters import assess  # noqa: E402
from filters.assess import AssessConfig, JudgeConfig  # noqa: E402
from pipeline.rundir import read_table  # noqa: E402
from pipeline.schema import PROBLEMS  # noqa: E402
from tests.filters.stagectx import run_stage, write_step  # noqa: E402

from .conftest import ENGINE_KW, text_problems  # noqa: E402

pytestmark = pytest.mark.vllm


def _engine(model) -> dict:
    # the rubric alone is ~600 tokens of the tiny tokenizer
    return {"kind": "vllm", "model": str(model), "text_only": True, **ENGINE_KW, "max_model_len": 2048}


def test_judge_retries_through_vllm_then_quarantines(ray_gpu, r1_model, tmp_path):
    problems = [{k: p.get(k) for k in PROBLEMS.names} for p in text_problems(3)]
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", problems)
    judge = JudgeConfig(engine=_engine(r1_model), max_retries=1, max_tokens=16, on_failure="quarantine")
    m = run_stage(assess, AssessConfig(workers=0, judge=judge), run, "assess", {"problems": ["ingest"]})
    m.check_counts()
    assert m.rows_in == 3 and m.kept == 0 and m.quarantined == {"judge_invalid": 3}
    assert m.metrics["judge_ok"] == 0 and m.metrics["judge_failed"] == 3 and m.metrics["judge_attempts"] == 6
    for q in read_table(run / "assess" / "quarantine").to_pylist():
        # the model answered (twice) and its reply was refused: not an engine error
        assert "after 2 attempts" in q["error"] and "engine error" not in q["error"], q["error"]
