"""rms_norm, Triton backend: launchers and autograd of ``csrc/triton/rms_norm.py``.

Reference: ``trm.ops.reference.rms_norm``. Native kernels: ``trm.ops.native.rms_norm``.
Tests: ``tests/test_ops_triton.py -k rms_norm``.

Math: ``s = x + residual`` (or ``x``), ``y = s * rstd``, ``rstd = 1 / sqrt(mean(s^2) + eps)`` over
``dim``; backward ``ds = rstd * (dy - y * mean(dy * y))`` for x and residual alike. Rows are
addressed as ``[P, Q]`` by strides (any axis, mlp_t's included, no copy); without a gradient the
forward runs alone and keeps no 1/rms.
"""

from __future__ import annotations

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import (
    MAX_ROW, cdiv, kernel_dtypes, kernel_module, needs_grad, next_pow2, num_warps, on_device, outer, rows_layout,
    runs_here, tile_elements,
)


def _rms_norm_layout(x, residual, dim):
    """The ``[P, Q]`` row layout shared by x, residual and y = empty_like(x), or None."""
    shape, x_strides = outer(x, dim)
    y_like = torch.empty_like(x, device="meta")            # y's strides, nothing allocated
    strides = [x_strides, outer(y_like, dim)[1]]
    if residual is not None:
        strides.append(outer(residual, dim)[1])
    return rows_layout(shape, strides)


def _rms_norm_forward(x, residual, eps, dim, layout, store_rstd):
    y = torch.empty_like(x)
    P, Q, strides = layout
    (sx_p, sx_q), (sy_p, sy_q) = strides[0], strides[1]
    sr_p, sr_q = strides[2] if residual is not None else (0, 0)
    N = x.shape[dim]
    BLOCK_N = next_pow2(N)
    BLOCK_Q = max(1, min(next_pow2(Q), tile_elements() // BLOCK_N))
    rstd = torch.empty(P * Q if store_rstd else 1, device=x.device, dtype=torch.float32)
    with on_device(x):
        kernel_module("rms_norm").rms_norm_fwd_kernel[(P * cdiv(Q, BLOCK_Q),)](
            x, residual if residual is not None else x, y, rstd, Q, N,
            sx_p, sx_q, x.stride(dim),
            sr_p, sr_q, residual.stride(dim) if residual is not None else 0,
            sy_p, sy_q, y.stride(dim),
            eps,
            HAS_RESIDUAL=residual is not None, STORE_RSTD=store_rstd,
            BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, num_warps=num_warps(BLOCK_Q * BLOCK_N),
        )
    return y, rstd


def _rms_norm_backward(dy, y, rstd, dim):
    dx = torch.empty_like(y)
    shape, _ = outer(y, dim)
    layout = rows_layout(shape, [outer(t, dim)[1] for t in (dy, y, dx)])
    if layout is None:                         # an odd dy layout: one copy, then y's layout holds
        dy = dy.contiguous()
        layout = rows_layout(shape, [outer(t, dim)[1] for t in (dy, y, dx)])
    P, Q, ((sdy_p, sdy_q), (sy_p, sy_q), (sdx_p, sdx_q)) = layout
    N = y.shape[dim]
    BLOCK_N = next_pow2(N)
    BLOCK_Q = max(1, min(next_pow2(Q), tile_elements() // BLOCK_N))
    with on_device(y):
        kernel_module("rms_norm").rms_norm_bwd_kernel[(P * cdiv(Q, BLOCK_Q),)](
            dy, y, rstd, dx, Q, N,
            sdy_p, sdy_q, dy.stride(dim),
            sy_p, sy_q, y.stride(dim),
            sdx_p, sdx_q, dx.stride(dim),
            BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, num_warps=num_warps(BLOCK_Q * BLOCK_N),
        )
    return dx


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, eps, dim, layout):
        y, rstd = _rms_norm_forward(x, residual, eps, dim, layout, store_rstd=True)
        ctx.save_for_backward(y, rstd)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        dx = _rms_norm_backward(dy, y, rstd, ctx.dim)
        return dx, (dx if ctx.needs_input_grad[1] else None), None, None, None


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Weightless RMSNorm of ``x + residual`` (or ``x``) over ``dim``, fp32 math, output in x.dtype."""
    layout = None
    if -x.dim() <= dim < x.dim() and x.dtype in kernel_dtypes():
        axis = dim % x.dim()
        same = residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)
        tensors = (x,) if residual is None else (x, residual)
        if same and x.shape[axis] <= MAX_ROW and runs_here(*tensors):
            layout = _rms_norm_layout(x, residual, axis)
    if layout is None:
        counters.fell_back("triton", "rms_norm", x, residual)
        return reference.rms_norm(x, eps, dim, residual=residual)
    if not needs_grad(x, residual):
        return _rms_norm_forward(x, residual, float(eps), axis, layout, store_rstd=False)[0]
    return _RMSNormFn.apply(x, residual, float(eps), axis, layout)
