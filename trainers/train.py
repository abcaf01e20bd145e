"""The `train` stage: SFT of the student on curated shards, with iterative rounds (Skywork R1V hybrid SFT).

    r1v run configs/demo.yaml --stage train          # tiny student on CPU, one process, ~1 minute
    r1v run configs/demo.yaml train.launcher=torchrun train.nproc=2

Plan (the `student` and `sft` phases of pipeline.plan.PLAN, when a `train` section is configured):

    assemble -> train -> evaluate -> train-t1 -> evaluate-t1 -> ... -> train-tT -> evaluate-tT

`train` fine-tunes on every curated sample with quality >= `tau` (all by default). Round t trains the
previous round's model on `{quality >= iterative.tau[t-1]} ∪ {samples of problems evaluate-t(t-1) got
wrong}` with `iterative.lr[t-1]` (Skywork: T=4, tau 2,3,4,5, LR 1e-4 then 2e-5). Without an `evaluate`
section the rounds still run, on the threshold alone.

Outputs in the step dir: `model/` (the exported student: config, safetensors, processor),
`part-*.parquet` (table `train_log`: one row per optimizer step), `input/` (the SFT rows trained on),
`checkpoints/` (DeepSpeed, for resume), `tb/` (TensorBoard), `steps.jsonl`, `result.json`.
Manifest: rows_in = SFT rows read, kept = samples in the training set, dropped by reason
(below_tau, bad_image, overlong, image_count_mismatch, no_assistant_turn).
A killed train step restarted with the same config resumes from its last checkpoint (taken every
`save_interval_s` by default, and every `save_every` steps when set). Samples that fail to load while
training (an image that does not decode after all) are left out of their step and counted in
`metrics.dropped_in_training` and in that step's `steps.jsonl` record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.config import StageConfig
from pipeline.rundir import Manifest, ShardWriter
from pipeline.schema import SFT
from trainers.data import SFTDataConfig
from trainers.loop import STEPS_LOG, LoopConfig
from trainers.model import FREEZE_POLICIES, LoraOptions

log = logging.getLogger(__name__)

TRAIN_LOG = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("loss", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("grad_norm", pa.float64()),
        pa.field("tokens", pa.int64()),
        pa.field("tok_s", pa.float64()),
        pa.field("mfu", pa.float64()),
        pa.field("step_s", pa.float64()),
    ]
)
TABLES = ("train_log", "sft")
ROWS_FROM = "sft"
# A killed attempt's checkpoints/ are kept and training continues from the latest one; the tables are
# rewritten in full (resume=False), so nothing is duplicated.
RESUMABLE = True
INPUT_DIR = "input"


class IterativeConfig(StageConfig):
    """Iterative SFT rounds after the initial one (Skywork R1V: T=4, tau 2,3,4,5)."""

    rounds: int = Field(0, ge=0, description="T: rounds after the initial SFT (0 = initial SFT only)")
    tau: list[float] = Field(
        default_factory=lambda: [2.0, 3.0, 4.0, 5.0], description="quality threshold of round t (0-5 scale), per round"
    )
    lr: list[float] = Field(
        default_factory=lambda: [1e-4, 2e-5], description="learning rate of round t; the last value repeats"
    )
    include_wrong: bool = Field(True, description="add samples of problems the previous round's model got wrong")

    @model_validator(mode="after")
    def _check(self) -> IterativeConfig:
        if self.rounds and len(self.tau) < self.rounds:
            raise ValueError(f"iterative.tau has {len(self.tau)} values for {self.rounds} rounds")
        if self.rounds and not self.lr:
            raise ValueError("iterative.lr needs at least one value")
        return self


class TrainConfig(LoopConfig):
    """SFT of the student (section `train`); optimisation fields come from trainers.loop.LoopConfig."""

    launcher: Literal["local", "torchrun", "ray"] = Field(
        "local", description="local: this process; torchrun: nproc local ranks; ray: Ray Train workers"
    )
    nproc: int = Field(1, ge=1, description="ranks (torchrun: per node) or Ray Train workers (in all)")
    nnodes: int = Field(1, ge=1, description="torchrun: nodes in the run (> 1 needs rdzv_endpoint)")
    rdzv_endpoint: str | None = Field(
        None, description="torchrun: HOST:PORT of the c10d rendezvous every node reaches (e.g. the head node:29400)")
    rdzv_id: str = Field("r1v-train", description="torchrun: rendezvous job id, the same on every node")
    use_gpu: bool | None = Field(None, description="ray: workers take a GPU each (default: if the cluster has them)")
    freeze: Literal[FREEZE_POLICIES] = Field(  # type: ignore[valid-type]
        "projector_llm", description="projector (align) | projector_llm | lora | full"
    )
    lora: LoraOptions | None = Field(None, description="LoRA options for freeze: lora")
    tau: float | None = Field(None, description="initial SFT: only samples with quality >= tau (None = all)")
    iterative: IterativeConfig = Field(default_factory=IterativeConfig)
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)
    init_from: str | None = Field(
        None, description="student checkpoint dir to start from when no `assemble` section is configured"
    )
    check_images: bool = Field(True, description="decode every image before training; bad ones drop their sample")


def round_settings(cfg: TrainConfig, round_: int) -> tuple[float | None, float]:
    """(tau, lr) of a round: round 0 uses train.tau / train.lr, round t the iterative lists."""
    if round_ == 0:
        return cfg.tau, cfg.lr
    it = cfg.iterative
    if round_ > len(it.tau):
        raise ValueError(f"train round {round_}: iterative.tau has only {len(it.tau)} values")
    return it.tau[round_ - 1], it.lr[min(round_ - 1, len(it.lr) - 1)]


# ---------------------------------------------------------------------------------------------------------
# selection


def select_rows(table: pa.Table, tau: float | None, wrong: set[str]) -> tuple[pa.Table, int]:
    """Rows with quality >= tau or of a wrongly answered problem; returns (rows, number below tau)."""
    import pyarrow.compute as pc

    if tau is None:
        return table, 0
    q = pc.fill_null(table.column("quality"), -1.0)
    keep = pc.greater_equal(q, tau)
    if wrong:
        keep = pc.or_(keep, pc.is_in(table.column("problem_id"), value_set=pa.array(sorted(wrong), pa.string())))
    kept = table.filter(keep)
    return kept, table.num_rows - kept.num_rows


def drop_bad_images(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """Rows whose every image decodes fully; returns (rows, sample ids dropped)."""
    from pipeline.images import ImageError, image_record

    keep, bad = [], []
    images = table.column("images").to_pylist()
    ids = table.column("sample_id").to_pylist()
    for i, imgs in enumerate(images):
        try:
            for k, rec in enumerate(imgs or []):
                # every pixel, as the collator will: intact containers can still hold corrupt image data
                image_record(rec["bytes"], where=f"sample {ids[i]!r} image {k}", check="full")
            keep.append(i)
        except ImageError as e:
            log.warning("train: dropping %s", e)
            bad.append(ids[i])
    return table.take(pa.array(keep, pa.int64())), bad


def _wrong_problems(ctx: Any) -> set[str]:
    if "wrong" not in ctx.inputs:
        return set()
    from trainers.evaluate import FAILED_DIR

    try:
        t = ctx.read_input("wrong", table=FAILED_DIR, columns=["problem_id"])
    except FileNotFoundError:
        return set()  # the previous model got everything right
    return set(t.column("problem_id").to_pylist())


def _model_dir(cfg: TrainConfig, ctx: Any) -> Path:
    from trainers.assemble import find_checkpoint

    if "model" in ctx.inputs:
        return find_checkpoint(ctx.input_dirs("model")[0])
    if not cfg.init_from:
        raise ValueError(f"step {ctx.step!r}: no model input and train.init_from is unset")
    return find_checkpoint(cfg.init_from)


# ---------------------------------------------------------------------------------------------------------
# the stage


def fingerprint_extra(cfg: TrainConfig) -> dict:
    """A changed init checkpoint re-runs training (steps fed by `assemble` get its fingerprint instead), and
    so does an edited DeepSpeed JSON (by content: the shipped ones live in the package, whose path and
    mtimes differ between a checkout and Ray's copy of it)."""
    from pipeline.rundir import stable_hash
    from trainers.assemble import _path_stats, find_checkpoint
    from trainers.chat import llm_template_text
    from trainers.loop import DEEPSPEED_DIR

    ds = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json"
    init = find_checkpoint(cfg.init_from) if cfg.init_from and Path(cfg.init_from).exists() else None
    return {"init_from": _path_stats(cfg.init_from),
            "deepspeed": stable_hash(ds.read_bytes()) if ds.is_file() else None,
            # the chat template the SFT text is rendered with, by content (steps fed by `assemble` get it
            # through assemble's fingerprint)
            **({"chat_template": stable_hash(llm_template_text(init))} if init else {})}


def run(cfg: TrainConfig, ctx: Any) -> Manifest:
    from trainers.data import SFTDataset
    from trainers.launch import WorkerSpec, launch
    from trainers.model import load_student

    m = ctx.manifest()
    tau, lr = round_settings(cfg, ctx.round)
    table = ctx.read_input("sft")
    m.rows_in = table.num_rows
    wrong = _wrong_problems(ctx) if cfg.iterative.include_wrong else set()
    rows, below = select_rows(table, tau, wrong)
    if below:
        m.drop("below_tau", below)
    if cfg.check_images:
        rows, bad = drop_bad_images(rows)
        if bad:
            m.drop("bad_image", len(bad))
    model_dir = _model_dir(cfg, ctx)
    # What the data path would drop (overlong, ...) is measured here, so the manifest counts it and the
    # ranks train on exactly the rows written to input/.
    _, processor = load_student(model_dir, dtype="float32")
    measured = SFTDataset(rows, processor, cfg.data)
    for reason, n in measured.dropped.items():
        m.drop(reason, n)
    rows = rows.take(pa.array(measured.index, pa.int64()))
    m.kept = rows.num_rows
    if rows.num_rows == 0:
        raise ValueError(
            f"step {ctx.step!r}: no SFT samples left to train on ({m.rows_in} read, dropped {m.dropped}; tau={tau})"
        )
    input_dir = ctx.out_dir / INPUT_DIR
    # Rewritten in full on a resumed step (same rows, same order), so shards are never duplicated.
    with ShardWriter(input_dir, SFT, "sft", resume=False) as w:
        w.write(rows.select(SFT.names))
    loop = cfg.model_dump(include=set(LoopConfig.model_fields))
    loop["lr"] = lr
    spec = WorkerSpec(
        model_dir=str(model_dir),
        sft_dirs=[str(input_dir)],
        out_dir=str(ctx.out_dir),
        freeze=cfg.freeze,
        lora=cfg.lora.model_dump() if cfg.lora else None,
        data=cfg.data.model_dump(),
        loop=loop,
        seed=ctx.seed("train"),
    )
    rdzv = None
    if cfg.rdzv_endpoint or cfg.nnodes > 1:
        from trainers.launch import Rendezvous

        if not cfg.rdzv_endpoint:
            raise ValueError(f"train.nnodes={cfg.nnodes} needs train.rdzv_endpoint=HOST:PORT")
        rdzv = Rendezvous(nnodes=cfg.nnodes, endpoint=cfg.rdzv_endpoint, id=cfg.rdzv_id)
    result = launch(spec, cfg.launcher, cfg.nproc, cfg.use_gpu, rdzv)
    records = [json.loads(x) for x in (ctx.out_dir / STEPS_LOG).read_text().splitlines() if x.strip()]
    with ShardWriter(ctx.out_dir, TRAIN_LOG, "train_log", resume=False) as w:
        w.write([{k: r.get(k) for k in TRAIN_LOG.names} for r in records])
    m.outputs = {"train_log": len(records), "sft": rows.num_rows}
    m.metrics.update(
        {
            "tau": tau,
            "lr": lr,
            "wrong_problems": len(wrong),
            "model_dir": str(ctx.out_dir / "model"),
            "init_from": str(model_dir),
            **{k: result.get(k) for k in ("steps", "first_loss", "final_loss", "tok_s", "mfu", "world_size",
                                          "samples_seen", "items")},
            # samples (per epoch) that failed to load while training: left out of their step, counted
            "dropped_in_training": result.get("dropped_in_training") or {},
        }
    )
    return m
