"""Train the tiny student on boxed answers to a few problems (shared by the evaluate and vLLM tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def teach_answers(student_dir: Path, problems: list[dict], out: Path, *, lr: float, warmup_ratio: float,
                  max_steps: int) -> Any:
    """Write one SFT row per problem (a boxed gold answer), train on them with the real loop under
    `out / "train"`, and return the loop's result."""
    from filters.curate import assistant_turn, system_prompt, user_turn
    from pipeline.rundir import ShardWriter
    from pipeline.schema import SFT
    from trainers.data import make_sft_data
    from trainers.loop import LoopConfig, LoopData, train_loop
    from trainers.model import apply_freeze, load_student

    sys_prompt = system_prompt()
    rows = []
    for i, p in enumerate(problems):
        msgs = [{"role": "system", "content": sys_prompt}, {"role": "user", "content": user_turn(p)},
                {"role": "assistant", "content": assistant_turn("ok", f"$\\boxed{{{p['answer']}}}$")}]
        rows.append({"sample_id": f"s{i}", "problem_id": p["problem_id"], "messages": msgs, "images": p["images"],
                     "quality": 5.0})
    with ShardWriter(out / "sft", SFT, "sft") as w:
        w.write(rows)
    model, processor = load_student(student_dir, dtype="float32")
    apply_freeze(model, "projector_llm")
    ds, collate = make_sft_data([out / "sft"], processor)
    cfg = LoopConfig(lr=lr, warmup_ratio=warmup_ratio, max_steps=max_steps, micro_batch=4, loss_chunk=0,
                     weight_decay=0.0, gradient_checkpointing=False)
    return train_loop(model, LoopData(ds, collate, processor), cfg, out / "train", seed=0)
