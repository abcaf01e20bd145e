"""The hf engine as a multimodal teacher: the project's own tiny student checkpoint, images via its processor."""

from __future__ import annotations

import pytest

from teachers.engines import GenRequest, HFEngineConfig, make_engine
from teachers.render import PromptConfig, render_messages

from .conftest import synthetic_problems


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    # A trained student serves as the next round's teacher: build one as the trainers package does.
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_checkpoints

    d = tmp_path_factory.mktemp("student")
    ck = build_tiny_checkpoints(d / "parts", seed=0)
    return assemble_student(AssembleConfig(vision_path=str(ck["vision"]), llm_path=str(ck["llm"])), d / "llava")


def test_hf_multimodal_engine_feeds_images_through_the_processor(student_dir, one_torch_thread):
    eng = make_engine(HFEngineConfig(model=str(student_dir), multimodal=True, batch_size=3))
    p = synthetic_problems(1)[0]
    one = render_messages(p, PromptConfig(), text_only=False)
    two = render_messages({**p, "images": p["images"] * 2}, PromptConfig(), text_only=False)
    none = render_messages({**p, "images": None}, PromptConfig(), text_only=False)
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 6, "seed": 1}
    r0, r1, r2 = eng.generate([GenRequest(messages=m, sampling=sampling) for m in (none, one, two)])
    assert all(r.error is None and r.completion_tokens <= 6 for r in (r0, r1, r2))
    per_image = r1.prompt_tokens - r0.prompt_tokens
    assert per_image > 1 and r2.prompt_tokens - r1.prompt_tokens == per_image
    # the same request alone gives the same sample (per-row seeds, left padding)
    assert eng.generate([GenRequest(messages=one, sampling=sampling)])[0].text == r1.text
