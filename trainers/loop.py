"""The DeepSpeed training loop: ZeRO-2/3, exact mid-epoch resume, per-step log line, TensorBoard, export.

One function, `train_loop(model, data, cfg, out_dir)`, runs on every rank (one process, `torchrun`
ranks, or Ray Train workers — trainers/launch.py picks). What it guarantees:

- the global batch (micro_batch x grad_accum x world) and its loss are the same for any world size: the
  loss is the weighted token sum over the whole global batch divided by its labelled-token count, so two
  ranks with grad_accum 1 and one rank with grad_accum 2 take the same optimizer step;
- a DeepSpeed checkpoint (model, optimizer, LR schedule) plus the data position (epoch, next sample
  index, order seed) and each rank's RNG states every `save_interval_s` seconds (on by default, spaced
  so saving costs at most `checkpoint_overhead` of the time) and every `save_every` steps when set; a
  restarted run continues from the `latest` checkpoint and reproduces the uninterrupted loss sequence;
- each step's batches are built ahead by DataLoader workers (trainers/loader.py: decode, tokenize, pack,
  collate; pinned on CUDA); the data position is the loop's plan, so resume is exact however far the
  workers had run ahead; a sample that fails to load is dropped from its step and counted (`dropped` in
  the step record, `dropped_in_training` in the metrics); any other input failure stops every rank;
- one log line per step, `step 12/40 | loss 2.3456 | lr 1.2e-04 | tok/s 1,234 | mfu 0.0012`, the same
  figures in TensorBoard (`<out>/tb`) and in `<out>/steps.jsonl` (plus `wait_s`: time the step waited on
  its input);
- at the end the model is consolidated (ZeRO-3 gathered, LoRA merged) and saved with `save_pretrained`
  to `<out>/model`, loadable with the model's Auto class.

Config knobs that the DeepSpeed JSON marks "auto" (batch sizes, clipping, bf16) come from LoopConfig.
CPU: gloo and fp32 by default; CUDA: nccl and bf16.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from trainers.checkpoint import export_model, load_checkpoint, save_checkpoint
from trainers.flops import StepFlops, peak_flops
from trainers.kernels import apply_kernels
from trainers.loader import (
    DROP_REASONS,
    auto_workers,
    epoch_order,  # noqa: F401 - the sample order, part of this module's API
    global_batches,
    step_items,
)
from trainers.loader import count_samples as _count  # noqa: F401 - the per-step counts (tests import it here)
from trainers.loss import chunked_lm_loss, loss_positions

log = logging.getLogger(__name__)

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
CKPT_DIR = "checkpoints"
STEPS_LOG = "steps.jsonl"

class LoopConfig(StageConfig):
    """Optimisation settings shared by every launcher (TrainConfig extends it)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON; default configs/deepspeed/zero<stage>.json ('auto' keys are filled here)"
    )
    lr: float = Field(2e-5, gt=0, description="peak learning rate (Skywork: 2e-4 align, 4e-5 after, 1e-4/2e-5 rounds)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="linear warmup as a fraction of all steps")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay on matrices (not on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    epochs: int = Field(1, ge=1, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default: epochs over the data")
    micro_batch: int = Field(1, ge=1, description="samples per forward per rank")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step per rank")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0 = off)")
    save_every: int = Field(0, ge=0, description="also checkpoint every N optimizer steps (0 = by time only)")
    save_interval_s: float = Field(
        300.0, ge=0, description="checkpoint once this many seconds of training passed since the last one (0 = "
        "off), spaced further apart when saving is slow, so checkpoints take at most checkpoint_overhead of the time"
    )
    checkpoint_overhead: float = Field(
        0.05, gt=0, le=1, description="time-based checkpoints: the most share of training time spent saving them"
    )
    loader_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes per rank that decode, tokenize, pack and collate "
        "steps ahead (0 = in the training process; default: up to 4 on CUDA, 1 on CPU)"
    )
    prefetch_factor: int = Field(2, ge=1, description="steps each loader worker builds ahead")
    pin_memory: bool | None = Field(None, description="page-locked batches for asynchronous copies (default: on CUDA)")
    loader_timeout_s: float = Field(
        1800.0, gt=0, description="a loader worker that delivers no step for this long is an error, not a hang"
    )
    loader_start: Literal["fork", "spawn", "forkserver"] = Field(
        "fork", description="how loader workers start (spawn/forkserver need a picklable dataset and collator)"
    )
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk (oldest removed)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward to save memory")
    checkpoint_every: int = Field(
        1, ge=1, description="recompute every N-th decoder layer only (fewer FLOPs where memory allows)"
    )
    loss_chunk: int = Field(
        1024, ge=0, description="tokens per chunk of the fused lm_head + cross-entropy (0 = full logits)"
    )
    log_every: int = Field(1, ge=1, description="log line every N steps")
    peak_tflops: float | None = Field(None, gt=0, description="MFU denominator override (TFLOP/s per device)")
    compile: bool = Field(False, description="torch.compile each transformer block (regional; GPU)")
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger: Liger's Triton RMSNorm/RoPE/SwiGLU in the LLM (CUDA, extra '.[gpu]')"
    )
    overflow_check: Literal["per_tensor", "global_norm"] = Field(
        "per_tensor",
        description="bf16 non-finite gradients: per_tensor = DeepSpeed checks every gradient tensor and skips the "
                    "step (one host sync per tensor); global_norm = no per-tensor check, the loop stops with an "
                    "error naming the step when the global gradient norm or the loss is not finite (ZeRO 1-3; "
                    "fp32 training always stops so)",
    )
    tensorboard: bool = Field(True, description="TensorBoard event files in <out>/tb (rank 0)")
    export: bool = Field(True, description="save the consolidated model to <out>/model at the end")


@dataclass
class LoopData:
    """What the loop trains on: indexable samples and a collator turning a list of them into a batch.

    A sample is a dict with `input_ids`, `labels` (-100 where no loss) and optionally `loss_weights`;
    `collate(samples)` returns tensors the model's forward accepts plus `labels` (and `loss_weights`).
    `tokens(i)` (optional) gives sample i's length for logging without collating.
    """

    dataset: Sequence[dict]
    collate: Callable[[list[dict]], dict]
    processor: Any = None


@dataclass
class LoopResult:
    steps: int
    losses: list[float]
    samples_seen: int
    model_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# distributed set-up


def init_distributed() -> tuple[int, int, Any]:
    """(rank, world_size, device); starts a one-process group when no launcher set one up."""
    import torch
    import torch.distributed as dist

    single = os.environ.get("WORLD_SIZE", "1") == "1"
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1")  # MASTER_PORT: the store's
    os.environ.setdefault("LOCAL_RANK", "0")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # before NCCL starts, so its communicator binds this GPU
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if single:
            # The store binds a port the OS picks (port 0), atomically: no window between choosing a free
            # port and binding it in which another process (a Ray worker, say) could take it.
            store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
            os.environ["MASTER_PORT"] = str(store.port)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def deepspeed_config(cfg: LoopConfig, world: int, bf16: bool) -> dict:
    """The JSON config with every "auto" value filled from `cfg`."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json"
    if not path.exists():
        if cfg.zero_stage in (0, 1) and not cfg.deepspeed_config:
            raw: dict = {"zero_optimization": {"stage": cfg.zero_stage}}
        else:
            raise FileNotFoundError(f"DeepSpeed config {path} not found (train.deepspeed_config)")
    else:
        raw = json.loads(path.read_text())
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
    }
    for k, v in auto.items():
        if raw.get(k, "auto") == "auto":
            raw[k] = v
        elif raw[k] != v:
            # The loop's data order, loss scaling and step count follow LoopConfig; a DeepSpeed value
            # that differs would make DeepSpeed step (or clip) on a schedule the loop does not know.
            raise ValueError(f"{path}: {k}={raw[k]!r} but the train config gives {v!r}; "
                             f"set it to \"auto\" there, or change micro_batch/grad_accum/grad_clip in the config")
    raw.setdefault("bf16", {})
    if raw["bf16"].get("enabled", "auto") == "auto":
        raw["bf16"]["enabled"] = bf16
    if cfg.overflow_check == "global_norm":
        if cfg.zero_stage == 0:
            # ZeRO-0 bf16 runs DeepSpeed's FP16_Optimizer wrapper, whose per-tensor check has no switch
            raise ValueError("train.overflow_check=global_norm needs zero_stage 1, 2 or 3")
        raw["bf16"]["check_grad_overflow"] = False
    zero = raw.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = cfg.zero_stage
    elif zero["stage"] != cfg.zero_stage:
        raise ValueError(f"{path}: zero_optimization.stage={zero['stage']} but train.zero_stage={cfg.zero_stage}")
    for k, v in list(zero.items()):
        if v == "auto":
            zero.pop(k)  # DeepSpeed's own default (bucket sizes depend on the model it sees)
    raw.setdefault("steps_per_print", 10**9)  # our own log line replaces DeepSpeed's
    raw.setdefault("wall_clock_breakdown", False)
    return raw


# ---------------------------------------------------------------------------------------------------------
# loss


def _unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (peft forwards attribute access otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def make_loss_module(model: Any, chunk: int, zero_stage: int) -> Any:
    """Wrap `model` so `engine(batch)` returns the weighted token-loss sum (not a mean).

    The chunked head needs the final hidden states: `<model>.model(...)` of a transformers CausalLM /
    LLaVA-style model gives them and `<model>.lm_head` is the head. Under ZeRO-3 the head's weight is
    partitioned outside its own forward, so there the plain logits path is used.
    """
    import torch

    class _Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.blank_image = None
            base = _unwrap(model)
            cfg = getattr(base, "config", None)
            vcfg = getattr(cfg, "vision_config", None)
            token = getattr(cfg, "image_token_id", None)
            if vcfg is not None and token is not None and hasattr(base, "get_image_features"):
                size = getattr(vcfg, "image_size", 224)
                size = size[0] if isinstance(size, (list, tuple)) else size
                p0 = next(model.parameters())  # the model may already sit on its GPU
                blank = torch.zeros(1, 3, size, size, dtype=p0.dtype, device=p0.device)
                with torch.no_grad():  # before DeepSpeed wraps the model: how many tokens one image takes
                    out = base.get_image_features(pixel_values=blank, return_dict=True)
                feats = getattr(out, "pooler_output", out)  # transformers < 5 returns the features
                if isinstance(feats, (list, tuple)):
                    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
                self.blank_tokens = int(feats.reshape(-1, feats.shape[-1]).shape[0])
                self.blank_image = blank
                self.image_token_id = int(token)
                pad = getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
                self.pad_id = int(pad) if pad is not None else 0

        def prepare(self, batch: dict) -> dict:
            """On the host, before the batch moves to the device: what the forward would otherwise learn
            from device tensors with a host sync each (boolean masks, `.any()`, `nonzero`) is computed
            here from the CPU tensors. `_loss_index`: the shifted token positions that carry loss (with
            the labels checked against the vocabulary); `_image_positions`: where the image features go."""
            if self.blank_image is not None and batch.get("pixel_values") is None:
                batch = self._with_blank_image(batch)
            out = dict(batch)
            labels = batch["labels"]
            weights = batch.get("loss_weights")
            if weights is None:
                weights = (labels != -100).to(torch.float32)
                out["loss_weights"] = weights
            out["_loss_index"] = loss_positions(labels, weights, self.vocab)
            if self.blank_image is not None and out.get("pixel_values") is not None:
                out["_image_positions"] = (batch["input_ids"].reshape(-1) == self.image_token_id).nonzero().squeeze(1)
            return out

        @property
        def vocab(self) -> int:
            base = _unwrap(self.model)
            head = getattr(base, "lm_head", None)
            n = getattr(head, "out_features", None)
            if n is None:
                cfg = base.config
                n = (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).vocab_size
            return int(n)

        def _embed_with_images(self, inputs: dict, positions: Any) -> dict:
            """input_ids + pixel_values -> inputs_embeds with the image features placed at `positions`,
            computed on the host: the same embeddings as the model's own merge, without its placeholder
            mask (a boolean index and a masked_scatter, each a host sync, one of them in backward)."""
            base = _unwrap(self.model)
            ids, pixels = inputs.pop("input_ids"), inputs.pop("pixel_values")
            embeds = base.get_input_embeddings()(ids)
            out = base.get_image_features(pixel_values=pixels, return_dict=True)
            feats = getattr(out, "pooler_output", out)  # transformers < 5 returns the features
            if isinstance(feats, (list, tuple)):
                feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
            feats = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            if feats.shape[0] != positions.numel():
                raise ValueError(f"image features and image tokens do not match: {positions.numel()} image "
                                 f"tokens in the batch, {feats.shape[0]} image features")
            flat = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, positions, feats)
            inputs["inputs_embeds"] = flat.view_as(embeds)
            return inputs

        def forward(self, batch: dict) -> Any:
            if "_loss_index" not in batch:
                batch = self.prepare(batch)
            labels, weights, index = batch["labels"], batch["loss_weights"], batch["_loss_index"]
            positions = batch.get("_image_positions")
            skip = ("labels", "loss_weights", "_loss_index", "_image_positions")
            inputs = {k: v for k, v in batch.items() if k not in skip}
            dtype = next(self.model.parameters()).dtype
            for k in ("pixel_values",):
                if k in inputs and inputs[k].is_floating_point():
                    inputs[k] = inputs[k].to(dtype)
            if positions is not None:
                inputs = self._embed_with_images(inputs, positions)
            base = _unwrap(self.model)
            inner, head = getattr(base, "model", None), getattr(base, "lm_head", None)
            if chunk > 0 and zero_stage < 3 and inner is not None and head is not None:
                hidden = inner(**inputs, use_cache=False).last_hidden_state
                loss = chunked_lm_loss(hidden, head, labels, weights, chunk, index=index)
            else:
                logits = self.model(**inputs, use_cache=False).logits
                loss = chunked_lm_loss(logits, torch.nn.Identity(), labels, weights, 0, index=index)
            return loss

        def _with_blank_image(self, batch: dict) -> dict:
            """A text-only micro-batch gets one blank image appended after its last token (no loss).

            ZeRO-2/3 reduce gradients bucket by bucket in the order backward produces them and ZeRO-3
            gathers parameters in the order modules run; every rank must do both identically. A rank
            whose batch has no image would skip encoder + projector and the collectives would no longer
            line up (wrong gradients, an IndexError, or a hang). The blank image's tokens come after
            every real token (causal: no real token sees them), are masked or form their own packed
            block, and carry labels -100, so the loss and its gradient are exactly those of the text.
            """
            ids = batch["input_ids"]
            rows, n = ids.shape[0], self.blank_tokens
            extra = torch.full((rows, n), self.pad_id, dtype=ids.dtype, device=ids.device)
            extra[0] = self.image_token_id
            out = dict(batch)
            out["input_ids"] = torch.cat([ids, extra], dim=1)
            out["labels"] = torch.cat([batch["labels"], torch.full_like(extra, -100)], dim=1)
            if batch.get("loss_weights") is not None:
                lw = batch["loss_weights"]
                out["loss_weights"] = torch.cat([lw, lw.new_zeros((rows, n))], dim=1)
            if batch.get("position_ids") is not None:
                pos = torch.arange(n, device=ids.device).expand(rows, n)
                out["position_ids"] = torch.cat([batch["position_ids"], pos], dim=1)
            else:
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(ids)
                out["attention_mask"] = torch.cat([mask, torch.zeros_like(extra)], dim=1)
            out["pixel_values"] = self.blank_image.to(ids.device, next(self.model.parameters()).dtype)
            return out

    return _Loss()


# ---------------------------------------------------------------------------------------------------------
# schedule, order, flops


def cosine_lambda(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# ---------------------------------------------------------------------------------------------------------
# the loop


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the freeze policy")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to(batch: dict, device: Any) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def total_steps(n: int, cfg: LoopConfig, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per = cfg.micro_batch * cfg.grad_accum * world
    return cfg.epochs * math.ceil(n / per)


class CheckpointClock:
    """When the time-based checkpoint is due: `interval_s` of training after the last one, or later when
    saving is slow, so that saving takes at most `overhead` of the time (a save that took c seconds
    waits at least c / overhead). The loop feeds `due` values every rank agrees on (all-reduced)."""

    def __init__(self, interval_s: float, overhead: float, now: Callable[[], float] = time.perf_counter) -> None:
        self.interval_s, self.overhead, self.now = interval_s, overhead, now
        self.last = now()
        self.cost = 0.0  # seconds the last checkpoint took (0 before the first)

    def since(self) -> float:
        return self.now() - self.last

    def due(self, since: float, cost: float) -> bool:
        return self.interval_s > 0 and since >= max(self.interval_s, cost / self.overhead)

    def saved(self, cost: float) -> None:
        self.cost, self.last = cost, self.now()


def read_steps(path: Path) -> list[dict]:
    """The step records of a killed run (train's and rl's steps.jsonl); a line torn by the kill (the last
    one) is skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a torn line %r", path, line[:80])
    return out


def train_loop(
    model: Any,
    data: LoopData,
    cfg: LoopConfig,
    out_dir: Path,
    seed: int = 0,
    on_step: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Train `model` on `data` with DeepSpeed; resume from `<out_dir>/checkpoints/latest` if present."""
    import deepspeed
    import torch
    import torch.distributed as dist

    out_dir = Path(out_dir)
    rank, world, device = init_distributed()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(seed)
    random.seed(seed)
    n = len(data.dataset)
    if n == 0:
        raise ValueError("no training samples")
    steps_total = total_steps(n, cfg, world)
    warmup = math.ceil(cfg.warmup_ratio * steps_total)

    if cfg.gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=cfg.checkpoint_every)
    elif cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # transformers < 5: all layers or none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    apply_kernels(model, cfg.kernels)  # before compile: the compiled blocks trace the patched modules
    if cfg.compile:
        # Regional compilation: identical blocks share one compiled graph, so it compiles in seconds.
        for module in model.modules():
            if type(module).__name__.endswith(("DecoderLayer", "EncoderLayer")):
                module.compile()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    flops = StepFlops.of(model)  # before DeepSpeed partitions anything
    wrapped = make_loss_module(model, cfg.loss_chunk, cfg.zero_stage)
    opt_kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), **opt_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(steps_total, warmup, cfg.min_lr_ratio))
    ds_cfg = deepspeed_config(cfg, world, bf16)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    # Destroyed even when a step fails (e.g. out of memory), so a retry in this process starts clean.
    items = None
    try:
        ckpt_dir = out_dir / CKPT_DIR
        position = load_checkpoint(engine, ckpt_dir, rank) or {"epoch": 0, "index": 0, "step": 0, "seed": seed}
        if position["seed"] != seed:
            raise ValueError(f"{ckpt_dir}: checkpoint was written with seed {position['seed']}, run has seed {seed}")
        step = position["step"]

        writer = None
        steps_log = out_dir / STEPS_LOG
        records: list[dict] = []
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if steps_log.exists():  # drop steps after the checkpoint: they are recomputed identically
                records = [r for r in read_steps(steps_log) if r["step"] <= step]
            steps_log.write_text("".join(json.dumps(r) + "\n" for r in records))
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out_dir / "tb"), purge_step=step + 1)

        peak = peak_flops(cfg.peak_tflops, device) * world
        # DeepSpeed skips a step with non-finite gradients only under bf16 with its per-tensor check
        unguarded = cfg.overflow_check == "global_norm" or not bf16
        losses = [r["loss"] for r in records]
        samples_seen = position.get("samples_seen", 0)
        dropped = dict(position.get("dropped", {}))
        plan = itertools.islice(global_batches(n, cfg, world, rank, seed, position), max(0, steps_total - step))
        workers = cfg.loader_workers if cfg.loader_workers is not None else auto_workers(device.type == "cuda")
        pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
        items = step_items(data.dataset, data.collate, plan, workers, cfg.prefetch_factor, pin,
                           cfg.loader_timeout_s, cfg.loader_start)
        clock = CheckpointClock(cfg.save_interval_s, cfg.checkpoint_overhead)
        engine.train()
        while step < steps_total:
            t0 = time.perf_counter()
            item = next(items)
            wait = time.perf_counter() - t0
            lr = scheduler.get_last_lr()[0]
            # On the device: NCCL reduces CUDA tensors only (gloo takes either). The last entries say
            # whether any rank failed to build its step: then every rank stops here, none waits forever.
            counts = (item.counts or [0.0] * 4) + [float(item.dropped.get(r, 0)) for r in DROP_REASONS]
            # Then the seconds since the last checkpoint and its cost: every rank takes the same decision.
            local = torch.tensor(counts + [float(item.dropped_real), float(item.error is not None), clock.since(),
                                           clock.cost], dtype=torch.float64, device=device)
            dist.all_reduce(local)
            *head, n_dropped_real, n_failed, since, cost = local.tolist()
            n_labels, n_tokens, n_sq, n_images = head[:4]
            step_drops = {r: int(v) for r, v in zip(DROP_REASONS, head[4:], strict=True) if v}
            if n_failed:
                raise RuntimeError(f"step {step + 1}: the input pipeline failed on {int(n_failed)} rank(s)"
                                   + (f"; on rank {rank}:\n{item.error}" if item.error else ""))
            scale = cfg.grad_accum * world / max(n_labels, 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for m in item.micro:
                s = engine(_to(wrapped.prepare(m), device))
                engine.backward(s * scale)
                engine.step()
                loss_sum += s.detach().double()  # read back once per step: no sync per micro-batch
            dist.all_reduce(loss_sum)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            samples_seen += item.real - int(n_dropped_real)
            epoch, next_index = item.epoch, item.next_index
            for r, v in step_drops.items():
                dropped[r] = dropped.get(r, 0) + v
            loss = float(loss_sum) / max(n_labels, 1.0)
            losses.append(loss)
            tok_s = n_tokens / dt
            mfu = flops.step(n_tokens, n_sq, n_images, n_labels) / dt / peak
            gn = engine.get_global_grad_norm()
            if unguarded and not (math.isfinite(loss) and (gn is None or math.isfinite(float(gn)))):
                # DeepSpeed did not check this step's gradients (fp32, or told not to), so it was applied:
                # stop here, loudly
                raise FloatingPointError(
                    f"step {step}: non-finite loss ({loss}) or gradient norm ({gn}); the weights are no longer "
                    f"valid: resume from the last checkpoint in {ckpt_dir} with a lower lr, or set "
                    f"train.overflow_check=per_tensor to skip such steps")
            rec = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": float(gn) if gn is not None else float("nan"),
                "tokens": int(n_tokens),
                "tok_s": tok_s,
                "mfu": mfu,
                "step_s": dt,
                "wait_s": wait,
            }
            if step_drops:
                rec["dropped"] = step_drops
                log.warning("step %d: dropped %s (%s)", step, step_drops, "; ".join(item.dropped_ids)[:300])
            if rank == 0:
                records.append(rec)
                with open(steps_log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                for k in ("loss", "lr", "grad_norm", "tok_s", "mfu"):
                    if writer is not None:
                        writer.add_scalar(f"train/{k}", rec[k], step)
                if step % cfg.log_every == 0 or step == steps_total:
                    log.info(
                        "step %d/%d | loss %.4f | lr %.1e | tok/s %s | mfu %.4f",
                        step, steps_total, loss, lr, f"{tok_s:,.0f}", mfu,
                    )
            position = {"epoch": epoch, "index": next_index, "step": step, "seed": seed, "samples_seen": samples_seen,
                        "dropped": dropped}
            if next_index >= n:
                position.update(epoch=epoch + 1, index=0)
            by_steps = cfg.save_every and step % cfg.save_every == 0
            if step < steps_total and (by_steps or clock.due(since / world, cost / world)):
                c0 = time.perf_counter()
                save_checkpoint(engine, ckpt_dir, step, position, rank, cfg.keep_checkpoints)
                clock.saved(time.perf_counter() - c0)
            if on_step is not None:
                on_step(step, rec)
        if writer is not None:
            writer.close()
        model_dir = out_dir / "model" if cfg.export else None
        if model_dir is not None:
            export_model(engine, model, model_dir, rank, cfg.zero_stage, data.processor)
    finally:
        if items is not None:
            items.close()  # stops the loader's workers
        engine.destroy()
    tail = records[-min(len(records), 5):] if records else []
    metrics = {
        "steps": step,
        "final_loss": losses[-1] if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "tok_s": sum(r["tok_s"] for r in tail) / max(1, len(tail)),
        "mfu": sum(r["mfu"] for r in tail) / max(1, len(tail)),
        "world_size": world,
        "bf16": bf16,
        "dropped_in_training": dropped,
    }
    return LoopResult(step, losses, samples_seen, model_dir, metrics, records)
