"""Efficient transfer end to end (slow): assemble on a substitute LLM -> align the projector -> re-assemble
onto the reasoning LLM -> SFT with packing, think weight and LoRA -> a standard checkpoint that reloads."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def _epoch_means_fall(result: dict, micro_batch: int) -> bool:
    """Each step sees different samples, so compare whole epochs: the last one's mean loss is lower."""
    k = -(-result["items"] // micro_batch)
    losses = result["losses"]
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_align_reassemble_sft(tiny_ckpts, sft_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from trainers.launch import WorkerSpec, launch
    from trainers.model import AssembleConfig, assemble_student, load_student, reassemble
    from trainers.tiny import build_tiny_llm

    loop = {"lr": 1e-2, "max_steps": 24, "micro_batch": 2, "warmup_ratio": 0.0, "zero_stage": 0,
            "gradient_checkpointing": False, "loss_chunk": 0}
    substitute = assemble_student(
        AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"])), tmp_path / "student"
    )
    align = launch(WorkerSpec(model_dir=str(substitute), sft_dirs=[str(sft_dir)], out_dir=str(tmp_path / "align"),
                              freeze="projector", loop=loop))
    assert _epoch_means_fall(align, 2)
    before, _ = load_student(substitute, dtype="float32")
    aligned, _ = load_student(align["model_dir"], dtype="float32")
    after = dict(aligned.named_parameters())
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, after[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)

    reasoner = build_tiny_llm(tmp_path / "reasoner", seed=9)
    student = reassemble(align["model_dir"], reasoner, tmp_path / "reassembled")
    sft = launch(WorkerSpec(model_dir=str(student), sft_dirs=[str(sft_dir)], out_dir=str(tmp_path / "sft"),
                            freeze="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                            data={"packing": True, "max_len": 512, "think_weight": 0.5}, loop=loop))
    assert _epoch_means_fall(sft, 2)
    assert sft["items"] < sft["samples"]  # packed bins
    final = AutoModelForImageTextToText.from_pretrained(sft["model_dir"], dtype=torch.float32)
    assert not any("lora_" in n for n, _ in final.named_parameters())
    proj_aligned = aligned.model.multi_modal_projector.state_dict()
    proj_final = final.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(proj_aligned[k], proj_final[k]) for k in proj_aligned)  # trained further in SFT
