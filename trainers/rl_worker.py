"""The `rl` stage's worker (one per rank) and its launchers: this process, `torchrun`, Ray Train.

    python -m trainers.rl_worker SPEC.json          # what each torchrun rank runs

Same three launchers as trainers/launch.py (`local`, `torchrun --standalone`, Ray Train's TorchTrainer):
every rank loads the student, builds the GRPO dataset from `<step>/input/`, and runs
trainers.grpo.R1VGRPOTrainer; HF Trainer / accelerate take the process group the launcher set up
(gloo on CPU, nccl on GPUs). Rank 0 writes `result.json` and the exported `model/`.

Resume: Trainer checkpoints go to `<out>/checkpoints/checkpoint-N`; the last one holding its
`trainer_state.json` (written last) is complete and training resumes from it; newer incomplete ones (a
kill during the save) are removed first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoint(ckpt_dir: Path, clean: bool = False) -> tuple[Path | None, int]:
    """(the latest complete Trainer checkpoint, its step) in `ckpt_dir`; with `clean`, newer incomplete
    ones are removed (a kill in the middle of a save leaves one)."""
    found = []
    for p in ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else []:
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for step, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").exists():
            return p, step
        if clean:
            log.warning("rl: removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    return None, 0


def _finished(ckpt: Path) -> bool:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("max_steps") or 0) > 0 and int(state["global_step"]) >= int(state["max_steps"])


def _grpo_args(cfg: Any, out: Path, seed: int, cuda: bool, world: int) -> Any:
    from trl import GRPOConfig

    from trainers.loop import DEEPSPEED_DIR

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    ds = None
    if cfg.zero_stage is not None or cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json"
        ds = json.loads(path.read_text())  # "auto" values are filled by transformers from these arguments
    quiet = os.environ.get("R1V_PROGRESS", "1") == "0"
    if cfg.tensorboard:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")  # transformers' TensorBoard callback reads it
    return GRPOConfig(
        output_dir=str(out / CKPT_DIR), seed=seed, data_seed=seed,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        per_device_train_batch_size=cfg.per_device_batch, gradient_accumulation_steps=cfg.grad_accum,
        steps_per_generation=cfg.steps_per_generation, num_iterations=cfg.num_iterations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        max_steps=cfg.max_steps or -1, num_train_epochs=cfg.epochs,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_every, save_total_limit=cfg.keep_checkpoints,
        report_to=["tensorboard"] if cfg.tensorboard else [],
        bf16=bf16, use_cpu=not cuda, ddp_backend=None if cuda or world == 1 else "gloo",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        deepspeed=ds, disable_tqdm=quiet, dataloader_num_workers=0,
        use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode, vllm_server_base_url=cfg.vllm_server_base_url,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        log_completions=False,
    )


def _dataset(problems_dir: Path, system: str) -> Any:
    import datasets

    from pipeline.rundir import read_table
    from trainers.rl import grpo_rows

    rows = grpo_rows(read_table(problems_dir).to_pylist(), system)
    ds = datasets.Dataset.from_list(rows)
    # images stay encoded in the dataset; decoded to PIL when a batch is drawn
    return ds.cast_column("images", datasets.Sequence(datasets.Image()))


def build_trainer(spec: Any) -> tuple[Any, list, Path | None]:
    """(the GRPO trainer of this rank, its reward functions, the checkpoint it resumes from or None)."""
    import torch

    from trainers.grpo import R1VGRPOTrainer, StepLog
    from trainers.model import apply_freeze, load_student
    from trainers.rewards import make_reward_funcs
    from trainers.rl import STEPS_LOG, RLConfig

    cfg = RLConfig.model_validate(spec.cfg)
    out = Path(spec.out_dir)
    if (cfg.zero_stage is not None or cfg.deepspeed_config) and "WORLD_SIZE" not in os.environ:
        from trainers.loop import init_distributed

        init_distributed()  # DeepSpeed in one process needs a process group (else it looks for MPI)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = _grpo_args(cfg, out, spec.seed, torch.cuda.is_available(), world)  # sets up the process group
    model, processor = load_student(spec.model_dir, dtype="float32")
    apply_freeze(model, cfg.freeze)
    export_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"  # generation pads prompts on the left
    funcs, weights = make_reward_funcs(cfg.rewards, processor.tokenizer, [model.generation_config.eos_token_id])
    args.reward_weights = weights
    ckpt, resume_step = complete_checkpoint(out / CKPT_DIR, clean=int(os.environ.get("RANK", "0")) == 0)
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # rank 0 has removed incomplete checkpoints
    steplog = StepLog(out / STEPS_LOG, [f.__name__ for f in funcs], resume_step)
    trainer = R1VGRPOTrainer(
        model=model, reward_funcs=funcs, args=args, train_dataset=_dataset(Path(spec.problems_dir), spec.system_prompt),
        processing_class=processor, callbacks=[steplog], zero_std=cfg.zero_std, buffer_size=cfg.buffer_size,
    )
    # our StepLog line replaces the Trainer's printed dict of every step's logs
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.export_padding_side = export_side
    return trainer, funcs, ckpt


def rl_worker(spec: dict | Any) -> dict:
    """One rank: load the student, freeze, build the dataset and rewards, run GRPO, export, summarise."""
    from pipeline.logging import setup_logging
    from trainers.rl import RLWorkerSpec

    spec = RLWorkerSpec.model_validate(spec) if isinstance(spec, dict) else spec
    setup_logging()
    trainer, funcs, ckpt = build_trainer(spec)
    if ckpt is not None:
        log.info("rl: resumed from %s", ckpt)
    try:
        if ckpt is not None and _finished(ckpt):
            # the kill came after the last step's checkpoint: training is over, only the export is left
            # (Trainer would run one step more when resumed at max_steps)
            from transformers.trainer_callback import TrainerState

            trainer._load_from_checkpoint(str(ckpt))
            trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    finally:
        for f in funcs:
            if hasattr(f, "close"):
                f.close()
    try:
        return finish(trainer, funcs, spec, ckpt)
    finally:
        # TrainingArguments(deepspeed=ZeRO-3) leaves a process-wide setting that makes every later
        # from_pretrained in this process partition its model (evaluate-rl runs in the same process)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def finish(trainer: Any, funcs: list, spec: Any, ckpt: Path | None) -> dict:
    """Export the model in the student's standard layout (as train's export: ZeRO-3 partitions gathered,
    the model's own parameter names, `save_pretrained`, the vision tower's published weight names) and
    write result.json."""
    import contextlib

    import torch.distributed as dist

    from pipeline.rundir import atomic_write_json
    from trainers.model import standard_weight_names
    from trainers.rl import result_path

    out = Path(spec.out_dir)
    export = out / "model"
    model = trainer.model  # the transformers model (DeepSpeed's engine wraps it in trainer.model_wrapped)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    zero3 = trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3
    if zero3:
        import deepspeed

        gather: Any = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    summary = {"steps": int(trainer.state.global_step), "world_size": int(trainer.accelerator.num_processes),
               "resumed_from": str(ckpt) if ckpt is not None else None,
               "verdicts": next((dict(f.verdicts) for f in funcs if hasattr(f, "verdicts")), {})}
    sd = None
    with gather:
        if trainer.is_world_process_zero():
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if zero3:
        # A model loaded under ZeRO-3 (zero.Init) records transformers' legacy renamings too, and
        # save_pretrained would revert them into doubled names (language_model.model.model.*): save with
        # the model's own conversions only, as a plain load records them (train's export).
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
        unset_hf_deepspeed_config()
    if sd is not None:
        model.config.use_cache = True
        export.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(export, state_dict=sd)
        standard_weight_names(export)  # the layout vLLM and evaluate load, as train's export
        processor = trainer.processing_class
        processor.tokenizer.padding_side = getattr(trainer, "export_padding_side", "right")
        processor.save_pretrained(export)
        atomic_write_json(result_path(out), summary)
    if dist.is_initialized():
        dist.barrier()
    return summary


# ---------------------------------------------------------------------------------------------------------
# launchers


def _ray_worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    for k, v in config.get("env", {}).items():
        os.environ.setdefault(k, v)
    rl_worker(config["spec"])


def launch(spec: Any, launcher: str = "local", nproc: int = 1, use_gpu: bool | None = None) -> dict:
    """Run the worker with the chosen launcher; returns rank 0's summary."""
    from trainers.launch import LAUNCHERS, _launch_ray, run_torchrun, torchrun_command
    from trainers.rl import read_result

    if launcher not in LAUNCHERS:
        raise ValueError(f"rl.launcher={launcher!r}: expected one of {LAUNCHERS}")
    spec = spec.model_copy(update={k: str(Path(getattr(spec, k)).resolve())
                                   for k in ("model_dir", "problems_dir", "out_dir")})
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "worker_spec.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    if launcher == "local":
        if nproc != 1:
            raise ValueError(f"rl.launcher=local runs one process, got rl.nproc={nproc}: use torchrun or ray")
        return rl_worker(spec)
    if launcher == "torchrun":
        run_torchrun(torchrun_command(spec_path, nproc, module="trainers.rl_worker"), spec_path)
    else:
        _launch_ray(spec, nproc, use_gpu, worker=_ray_worker, name="ray_rl")
    return read_result(out)


def main(argv: list[str] | None = None) -> int:
    from trainers.rl import RLWorkerSpec

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m trainers.rl_worker SPEC.json", file=sys.stderr)
        return 2
    rl_worker(RLWorkerSpec.model_validate_json(Path(args[0]).read_text()))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
