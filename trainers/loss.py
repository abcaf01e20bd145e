"""The token loss: weighted next-token cross-entropy over the LM head without full logits.

`chunked_lm_loss(hidden, head, labels, weights, chunk)` returns the *sum* of per-token weighted
cross-entropy (the loop divides by the global labelled-token count). With a plain `nn.Linear` head and
gradients wanted, it runs fused: each `chunk` of tokens has its logits computed once, in the forward,
and turned right away into its contribution to d(loss)/d(hidden) and d(loss)/d(head weight); backward
only scales those by the incoming gradient. Neither the (tokens x vocab) logits nor their fp32 upcast
ever exist whole (at 8k tokens x 150k vocab: 2.4 GB bf16, 4.9 GB fp32), and the head's matmul is not
recomputed in backward (3 matmuls per chunk instead of 4 for the checkpointed form).

Any other head (a peft-wrapped one, say) or no gradient: chunks under activation checkpointing, the
logits recomputed in backward. chunk <= 0: one full-logits cross-entropy.
"""

from __future__ import annotations

from typing import Any


def _fused_class():
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """sum_i w_i * CE(h_i @ W^T + b, y_i), gradients computed chunk by chunk in the forward."""

        @staticmethod
        def forward(ctx, h, weight, bias, y, w, chunk):  # noqa: ANN001 - autograd.Function signature
            n = h.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
                if bias is not None and ctx.needs_input_grad[2] else None
            softmax_grad = _softmax_grad_fn(h.device)
            for s in range(0, n, chunk):
                hc, yc, wc = h[s : s + chunk], y[s : s + chunk], w[s : s + chunk]
                logits = hc @ weight.t()
                if bias is not None:
                    logits = logits + bias
                loss, g = softmax_grad(logits, yc, wc)
                total += loss
                if grad_b is not None:
                    grad_b += g.float().sum(0)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g @ weight
                if grad_w is not None:
                    grad_w.add_(g.t() @ hc)  # chunks summed in fp32
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_out):  # noqa: ANN001
            grad_h, grad_w, grad_b = ctx.saved_tensors
            wd, bd = ctx.dtypes
            scale = grad_out.float()  # scaled in fp32: a bf16-rounded scale would bias every step's gradient
            gh = (grad_h.float() * scale).to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * scale).to(wd) if grad_w is not None else None
            gb = (grad_b * scale).to(bd) if grad_b is not None else None
            return gh, gw, gb, None, None, None

    return FusedLinearCrossEntropy


def softmax_grad(logits: Any, y: Any, w: Any) -> tuple[Any, Any]:
    """sum_i w_i * CE(logits_i, y_i) and its gradient w_i * (softmax_i - onehot(y_i)) in logits' dtype.

    Computed in fp32 from `logits` (any float dtype). On CUDA it runs compiled, as one reduction and one
    elementwise pass over the chunk's logits instead of a fp32 copy and ~6 eager passes over it.
    """
    import torch

    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, y.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * w).sum()
    onehot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == y.unsqueeze(1)
    g = ((x - lse.unsqueeze(1)).exp() - onehot.to(x.dtype)) * w.unsqueeze(1)
    return loss, g.to(logits.dtype)


_COMPILED: dict[str, Any] = {}


def _softmax_grad_fn(device: Any):
    """`softmax_grad`, compiled once per process on CUDA (eager elsewhere, or where compiling fails)."""
    if device.type != "cuda":
        return softmax_grad
    if "fn" not in _COMPILED:
        import torch

        compiled = torch.compile(softmax_grad, dynamic=True)

        def guarded(logits: Any, y: Any, w: Any) -> tuple[Any, Any]:
            if _COMPILED.get("broken"):
                return softmax_grad(logits, y, w)
            try:
                return compiled(logits, y, w)
            except Exception as e:  # noqa: BLE001 - no Triton/compiler: the same math, eager
                import logging

                logging.getLogger(__name__).warning("compiled loss unavailable, eager from here on: %s", e)
                _COMPILED["broken"] = True
                return softmax_grad(logits, y, w)

        _COMPILED["fn"] = guarded
    return _COMPILED["fn"]


_FUSED = None


def fused_linear_cross_entropy(h: Any, head: Any, y: Any, w: Any, chunk: int) -> Any:
    global _FUSED
    if _FUSED is None:
        _FUSED = _fused_class()
    return _FUSED.apply(h, head.weight, head.bias, y, w, chunk)


def loss_positions(labels: Any, weights: Any, vocab: int) -> Any:
    """The positions, in the flattened next-token targets (`labels[:, 1:]`), that carry loss: label set
    and weight non-zero. Labels outside [0, vocab) there are an error, not an index.

    With none (a weight-0 filler sample, a prompt-only row) there is nothing to learn, yet the head must
    still get its (zero) gradient: under ZeRO every rank fills the same gradient buckets in the same
    order, and a rank whose head saw no backward would desynchronise them. Then one position is returned,
    whose weight is 0 or whose label is -100 (the loss zeroes both).
    """
    import torch

    y = labels[:, 1:].reshape(-1)
    index = ((y != -100) & (weights[:, 1:].reshape(-1) != 0)).nonzero().squeeze(1)
    if index.numel() == 0:
        index = torch.zeros(1, dtype=torch.long, device=y.device)
    ys = y[index]
    bad = ((ys < 0) & (ys != -100)) | (ys >= vocab)
    if bool(bad.any()):
        raise ValueError(f"labels outside [0, {vocab}) (and not the ignore index -100): "
                         f"{sorted(set(ys[bad].tolist()))[:5]}")
    return index


def chunked_lm_loss(hidden: Any, head: Any, labels: Any, weights: Any, chunk: int, index: Any = None) -> Any:
    """Sum of weighted next-token cross-entropy of `head(hidden)` against `labels` shifted by one.

    `index`: `loss_positions` of the batch. The training loop finds them on the host before the batch
    moves (`prepare`), so selecting them here needs no host sync; without it they are found here.
    """
    import torch

    if index is None:
        index = loss_positions(labels, weights, getattr(head, "out_features", hidden.shape[-1]))
    index = index.to(hidden.device)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)
    y = labels[:, 1:].reshape(-1).index_select(0, index)
    w = weights[:, 1:].reshape(-1).to(torch.float32).index_select(0, index)
    w = w * (y != -100)  # the filler position of a batch without labels
    return _head_loss(h, head, y.clamp(min=0), w, chunk)


def _head_loss(h: Any, head: Any, y: Any, w: Any, chunk: int) -> Any:
    """Sum of w * CE(head(h), y) over the selected tokens (every y a valid class)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(hc: Any, yc: Any, wc: Any) -> Any:
        logits = head(hc).float()
        return (F.cross_entropy(logits, yc, reduction="none") * wc).sum()

    if chunk <= 0:
        return piece(h, y, w)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    if type(head) is torch.nn.Linear and wants_grad:
        return fused_linear_cross_entropy(h, head, y, w, chunk)
    if h.shape[0] <= chunk:
        return piece(h, y, w)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(piece, h[s : s + chunk], y[s : s + chunk], w[s : s + chunk], use_reentrant=False)
    return total
