"""The `align` stage: the projector trained alone on image-text pairs, on the *substitute* LLM.

    r1v run configs/demo.yaml --until assemble      # align on one tiny LLM, re-assemble onto another

Skywork R1V's efficient multimodal transfer: the vision encoder and an MLP projector are first aligned to
a substitute LLM (an instruct model of the reasoning LLM's architecture and hidden size), with everything
but the projector frozen, on caption / VQA-style pairs; the aligned encoder + projector then move to the
reasoning LLM, and SFT goes on from there. An `align` section (beside the `assemble` section, which
names the encoder and the reasoning LLM) turns on the `align` phase of pipeline.plan.PLAN:

    align-data      (stage pairs: align.pairs -> SFT rows, bad rows counted by reason; pipeline/pairs.py)
    align-assemble  (stage assemble: the assemble section with the substitute LLM of align.substitute)
    align           (this stage: projector-only SFT of align-assemble's student on align-data's pairs)
    assemble        (re-assembly: align's encoder + projector onto assemble.llm_path, the reasoning LLM)
    train ...       (SFT on the curated chains with train.freeze, as without alignment)

Settings: the optimisation fields of trainers.loop.LoopConfig (lr defaults to Skywork's 2e-4 for the
projector), launcher / nproc as train's, `data` (tokenization, trainers.data.SFTDataConfig). When the
reasoning LLM is a checkpoint (assemble.init: pretrained), its fit (architecture, hidden size, vocabulary:
trainers.model.check_llm_fits) is checked before any training, so a mismatch fails in seconds, not after
the alignment. Outputs are train's (`model/`, `train_log`, `input/`, checkpoints: resumable); the
exported `model/` carries the substitute's r1v_assembly.json with an `align` entry added to its history.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.pairs import PairsConfig
from pipeline.pairs import preflight as pairs_preflight
from pipeline.rundir import Manifest
from trainers.data import SFTDataConfig
from trainers.loop import LoopConfig

log = logging.getLogger(__name__)

TABLES = ("train_log", "sft")
ROWS_FROM = "sft"
RESUMABLE = True  # as train: a killed attempt continues from its last checkpoint


class SubstituteConfig(StageConfig):
    """The LLM the projector is aligned on (Skywork R1V: Qwen2.5-32B-Instruct for the QwQ-32B student)."""

    llm_path: str | None = Field(
        None, description="HF causal LM dir with its tokenizer: same architecture, hidden size and vocabulary as "
        "assemble.llm_path (assemble.init: pretrained)"
    )
    seed: int | None = Field(
        None, description="assemble.init: tiny_random only: the seed of the tiny random substitute student (an LLM "
        "of the same shape as the reasoning one, other weights); must differ from assemble.seed"
    )


class AlignConfig(LoopConfig):
    """Projector alignment on the substitute LLM (section `align`); optimisation fields from LoopConfig."""

    pairs: PairsConfig = Field(description="the caption / VQA pairs (pipeline/pairs.py)")
    substitute: SubstituteConfig = Field(default_factory=SubstituteConfig)
    lr: float = Field(2e-4, gt=0, description="peak learning rate of the projector (Skywork R1V: 2e-4)")
    launcher: Literal["local", "torchrun", "ray"] = Field("local", description="as train.launcher")
    nproc: int = Field(1, ge=1, description="ranks (torchrun) or Ray Train workers")
    use_gpu: bool | None = Field(None, description="ray: workers take a GPU each (default: if the cluster has them)")
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)
    check_images: bool = Field(True, description="decode every image before training; bad ones drop their sample")


def substitute_assembly(cfg: AlignConfig, assemble: Any) -> Any:
    """The `assemble` section as the substitute student is built (step align-assemble); ValueError when the
    two sections do not fit together."""
    sub = cfg.substitute
    if assemble.reassemble_from:
        raise ValueError("align re-assembles the aligned student onto assemble.llm_path itself: leave "
                         "assemble.reassemble_from unset")
    if assemble.init == "tiny_random":
        if sub.llm_path:
            raise ValueError("align.substitute.llm_path: assemble.init=tiny_random builds its own LLMs; set "
                             "align.substitute.seed instead")
        if sub.seed is None:
            raise ValueError("align.substitute.seed: required with assemble.init=tiny_random (the seed of the tiny "
                             "substitute LLM)")
        if sub.seed == assemble.seed:
            raise ValueError(f"align.substitute.seed={sub.seed} is assemble.seed: that builds the reasoning LLM "
                             "itself, not a substitute")
        return assemble.model_copy(update={"seed": sub.seed})
    if not sub.llm_path:
        raise ValueError("align.substitute.llm_path: required (the LLM the projector is aligned on)")
    if sub.seed is not None:
        raise ValueError("align.substitute.seed is for assemble.init=tiny_random; a pretrained run names "
                         "align.substitute.llm_path")
    return assemble.model_copy(update={"llm_path": sub.llm_path})


def preflight(cfg: AlignConfig) -> list[str]:
    problems = pairs_preflight(cfg.pairs)
    if cfg.substitute.llm_path and not Path(cfg.substitute.llm_path).exists():
        problems.append(f"align.substitute.llm_path: not found: {cfg.substitute.llm_path}")
    return problems


def fingerprint_extra(cfg: AlignConfig) -> dict:
    """An edited DeepSpeed JSON re-runs alignment (by content, as for train)."""
    from pipeline.rundir import stable_hash
    from trainers.loop import DEEPSPEED_DIR

    ds = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json"
    return {"deepspeed": stable_hash(ds.read_bytes()) if ds.is_file() else None}


def train_config(cfg: AlignConfig) -> Any:
    """The align section as a projector-only train config (trainers.train.TrainConfig)."""
    from trainers.train import TrainConfig

    loop = cfg.model_dump(include=set(LoopConfig.model_fields))
    return TrainConfig(**loop, launcher=cfg.launcher, nproc=cfg.nproc, use_gpu=cfg.use_gpu, freeze="projector",
                       data=cfg.data, check_images=cfg.check_images)


def _reasoning_llm(run_config: Any) -> str | None:
    asm = getattr(run_config, "assemble", None)
    return asm.llm_path if asm is not None and asm.init == "pretrained" else None


def run(cfg: AlignConfig, ctx: Any) -> Manifest:
    from trainers.assemble import find_checkpoint
    from trainers.model import ASSEMBLY_FILE, check_llm_fits
    from trainers.train import run as train_run

    substitute = find_checkpoint(ctx.input_dirs("model")[0])
    reasoning = _reasoning_llm(ctx.run_config)
    if reasoning:
        check_llm_fits(substitute, reasoning)  # ReassemblyError naming both, before any training
    m = train_run(train_config(cfg), ctx)
    model_dir = ctx.out_dir / "model"
    rec_path = substitute / ASSEMBLY_FILE
    record = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    record["history"] = [*record.get("history", []), {"op": "align", "from": str(substitute),
                                                      "steps": m.metrics.get("steps"), "pairs": m.kept}]
    if model_dir.is_dir():
        (model_dir / ASSEMBLY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    m.metrics.update({"substitute": str(substitute), "substitute_llm": record.get("llm_path"),
                      "reasoning_llm": reasoning, "freeze": "projector"})
    log.info("align: projector aligned on %s in %s steps (loss %s -> %s)", record.get("llm_path", substitute),
             m.metrics.get("steps"), m.metrics.get("first_loss"), m.metrics.get("final_loss"))
    return m
