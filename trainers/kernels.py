"""Fused GPU kernels for the student's LLM: `train.kernels: liger` swaps in Liger's Triton RMSNorm,
rotary embedding and SwiGLU MLP (the memory-bound parts of every decoder layer) on the model instance.

The loss keeps our own fused lm_head + cross-entropy (trainers/loss.py): it takes the per-token weights
(think-span weighting) that Liger's fused loss has no slot for. Needs CUDA and the `liger-kernel`
package (`pip install -e '.[gpu]'`); both are checked before anything is patched, with a message that
says what is missing.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

KERNELS = ("none", "liger")
# model_type of the LLM -> Liger's patch function for it
LIGER_PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
}


def language_model(model: Any) -> Any:
    """The decoder stack inside a LLaVA/InternVL student (or the model itself for a plain LM)."""
    get = getattr(model, "get_base_model", None)
    base = get() if get is not None else model
    inner = getattr(base, "model", base)
    return getattr(inner, "language_model", None) or inner


def apply_kernels(model: Any, kind: str) -> list[str]:
    """Patch `model` in place; returns what was swapped in (empty for 'none')."""
    if kind not in KERNELS:
        raise ValueError(f"train.kernels={kind!r}: expected one of {KERNELS}")
    if kind == "none":
        return []
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton); set kernels: none")
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as e:
        raise RuntimeError(f"train.kernels=liger needs the liger-kernel package (pip install -e '.[gpu]'): {e}") from e
    lm = language_model(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    name = LIGER_PATCHES.get(model_type)
    if name is None:
        raise RuntimeError(f"train.kernels=liger: no Liger patch for LLM type {model_type!r} "
                           f"(supported: {sorted(LIGER_PATCHES)})")
    patch = getattr(monkey_patch, name)
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False, "model": lm}
    accepted = inspect.signature(patch).parameters
    patch(**{k: v for k, v in wanted.items() if k in accepted})
    done = [k for k in ("rope", "rms_norm", "swiglu") if k in accepted]
    log.info("liger kernels on the %s LLM: %s", model_type, ", ".join(done))
    return done
