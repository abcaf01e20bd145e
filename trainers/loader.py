"""The training loop's input pipeline: each optimizer step's batches built ahead, in DataLoader workers.

An item of `StepBatches` is one optimizer step of this rank: the loop's plan entry (epoch, next sample
index, [(sample index, weight) per micro-batch], real samples) turned into collated micro-batches plus
the step's counts. Decoding images, tiling, tokenizing, packing and collating all run inside
`dataset[i]` / `collate`, so with `workers > 0` they happen in worker processes `prefetch` steps ahead
of the step that needs them (pinned when the loop trains on CUDA), and the step waits on the host only
when the workers fall behind (`wait_s` in every step record).

The data position stays the loop's: the plan is computed in the main process from (seed, epoch,
index), workers only fill it in, and a DataLoader returns items in plan order. A resumed run starts the
plan at the checkpoint's position, so it lands on the same sample whatever the workers had prefetched.

A sample that cannot be loaded (an image that does not decode: `bad_image`; a row the data path
refuses: `bad_sample`) is dropped from its step: it keeps its slot as a weight-0 filler (a copy of a
sample that did load, labels -100), so every rank still runs the same forwards and the loss is the mean
over the samples that loaded. Its reason is counted in the step's counts (summed over ranks by the
loop). Any other failure while building a step is returned to the loop as an error, which every rank
learns in the step's first all-reduce: all ranks raise together instead of the others waiting forever
on the one that failed.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Drop reasons counted per step (fixed order: they ride in the step's all-reduced count vector).
DROP_REASONS = ("bad_image", "bad_sample")


@dataclass
class StepItem:
    """One step of one rank, ready for the device (see the module docstring)."""

    epoch: int
    next_index: int
    real: int
    micro: list[dict]
    counts: list[float]
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_ids: list[str] = field(default_factory=list)
    dropped_real: int = 0
    error: str | None = None

    def pin_memory(self) -> StepItem:
        """Called by the DataLoader's pin thread: the micro-batches' tensors in page-locked memory."""
        self.micro = [{k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in m.items()}
                      for m in self.micro]
        return self


def _weighted(sample: dict, w: float) -> dict:
    """A filler sample (w == 0) keeps its shape but carries no loss: labels all -100."""
    if w != 0.0:
        return sample
    import torch

    s = dict(sample)
    s["labels"] = torch.full_like(torch.as_tensor(s["labels"]), -100)
    if s.get("loss_weights") is not None:
        s["loss_weights"] = torch.zeros_like(torch.as_tensor(s["loss_weights"]))
    return s


def count_samples(micro_samples: list[list[tuple[dict, float]]]) -> list[float]:
    """[labelled tokens, text tokens, sum of squared sample lengths, images] of a rank's step.

    Counted on the samples before collation, so padding is left out; so are weight-0 filler samples
    (computed only to keep ranks in step, they are not throughput).
    """
    import torch

    from trainers.flops import batch_stats

    out = [0.0, 0.0, 0.0, 0.0]
    for samples in micro_samples:
        for s, w in samples:
            if w == 0.0:
                continue
            out[0] += float((torch.as_tensor(s["labels"]) != -100).sum())
            for k, v in enumerate(batch_stats(s), start=1):
                out[k] += float(v)
    return out


def _drop_reason(e: Exception) -> str | None:
    from pipeline.images import ImageError
    from trainers.data import DataError

    if isinstance(e, ImageError):
        return "bad_image"
    if isinstance(e, DataError):
        return "bad_sample"
    return None


class StepBatches:
    """Map-style dataset over plan entries: `ds[(epoch, next_index, mine, real)]` -> StepItem."""

    def __init__(self, dataset: Sequence[dict], collate: Callable[[list[dict]], dict]) -> None:
        self.dataset, self.collate = dataset, collate

    def _load(self, i: int, item: StepItem, w: float = 1.0) -> dict | None:
        """Sample i, or None when it cannot be loaded; drops are counted for training samples only (w != 0:
        a weight-0 filler repeats a sample of the epoch, whose drop was counted where it trained)."""
        try:
            s = self.dataset[i]
            for reason, k in (s.get("dropped") or {}).items():  # members a packed bin left out
                if w != 0.0:
                    item.dropped[reason] = item.dropped.get(reason, 0) + k
            return s
        except Exception as e:  # noqa: BLE001 - only the drop reasons are caught; the rest is re-raised
            reason = _drop_reason(e)
            if reason is None:
                raise
            log.warning("dropping sample %d from this step (%s): %s", i, reason, e)
            if w != 0.0:
                item.dropped[reason] = item.dropped.get(reason, 0) + 1
            item.dropped_ids.append(str(e)[:200])
            return None

    def _filler(self, start: int, item: StepItem) -> dict:
        """A sample that loads, to stand in (at weight 0) for the ones that did not."""
        n = len(self.dataset)
        for k in range(1, n + 1):
            s = self._load((start + k) % n, StepItem(0, 0, 0, [], []))  # its own failures are not this step's
            if s is not None:
                return s
        raise RuntimeError(f"none of the {n} training samples can be loaded (first failure: {item.dropped_ids[:1]})")

    def __getitem__(self, plan: tuple) -> StepItem:
        epoch, next_index, mine, real = plan
        item = StepItem(epoch, next_index, real, [], [])
        try:
            loaded = [[(self._load(i, item, w), i, w) for i, w in mb] for mb in mine]
            good = next((s for mb in loaded for s, _, _ in mb if s is not None), None)
            samples = []
            for mb in loaded:
                row = []
                for s, i, w in mb:
                    if s is None:
                        good = good if good is not None else self._filler(i, item)
                        item.dropped_real += w != 0.0
                        s, w = good, 0.0
                    row.append((s, w))
                samples.append(row)
            item.counts = count_samples(samples)
            item.micro = [self.collate([_weighted(s, w) for s, w in mb]) for mb in samples]
        except Exception:  # noqa: BLE001 - reported to every rank by the loop, then raised there
            item.error = traceback.format_exc(limit=8)
        return item

    def __len__(self) -> int:  # the DataLoader asks; items are addressed by plan entries, not by position
        return len(self.dataset)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same on every rank."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, cfg: Any, world: int, rank: int, seed: int, start: dict):
    """Yield (epoch, next_index, [(sample indices, weight) per micro-batch of this rank]) from `start`.

    A short last global batch is filled with samples from the epoch's start at weight 0, so every
    rank runs the same number of forwards (ZeRO collectives need it) and the step's gradient equals the
    one over the real samples only.
    """
    per = cfg.micro_batch * cfg.grad_accum * world
    epoch, index = start["epoch"], start["index"]
    while True:
        order = epoch_order(n, seed, epoch)
        while index < n:
            ids = order[index : index + per]
            real = len(ids)
            ids += [order[i % n] for i in range(per - real)]
            mine = []
            for j in range(cfg.grad_accum):
                lo = (j * world + rank) * cfg.micro_batch
                mine.append([(ids[k], 1.0 if k < real else 0.0) for k in range(lo, lo + cfg.micro_batch)])
            index += per
            yield epoch, min(index, n), mine, real
        epoch, index = epoch + 1, 0


def _identity(x: Any) -> Any:
    return x


def auto_workers(cuda: bool) -> int:
    """Workers per rank: up to 4 on CUDA (the CPUs this rank's share allows, one left for the loop),
    1 on CPU (the forward already uses the cores; one worker keeps decoding off the step)."""
    if not cuda:
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // max(local, 1) - 1))


def step_items(
    dataset: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    plan: Iterable[tuple],
    workers: int,
    prefetch: int,
    pin: bool,
    timeout_s: float,
    start_method: str,
) -> Iterator[StepItem]:
    """StepItems in plan order; `workers == 0` builds each in this process when the loop asks for it."""
    steps = StepBatches(dataset, collate)
    if workers == 0:
        for p in plan:
            item = steps[p]
            yield item.pin_memory() if pin and item.error is None else item
        return
    from torch.utils.data import DataLoader

    # Tokenizers' Rust thread pool cannot cross a fork; say so up front instead of its warning per worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        steps,
        batch_size=None,
        sampler=plan,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=prefetch,
        pin_memory=pin,
        timeout=timeout_s,
        multiprocessing_context=start_method,
        worker_init_fn=_worker_init,
    )
    log.info("input pipeline: %d worker(s), %d step(s) prefetched each%s", workers, prefetch,
             ", pinned" if pin else "")
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - a dead or stuck worker: the loop tells every rank, then raises
            item = StepItem(0, 0, 0, [], [], error=traceback.format_exc(limit=8))
            yield item
            return
        yield item


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)
