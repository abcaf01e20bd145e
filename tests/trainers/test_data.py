"""SFT data path: assistant-only mask token by token, think weights, image expansion, packing, grouping."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.schema import SFT
from tests.trainers.conftest import make_image, make_sft_rows


@pytest.fixture(scope="module")
def student(tiny_student):
    from trainers.model import load_student

    model, processor = load_student(tiny_student, dtype="float32")
    return model.eval(), processor


def _forward(model, batch):
    with torch.no_grad():
        # use_cache=False as in training: transformers derives the per-sample mask only without a cache.
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}, use_cache=False).logits


def test_mask_token_by_token_matches_processor(student, sft_rows):
    from pipeline.images import decode
    from trainers.data import SFTDataConfig, SFTDataset

    _, processor = student
    ds = SFTDataset(pa.Table.from_pylist(sft_rows, schema=SFT), processor, SFTDataConfig(think_weight=0.25))
    row = sft_rows[2]  # two images
    item = ds[2]
    images = [decode(im) for im in row["images"]]
    msgs = row["messages"]
    full = processor.apply_chat_template(msgs, tokenize=False)
    prompt = processor.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    ref = processor(images=images, text=[full], return_tensors="pt")
    ref_prompt = processor(images=images, text=[prompt], return_tensors="pt")["input_ids"][0]
    ids = item["input_ids"]
    # Same ids and pixels as the processor at inference: image placeholders expanded identically.
    assert torch.equal(ids, ref["input_ids"][0])
    assert torch.equal(item["pixel_values"], ref["pixel_values"])
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 2 * 16
    p = len(ref_prompt)
    assert torch.equal(ids[:p], ref_prompt)
    labels, weights = item["labels"].tolist(), item["loss_weights"].tolist()
    tok = processor.tokenizer
    # Token by token: nothing before the assistant turn, every assistant token up to <|im_end|>, not the "\n".
    for i, t in enumerate(ids.tolist()):
        piece = tok.decode([t])
        if i < p or i == len(ids) - 1:
            assert labels[i] == -100 and weights[i] == 0.0, (i, piece)
        else:
            assert labels[i] == t, (i, piece)
    assert tok.decode(ids[-1:]) == "\n" and tok.decode(ids[-2:-1]) == "<|im_end|>"
    think = [i for i, w in enumerate(weights) if w == 0.25]
    answer = [i for i, w in enumerate(weights) if w == 1.0]
    assert think == list(range(p, p + len(think)))  # the think block opens the assistant turn
    assert tok.decode(ids[think]) == msgs[2]["content"].split("</think>")[0] + "</think>"
    assert tok.decode(ids[answer]) == msgs[2]["content"].split("</think>")[1] + "<|im_end|>"
    assert item["length"] == len(ids) == ds.lengths[2]


def test_zero_think_weight_masks_the_think_labels(student, sft_rows):
    from trainers.data import SFTDataConfig, SFTDataset

    _, processor = student
    ds = SFTDataset(pa.Table.from_pylist(sft_rows, schema=SFT), processor, SFTDataConfig(think_weight=0.0))
    item = ds[0]
    kept = processor.tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert "<think>" not in kept and kept.startswith("The answer is")


def test_bad_rows_are_dropped_and_counted(student, tmp_path):
    from pipeline.rundir import ShardWriter
    from trainers.data import SFTDataConfig, SFTDataset

    _, processor = student
    rows = make_sft_rows(9)
    rows[1]["images"] = []  # one placeholder, no image
    rows[3]["messages"] = rows[3]["messages"][:2]  # no assistant turn
    rows[4]["messages"][2]["content"] = "<think>" + "wait, check again. " * 400 + "</think>6"
    rows[6]["messages"][0]["content"] = None
    rows[7]["images"][0]["width"] = None
    with ShardWriter(tmp_path, SFT, "sft") as w:
        w.write(rows)
    ds = SFTDataset(tmp_path, processor, SFTDataConfig(max_len=1024))
    assert ds.dropped == {
        "image_count_mismatch": 1, "no_assistant_turn": 1, "overlong": 1, "empty_message": 1, "bad_image_record": 1
    }
    assert ds.dropped_ids["overlong"] == ["s004"] and ds.dropped_ids["bad_image_record"] == ["s007"]
    assert len(ds) + sum(ds.dropped.values()) == ds.rows_in == 9
    assert all(ds[i]["length"] <= 1024 for i in range(len(ds)))


def test_errors_name_the_input(student, tmp_path):
    from pipeline.images import ImageError
    from trainers.data import DataError, SFTDataset

    _, processor = student
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        SFTDataset([tmp_path / "missing"], processor)
    with pytest.raises(DataError, match=r"lack column\(s\) \['messages'"):
        SFTDataset(pa.table({"sample_id": ["a"], "images": [None]}), processor)
    rows = make_sft_rows(2)
    rows[1]["images"] = [{**make_image(1), "bytes": b"\x89PNG broken"}]
    ds = SFTDataset(pa.Table.from_pylist(rows, schema=SFT), processor)
    with pytest.raises(ImageError, match="'s001': image 0"):
        ds[1]


def test_long_sample_measured_exactly(student):
    from trainers.data import SFTDataConfig, SFTDataset

    _, processor = student
    rows = make_sft_rows(2)
    rows[1]["messages"][2]["content"] = "<think>" + "Let x be the side so 3 x + 4 = 10. " * 900 + "</think>x = 2"
    ds = SFTDataset(pa.Table.from_pylist(rows, schema=SFT), processor, SFTDataConfig(max_len=32768))
    assert ds.lengths[1] > 16384
    item = ds[1]
    assert item["length"] == ds.lengths[1]
    assert int((item["labels"] != -100).sum()) > 16000


def test_padded_batch_rows_equal_single_forwards(student, sft_rows):
    from trainers.data import SFTDataConfig, make_sft_data

    model, processor = student
    ds, collate = make_sft_data(pa.Table.from_pylist(sft_rows, schema=SFT), processor, SFTDataConfig())
    items = [ds[i] for i in (0, 1, 2)]  # 0, 1 and 2 images, different lengths
    batch = collate(items)
    assert batch["pixel_values"].shape[0] == 3
    logits = _forward(model, batch)
    for r, it in enumerate(items):
        single = _forward(model, collate([it]))[0]
        n = it["length"]
        assert torch.allclose(logits[r, :n], single, atol=1e-4)
        assert batch["attention_mask"][r].sum() == n and (batch["labels"][r, n:] == -100).all()


def test_packing_keeps_attention_within_each_sample(student, sft_rows):
    from trainers.data import SFTDataConfig, make_sft_data

    model, processor = student
    table = pa.Table.from_pylist(sft_rows, schema=SFT)
    cfg = SFTDataConfig(packing=True, max_len=400, seed=5)
    packed, collate = make_sft_data(table, processor, cfg)
    base = packed.base
    members = sorted(i for b in packed.bins for i in b)
    assert members == list(range(len(base)))  # every sample exactly once
    assert all(sum(base.lengths[i] for i in b) <= 400 for b in packed.bins)
    assert len(packed) < len(base)
    batch = collate([packed[b] for b in range(len(packed))])
    assert "attention_mask" not in batch
    logits = _forward(model, batch)
    for row, bin_ in enumerate(packed.bins):
        start = 0
        for i in bin_:
            n = base.lengths[i]
            assert torch.equal(batch["position_ids"][row, start : start + n], torch.arange(n))
            single = _forward(model, _one(base[i]))[0]
            assert torch.allclose(logits[row, start : start + n], single, atol=1e-4), (row, i)
            assert torch.equal(batch["labels"][row, start : start + n], base[i]["labels"])
            start += n
    # Same seed, same bins; another seed, another assignment.
    again = make_sft_data(table, processor, cfg)[0]
    assert again.bins == packed.bins
    small = cfg.model_copy(update={"window": 3})
    seeds = {str(make_sft_data(table, processor, small.model_copy(update={"seed": s}))[0].bins) for s in range(4)}
    assert len(seeds) > 1


def _one(item: dict) -> dict:
    batch = {"input_ids": item["input_ids"][None], "attention_mask": torch.ones_like(item["input_ids"])[None]}
    if item["pixel_values"] is not None:
        batch["pixel_values"] = item["pixel_values"]
    return batch


def test_length_groups_reduce_padding(student):
    from trainers.data import SFTDataConfig, make_sft_data

    model, processor = student
    rows = make_sft_rows(12)
    for i, r in enumerate(rows):
        r["messages"][2]["content"] = "<think>" + "step. " * (5 + 40 * (i % 4)) + "</think>6"
    table = pa.Table.from_pylist(rows, schema=SFT)
    grouped, collate = make_sft_data(table, processor, SFTDataConfig(group_by_length=True, group_size=3, seed=1))
    base = grouped.base
    assert sorted(i for g in grouped.groups for i in g) == list(range(12))

    def padding(groups) -> int:
        return sum(len(g) * max(base.lengths[i] for i in g) - sum(base.lengths[i] for i in g) for g in groups)

    naive = [list(range(k, k + 3)) for k in range(0, 12, 3)]
    assert padding(grouped.groups) < padding(naive)
    # Two groups collate into one padded batch whose rows are exactly the groups' samples.
    batch = collate([grouped[0], grouped[1]])
    members = grouped.groups[0] + grouped.groups[1]
    assert batch["input_ids"].shape[0] == 6
    for r, i in enumerate(members):
        n = base.lengths[i]
        assert torch.equal(batch["input_ids"][r, :n], base[i]["input_ids"])
    n_pix = sum(len(rows[i]["images"]) for i in members)
    assert (batch.get("pixel_values") is None and n_pix == 0) or batch["pixel_values"].shape[0] == n_pix
    _forward(model, batch)  # the model accepts it (image tokens match features)


def test_prompt_inputs_are_the_training_prefix(student, sft_rows):
    from trainers.data import SFTDataConfig, SFTDataset, prompt_inputs

    model, processor = student
    ds = SFTDataset(pa.Table.from_pylist(sft_rows, schema=SFT), processor, SFTDataConfig())
    row, item = sft_rows[1], ds[1]
    inputs = prompt_inputs(processor, row["messages"][:2], row["images"])
    n = inputs["input_ids"].shape[1]
    first_label = int((item["labels"] != -100).nonzero()[0])
    assert n == first_label  # the prompt ends exactly where the trained tokens begin
    assert torch.equal(inputs["input_ids"][0], item["input_ids"][:n])
    assert torch.equal(inputs["pixel_values"], item["pixel_values"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == n + 3


def test_packed_mixed_lengths_give_the_unpacked_loss_and_gradients(student):
    """The loop's loss module on one packed row of mixed-length samples (0-2 images, lengths differing
    several-fold) vs the same samples padded one per row: the same loss sum and the same gradients, so no
    token attends across a sample boundary and no loss is counted on one (SDPA's path on CPU)."""
    from trainers.data import SFTDataConfig, make_sft_data, pack
    from trainers.loop import make_loss_module

    model, processor = student
    rows = make_sft_rows(9)
    for k, r in enumerate(rows):  # a length mix: reasoning from a few words to ~30x that
        think = "Let x be the side. " * (1 + 7 * (k % 4) ** 2)
        r["messages"][2]["content"] = f"<think>{think}</think>The answer is {k}."
    ds, collate = make_sft_data(pa.Table.from_pylist(rows, schema=SFT), processor, SFTDataConfig())
    items = [ds[i] for i in (0, 1, 2, 3, 4, 5)]
    assert max(it["length"] for it in items) > 3 * min(it["length"] for it in items)
    wrapped = make_loss_module(model, chunk=32, zero_stage=2)

    def loss_and_grads(batch: dict):
        model.zero_grad()
        loss = wrapped(wrapped.prepare({k: v for k, v in batch.items() if torch.is_tensor(v)}))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = collate([pack(items[:4]), pack(items[4:])])  # two packed rows, the shorter padded
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2
    unpacked = collate(items)
    loss_p, grads_p = loss_and_grads(packed)
    loss_u, grads_u = loss_and_grads(unpacked)
    assert torch.allclose(loss_p, loss_u, rtol=1e-5), (loss_p, loss_u)
    assert grads_p.keys() == grads_u.keys() and any("vision" in n for n in grads_p)
    for n in grads_p:  # fp32 sums in another order: equal to ~1e-6 of the gradient's own scale
        scale = float(grads_u[n].abs().max())
        assert float((grads_p[n] - grads_u[n]).abs().max()) <= 1e-5 * scale + 1e-7, n  # k bias: 0 up to noise
