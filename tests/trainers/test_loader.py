"""The loop's input pipeline (trainers.loader) and its time-based checkpoints.

Run: .venv/bin/pytest -q tests/trainers/test_loader.py
"""

from __future__ import annotations

import itertools
import json

import pytest

from pipeline.images import ImageError
from trainers.data import DataError
from trainers.loader import StepBatches, global_batches, step_items
from trainers.loop import CheckpointClock, LoopConfig


class Numbers:
    """Samples i -> input_ids [i, i+1, ...] (length 2 + i % 3); some indices fail as told."""

    def __init__(self, n: int, bad: dict[int, Exception] | None = None) -> None:
        self.n, self.bad = n, bad or {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch

        if i in self.bad:
            raise self.bad[i]
        ids = torch.arange(i, i + 2 + i % 3)
        return {"input_ids": ids, "labels": ids.clone()}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        labels = torch.full((len(items), width), -100)
        for r, x in enumerate(items):
            ids[r, : len(x["input_ids"])] = x["input_ids"]
            labels[r, : len(x["labels"])] = x["labels"]
        return {"input_ids": ids, "labels": labels}


def _plan(n: int, steps: int, start: dict | None = None, **kw):
    cfg = LoopConfig(micro_batch=kw.get("micro_batch", 2), grad_accum=kw.get("grad_accum", 2))
    return itertools.islice(global_batches(n, cfg, 1, 0, 3, start or {"epoch": 0, "index": 0}), steps)


def _flat(item) -> list:
    return [(k, m[k].tolist()) for m in item.micro for k in sorted(m)]


def test_workers_deliver_the_same_steps_in_plan_order_as_the_training_process():
    ds = Numbers(11)
    inline = list(step_items(ds, ds.collate, _plan(11, 7), 0, 2, False, 60, "fork"))
    ahead = list(step_items(ds, ds.collate, _plan(11, 7), 2, 3, False, 60, "fork"))
    assert len(inline) == len(ahead) == 7
    assert [(a.epoch, a.next_index) for a in inline] == [(b.epoch, b.next_index) for b in ahead]
    assert [(0, 4), (0, 8), (0, 11), (1, 4)] == [(a.epoch, a.next_index) for a in inline[:4]]
    for a, b in zip(inline, ahead, strict=True):
        assert _flat(a) == _flat(b) and a.counts == b.counts and a.error is None
    # a plan started at a position (what a resumed run does) gives the uninterrupted run's later steps
    resumed = list(step_items(ds, ds.collate, _plan(11, 4, {"epoch": 0, "index": 11}), 2, 2, False, 60, "fork"))
    assert [_flat(x) for x in resumed] == [_flat(x) for x in inline[3:]]


def test_a_sample_that_fails_to_load_is_dropped_with_its_reason_and_a_filler_keeps_its_slot():
    ds = Numbers(8, {3: ImageError("sample 's3': image 0 cannot be decoded: broken data stream"),
                     5: DataError("sample 's5': encoded 7 tokens, measured 9")})
    steps = StepBatches(ds, ds.collate)
    mine = [[(3, 1.0), (1, 1.0)], [(5, 1.0), (0, 0.0)]]
    item = steps[(0, 4, mine, 3)]
    assert item.error is None
    assert item.dropped == {"bad_image": 1, "bad_sample": 1} and item.dropped_real == 2
    filler_only = steps[(0, 8, [[(3, 0.0), (1, 1.0)]], 1)]  # a weight-0 repeat is not a training drop
    assert filler_only.dropped == {} and filler_only.dropped_real == 0 and filler_only.error is None
    assert "broken data stream" in item.dropped_ids[0]
    assert [m["input_ids"].shape[0] for m in item.micro] == [2, 2]  # every forward still runs
    # only sample 1 carries loss: the fillers (and the weight-0 sample 0) have labels -100
    ref = Numbers(8)[1]
    assert item.counts[0] == float(len(ref["labels"]))
    for m in item.micro:
        for row in m["labels"]:
            kept = row[row != -100].tolist()
            assert kept in ([], ref["labels"].tolist())


def test_other_failures_and_dead_workers_come_back_as_errors_not_hangs():
    ds = Numbers(6, {2: KeyError("messages")})
    item = StepBatches(ds, ds.collate)[(0, 2, [[(2, 1.0), (4, 1.0)]], 2)]
    assert item.micro == [] and "KeyError: 'messages'" in item.error
    every_bad = Numbers(3, {i: ImageError(f"bad {i}") for i in range(3)})
    item = StepBatches(every_bad, every_bad.collate)[(0, 1, [[(0, 1.0)]], 1)]
    assert "none of the 3 training samples can be loaded" in item.error

    class Dies(Numbers):
        def __getitem__(self, i):
            import os

            os._exit(3)  # a worker killed mid-step (out of memory, a crash in a decoder)

    d = Dies(6)
    items = list(step_items(d, d.collate, _plan(6, 3), 1, 2, False, 60, "fork"))
    assert len(items) == 1 and "exited unexpectedly" in items[0].error


def test_checkpoint_clock_spaces_slow_saves_to_the_overhead_budget():
    now = [0.0]
    clock = CheckpointClock(60.0, 0.05, now=lambda: now[0])
    assert not clock.due(59.0, 0.0) and clock.due(60.0, 0.0)
    now[0] = 100.0
    clock.saved(10.0)  # a 10 s checkpoint: the next one no sooner than 200 s later (10 / 0.05)
    assert clock.since() == 0.0 and clock.cost == 10.0
    assert not clock.due(199.0, clock.cost) and clock.due(200.0, clock.cost)
    assert not CheckpointClock(0.0, 0.05).due(1e9, 0.0)  # 0 = off
    assert LoopConfig().save_interval_s > 0 and LoopConfig().save_every == 0  # on by default, by time


@pytest.mark.parametrize("packing", [False, True])
def test_a_corrupt_image_met_in_training_is_dropped_counted_and_checkpoints_come_by_time(tiny_student, sft_rows,
                                                                                          tmp_path, packing):
    """Real SFT rows, one with an image whose pixel data is corrupt (its header still reads): the run
    finishes, the step that met it counts it, and with only the time-based schedule a checkpoint exists.
    Packed: the bad sample leaves its bin, the bin's other samples still train."""
    import pyarrow as pa

    from pipeline.schema import SFT
    from trainers.data import SFTDataConfig, make_sft_data
    from trainers.loop import LoopData, train_loop
    from trainers.model import apply_freeze, load_student

    rows = [dict(r) for r in sft_rows]
    img = dict(rows[1]["images"][0])
    img["bytes"] = img["bytes"][: len(img["bytes"]) // 2]  # truncated: size known, pixels not decodable
    rows[1]["images"] = [img]
    table = pa.Table.from_pylist(rows, schema=SFT)
    model, processor = load_student(tiny_student, dtype="float32")
    apply_freeze(model, "projector_llm")
    ds, collate = make_sft_data(table, processor, SFTDataConfig(packing=packing, max_len=400, window=6))
    base = getattr(ds, "base", ds)
    assert len(base) == len(rows)  # the stored size is intact: only decoding finds it
    steps = -(-len(ds) // 2)  # one epoch
    cfg = LoopConfig(max_steps=steps, micro_batch=2, grad_accum=1, lr=1e-3, loss_chunk=0, tensorboard=False,
                     export=False, loader_workers=1, save_interval_s=1e-6, checkpoint_overhead=1.0)
    res = train_loop(model, LoopData(ds, collate, processor), cfg, tmp_path, seed=0)
    assert res.steps == steps and all(x == x for x in res.losses)
    assert res.metrics["dropped_in_training"] == {"bad_image": 1}
    recs = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert sum(r.get("dropped", {}).get("bad_image", 0) for r in recs) == 1
    if packing:
        bin_ = next(b for b in ds.bins if 1 in b)
        assert len(bin_) > 1 and res.samples_seen == len(ds)  # the bin still trained, on its other samples
    else:
        assert res.samples_seen == len(ds) - 1  # one epoch, less the dropped sample
    assert all(r["wait_s"] >= 0 for r in recs)
    assert (tmp_path / "checkpoints" / "latest").read_text().startswith("step-")
