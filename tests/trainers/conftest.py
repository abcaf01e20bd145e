"""Trainer fixtures: tiny random checkpoints saved and re-loaded through the real from_pretrained path.

- `tiny_ckpts`: {"vision": SigLIP (hidden 64, 32px, 16 tokens), "llm": Qwen2 (hidden 64, 2 layers) with a
  byte-level BPE tokenizer trained on the fly, "internvit": InternViT-style encoder} (trainers.tiny).
- `tiny_student`: those assembled into a LLaVA-layout student dir (AutoModelForImageTextToText loads it).
- `tiny_internvl_student`: the InternVL layout (LayerNorm + pixel shuffle projector, tiling processor);
  skips where torchvision is missing (transformers builds InternVL's processor only with it).
- `sft_rows` / `sft_dir`: a few pipeline.schema.SFT rows (0, 1 and 2 images, think spans) and a shard dir.
All session-scoped: built once (a few seconds), never modified by tests (copy before writing).
"""

from __future__ import annotations

import numpy as np
import pytest

SYSTEM = "You are a careful reasoner. Think in <think></think>, then answer."


def make_image(seed: int, width: int = 40, height: int = 30) -> dict:
    from PIL import Image

    from pipeline.images import encode_pil

    arr = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return encode_pil(Image.fromarray(arr), "png")


def make_sft_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        n_img = i % 3
        images = [make_image(100 * i + k, 40 + 8 * k, 30 + 4 * i) for k in range(n_img)]
        question = "What is the area of the triangle? " * (1 + i % 2) + f"Case {i}."
        reasoning = "Let x be the side. " * (1 + i) + "So the area is 6."
        rows.append(
            {
                "sample_id": f"s{i:03d}",
                "problem_id": f"p{i:03d}",
                "chain_id": f"c{i:03d}",
                "round": 0,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "<image>\n" * n_img + question},
                    {"role": "assistant", "content": f"<think>{reasoning}</think>The answer is $\\boxed{{{6 + i}}}$."},
                ],
                "images": images,
                "quality": float(2 + i % 4),
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    from trainers.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0, internvit=True)


@pytest.fixture(scope="session")
def tiny_student(tiny_ckpts, tmp_path_factory):
    from trainers.model import AssembleConfig, assemble_student

    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"]))
    return assemble_student(cfg, tmp_path_factory.mktemp("student") / "llava")


@pytest.fixture(scope="session")
def tiny_internvl_student(tiny_ckpts, tmp_path_factory):
    from trainers.model import AssembleConfig, assemble_student

    pytest.importorskip("torchvision", reason="InternVL's processor needs torchvision")
    cfg = AssembleConfig(vision_path=str(tiny_ckpts["internvit"]), llm_path=str(tiny_ckpts["llm"]), pixel_shuffle=0.5)
    return assemble_student(cfg, tmp_path_factory.mktemp("student") / "internvl")


@pytest.fixture(scope="session")
def sft_rows() -> list[dict]:
    return make_sft_rows()


@pytest.fixture(scope="session")
def sft_dir(sft_rows, tmp_path_factory):
    from pipeline.rundir import ShardWriter
    from pipeline.schema import SFT

    d = tmp_path_factory.mktemp("sft")
    with ShardWriter(d, SFT, "sft", rows_per_shard=4) as w:
        w.write(sft_rows)
    return d
