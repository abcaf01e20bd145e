"""Liger kernels (train.kernels: liger) on a GPU: the patched student trains to the same losses."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(tmp_path, kernels: str) -> list[float]:
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    from benchmarks.train import SHAPES, Samples, build_student
    from trainers.loop import LoopConfig, LoopData, train_loop

    shape = dict(SHAPES["tiny"], seq=256)
    data = Samples(shape, n=8)
    model = build_student(shape, torch.device("cuda"), torch.bfloat16)
    cfg = LoopConfig(lr=1e-3, warmup_ratio=0.0, micro_batch=1, grad_accum=2, max_steps=6, precision="bf16",
                     gradient_checkpointing=False, tensorboard=False, export=False, kernels=kernels)
    return train_loop(model, LoopData(data, Samples.collate), cfg, tmp_path / kernels, seed=0).losses


def test_liger_kernels_train_to_the_same_losses(tmp_path):
    pytest.importorskip("liger_kernel")
    plain = _train(tmp_path, "none")
    liger = _train(tmp_path, "liger")
    assert plain[-1] < plain[0]
    for a, b in zip(plain, liger, strict=True):
        assert abs(a - b) < 0.05 * abs(a), (plain, liger)
