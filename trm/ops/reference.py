"""Plain-PyTorch references of the ops (float32 math unless stated; float64 for the loss).

These define the numerics every fused backend is tested against.

Shape legend: B batch, L positions, D hidden, H heads, K head_dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_LABEL_ID = -100


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """Weightless RMSNorm over ``dim``: ``x / sqrt(mean(x^2) + eps)``, in fp32, cast back."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.square().mean(dim, keepdim=True) + eps)).to(x.dtype)


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


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` in float64; 0 where the label is ignored."""
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
