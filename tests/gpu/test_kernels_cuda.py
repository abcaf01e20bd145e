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


def test_compiled_softmax_grad_matches_eager_on_cuda():
    from trainers.loss import _softmax_grad_fn, softmax_grad

    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1000, 333):  # two shapes: the compiled function is dynamic, not recompiled per chunk
        logits = (torch.randn(n, 5003, device="cuda", generator=g) * 4).to(torch.bfloat16)
        y = torch.randint(0, 5003, (n,), device="cuda", generator=g)
        w = torch.rand(n, device="cuda", generator=g)
        loss_c, grad_c = _softmax_grad_fn(logits.device)(logits, y, w)
        loss_e, grad_e = softmax_grad(logits, y, w)
        assert torch.allclose(loss_c, loss_e, rtol=1e-5), (loss_c, loss_e)
        assert grad_c.dtype == torch.bfloat16
        assert (grad_c.float() - grad_e.float()).abs().max() < 1e-2
