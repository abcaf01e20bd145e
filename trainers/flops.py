"""Model FLOPs of a training step, for the MFU figure in the log line and the benchmark.

MFU = model FLOPs of the step / (step seconds x the devices' dense bf16 peak). The model FLOPs count
the matmuls the step needs, not what it happens to run (recompute is not counted):

- each part's weights: 2 FLOPs per parameter per token forward, 2 more in backward for the activation
  gradients wherever a gradient has to flow through the part, and 2 more for its weight gradients when
  its parameters train — so a fully trained model costs the familiar 6N per token, a frozen vision
  encoder 2N per patch and a frozen LLM under a trained projector 4N per token;
- the parts see different tokens: the LLM every text token (image placeholders included), the vision
  encoder every patch of every image (or tile), the projector every patch (a quarter after a 0.5 pixel
  shuffle);
- attention: 4 x layers x hidden x s FLOPs per token forward for a sequence of s tokens (QK^T and AV),
  doubled in backward; packed rows count each sample's own length, so s^2 is summed per sample;
- the input embedding is a lookup (no FLOPs); a tied embedding is counted once, as the LM head; the
  vision encoder's pooling head is left out (the projector takes the patch features, not its output);
  the LM head counts only on tokens with a label (the fused loss computes no logits elsewhere).

Parameters under ZeRO-3 report numel 0 once partitioned; `ds_numel` is used then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name (no sparsity): the MFU denominator.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
# A nominal CPU peak so the CPU figure is a smoke number, never compared with a GPU's.
CPU_PEAK_FLOPS = 1e12

VISION_KEYS = ("vision_tower", "vision_model")
PROJECTOR_KEYS = ("multi_modal_projector", "mlp1")


def _numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def _unwrap(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


@dataclass(frozen=True)
class Part:
    params: int
    trainable: int
    layers: int = 0
    hidden: int = 0

    @property
    def trains(self) -> bool:
        return self.trainable > 0


@dataclass(frozen=True)
class StepFlops:
    """Per-part sizes of a model; `step(...)` turns a step's token counts into FLOPs."""

    text: Part
    vision: Part
    projector: Part
    head: Part
    patches_per_image: int
    tokens_per_image: int

    @classmethod
    def of(cls, model: Any) -> StepFlops:
        base = _unwrap(model)
        config = getattr(base, "config", None)
        tc = getattr(config, "text_config", None) or config
        vc = getattr(config, "vision_config", None)
        emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        emb_w = getattr(emb, "weight", None)
        tied = emb_w is not None and head is not None and getattr(head, "weight", None) is emb_w
        head_w = getattr(head, "weight", None)
        sums = {"text": [0, 0], "vision": [0, 0], "projector": [0, 0], "head": [0, 0]}
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p is emb_w and not tied:
                continue  # a lookup; the separate lm_head weight carries the output matmul
            if any(k + ".head." in name for k in VISION_KEYS):
                continue  # the encoder's pooling head (SigLIP's): its pooled vector feeds nothing
            part = ("head" if head_w is not None and p is head_w
                    else "vision" if any(k in name for k in VISION_KEYS)
                    else "projector" if any(k in name for k in PROJECTOR_KEYS) else "text")
            sums[part][0] += _numel(p)
            sums[part][1] += _numel(p) if p.requires_grad else 0
        patches = tokens = 0
        if vc is not None:
            size = getattr(vc, "image_size", 0) or 0
            size = size[0] if isinstance(size, (list, tuple)) else size
            patch = getattr(vc, "patch_size", 0) or 0
            patch = patch[0] if isinstance(patch, (list, tuple)) else patch
            patches = (size // patch) ** 2 if size and patch else 0
            # the projector sees every patch, or a quarter of them after InternVL's pixel shuffle
            tokens = int(patches * float(getattr(config, "downsample_ratio", 1.0) or 1.0) ** 2)
        return cls(
            text=Part(*sums["text"], getattr(tc, "num_hidden_layers", 0) or 0, getattr(tc, "hidden_size", 0) or 0),
            vision=Part(*sums["vision"], getattr(vc, "num_hidden_layers", 0) or 0, getattr(vc, "hidden_size", 0) or 0),
            projector=Part(*sums["projector"]),
            head=Part(*sums["head"]),
            patches_per_image=patches,
            tokens_per_image=tokens,
        )

    def step(self, text_tokens: float, text_sq: float, images: float, labelled: float | None = None) -> float:
        """FLOPs of a step: `text_tokens` LLM tokens, `text_sq` the sum of squared sample lengths,
        `images` images (or tiles) through the vision encoder, `labelled` tokens with a label (the LM
        head's tokens; default: every text token)."""
        vision_grad = self.vision.trains  # a gradient flows back through the encoder only if it trains
        f = _weights(self.text, text_tokens, act_grad=True)
        f += _weights(self.head, text_tokens if labelled is None else labelled, act_grad=True)
        f += _attention(self.text, text_sq, backward=True)
        patches = images * self.patches_per_image
        f += _weights(self.vision, patches, act_grad=vision_grad)
        f += _attention(self.vision, images * self.patches_per_image**2, backward=vision_grad)
        f += _weights(self.projector, images * self.tokens_per_image, act_grad=vision_grad)
        return f


def _weights(part: Part, tokens: float, act_grad: bool) -> float:
    return tokens * (2.0 * part.params + (2.0 * part.params if act_grad else 0.0) + 2.0 * part.trainable)


def _attention(part: Part, sq: float, backward: bool) -> float:
    fwd = 4.0 * part.layers * part.hidden * sq
    return fwd * (3.0 if backward else 1.0)


def batch_stats(batch: dict) -> tuple[int, int, int]:
    """(text tokens, sum of squared sample lengths, images) of a sample or a collated batch.

    Packed rows (position_ids restarting at 0) count each sample's own length; padded rows their
    attention_mask length; 1-D tensors are one row. Pass samples before collation to leave out the
    padding a collator adds.
    """
    import torch

    def rows(x: Any) -> Any:
        x = torch.as_tensor(x)
        return x.unsqueeze(0) if x.dim() == 1 else x

    ids = rows(batch["input_ids"])
    pos, mask = batch.get("position_ids"), batch.get("attention_mask")
    if pos is not None:
        pos = rows(pos)
        lengths = []
        for row in pos:
            starts = torch.nonzero(row == 0).flatten().tolist()
            if not starts or starts[0] != 0:
                starts = [0, *starts]
            lengths += [b - a for a, b in zip(starts, [*starts[1:], row.numel()], strict=True)]
    elif mask is not None:
        lengths = [int(x) for x in rows(mask).sum(dim=1).tolist()]
    else:
        lengths = [int(ids.shape[1])] * int(ids.shape[0])
    pix = batch.get("pixel_values")
    images = int(pix.shape[0]) if pix is not None and hasattr(pix, "shape") and pix.ndim == 4 else 0
    return sum(lengths), sum(n * n for n in lengths), images


def peak_flops(peak_tflops: float | None, device: Any) -> float:
    """The dense bf16 peak of `device` (FLOP/s); `peak_tflops` overrides it."""
    import torch

    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_FLOPS.items():
            if key in name:
                return v
        log.warning("unknown GPU %r: MFU uses the H100 peak; set train.peak_tflops", name)
        return PEAK_FLOPS["H100"]
    return CPU_PEAK_FLOPS
