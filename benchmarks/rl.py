"""GRPO step time split into generation / reward / update: the rl stage's trainer vs plain TRL, same run.

    python benchmarks/rl.py                                   # CPU: tiny student, hf generation
    python benchmarks/rl.py --gpu --out b.json                # one GPU: SigLIP-so400m + Qwen2-1.5B shape (~2B)
    python benchmarks/rl.py --gpu --vllm                      # the same with vLLM colocated (needs vllm)

Both trainers train the same student (LLaVA layout; CPU: the tiny random one, hidden 64; --gpu: random
weights in the ~2B benchmark shape of benchmarks/train.py) on the same synthetic figure problems with
the same rewards (verifier accuracy in deadline worker processes, format, length), the same group size,
completion budget and seed, one after the other in this process:

- baseline: `trl.GRPOTrainer` as shipped (its step time from its own `step_time` metric);
- ours: trainers.grpo.R1VGRPOTrainer (zero-std groups skipped, or `--zero-std buffer`), its step split
  into generation (`_generate`), reward (`_calculate_rewards`, the verifier's worker round trips
  included) and update (the rest: reference and policy forward/backward, optimizer step).

Reported: the median over the steps after `--warmup` of each part, completion tokens/s, and ours / baseline
step-time ratio. On CPU the figures are smoke figures (a 2-core shared box); the --gpu variant is the one
to read for the 2B shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.rl")


def build_student(out: Path, gpu_shape: bool) -> Path:
    """A student dir loadable by trainers.model.load_student: tiny, or the ~2B shape with random weights."""
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_checkpoints

    if not gpu_shape:
        ck = build_tiny_checkpoints(out / "parts")
        return assemble_student(AssembleConfig(vision_path=str(ck["vision"]), llm_path=str(ck["llm"])), out / "student")
    import torch
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from benchmarks.train import SHAPES
    from trainers.tiny import train_tokenizer

    shape = SHAPES["full"]
    v = shape["vision"]
    vis = out / "parts" / "vision"
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**v)).to(torch.bfloat16).save_pretrained(vis)
    SiglipImageProcessor(size={"height": v["image_size"], "width": v["image_size"]}).save_pretrained(vis)
    llm = out / "parts" / "llm"
    tok = train_tokenizer(llm)
    t = dict(shape["text"], eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
             bos_token_id=None)
    Qwen2ForCausalLM(Qwen2Config(**t)).to(torch.bfloat16).save_pretrained(llm)
    return assemble_student(AssembleConfig(vision_path=str(vis), llm_path=str(llm), dtype="bfloat16"),
                            out / "student")


def write_problems(out: Path, n: int) -> Path:
    from pipeline.rundir import ShardWriter
    from pipeline.synthetic import make_problem
    from trainers.rl import RL_PROBLEMS

    rows = []
    for i in range(n):
        p = make_problem(0, i)
        rows.append({**{k: p.get(k) for k in RL_PROBLEMS.names}, "problem_id": p["id"], "max_tokens": 256})
    with ShardWriter(out / "problems", RL_PROBLEMS, "problems") as w:
        w.write(rows)
    return out / "problems"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_ours(spec, warmup: int) -> dict:
    from trainers.loop import read_steps
    from trainers.rl_worker import build_trainer

    trainer, funcs, _ = build_trainer(spec)
    try:
        trainer.train()
    finally:
        for f in funcs:
            if hasattr(f, "close"):
                f.close()
    rows = read_steps(Path(spec.out_dir) / "steps.jsonl")[warmup:]
    tokens = [r["completion_len"] * r["groups"] * trainer.num_generations / r["step_s"] for r in rows]
    return {k: _median([r[k] for r in rows]) for k in ("gen_s", "reward_s", "update_s", "step_s")} | {
        "completion_tok_s": _median(tokens), "steps_timed": len(rows),
        "reward_share": _median([r["reward_s"] / r["step_s"] for r in rows]),
    }


def run_baseline(spec, warmup: int) -> dict:
    """trl.GRPOTrainer as shipped, same arguments, dataset and reward functions."""
    import torch
    from trl import GRPOTrainer

    from trainers.model import apply_freeze, load_student
    from trainers.rewards import make_reward_funcs
    from trainers.rl import RLConfig
    from trainers.rl_worker import _dataset, _grpo_args

    cfg = RLConfig.model_validate(spec.cfg)
    args = _grpo_args(cfg, Path(spec.out_dir), spec.seed, torch.cuda.is_available(), 1)
    model, processor = load_student(spec.model_dir, dtype="float32")
    apply_freeze(model, cfg.freeze)
    processor.tokenizer.padding_side = "left"
    funcs, weights = make_reward_funcs(cfg.rewards, processor.tokenizer, [model.generation_config.eos_token_id])
    args.reward_weights = weights
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, processing_class=processor,
                          train_dataset=_dataset(Path(spec.problems_dir), spec.system_prompt))
    try:
        trainer.train()
    finally:
        for f in funcs:
            f.close() if hasattr(f, "close") else None
    rows = [r for r in trainer.state.log_history if "step_time" in r][warmup:]
    return {"step_s": _median([r["step_time"] for r in rows]), "steps_timed": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, the ~2B shape")
    ap.add_argument("--vllm", action="store_true", help="--gpu: generate with vLLM colocated")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default 8 CPU, 6 GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--group", type=int, default=None, help="completions per prompt (default 4 CPU, 8 GPU)")
    ap.add_argument("--completion-tokens", type=int, default=None, help="default 64 CPU, 1024 GPU")
    ap.add_argument("--zero-std", default="skip", choices=["skip", "buffer", "keep"])
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s | %(message)s")
    os.environ.setdefault("R1V_PROGRESS", "0")
    from trainers.rl import RLConfig, RLWorkerSpec

    steps = args.steps or (6 if args.gpu else 8)
    group = args.group or (8 if args.gpu else 4)
    tokens = args.completion_tokens or (1024 if args.gpu else 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = build_student(root, args.gpu)
        problems = write_problems(root, 4 * group)
        base = dict(lr=1e-6 if args.gpu else 5e-3, num_generations=group, per_device_batch=2 * group,
                    max_completion_tokens=tokens, max_steps=steps + args.warmup, save_every=10_000,
                    gradient_checkpointing=args.gpu, tensorboard=False, zero_std=args.zero_std,
                    use_vllm=args.vllm, vllm_gpu_memory_utilization=0.3, rewards={"workers": 2})
        figures: dict = {"device": "cuda" if args.gpu else "cpu", "group": group, "completion_tokens": tokens,
                         "prompts_per_step": 2, "steps": steps, "zero_std": args.zero_std}
        for name, fn in (("baseline_trl", run_baseline), ("ours", run_ours)):
            spec = RLWorkerSpec(model_dir=str(student), problems_dir=str(problems), out_dir=str(root / name),
                                cfg=RLConfig(**base).model_dump(mode="json"), system_prompt="Think, then answer.",
                                seed=0)
            t0 = time.perf_counter()
            figures[name] = fn(spec, args.warmup)
            figures[name]["wall_s"] = time.perf_counter() - t0
        figures["ratio_step_s"] = figures["ours"]["step_s"] / figures["baseline_trl"]["step_s"]
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
