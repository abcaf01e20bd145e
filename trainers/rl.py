"""The `rl` stage: GRPO with rule rewards after the SFT rounds (Skywork R1V's last phase), on TRL.

    r1v run configs/demo.yaml --stage rl                 # tiny student on CPU, a few steps, seconds
    r1v run configs/demo.yaml rl.launcher=torchrun rl.nproc=2
    r1v run configs/r1v-38b.yaml --stage rl              # the paper's recipe (GPUs, DeepSpeed ZeRO-3, vLLM)

Plan (phase `rl` of pipeline.plan.PLAN): `rl` reads the last SFT round's `model` and the run's `problems`
(with their images; or the set in `rl.sources`), then `evaluate-rl` evaluates the RL model.

Training is `trl.GRPOTrainer` (trainers/grpo.py adds the zero-advantage group handling, R1V2's Selective
Sample Buffer and the per-step log): the problems' prompts are rendered like the SFT and evaluate prompts
(system prompt, one image part per image, the question), `num_generations` completions per prompt are
sampled (transformers `generate`, or vLLM colocated with the trainer or as a server: `rl.vllm_mode`),
scored by the rule rewards of trainers/rewards.py (verifier accuracy under a hard deadline, think /
answer format, the length penalty past the problem's budget from `assess`), and the policy is updated
with the loss TRL ships under `rl.loss_type` (grpo, dapo, dr_grpo, bnpo, cispo, sapo, ...), through
DeepSpeed ZeRO when `rl.zero_stage` is set. Skywork R1V: LR 1e-6, group size 8, temperature 1.0, 8k
completion tokens (the defaults here).

Outputs in the step dir: `model/` (the student's standard HF layout, as `train` exports it: evaluate
and vLLM load it), `part-*.parquet` (table `rl_log`: one row per optimizer step: reward mean/std per
component, KL, clipped fraction, completion length, tokens/s, zero-std groups, generation / reward /
update seconds), `input/` (the problems trained on), `checkpoints/` (Trainer checkpoints: model,
optimizer, scheduler, RNG), `steps.jsonl`, `result.json`. A step killed (even by SIGKILL) and run again
continues from its last complete checkpoint: the log continues at the checkpoint's step, no row twice.
Manifest: rows_in = problems read, kept = problems trained on, dropped by reason (no_answer: no gold;
over_limit: past `limit`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.config import StageConfig
from pipeline.ingest import SourceConfig
from pipeline.rundir import Manifest, ShardWriter, stable_hash
from pipeline.schema import PROBLEMS
from trainers.model import FREEZE_POLICIES
from trainers.rewards import COMPONENTS, RewardsConfig

log = logging.getLogger(__name__)

TABLES = ("rl_log", "problems")
ROWS_FROM = "problems"
# A killed attempt's checkpoints/ and steps.jsonl are kept and training continues from the last complete
# checkpoint; the tables are rewritten in full, so nothing is duplicated.
RESUMABLE = True
INPUT_DIR = "input"
STEPS_LOG = "steps.jsonl"
RESULT = "result.json"

RL_LOG = pa.schema(
    [pa.field("step", pa.int64(), nullable=False)]
    + [pa.field(k, pa.float64()) for k in ("loss", "lr", "grad_norm", "reward", "reward_std")]
    + [pa.field(f"{c}_{s}", pa.float64()) for c in COMPONENTS for s in ("mean", "std")]
    + [pa.field(k, pa.float64()) for k in ("kl", "clip_ratio", "entropy", "completion_len", "truncated_ratio")]
    + [pa.field(k, pa.int64()) for k in ("groups", "zero_std_groups", "skipped_rows", "replayed_rows",
                                         "accuracy_timeouts", "tokens")]
    + [pa.field(k, pa.float64()) for k in ("tok_s", "gen_s", "reward_s", "update_s", "step_s")]
)
# the problems trained on, with assess's token budget where it ran (the length reward's budget)
RL_PROBLEMS = pa.schema(list(PROBLEMS) + [pa.field("max_tokens", pa.int64())])


class RLConfig(StageConfig):
    """GRPO after the SFT rounds (section `rl`). Defaults: Skywork R1V's GRPO settings."""

    launcher: Literal["local", "torchrun", "ray"] = Field(
        "local", description="local: this process; torchrun: nproc local ranks; ray: Ray Train workers"
    )
    nproc: int = Field(1, ge=1, description="ranks (torchrun) or Ray Train workers")
    use_gpu: bool | None = Field(None, description="ray: workers take a GPU each (default: if the cluster has them)")
    sources: list[SourceConfig] | None = Field(
        None, description="RL problems (ingest-style sources); default: the run's problems (with images)"
    )
    limit: int | None = Field(None, ge=1, description="problems used (a seeded sample), None = all")
    freeze: Literal[FREEZE_POLICIES] = Field(  # type: ignore[valid-type]
        "projector_llm", description="trainable parts: projector | projector_llm | full (lora: not in rl)"
    )
    lr: float = Field(1e-6, gt=0, description="learning rate (Skywork R1V GRPO: 1e-6)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field("constant")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of all steps")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    num_generations: int = Field(8, ge=2, description="group size: completions per prompt (Skywork R1V: 8)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (Skywork R1V: 1.0)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_tokens: int = Field(8192, ge=1, description="completion tokens (Skywork R1V: 8k)")
    per_device_batch: int = Field(8, ge=1, description="completions per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    steps_per_generation: int | None = Field(None, ge=1, description="optimizer steps per generation round "
                                             "(TRL; default grad_accum)")
    num_iterations: int = Field(1, ge=1, description="policy updates per generation batch (GRPO's mu)")
    beta: float = Field(0.04, ge=0, description="KL coefficient against the initial model (0 = no reference model)")
    epsilon: float = Field(0.2, gt=0, description="clip range of the policy ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range (DAPO clip-higher; None = epsilon)")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] = Field(
        "grpo", description="TRL's loss variants (grpo: per-sequence mean, as in the paper)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage scaling")
    mask_truncated_completions: bool = Field(False, description="truncated completions leave the loss (DAPO)")
    zero_std: Literal["keep", "skip", "buffer"] = Field(
        "skip", description="groups whose rewards are all equal: keep (TRL's default), skip (out of the loss), "
        "buffer (R1V2's Selective Sample Buffer: replaced by cached samples with non-zero advantage)")
    buffer_size: int = Field(256, ge=1, description="zero_std=buffer: cached completions")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default: epochs over the problems")
    epochs: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, ge=1)
    zero_stage: Literal[2, 3] | None = Field(None, description="DeepSpeed ZeRO stage through accelerate (None = off)")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON; default configs/deepspeed/zero<stage>.json")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = Field(True)
    use_vllm: bool = Field(False, description="generate with vLLM (needs the vllm extra) instead of transformers")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM inside each training process; server: `trl vllm-serve` elsewhere")
    vllm_server_base_url: str | None = Field(None, description="server mode: the vLLM server's URL")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate: GPU share for vLLM")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="colocate: tensor parallel size of vLLM")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    system_prompt_file: str = Field("sft_system.txt", description="system prompt (as curate / evaluate)")
    tensorboard: bool = Field(True, description="TensorBoard event files in <step>/tb")

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        gen_batch = self.per_device_batch * (self.steps_per_generation or self.grad_accum)
        if gen_batch % self.num_generations:
            raise ValueError(f"rl: per_device_batch x steps_per_generation = {gen_batch} completions is not a multiple "
                             f"of num_generations={self.num_generations} (whole groups per device)")
        if self.freeze == "lora":
            raise ValueError("rl.freeze=lora is not supported: use projector, projector_llm or full")
        if self.use_vllm and self.vllm_mode == "server" and not self.vllm_server_base_url:
            raise ValueError("rl.vllm_mode=server needs rl.vllm_server_base_url")
        return self


class RLWorkerSpec(StageConfig):
    """Everything one rank needs, as plain JSON."""

    model_dir: str
    problems_dir: str
    out_dir: str
    cfg: dict[str, Any]
    system_prompt: str
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------
# per-problem logic (plain Python)


def prompt_messages(problem: dict, system: str) -> list[dict]:
    """The GRPO prompt: the same turns as evaluate's (and the SFT rows'), images as TRL image parts."""
    from filters.curate import problem_text

    user: list[dict] = []
    for _ in problem.get("images") or []:
        user += [{"type": "image"}, {"type": "text", "text": "\n"}]
    user.append({"type": "text", "text": problem_text(problem)})
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, {"role": "user", "content": user}]


def grpo_rows(problems: list[dict], system: str) -> list[dict]:
    """Dataset rows for GRPOTrainer: prompt, images (encoded), and the columns the rewards read."""
    return [{
        "prompt": prompt_messages(p, system),
        "images": [{"bytes": im["bytes"], "path": None} for im in p.get("images") or []],
        "problem_id": p["problem_id"], "answer": str(p["answer"]), "answer_type": p.get("answer_type"),
        "choices": list(p.get("choices") or []), "max_tokens": p.get("max_tokens"),
    } for p in problems]


def _problems(cfg: RLConfig, ctx: Any, m: Manifest) -> list[dict]:
    if cfg.sources:
        from pipeline.ingest import load_sources

        rows = [row for kind, row in load_sources(cfg.sources) if kind == "problem"]
    else:
        rows = ctx.read_input("problems").to_pylist()
    m.rows_in = len(rows)
    keep = [r for r in rows if str(r.get("answer") or "").strip()]
    if len(keep) < len(rows):
        m.drop("no_answer", len(rows) - len(keep))
    salt = ctx.run_config.run.seed
    keep.sort(key=lambda r: stable_hash(salt, r["problem_id"]))
    if cfg.limit and len(keep) > cfg.limit:
        m.drop("over_limit", len(keep) - cfg.limit)
        keep = keep[: cfg.limit]
    return keep


def _model_dir(ctx: Any) -> Path:
    from trainers.assemble import find_checkpoint

    return find_checkpoint(ctx.input_dirs("model")[0])


# ---------------------------------------------------------------------------------------------------------
# the stage


def fingerprint_extra(cfg: RLConfig) -> dict:
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import fingerprint_extra as source_stats

    return source_stats(IngestConfig(sources=cfg.sources)) if cfg.sources else {}


def run(cfg: RLConfig, ctx: Any) -> Manifest:
    from filters.curate import CurateConfig, system_prompt
    from trainers.rl_worker import launch

    m = ctx.manifest()
    problems = _problems(cfg, ctx, m)
    if not problems:
        raise ValueError(f"step {ctx.step!r}: no problems with a gold answer to train on ({m.rows_in} read)")
    m.kept = len(problems)
    input_dir = ctx.out_dir / INPUT_DIR
    # Rewritten in full on a resumed step (same rows, same order), so shards are never duplicated.
    with ShardWriter(input_dir, RL_PROBLEMS, "problems", resume=False) as w:
        w.write([{k: p.get(k) for k in RL_PROBLEMS.names} for p in problems])
    spec = RLWorkerSpec(model_dir=str(_model_dir(ctx)), problems_dir=str(input_dir), out_dir=str(ctx.out_dir),
                        cfg=cfg.model_dump(mode="json"), seed=ctx.seed("rl") % (2**31),
                        system_prompt=system_prompt(CurateConfig(system_prompt_file=cfg.system_prompt_file)))
    result = launch(spec, cfg.launcher, cfg.nproc, cfg.use_gpu)
    from trainers.loop import read_steps

    records = read_steps(ctx.out_dir / STEPS_LOG)
    with ShardWriter(ctx.out_dir, RL_LOG, "rl_log", resume=False) as w:
        w.write([{k: r.get(k) for k in RL_LOG.names} for r in records])
    m.outputs = {"rl_log": len(records), "problems": len(problems)}
    first, last = (records[0], records[-1]) if records else ({}, {})
    m.metrics.update({
        "model_dir": str(ctx.out_dir / "model"), "init_from": spec.model_dir, "steps": len(records),
        "reward_first": first.get("reward"), "reward_final": last.get("reward"),
        **{f"{c}_final": last.get(f"{c}_mean") for c in COMPONENTS if last.get(f"{c}_mean") is not None},
        "zero_std_groups": sum(r.get("zero_std_groups", 0) for r in records),
        "groups": sum(r.get("groups", 0) for r in records),
        "accuracy_timeouts": sum(r.get("accuracy_timeouts", 0) for r in records),
        **{k: result.get(k) for k in ("world_size", "resumed_from", "verdicts")},
    })
    return m


def result_path(out_dir: Path) -> Path:
    return Path(out_dir) / RESULT


def read_result(out_dir: Path) -> dict:
    p = result_path(out_dir)
    if not p.exists():
        raise RuntimeError(f"rl finished without {p}")
    return json.loads(p.read_text())
