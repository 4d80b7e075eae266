"""Stablemax cross-entropy, per token, many rows per program (Triton), forward and backward.

With ``s(v) = v + 1 if v >= 0 else 1 / (1 - v)`` over the V logits x of a row and its label y::

    loss = -log(s(x_y) / sum_j s(x_j)) = log1p(z),  z = (sum_{j != y} s(x_j)) / s(x_y)
    loss = 0 where y == ignore_index;  NaN for any other label outside [0, V) (never read)
    backward:  d x_j = g * (s'(x_j) / sum_i s(x_i) - [j == y] s'(x_y) / s(x_y)),
               s'(v) = 1 if v >= 0 else s(v)^2

fp32 math with correctly rounded divisions (``div_rn``; plain ``/`` is approximate on GPU);
``log1p(z)`` is evaluated as ``log(u) * z / (u - 1)`` with ``u = 1 + z`` (exact
``z`` when ``u == 1``), so a tiny loss keeps its relative accuracy (within 1e-6 of the float64
formula) instead of cancelling in ``log(sum) - log(s_y)``. The loss is stored as float64 (the
reference's dtype). Rows (the leading dims) are addressed as ``[P, Q]`` with per-tensor
strides; the vocabulary is narrow (6-12), so a program handles a ``[BLOCK_Q, BLOCK_V]`` tile of
many rows. Loads go to fp32 first (the interpreter gets bf16 math wrong).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k stablemax``
Time:  ``python -m trm.ops.triton --bench stablemax_cross_entropy``
"""

import triton
import triton.language as tl


@triton.jit
def _load_row_tile(logits_ptr, labels_ptr, pid, Q, V, sl_p, sl_q, sl_v, sb_p, sb_q, ignore_index,
                   BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """(logits [BLOCK_Q, BLOCK_V] fp32, is_label mask, labels, row mask, element mask, p, q)."""
    q_blocks = tl.cdiv(Q, BLOCK_Q)
    p = (pid // q_blocks).to(tl.int64)
    q = ((pid % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    row_mask = q < Q
    mask = row_mask[:, None] & (cols < V)[None, :]
    x = tl.load(logits_ptr + p * sl_p + q[:, None] * sl_q + cols[None, :].to(tl.int64) * sl_v,
                mask=mask, other=0.0).to(tl.float32)
    labels = tl.load(labels_ptr + p * sb_p + q * sb_q, mask=row_mask, other=ignore_index).to(tl.int64)
    is_label = cols[None, :] == labels[:, None]
    return x, is_label, labels, row_mask, mask, p, q


@triton.jit
def _stablemax_s(x):
    """s(x) without evaluating the other branch's formula at a value of the wrong sign."""
    negative = x < 0
    return tl.where(negative, tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 - tl.where(negative, x, 0.0)), x + 1.0)


@triton.jit
def stablemax_ce_fwd_kernel(
    logits_ptr, labels_ptr, loss_ptr,
    Q, V,
    sl_p, sl_q, sl_v,
    sb_p, sb_q,
    ignore_index,
    BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid: P * cdiv(Q, BLOCK_Q) programs. loss is a contiguous [P * Q] float64 buffer."""
    x, is_label, labels, row_mask, mask, p, q = _load_row_tile(
        logits_ptr, labels_ptr, tl.program_id(0), Q, V, sl_p, sl_q, sl_v, sb_p, sb_q, ignore_index,
        BLOCK_Q, BLOCK_V)
    s = tl.where(mask, _stablemax_s(x), 0.0)
    s_label = tl.sum(tl.where(is_label, s, 0.0), axis=1)
    others = tl.sum(tl.where(is_label, 0.0, s), axis=1)
    z = tl.div_rn(others, tl.where(s_label > 0.0, s_label, 1.0))     # s_label is 0 only on pad rows
    u = 1.0 + z
    log1p_z = tl.where(u == 1.0, z, tl.log(u) * tl.div_rn(z, tl.where(u == 1.0, 1.0, u - 1.0)))
    in_range = (labels >= 0) & (labels < V)
    loss = tl.where(labels == ignore_index, 0.0, tl.where(in_range, log1p_z, float("nan")))
    tl.store(loss_ptr + p * Q + q, loss.to(tl.float64), mask=row_mask)


@triton.jit
def stablemax_ce_bwd_kernel(
    logits_ptr, labels_ptr, grad_ptr, dlogits_ptr,
    Q, V,
    sl_p, sl_q, sl_v,
    sb_p, sb_q,
    sg_p, sg_q,
    sd_p, sd_q, sd_v,
    ignore_index,
    BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid as the forward. grad is the incoming per-token gradient (any float dtype, strided)."""
    x, is_label, labels, row_mask, mask, p, q = _load_row_tile(
        logits_ptr, labels_ptr, tl.program_id(0), Q, V, sl_p, sl_q, sl_v, sb_p, sb_q, ignore_index,
        BLOCK_Q, BLOCK_V)
    g = tl.load(grad_ptr + p * sg_p + q * sg_q, mask=row_mask, other=0.0).to(tl.float32)
    in_range = (labels >= 0) & (labels < V)
    g = tl.where(labels == ignore_index, 0.0, tl.where(in_range, g, float("nan")))
    s = tl.where(mask, _stablemax_s(x), 0.0)
    ds = tl.where(x < 0, s * s, 1.0)
    total = tl.sum(s, axis=1)
    s_label = tl.sum(tl.where(is_label, s, 0.0), axis=1)
    s_label = tl.where(s_label > 0.0, s_label, 1.0)                   # 0 only on pad/ignored rows
    total = tl.where(total > 0.0, total, 1.0)
    dx = tl.div_rn(ds, total[:, None]) - tl.where(is_label, tl.div_rn(ds, s_label[:, None]), 0.0)
    dx = dx * g[:, None]
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    tl.store(dlogits_ptr + p * sd_p + q[:, None] * sd_q + cols[None, :] * sd_v,
             dx.to(dlogits_ptr.dtype.element_ty), mask=mask)
