"""apply_rope, Triton backend: launcher and autograd of ``csrc/triton/rope.py``.

Reference: ``trm.ops.reference.apply_rope``. Tests: ``tests/test_ops_triton.py -k rope``.

Math: rotate-half RoPE, ``x * cos + rotate_half(x) * sin`` for q and k in one launch (strided
[B, L, H, K] views of the packed qkv); the backward is the same kernel with the rotation
transposed (``sin -> -sin``).
"""

from __future__ import annotations

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import (
    cdiv, kernel_dtypes, kernel_module, needs_grad, next_pow2, num_warps, on_device, runs_here, tile_elements,
)


def _rope_launch(q, k, cos, sin, transpose: bool):
    B, L, H, K = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_rows = B * L * H
    BLOCK_HALF = next_pow2(K // 2)
    BLOCK_R = max(1, min(next_pow2(n_rows), tile_elements() // (2 * BLOCK_HALF)))
    with on_device(q):
        kernel_module("rope").rope_kernel[(cdiv(n_rows, BLOCK_R),)](
            q, k, q_out, k_out, cos, sin, n_rows, L, H, K // 2,
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(),
            TRANSPOSE=transpose, BLOCK_R=BLOCK_R, BLOCK_HALF=BLOCK_HALF,
            num_warps=num_warps(BLOCK_R * 2 * BLOCK_HALF),
        )
    return q_out, k_out


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq_out, dk_out, cos, sin, transpose=True)
        return dq, dk, None, None


def apply_rope(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor):
    """Rotate-half RoPE of q and k (strided [B, L, H, K] views allowed); fp32 tables [L, K]."""
    q, k, cos, sin = q_BLHK, k_BLHK, cos_LK, sin_LK
    supported = (
        q.dim() == 4 and q.shape == k.shape and q.dtype == k.dtype and q.dtype in kernel_dtypes()
        and q.shape[-1] % 2 == 0
        and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (q.shape[1], q.shape[3])
        and cos.stride() == sin.stride()
        and not needs_grad(cos, sin)
        and runs_here(q, k, cos, sin)
    )
    if not supported:
        counters.fell_back("triton", "apply_rope", q, k, cos, sin)
        return reference.apply_rope(q, k, cos, sin)
    if not needs_grad(q, k):
        return _rope_launch(q, k, cos, sin, transpose=False)
    return _RopeFn.apply(q, k, cos, sin)
