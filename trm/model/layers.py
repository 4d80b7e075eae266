"""Building blocks of the TRM network: casted linear/embedding, RoPE, attention, SwiGLU, block.

Weights are fp32 masters, cast to the activations' dtype at use. The block is post-norm
with a weightless RMSNorm. Module and parameter names follow the reference implementation
so its state dicts load without renaming (see ``trm.model.reference``).

Shape legend: B batch, L positions (prefix included), D hidden, H heads, K head_dim,
I SwiGLU inner width.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trm import ops


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> torch.Tensor:
    """JAX-style truncated normal, in place: samples in [lower, upper] sigma, rescaled so the
    TRUNCATED distribution has standard deviation ``std`` (torch's trunc_normal_ does not)."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        sqrt2 = math.sqrt(2.0)
        cdf_lo, cdf_hi = math.erf(lower / sqrt2), math.erf(upper / sqrt2)
        mass = (cdf_hi - cdf_lo) / 2
        pdf_lo = math.exp(-0.5 * lower**2) / math.sqrt(2 * math.pi)
        pdf_hi = math.exp(-0.5 * upper**2) / math.sqrt(2 * math.pi)
        truncated_var = 1 - (upper * pdf_hi - lower * pdf_lo) / mass - ((pdf_hi - pdf_lo) / mass) ** 2
        corrected_std = std / math.sqrt(truncated_var)
        tensor.uniform_(cdf_lo, cdf_hi).erfinv_().mul_(sqrt2 * corrected_std)
        return tensor.clamp_(lower * corrected_std, upper * corrected_std)


def swiglu_inner_width(width: int, expansion: float) -> int:
    """``ceil_to_multiple(round(expansion * width * 2 / 3), 256)``."""
    inner = round(expansion * width * 2 / 3)
    return -(-inner // 256) * 256


class CastedLinear(nn.Module):
    """``x @ W.T (+ b)`` with fp32 master weights cast to x's dtype; LeCun truncated-normal init."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=1.0 / math.sqrt(in_features)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    """Embedding lookup with an fp32 table cast to ``cast_to`` at use."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(trunc_normal_(torch.empty(num_embeddings, dim), std=init_std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """cos/sin tables [L, K] of rotate-half RoPE: frequencies ``theta^(-2i/K)``, duplicated halves."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached, self.sin_cached


class Attention(nn.Module):
    """Non-causal multi-head attention with a fused QKV projection (rows: q heads, k heads, v heads)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = CastedLinear(hidden_size, 3 * num_heads * self.head_dim, bias=False)
        self.o_proj = CastedLinear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, h_BLD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, L, _ = h_BLD.shape
        qkv = self.qkv_proj(h_BLD).view(B, L, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.split(self.num_heads, dim=2)
        if cos_sin is not None:
            q, k = ops.apply_rope(q, k, *cos_sin)
        out_BLHK = ops.attention(q, k, v)
        return self.o_proj(out_BLHK.reshape(B, L, -1))


class SwiGLU(nn.Module):
    """``down(silu(gate) * up)`` with ``gate, up = gate_up(h).chunk(2)``; no biases."""

    def __init__(self, width: int, expansion: float):
        super().__init__()
        inner = swiglu_inner_width(width, expansion)
        self.gate_up_proj = CastedLinear(width, 2 * inner, bias=False)
        self.down_proj = CastedLinear(inner, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(h)))


class Block(nn.Module):
    """Post-norm block: token mixing (attention, or a SwiGLU over the sequence axis) then a SwiGLU.

    attention: ``h = rms(h + attn(h)); h = rms(h + mlp(h))``
    mlp_t:     ``h = rms_L(h + mlp_t(h^T)^T)`` (norm over the sequence axis); ``h = rms(h + mlp(h))``
    """

    def __init__(self, hidden_size: int, num_heads: int, expansion: float, seq_len_total: int, mlp_t: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.use_mlp_t = mlp_t
        if mlp_t:
            self.mlp_t = SwiGLU(seq_len_total, expansion)
        else:
            self.self_attn = Attention(hidden_size, num_heads)
        self.mlp = SwiGLU(hidden_size, expansion)

    def forward(self, h_BLD: torch.Tensor, cos_sin) -> torch.Tensor:
        if self.use_mlp_t:
            h_BDL = h_BLD.transpose(1, 2)
            # the norm runs over the sequence axis of the transposed view, without a copy
            h_BLD = ops.rms_norm(h_BDL, self.eps, residual=self.mlp_t(h_BDL)).transpose(1, 2)
        else:
            h_BLD = ops.rms_norm(h_BLD, self.eps, residual=self.self_attn(h_BLD, cos_sin))
        return ops.rms_norm(h_BLD, self.eps, residual=self.mlp(h_BLD))


class ReasoningModule(nn.Module):
    """The ONE network ``net(h, inj) = blocks(h + inj)``, applied recursively to y and z."""

    def __init__(self, layers: list[Block]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h_BLD: torch.Tensor, injection_BLD: torch.Tensor, cos_sin) -> torch.Tensor:
        h_BLD = h_BLD + injection_BLD
        for layer in self.layers:
            h_BLD = layer(h_BLD, cos_sin)
        return h_BLD


class SparsePuzzleEmbedding(nn.Module):
    """Puzzle-embedding table ``weights [N, E]`` (fp32 buffer, zero init) trained by sign-SGD.

    It lives outside the network optimizer. In training, the rows used this step are copied
    into the leaf tensor ``local_weights [B, E]`` (ids in ``local_ids``); backward fills
    ``local_weights.grad`` and ``trm.train.optim.PuzzleEmbeddingSignSGD`` applies the update.
    """

    def __init__(self, num_ids: int, dim: int, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.register_buffer("weights", torch.zeros(num_ids, dim))
        self.local_ids: torch.Tensor | None = None
        self.local_weights: torch.Tensor | None = None
        self.lookup: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Replaces ``weights[ids]`` when the table is stored elsewhere (e.g. sharded by the trainer)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.lookup(ids) if self.lookup is not None else self.weights[ids]
        if not (self.training and torch.is_grad_enabled()):
            return rows.to(self.cast_to)
        self.local_ids = ids
        self.local_weights = rows.detach().requires_grad_(True)
        return self.local_weights.to(self.cast_to)
