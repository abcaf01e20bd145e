"""InternVL layout (InternViT-style encoder, pixel shuffle + LayerNorm projector, dynamic tiling).

transformers builds InternVL's processor only with torchvision installed; without it these tests skip
(the CPU dev box), and they run where torchvision is present (the GPU image).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from pipeline.schema import SFT
from tests.trainers.conftest import make_image, make_sft_rows

pytest.importorskip("torchvision", reason="InternVL's processor needs torchvision")


def test_internvl_student_reloads_with_same_logits(tiny_ckpts, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.images import decode
    from trainers.model import AssembleConfig, _save, build_student

    cfg = AssembleConfig(vision_path=str(tiny_ckpts["internvit"]), llm_path=str(tiny_ckpts["llm"]), pixel_shuffle=0.5)
    model, processor, record = build_student(cfg)
    assert record["layout"] == "internvl"
    assert hasattr(model.model.multi_modal_projector, "layer_norm")
    images = [decode(make_image(3, width=90, height=40))]  # wide: several tiles + thumbnail
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    tiles = inputs["pixel_values"].shape[0]
    assert tiles > 1
    # (32 / 8)^2 patches x 0.5^2 pixel shuffle = 4 tokens per tile.
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4 * tiles
    with torch.no_grad():
        before = model.eval()(**inputs).logits
    out = _save(model, processor, tmp_path / "s", record)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    inputs2 = AutoProcessor.from_pretrained(out)(images=images, text=[prompt], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs2).logits, before, atol=1e-5)


def test_internvl_sft_samples_match_processor(tiny_internvl_student):
    from pipeline.images import decode
    from trainers.data import SFTDataConfig, SFTDataset
    from trainers.model import load_student

    model, processor = load_student(tiny_internvl_student, dtype="float32")
    rows = make_sft_rows(3)
    ds = SFTDataset(pa.Table.from_pylist(rows, schema=SFT), processor, SFTDataConfig(max_tiles=4))
    item = ds[2]
    row = rows[2]
    text = processor.apply_chat_template(row["messages"], tokenize=False).replace("<image>", processor.image_token)
    ref = processor(images=[decode(i) for i in row["images"]], text=[text], return_tensors="pt", max_patches=4)
    assert torch.equal(item["input_ids"], ref["input_ids"][0])
    assert torch.equal(item["pixel_values"], ref["pixel_values"])
    with torch.no_grad():
        model.eval()(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"])
