"""Plain-PyTorch references of the ops (float32 math unless stated; float64 for the loss).

These define the numerics every fused backend is tested against.

Shape legend: B batch, L positions, D hidden, H heads, K head_dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_LABEL_ID = -100


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Weightless RMSNorm of ``s = x + residual`` (or ``x``) over ``dim``: ``s / sqrt(mean(s^2) + eps)``.

    The sum and the norm are computed in fp32; the result is cast back to ``x.dtype``.
    """
    s32 = x.to(torch.float32)
    if residual is not None:
        s32 = s32 + residual.to(torch.float32)
    return (s32 * torch.rsqrt(s32.square().mean(dim, keepdim=True) + eps)).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` over the last axis of ``x`` (``F.linear``; weight [N, K], bias [N])."""
    return F.linear(x, weight, bias)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.chunk(2, -1)`` (first half is the gate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor):
    """Rotate-half rotary embedding of q and k, computed in the tables' dtype (fp32)."""
    dtype = q_BLHK.dtype
    cos, sin = cos_LK.unsqueeze(-2), sin_LK.unsqueeze(-2)
    q = q_BLHK.to(cos.dtype)
    k = k_BLHK.to(cos.dtype)
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out.to(dtype), k_out.to(dtype)


def attention(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, v_BLHK: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(K); returns [B, L, H, K]."""
    q, k, v = (t.transpose(1, 2) for t in (q_BLHK, k_BLHK, v_BLHK))
    return F.scaled_dot_product_attention(q, k, v, is_causal=False).transpose(1, 2)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(s(x_i) / sum_j s(x_j))`` with ``s(v) = v + 1 if v >= 0 else 1 / (1 - v)``.

    Each branch only ever sees inputs of its own sign, so neither produces inf (and so
    no ``0 * inf = NaN`` reaches the gradient through ``torch.where``).
    """
    negative = x < 0
    s = torch.where(negative, 1.0 / (1.0 - torch.where(negative, x, 0.0)), torch.where(negative, 0.0, x) + 1.0)
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def check_labels(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise IndexError for a label outside ``[0, V)`` that is not ``ignore_index`` (on a GPU: one
    reduction and a host sync). Every backend raises this same error; nothing is checked while
    ``torch.compile`` traces (a data-dependent branch), where a bad label gives a NaN loss."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"stablemax_cross_entropy: label {int(labels[where])} at position {where} is out of range "
                         f"[0, {V}) and is not ignore_index ({ignore_index}); fix the labels, or pass the "
                         f"ignore_index that marks padding")


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` in float64; 0 where the label is ignored.
    Out-of-range labels raise :func:`check_labels`'s IndexError on CPU tensors (free there; on a GPU
    the gather's own device assert fires, and the kernel backends check)."""
    if labels_BL.device.type == "cpu":
        check_labels(labels_BL, logits_BLV.shape[-1], ignore_index)
    logprobs = log_stablemax(logits_BLV.to(torch.float64), dim=-1)
    valid = labels_BL != ignore_index
    safe_labels = torch.where(valid, labels_BL, 0).long()
    picked = logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0.0)


def softmax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token softmax cross-entropy in float32; 0 where the label is ignored."""
    flat = logits_BLV.to(torch.float32).reshape(-1, logits_BLV.shape[-1])
    loss = F.cross_entropy(flat, labels_BL.long().reshape(-1), ignore_index=ignore_index, reduction="none")
    return loss.view(labels_BL.shape)


@torch.no_grad()
def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float,
               weight_decay: float) -> None:
    """In-place AdamATan2 update of lists of tensors at step ``step`` (>= 1, already incremented)::

        p *= 1 - lr * weight_decay
        m = lerp(m, g, 1 - beta1);  v = lerp(v, g * g, 1 - beta2)
        p -= lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

    ``torch._foreach_*`` kernels (``atan2`` has no foreach form and runs per tensor).
    """
    if step < 1:
        raise ValueError(f"adam_atan2: step must be >= 1 (the count after this update), got {step}")
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    grad_squares = torch._foreach_mul(grads, grads)
    torch._foreach_lerp_(exp_avg_sqs, grad_squares, 1.0 - beta2)
    del grad_squares
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, math.sqrt(1.0 - beta2**step))
    directions = [torch.atan2(m, d, out=d) for m, d in zip(exp_avgs, denoms)]
    torch._foreach_mul_(directions, lr / (1.0 - beta1**step))
    torch._foreach_sub_(params, directions)
