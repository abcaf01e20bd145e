"""Launchers on the tiny student: one process, torchrun (2 gloo ranks), Ray Train (2 workers).

Run: .venv/bin/pytest -q tests/trainers/test_launch.py        (add -m slow for Ray Train)
"""

from __future__ import annotations

import json

import pytest

from trainers.launch import WorkerSpec, launch


def _spec(student, sft_dir, out, **loop) -> WorkerSpec:
    base = dict(lr=5e-3, warmup_ratio=0.0, micro_batch=1, grad_accum=2, max_steps=4, zero_stage=2, loss_chunk=16)
    base.update(loop)
    return WorkerSpec(
        model_dir=str(student), sft_dirs=[str(sft_dir)], out_dir=str(out), freeze="projector_llm",
        data={"max_len": 512}, loop=base, seed=3,
    )


def _weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_align_changes_only_projector_tensors(tiny_student, sft_dir, tmp_path):
    spec = _spec(tiny_student, sft_dir, tmp_path, max_steps=3).model_copy(update={"freeze": "projector"})
    res = launch(spec, "local")
    assert res["steps"] == 3 and res["samples"] == 6
    before, after = _weights(tiny_student), _weights(tmp_path / "model")
    assert before.keys() == after.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed, "nothing trained"
    assert all("multi_modal_projector" in k for k in changed), sorted(changed)
    proj = {k for k in before if "multi_modal_projector" in k}
    assert changed == proj


def test_exported_student_reloads_with_same_logits(tiny_student, sft_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from trainers.data import make_sft_data
    from trainers.loop import LoopConfig, LoopData, train_loop
    from trainers.model import apply_freeze, load_student

    model, processor = load_student(tiny_student, dtype="float32")
    apply_freeze(model, "projector_llm")
    ds, collate = make_sft_data([sft_dir], processor)
    cfg = LoopConfig(lr=5e-3, max_steps=2, micro_batch=2, loss_chunk=8)
    res = train_loop(model, LoopData(ds, collate, processor), cfg, tmp_path, seed=0)
    reloaded = AutoModelForImageTextToText.from_pretrained(res.model_dir)
    batch = collate([ds[1], ds[2]])  # samples with 1 and 2 images
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    model.eval()
    with torch.no_grad():
        a, b = model(**inputs).logits, reloaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert (res.model_dir / "processor_config.json").exists() or (res.model_dir / "preprocessor_config.json").exists()


def _agree(one: dict, two: dict, tol: float, steps: int = 4) -> None:
    assert one["steps"] == two["steps"] == steps
    for i, (a, b) in enumerate(zip(one["losses"], two["losses"], strict=True)):
        assert abs(a - b) < tol, f"step {i + 1}: 1 rank {a} vs 2 ranks {b}"
    assert two["world_size"] == 2 and one["world_size"] == 1


def _same_weights(a, b, tol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst < tol, worst


@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_two_ranks_match_one_rank(tiny_student, sft_dir, tmp_path, stage):
    one = launch(_spec(tiny_student, sft_dir, tmp_path / "one", zero_stage=stage, grad_accum=2), "local")
    two = launch(_spec(tiny_student, sft_dir, tmp_path / "two", zero_stage=stage, grad_accum=1), "torchrun", nproc=2)
    _agree(one, two, 1e-5)
    _same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", 1e-5)
    steps = [json.loads(x) for x in (tmp_path / "two" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]


def test_torchrun_two_ranks_agree_when_one_rank_gets_only_filler(tiny_student, sft_dir, tmp_path):
    # 6 samples, global batch 8: rank 1's second micro-batch holds only weight-0 filler while rank 0's
    # holds real samples; both ranks must still reduce the same gradient buckets
    one = launch(_spec(tiny_student, sft_dir, tmp_path / "one", micro_batch=2, grad_accum=4, max_steps=2), "local")
    two = launch(_spec(tiny_student, sft_dir, tmp_path / "two", micro_batch=2, grad_accum=2, max_steps=2),
                 "torchrun", nproc=2)
    _agree(one, two, 1e-5, steps=2)
    _same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", 1e-5)


@pytest.mark.slow
def test_ray_train_two_workers_match_one_rank(ray_local, tiny_student, sft_dir, tmp_path):
    one = launch(_spec(tiny_student, sft_dir, tmp_path / "one", grad_accum=2), "local")
    two = launch(_spec(tiny_student, sft_dir, tmp_path / "two", grad_accum=1), "ray", nproc=2, use_gpu=False)
    _agree(one, two, 1e-5)
    _same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", 1e-5)


def test_launcher_errors_are_clear(tiny_student, sft_dir, tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        launch(_spec(tiny_student, sft_dir, tmp_path), "mpi")
    with pytest.raises(ValueError, match="train.nproc=2"):
        launch(_spec(tiny_student, sft_dir, tmp_path), "local", nproc=2)
