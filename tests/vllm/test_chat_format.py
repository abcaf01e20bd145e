"""What Ray's chat-template stage renders from the generate stage's rows, for three kinds of template.

Plain-string content stays a string (DeepSeek-R1's template concatenates it and fails on a list of
parts), messages with images carry parts; a template that iterates parts reads both, and the
student's multimodal template puts its image placeholder where each image part is. The stage here is
Ray's own ChatTemplateUDF, as the processor runs it, without an engine.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF  # noqa: E402

from teachers.engines import VLLMEngineConfig  # noqa: E402
from teachers.engines.vllm import preprocess  # noqa: E402
from teachers.generate import GenerateConfig, build_requests, expand  # noqa: E402
from tests.teachers.conftest import synthetic_problems  # noqa: E402

from .conftest import PARTS_TEMPLATE, build_text_model  # noqa: E402

pytestmark = pytest.mark.vllm


def _rows(model, text_only: bool, problems) -> list[dict]:
    cfg = GenerateConfig(engine=VLLMEngineConfig(model=str(model), text_only=text_only), samples_per_problem=1)
    work, bad = build_requests(problems, cfg, 0, 0)
    assert not bad
    return [preprocess(r) for w in work for r in expand(w)]


def _render(model, rows) -> list[str]:
    udf = ChatTemplateUDF(data_column="__data", expected_input_keys=["messages"], model=str(model))
    batch = [{**r, udf.IDX_IN_BATCH_COLUMN: i} for i, r in enumerate(rows)]

    async def go():
        return [o async for o in udf.udf(batch)]

    out = sorted(asyncio.run(go()), key=lambda o: o[udf.IDX_IN_BATCH_COLUMN])
    return [o["prompt"] for o in out]


def _problems():
    ps = synthetic_problems(2)
    return [{**ps[0], "images": None, "needs_image": False, "image_description": None}, ps[1]]


def test_r1_template_gets_strings(r1_model):
    text = {**_problems()[0]}
    described = {**_problems()[1], "image_description": "a right triangle with legs 3 and 4"}
    rows = _rows(r1_model, True, [text, described])
    assert all(isinstance(m["content"], str) for r in rows for m in r["messages"])
    prompts = _render(r1_model, rows)
    assert prompts[0].startswith("<|im_start|>User: " + text["question"].strip()[:20])
    assert "a right triangle with legs 3 and 4" in prompts[1] and prompts[1].endswith("Assistant: <think>\n")
    # the content-parts form of the same rows is what the R1 template cannot take
    parts = [{**r, "messages": [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in r["messages"]]}
             for r in rows]
    with pytest.raises(TypeError, match="concatenate"):
        _render(r1_model, parts)


def test_parts_template_reads_strings_and_image_parts(tmp_path):
    model = build_text_model(tmp_path / "parts", chat_template=PARTS_TEMPLATE)
    text, image = _problems()
    rows = _rows(model, False, [text, image])
    assert isinstance(rows[0]["messages"][-1]["content"], str)
    parts = rows[1]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    prompts = _render(model, rows)
    assert "<image>" not in prompts[0] and text["question"].strip()[:20] in prompts[0]
    assert prompts[1].count("<image>") == 1 and image["question"].strip()[:20] in prompts[1]
    assert json.loads(json.dumps(rows[1]["sampling_params"]))["seed"] == rows[1]["seed"]


def test_student_template_places_one_placeholder_per_image(tiny_student):
    _, image = _problems()
    two = {**image, "images": image["images"] * 2}
    rows = _rows(tiny_student, False, [two, _problems()[0]])
    prompts = _render(tiny_student, rows)
    assert prompts[0].count("<image>") == 2 and prompts[1].count("<image>") == 0
    assert prompts[0].endswith("<|im_start|>assistant\n")
