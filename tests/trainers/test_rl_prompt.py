"""GRPO prompts are the student's own: what TRL renders from the rl stage's conversation is exactly the
text evaluate prompts with (trainers.chat.student_prompt), so RL trains on the prompts the student sees."""

from __future__ import annotations

import io

import pytest

from pipeline.synthetic import make_problem


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_rl_prompt_renders_as_the_students_prompt(tiny_student, n_images):
    from PIL import Image
    from transformers import AutoProcessor
    from trl.data_utils import prepare_multimodal_messages

    from filters.curate import CurateConfig, system_prompt
    from trainers.chat import student_prompt
    from trainers.rl import grpo_rows

    processor = AutoProcessor.from_pretrained(tiny_student)
    p = make_problem(0, 3)
    p = {**p, "problem_id": p["id"], "images": (list(p.get("images") or []) * 2)[:n_images]}
    system = system_prompt(CurateConfig())
    [row] = grpo_rows([p], system)
    # what GRPOTrainer does with a conversational prompt of a vision-language model: images into the parts,
    # then the processor's chat template with the generation prompt
    images = [Image.open(io.BytesIO(im["bytes"])) for im in row["images"]]
    msgs = prepare_multimodal_messages(row["prompt"], images=images) if images else row["prompt"]
    got = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == student_prompt(p, processor, system)
    assert got.count(processor.image_token) == n_images
