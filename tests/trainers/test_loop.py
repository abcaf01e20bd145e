"""The DeepSpeed loop on a tiny causal LM (real DeepSpeed, real checkpoints, real from_pretrained).

Run: .venv/bin/pytest -q tests/trainers/test_loop.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
from pathlib import Path

import pytest

from trainers.loop import LoopConfig, LoopData, chunked_lm_loss, deepspeed_config, epoch_order, train_loop

PROMPTS = [
    ("what is the sum of 3 and 4", "the answer is 7"),
    ("find the area of the square with side 5", "area is 25 cm"),
    ("how many degrees in a right angle", "90 degrees"),
    ("compute 12 times 5", "the product is 60"),
    ("what is the radius if diameter is 10", "radius is 5"),
    ("choose the correct option (A) 2 (B) 4", "(B)"),
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from trainers.tiny import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny-lm"), seed=0)


class PromptAnswerData:
    """Text samples: loss on the answer tokens only (labels -100 on the prompt), padded collation."""

    def __init__(self, tokenizer, n: int) -> None:
        import torch

        self.tok = tokenizer
        self.samples = []
        for i in range(n):
            q, a = PROMPTS[i % len(PROMPTS)]
            p = tokenizer(q + " ?", add_special_tokens=False)["input_ids"]
            y = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor(p + y)
            labels = torch.tensor([-100] * len(p) + y)
            self.samples.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def collate(self, batch: list[dict]) -> dict:
        import torch

        n = max(len(s["input_ids"]) for s in batch)
        ids = torch.full((len(batch), n), self.tok.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, s in enumerate(batch):
            k = len(s["input_ids"])
            ids[r, :k], labels[r, :k], mask[r, :k] = s["input_ids"], s["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _data(model_dir: Path, n: int = 12) -> LoopData:
    from transformers import AutoTokenizer

    d = PromptAnswerData(AutoTokenizer.from_pretrained(model_dir), n)
    return LoopData(dataset=d, collate=d.collate, processor=d.tok)


def _model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _cfg(**kw) -> LoopConfig:
    base = dict(lr=3e-3, warmup_ratio=0.1, micro_batch=2, grad_accum=2, max_steps=12, zero_stage=2, loss_chunk=7)
    base.update(kw)
    return LoopConfig(**base)


def test_loss_falls_and_log_line(tiny_lm, tmp_path, caplog):
    caplog.set_level("INFO", logger="trainers.loop")
    res = train_loop(_model(tiny_lm), _data(tiny_lm), _cfg(max_steps=30, grad_accum=1, lr=6e-3), tmp_path, seed=1)
    assert res.steps == 30 and len(res.losses) == 30
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.5 * first, res.losses
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    pat = re.compile(r"^step (\d+)/30 \| loss (\d+\.\d{4}) \| lr (\S+) \| tok/s ([\d,]+) \| mfu (\d+\.\d{4})$")
    parsed = [pat.match(x) for x in lines]
    assert len(parsed) == 30 and all(parsed), lines[:3]
    assert [int(m.group(1)) for m in parsed] == list(range(1, 31))
    assert abs(float(parsed[-1].group(2)) - res.losses[-1]) < 1e-4
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 31))
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    # warmup then cosine decay
    lrs = [s["lr"] for s in steps]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[5]


def test_export_reloads_with_same_logits(tiny_lm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = _model(tiny_lm)
    res = train_loop(model, _data(tiny_lm), _cfg(max_steps=4), tmp_path, seed=2)
    reloaded = AutoModelForCausalLM.from_pretrained(res.model_dir)
    x = torch.tensor([[5, 9, 33, 47, 100, 7]])
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=x).logits, reloaded(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-6)
    orig = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        assert not torch.allclose(orig(input_ids=x).logits, b, atol=1e-4)  # training changed the weights
    assert (res.model_dir / "tokenizer.json").exists()


def test_chunked_loss_matches_full_logits():
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 30, bias=False)
    labels = torch.randint(0, 30, (2, 9))
    labels[0, :3] = -100
    w = torch.rand(2, 9)
    full = chunked_lm_loss(hidden, head, labels, w, 0)
    full.backward()
    g_full = hidden.grad.clone()
    hidden.grad = None
    chunked = chunked_lm_loss(hidden, head, labels, w, 4)
    chunked.backward()
    assert torch.allclose(full, chunked, atol=1e-5)
    assert torch.allclose(g_full, hidden.grad, atol=1e-6)
    ref = (torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 30), labels[:, 1:].reshape(-1),
                                             reduction="none", ignore_index=-100) * w[:, 1:].reshape(-1)).sum()
    assert torch.allclose(full, ref, atol=1e-5)


def test_deepspeed_auto_values_filled():
    cfg = deepspeed_config(_cfg(zero_stage=3, micro_batch=2, grad_accum=4, grad_clip=0.5), world=2, bf16=False)
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(cfg)
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        deepspeed_config(_cfg(zero_stage=3, deepspeed_config=str(Path("configs/deepspeed/zero2.json"))), 1, False)


def test_deepspeed_json_values_that_contradict_the_config_are_refused(tmp_path):
    ds = json.loads(Path("configs/deepspeed/zero2.json").read_text())
    ds["gradient_accumulation_steps"] = 4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=r"ds.json: gradient_accumulation_steps=4 but the train config gives 1"):
        deepspeed_config(_cfg(grad_accum=1, deepspeed_config=str(path)), 1, False)
    ds["gradient_accumulation_steps"] = 2  # explicit and equal: accepted
    path.write_text(json.dumps(ds))
    assert deepspeed_config(_cfg(grad_accum=2, deepspeed_config=str(path)), 1, False)["gradient_accumulation_steps"] == 2


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(10, 3, 0), epoch_order(10, 3, 0)
    assert a == b and sorted(a) == list(range(10))
    assert epoch_order(10, 3, 1) != a


MID_EPOCH_N = 14


def _killed_run(model_dir: str, out: str, kill_at: int) -> None:
    """Child process: train with checkpoints every 3 steps and SIGKILL itself after step `kill_at`."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)  # inherited from the test process's own one-rank group

    def on_step(step: int, _rec: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    data = _data(Path(model_dir), MID_EPOCH_N)
    # two loader workers, three steps ahead each: when the kill comes, steps past it are already built
    cfg = _cfg(save_every=3, loader_workers=2, prefetch_factor=3)
    train_loop(_model(Path(model_dir)), data, cfg, Path(out), seed=5, on_step=on_step)


def test_kill_and_resume_continues_the_same_loss_curve(tiny_lm, tmp_path):
    import torch

    # 14 samples, 4 per step: epochs end after steps 4, 8, 12 (each with a 2-sample filler-padded step),
    # so the checkpoint at step 6 sits mid-epoch (epoch 1, sample 8).
    full = train_loop(_model(tiny_lm), _data(tiny_lm, MID_EPOCH_N), _cfg(save_every=3, loader_workers=1),
                      tmp_path / "full", seed=5)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_killed_run, args=(str(tiny_lm), str(tmp_path / "cut"), 8))
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000006" / "mp_rank_00_model_states.pt",
                      weights_only=False)
    assert ckpt["position"]["epoch"] == 1 and ckpt["position"]["index"] == 8
    with open(tmp_path / "cut" / "steps.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 2, "lo')  # a line the kill tore in half
    # resumed with the batches built in this process: the data position is the checkpoint's, not the loader's
    resumed = train_loop(_model(tiny_lm), _data(tiny_lm, MID_EPOCH_N), _cfg(save_every=3, loader_workers=0),
                         tmp_path / "cut", seed=5)
    assert resumed.steps == 12 and len(resumed.losses) == 12
    for i, (a, b) in enumerate(zip(full.losses, resumed.losses, strict=True)):
        assert abs(a - b) < 1e-6, f"step {i + 1}: {a} vs {b}"
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps 7-8 of the killed run were replaced, not duplicated


@pytest.mark.parametrize("dtype,bias,chunk", [("float32", False, 5), ("float32", True, 64), ("bfloat16", False, 7)])
def test_fused_head_loss_matches_full_logits_in_value_and_gradients(dtype, bias, chunk):
    import torch

    dt = getattr(torch, dtype)
    torch.manual_seed(1)
    head = torch.nn.Linear(24, 50, bias=bias).to(dt)
    hidden = torch.randn(3, 11, 24, dtype=dt, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[1, :4] = -100
    w = torch.rand(3, 11)
    w[2, 5] = 0.0

    def grads(loss):
        (2.5 * loss).backward()  # an upstream scale reaches every gradient
        out = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        return out

    ref = (torch.nn.functional.cross_entropy(head(hidden[:, :-1]).float().reshape(-1, 50), labels[:, 1:].reshape(-1),
                                             reduction="none", ignore_index=-100) * w[:, 1:].reshape(-1)).sum()
    g_ref = grads(ref)
    fused = chunked_lm_loss(hidden, head, labels, w, chunk)
    assert fused.grad_fn is not None and "FusedLinearCrossEntropy" in type(fused.grad_fn).__name__
    g_fused = grads(fused)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert torch.allclose(fused.detach(), ref.detach(), rtol=tol, atol=tol)
    for a, b in zip(g_ref, g_fused, strict=True):
        assert a.dtype == b.dtype
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), (a - b).abs().max()


def test_fused_head_loss_with_a_frozen_head_gives_only_the_hidden_gradient():
    import torch

    torch.manual_seed(2)
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 9, 8, requires_grad=True)
    labels = torch.randint(0, 20, (1, 9))
    w = torch.ones(1, 9)
    chunked_lm_loss(hidden, head, labels, w, 3).backward()
    g = hidden.grad.clone()
    hidden.grad = None
    chunked_lm_loss(hidden, head, labels, w, 0).backward()
    assert head.weight.grad is None and torch.allclose(g, hidden.grad, atol=1e-6)


def test_liger_kernels_off_gpu_fail_with_a_clear_message(tiny_lm, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA box runs tests/gpu/test_kernels_cuda.py instead")
    with pytest.raises(RuntimeError, match="kernels=liger needs a CUDA GPU"):
        train_loop(_model(tiny_lm), _data(tiny_lm), _cfg(kernels="liger"), tmp_path, seed=0)
    with pytest.raises(ValueError, match="kernels"):
        _cfg(kernels="apex")


def test_fused_head_loss_keeps_an_fp32_upstream_scale_in_bf16():
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, 200, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 64, (1, 200))
    scale = 2.0 / 3  # rounds to 0.66797 in bf16: 0.2% off
    (chunked_lm_loss(hidden, head, labels, torch.ones(1, 200), 64) * scale).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64[0, :-1] @ head.weight.detach().double().t(), labels[0, 1:],
                                            reduction="sum") * scale
    ref.backward()
    mask = h64.grad.abs() > 1e-9
    ratio = (hidden.grad.double()[mask] / h64.grad[mask]).median()
    assert abs(float(ratio) - 1.0) < 5e-4, float(ratio)


def test_labels_outside_the_vocabulary_are_an_error_not_an_index():
    import torch

    head = torch.nn.Linear(8, 10, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    for bad in (-1, 10):
        labels = torch.tensor([[-100, 3, bad, 4, 2]])
        with pytest.raises(ValueError, match=rf"labels outside \[0, 10\).*\[{bad}\]"):
            chunked_lm_loss(hidden, head, labels, torch.ones(1, 5), 2)


def test_a_row_without_labels_still_gives_the_head_a_gradient():
    import torch

    head = torch.nn.Linear(8, 10, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss = chunked_lm_loss(hidden, head, torch.full((1, 5), -100), torch.ones(1, 5), 2)
    loss.backward()
    assert float(loss) == 0.0
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0


def test_latest_names_a_checkpoint_only_after_deepspeed_has_written_it(tiny_lm, tmp_path, monkeypatch):
    import deepspeed

    seen = []
    original = deepspeed.DeepSpeedEngine.save_checkpoint

    def watched(self, save_dir, tag=None, **kw):
        out = original(self, save_dir, tag=tag, **kw)
        latest = Path(save_dir) / "latest"
        # DeepSpeed has returned on this rank; other ranks may still be writing: not yet published
        seen.append((tag, latest.read_text() if latest.exists() else None))
        return out

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", watched)
    train_loop(_model(tiny_lm), _data(tiny_lm), _cfg(max_steps=3, save_every=1), tmp_path, seed=0)
    assert seen == [("step-0000001", None), ("step-0000002", "step-0000001")]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000002"


@pytest.mark.parametrize("check", ["per_tensor", "global_norm"])
def test_a_non_finite_step_stops_training_with_the_step_named(tiny_lm, tmp_path, check):
    """fp32 (DeepSpeed checks nothing) or overflow_check=global_norm: a NaN that reaches the weights at
    step 3 stops the run there with an error naming the step, not a run that trains on NaN weights."""
    import torch

    model = _model(tiny_lm)
    calls = {"n": 0}

    def poison(module, args, output):  # the 3rd forward (step 3: one micro-batch per step) turns to NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.model.layers[0].mlp.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite loss"):
        train_loop(model, _data(tiny_lm), _cfg(grad_accum=1, overflow_check=check), tmp_path, seed=0)
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


def test_global_norm_overflow_check_turns_off_deepspeeds_per_tensor_check():
    cfg = deepspeed_config(_cfg(zero_stage=2, overflow_check="global_norm"), world=1, bf16=True)
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert "check_grad_overflow" not in deepspeed_config(_cfg(zero_stage=2), world=1, bf16=True)["bf16"]
    with pytest.raises(ValueError, match="overflow_check=global_norm needs zero_stage 1, 2 or 3"):
        deepspeed_config(_cfg(zero_stage=0, overflow_check="global_norm"), world=1, bf16=True)


@pytest.mark.parametrize("layout", ["llava", "internvl"])
def test_host_prepared_batches_give_the_models_own_loss_and_gradients(request, sft_dir, layout):
    """The loop's `prepare` (loss positions and image-token positions found on the host, image features
    placed by index) gives the same loss and gradients as the model's own placeholder merge."""
    import torch

    from trainers.data import make_sft_data
    from trainers.loop import make_loss_module
    from trainers.model import load_student

    path = request.getfixturevalue("tiny_student" if layout == "llava" else "tiny_internvl_student")
    model, processor = load_student(path, dtype="float32")
    ds, collate = make_sft_data([sft_dir], processor)
    batch = collate([ds[1], ds[2]])  # 1 and 2 images
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    wrapped = make_loss_module(model, chunk=16, zero_stage=2)

    def loss_and_grads(prepared: bool):
        model.zero_grad()
        b = wrapped.prepare(dict(batch))
        if not prepared:  # the model's own merge: no host-computed image positions
            del b["_image_positions"]
        loss = wrapped(b)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    own_loss, own = loss_and_grads(False)
    host_loss, host = loss_and_grads(True)
    assert torch.allclose(own_loss, host_loss, rtol=1e-6), (own_loss, host_loss)
    assert own.keys() == host.keys() and any("vision" in n for n in own)
    for n in own:
        assert torch.allclose(own[n], host[n], atol=1e-6, rtol=1e-5), n

    bad = dict(batch)
    bad["labels"] = batch["labels"].clone()
    bad["labels"][0, int((batch["labels"][0] != -100).nonzero()[-1])] = 10**6  # a token that carries loss
    with pytest.raises(ValueError, match="labels outside"):
        wrapped.prepare(bad)
    short = wrapped.prepare(dict(batch))
    short["_image_positions"] = short["_image_positions"][:-1]
    with pytest.raises(ValueError, match=r"image tokens in the batch, \d+ image features"):
        wrapped(short)
