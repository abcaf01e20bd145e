"""The hf engine on a CUDA device (run with `pytest -m gpu tests/teachers`)."""

from __future__ import annotations

import pytest

from teachers.engines import GenRequest, HFEngineConfig, make_engine
from teachers.render import PromptConfig, render_messages

from .conftest import synthetic_problems

torch = pytest.importorskip("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_engine_on_cuda_per_row_sampling(tiny_chat_model):
    # float32: batch-composition independence should not hinge on bf16 rounding of padded attention
    eng = make_engine(HFEngineConfig(model=str(tiny_chat_model), text_only=True, device="cuda", dtype="float32",
                                     batch_size=4))
    assert eng.device.type == "cuda" and eng.model.dtype == torch.float32
    problems = [{**p, "images": None} for p in synthetic_problems(4)]
    reqs = [GenRequest(messages=render_messages(p, PromptConfig(), True),
                       sampling={"temperature": 0.8, "top_p": 0.9, "max_tokens": 10 + i, "seed": i,
                                 "repetition_penalty": 1.0 + 0.2 * i}) for i, p in enumerate(problems)]
    together = eng.generate(reqs)
    for i, r in enumerate(together):
        assert r.error is None and r.completion_tokens <= 10 + i
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "length":
            assert r.completion_tokens == 10 + i
    # a row's sample depends on its own seed, not on its batch neighbours
    assert eng.generate([reqs[2]])[0].text == together[2].text
