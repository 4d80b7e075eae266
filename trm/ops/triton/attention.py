"""attention, Triton backend: launchers and autograd of ``csrc/triton/attention.py``.

Reference: ``trm.ops.reference.attention`` (PyTorch SDPA). Tests:
``tests/test_ops_triton.py -k attention``.

Math: non-causal ``softmax(q k^T / sqrt(K)) v`` flash-style (online softmax, log-sum-exp saved);
backward in three kernels: ``Delta = rowsum(dO * O)``, then dK/dV, then dQ. Head dims 16-128.
"""

from __future__ import annotations

import math

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import (
    cdiv, interpreting, kernel_dtypes, kernel_module, needs_grad, next_pow2, on_device, runs_here,
)

ATTENTION_HEAD_DIMS = (16, 32, 64, 128)


def _attention_blocks(K: int, L: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): big blocks in the interpreter (few numpy steps, still several blocks at
    L = 916); on a GPU sized so the backward's shared memory stays under ~110 KB (sm_80 / sm_90,
    measured from the sm_90 compile): fp32 tiles are twice the bytes of fp16/bf16 ones."""
    if interpreting():
        block = min(256, max(16, next_pow2(L)))
        return block, block
    if dtype == torch.float32:
        return (64, 64) if K <= 32 else (64, 32) if K <= 64 else (32, 32)
    return (64, 64) if K <= 64 else (64, 32)


def _attention_forward(q, k, v):
    B, L, H, K = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    BLOCK_M, BLOCK_N = _attention_blocks(K, L, q.dtype)
    scale = 1.0 / math.sqrt(K)
    with on_device(q):
        kernel_module("attention").attention_fwd_kernel[(B * H, cdiv(L, BLOCK_M))](
            q, k, v, o, lse, H, L, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            scale * math.log2(math.e),
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
    return o, lse


def _attention_backward(do, q, k, v, o, lse):
    B, L, H, K = q.shape
    BLOCK_M, BLOCK_N = _attention_blocks(K, L, q.dtype)
    scale = 1.0 / math.sqrt(K)
    kernels = kernel_module("attention")
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    with on_device(q):
        kernels.attention_bwd_delta_kernel[(B * H, cdiv(L, BLOCK_M))](
            o, do, delta, H, L, *o.stride(), *do.stride(), HEAD_DIM=K, BLOCK_M=BLOCK_M, num_warps=4,
        )
        kernels.attention_bwd_dkdv_kernel[(B * H, cdiv(L, BLOCK_N))](
            q, k, v, do, lse, delta, dk, dv, H, L,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            scale * math.log2(math.e), scale,
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
        kernels.attention_bwd_dq_kernel[(B * H, cdiv(L, BLOCK_M))](
            q, k, v, do, lse, delta, dq, H, L,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            scale * math.log2(math.e), scale,
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _attention_backward(do, *ctx.saved_tensors)


def attention(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, v_BLHK: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(K), on [B, L, H, K] (strided views allowed)."""
    q, k, v = q_BLHK, k_BLHK, v_BLHK
    supported = (
        q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
        and q.dtype in kernel_dtypes() and q.shape[-1] in ATTENTION_HEAD_DIMS
        and runs_here(q, k, v)
    )
    if not supported:
        counters.fell_back("triton", "attention", q, k, v)
        return reference.attention(q, k, v)
    if not needs_grad(q, k, v):
        return _attention_forward(q, k, v)[0]
    return _AttentionFn.apply(q, k, v)
