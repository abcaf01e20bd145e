"""Checkpoints and export for trainers/loop.py: DeepSpeed state + data position + RNG, and the final model.

A checkpoint is `<out>/checkpoints/step-NNNNNNN/` (DeepSpeed's model/optimizer/scheduler shards plus
`rng-rank<r>.pt`) and the `latest` pointer, which rank 0 writes (tmp name + rename) only after a barrier
that every rank reaches once its shards are on disk: the tag it names is a complete checkpoint. The data position (epoch, next sample index, order seed, samples seen) rides in DeepSpeed's
client state. Export consolidates ZeRO-3 partitions, merges LoRA adapters and calls `save_pretrained`.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, position: dict, rank: int, keep: int) -> None:
    import torch
    import torch.distributed as dist

    tag = f"step-{step:07d}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng-rank{rank}.pt")
    dist.barrier()
    # DeepSpeed's own `latest` can land before another rank's shards; ours is written after all of them.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"position": position}, save_latest=False)
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s saved (epoch %d, sample %d)", tag, position["epoch"], position["index"])


def load_checkpoint(engine: Any, ckpt_dir: Path, rank: int) -> dict | None:
    import torch

    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng = ckpt_dir / tag / f"rng-rank{rank}.pt"
    if not rng.exists():
        raise RuntimeError(f"{rng} missing: resume needs the same world size as the run that saved {tag}")
    _set_rng_state(torch.load(rng, weights_only=False))
    log.info("resumed from %s (epoch %d, sample %d)", tag, client["position"]["epoch"], client["position"]["index"])
    return client["position"]


# ---------------------------------------------------------------------------------------------------------
# export


def export_model(engine: Any, model: Any, out: Path, rank: int, zero_stage: int, processor: Any = None) -> None:
    """Save the full trained model with `save_pretrained` (ZeRO-3 gathered, LoRA merged) on rank 0."""
    import contextlib

    import deepspeed
    import torch.distributed as dist

    gather = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            target = model
            if hasattr(model, "merge_and_unload"):  # a peft wrapper
                target = model.merge_and_unload()
            elif any("lora_" in n for n, _ in model.named_parameters()):  # adapters injected in place
                from trainers.model import merge_lora

                target = merge_lora(model)
            sd = {k: v.detach().clone() for k, v in target.state_dict().items()}
            out.mkdir(parents=True, exist_ok=True)
            cfg = getattr(target, "config", None)
            if cfg is not None and hasattr(cfg, "use_cache"):
                cfg.use_cache = True
            target.save_pretrained(out, state_dict=sd)
            from trainers.model import standard_weight_names

            standard_weight_names(out)  # the layout vLLM loads
            if processor is not None:
                processor.save_pretrained(out)
    dist.barrier()
