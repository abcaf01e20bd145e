"""The student on a GPU: bf16 by default, packed rows equal single forwards, generation runs."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.schema import SFT
from tests.trainers.conftest import make_sft_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda(t: torch.Tensor) -> torch.Tensor:
    """To the GPU; pixels in the model's bf16 (LLaVA's forward does not cast them)."""
    return t.to("cuda", torch.bfloat16) if t.is_floating_point() and t.dim() == 4 else t.cuda()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from trainers.model import AssembleConfig, assemble_student, load_student

    out = assemble_student(AssembleConfig(init="tiny_random", dtype="bfloat16"), tmp_path_factory.mktemp("s") / "s")
    model, processor = load_student(out)  # dtype None: bf16 on CUDA
    return model.cuda().eval(), processor


def test_bf16_on_cuda_by_default(student):
    model, _ = student
    assert next(model.parameters()).dtype == torch.bfloat16


def test_packed_rows_match_single_forwards_on_cuda(student):
    from trainers.data import SFTDataConfig, make_sft_data

    model, processor = student
    table = pa.Table.from_pylist(make_sft_rows(6), schema=SFT)
    packed, collate = make_sft_data(table, processor, SFTDataConfig(packing=True, max_len=400))
    batch = {k: _cuda(v) for k, v in collate([packed[b] for b in range(len(packed))]).items()}
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
        for row, bin_ in enumerate(packed.bins):
            start = 0
            for i in bin_:
                item = packed.base[i]
                one = {"input_ids": item["input_ids"][None].cuda()}
                if item["pixel_values"] is not None:
                    one["pixel_values"] = _cuda(item["pixel_values"])
                single = model(**one, use_cache=False).logits.float()[0]
                n = item["length"]
                # bf16: compare the predicted tokens and a loose tolerance, not bit equality
                assert (logits[row, start : start + n].argmax(-1) == single.argmax(-1)).float().mean() > 0.98
                assert torch.allclose(logits[row, start : start + n], single, atol=5e-2, rtol=5e-2)
                start += n


def test_generate_on_cuda(student):
    from trainers.data import prompt_inputs

    model, processor = student
    row = make_sft_rows(2)[1]
    inputs = {k: _cuda(v) for k, v in prompt_inputs(processor, row["messages"][:2], row["images"]).items()}
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
