"""Weightless RMSNorm with a fused residual add, over any axis (Triton), forward and backward.

Computes, per row (a row = all elements along the normalised axis, N of them)::

    s = x + residual            (or s = x)           in fp32
    rstd = 1 / sqrt(mean(s^2) + eps)
    y = s * rstd                                      stored in y's dtype
    backward:  dx = rstd * (dy - y * mean(dy * y)),   d residual = dx

Every tensor is addressed as ``[P, Q, N]`` with its own three strides, so a transposed view
(the mlp_t block normalises a (B, D, L) view of a contiguous (B, L, D) tensor over L, stride D)
is read in place, without a transpose copy; row ``r = p * Q + q`` owns ``rstd[r]``. A program
handles ``BLOCK_Q`` consecutive ``q`` of one ``p`` (a ``[BLOCK_Q, BLOCK_N]`` tile), so
narrow rows are packed many to a program and, when the q stride is 1 (the transposed case),
loads are coalesced along q. ``STORE_RSTD=False`` is the forward-only variant (no-grad
cycles): nothing is saved. Loads go to fp32 first (the interpreter gets bf16 math wrong).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k rms_norm``
       (on a CPU-only machine the tests run this file in the Triton interpreter).
Time:  ``python -m trm.ops.triton --bench rms_norm`` (GPU: triton.testing.do_bench,
       kernel vs the PyTorch reference).
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr, r_ptr, y_ptr, rstd_ptr,
    Q, N,
    sx_p, sx_q, sx_n,
    sr_p, sr_q, sr_n,
    sy_p, sy_q, sy_n,
    eps,
    HAS_RESIDUAL: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (P * cdiv(Q, BLOCK_Q),). rstd (fp32, one per row) only when STORE_RSTD."""
    pid = tl.program_id(0)
    q_blocks = (Q + BLOCK_Q - 1) // BLOCK_Q
    p = (pid // q_blocks).to(tl.int64)
    q = ((pid % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (q < Q)[:, None] & (n < N)[None, :]
    s = tl.load(x_ptr + p * sx_p + q[:, None] * sx_q + n[None, :] * sx_n, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(r_ptr + p * sr_p + q[:, None] * sr_q + n[None, :] * sr_n, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / N + eps)
    y = s * rstd[:, None]
    tl.store(y_ptr + p * sy_p + q[:, None] * sy_q + n[None, :] * sy_n, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + p * Q + q, rstd, mask=q < Q)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr, y_ptr, rstd_ptr, dx_ptr,
    Q, N,
    sdy_p, sdy_q, sdy_n,
    sy_p, sy_q, sy_n,
    sdx_p, sdx_q, sdx_n,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid as the forward; dx = rstd * (dy - y * mean(dy * y)) from the output y and rstd."""
    pid = tl.program_id(0)
    q_blocks = (Q + BLOCK_Q - 1) // BLOCK_Q
    p = (pid // q_blocks).to(tl.int64)
    q = ((pid % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (q < Q)[:, None] & (n < N)[None, :]
    dy = tl.load(dy_ptr + p * sdy_p + q[:, None] * sdy_q + n[None, :] * sdy_n, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + p * sy_p + q[:, None] * sy_q + n[None, :] * sy_n, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + p * Q + q, mask=q < Q, other=0.0)
    mean_dy_y = tl.sum(dy * y, axis=1) / N
    dx = rstd[:, None] * (dy - y * mean_dy_y[:, None])
    tl.store(dx_ptr + p * sdx_p + q[:, None] * sdx_q + n[None, :] * sdx_n, dx.to(dx_ptr.dtype.element_ty), mask=mask)
