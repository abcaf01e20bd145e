"""Curate's SFT shards feed the trainer's data path as they are: no sample dropped, images expanded.

Curate runs on filtered chains of real synthetic problems (images included); the shards go through
trainers.data with a tiny random student built and re-loaded through from_pretrained.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from filters import curate
from filters.curate import CurateConfig
from pipeline.rundir import read_table
from pipeline.schema import CHAINS, PROBLEMS, extend
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

FILTERED = extend(CHAINS, pa.field("verdict", pa.string()), pa.field("quality", pa.float64()),
                  pa.field("keep", pa.bool_()), pa.field("drop_reason", pa.string()))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    pytest.importorskip("transformers")
    from trainers.model import AssembleConfig, assemble_student, load_student
    from trainers.tiny import build_tiny_checkpoints

    ckpts = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0)
    student = assemble_student(
        AssembleConfig(vision_path=str(ckpts["vision"]), llm_path=str(ckpts["llm"])),
        tmp_path_factory.mktemp("student") / "llava",
    )
    return load_student(student, dtype="float32")[1]


def test_curated_shards_train_without_drops(tmp_path, processor):
    from trainers.data import SFTDataConfig, make_sft_data

    problems, chains = [], []
    for i in range(6):
        p = make_problem(2, i)
        # Problem 0 carries two figures and inline source tags, as MATH-V style data does.
        images = p["images"] * (2 if i == 0 else 1)
        question = ("Compare <image1> with <image2>. " if i == 0 else "") + p["question"]
        problems.append({"problem_id": f"p{i}", "question": question, "images": images, "answer": p["answer"],
                         "choices": p["choices"], "answer_type": p["answer_type"]})
        for k in range(2):
            chains.append({"chain_id": f"c{i}{k}", "problem_id": f"p{i}", "round": 0, "teacher": "t",
                           "sample_idx": k, "reasoning": f"Reading the figure {k}: " + "the values add up. " * (3 + k),
                           "response": f"So the answer is $\\boxed{{{p['answer']}}}$.", "completion_tokens": 20 + k,
                           "verdict": "correct", "quality": 4.0, "keep": True})
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", problems)
    write_step(run, "filter", FILTERED, "chains", chains)
    m = run_stage(curate, CurateConfig(n_per_problem=1), run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    assert m.kept == 6

    ds, collate = make_sft_data([run / "curate"], processor, SFTDataConfig(max_len=4096))
    assert len(ds) == 6 and ds.dropped == {}
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    rows = {r["sample_id"]: r for r in read_table(run / "curate").to_pylist()}
    per_image = None
    for i in range(len(ds)):
        item = ds[i]
        n_img_tokens = int((item["input_ids"] == image_id).sum())
        n_images = item["pixel_values"].shape[0] if item.get("pixel_values") is not None else 0
        per_image = per_image or n_img_tokens // max(1, n_images)
        assert n_images >= 1 and n_img_tokens == per_image * n_images
        assert (item["labels"] != -100).any()  # the assistant turn is trained on
    assert sorted(len(r["images"]) for r in rows.values()) == [1, 1, 1, 1, 1, 2]
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2
