"""The MFU numerator: trainers.flops' model FLOPs against the matmul FLOPs torch counts in a real step.

torch.utils.flop_counter.FlopCounterMode counts every matmul, convolution and attention FLOP that a
forward + backward executes; the model FLOPs must agree with it within what the counter sees and the
model formula leaves out (norms, activations, the embedding lookup are not matmuls).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _student(tiny_student):
    from transformers import AutoModelForImageTextToText

    # eager attention: its matmuls are ops the counter sees (CPU sdpa is one fused op it does not count)
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_student), attn_implementation="eager")
    model.config.use_cache = False
    return model, None


def _batch(model, seq: int, images: int = 1) -> dict:
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.image_token_id - 1, (1, seq), generator=g)
    for k in range(images):
        ids[0, 4 + k * (n_img + 2) : 4 + k * (n_img + 2) + n_img] = cfg.image_token_id
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "pixel_values": torch.randn(images, 3, size, size, generator=g), "labels": ids.clone()}


def _counted(model, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


@pytest.mark.parametrize("images", [1, 2])
def test_full_training_step_matches_counted_matmuls(tiny_student, images):
    from trainers.flops import StepFlops, batch_stats

    model, _ = _student(tiny_student)
    batch = _batch(model, 96, images)
    ours = StepFlops.of(model).step(*batch_stats(batch))
    counted = _counted(model, batch)
    assert ours == pytest.approx(counted, rel=0.03), (ours, counted)


def test_frozen_encoder_costs_only_its_forward(tiny_student):
    from trainers.flops import StepFlops, batch_stats
    from trainers.model import apply_freeze

    model, _ = _student(tiny_student)
    apply_freeze(model, "projector_llm")
    sf = StepFlops.of(model)
    assert sf.vision.params > 0 and sf.vision.trainable == 0 and sf.text.trainable == sf.text.params
    batch = _batch(model, 96)
    ours, counted = sf.step(*batch_stats(batch)), _counted(model, batch)
    assert ours == pytest.approx(counted, rel=0.03), (ours, counted)
    full = StepFlops.of(_student(tiny_student)[0]).step(*batch_stats(batch))
    assert ours < full  # the frozen encoder has no backward


def test_packed_rows_count_each_samples_own_attention():
    from trainers.flops import batch_stats

    pos = torch.cat([torch.arange(5), torch.arange(3), torch.arange(2)]).unsqueeze(0)
    packed = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "position_ids": pos}
    assert batch_stats(packed) == (10, 25 + 9 + 4, 0)
    padded = {"input_ids": torch.zeros(2, 6, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
              "pixel_values": torch.zeros(3, 3, 8, 8)}
    assert batch_stats(padded) == (10, 36 + 16, 3)


def test_throughput_counts_leave_out_collator_padding_and_filler(sft_rows):
    from trainers.data import SFTCollator, pack
    from trainers.loop import _count

    a = {"input_ids": torch.arange(5), "labels": torch.tensor([-100, -100, 1, 2, 3]),
         "loss_weights": torch.ones(5), "position_ids": torch.arange(5)}
    b = {"input_ids": torch.arange(3), "labels": torch.tensor([-100, 4, 5]), "loss_weights": torch.ones(3),
         "position_ids": torch.arange(3)}
    bin1, bin2 = pack([a, b]), pack([b])
    collated = SFTCollator(pad_token_id=0)([bin1, bin2])  # bin2 padded with a 5-token block of its own
    assert tuple(collated["input_ids"].shape) == (2, 8)
    assert _count([[(bin1, 1.0), (bin2, 1.0)]]) == [7.0, 11.0, 25 + 9 + 9, 0.0]
    assert _count([[(bin1, 1.0)], [(bin2, 0.0)]]) == [5.0, 8.0, 25 + 9, 0.0]  # weight 0: filler


def test_the_head_counts_only_on_labelled_tokens_as_the_fused_loss_runs_it(tiny_student):
    from torch.utils.flop_counter import FlopCounterMode

    from trainers.flops import StepFlops, batch_stats
    from trainers.loop import make_loss_module

    model, _ = _student(tiny_student)
    batch = _batch(model, 96)
    batch["labels"][0, :60] = -100  # a long prompt: no loss there
    loss_module = make_loss_module(model, chunk=16, zero_stage=2)
    with FlopCounterMode(display=False) as fc:
        loss_module(dict(batch)).backward()
    labelled = float((batch["labels"] != -100).sum())
    sf = StepFlops.of(model)
    ours = sf.step(*batch_stats(batch), labelled)
    assert ours == pytest.approx(fc.get_total_flops(), rel=0.03), (ours, fc.get_total_flops())
    assert ours < sf.step(*batch_stats(batch))  # counting the head on every token would over-count
