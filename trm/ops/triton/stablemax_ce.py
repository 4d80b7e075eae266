"""stablemax_cross_entropy, Triton backend: launchers and autograd of ``csrc/triton/stablemax_ce.py``.

Reference: ``trm.ops.reference.stablemax_cross_entropy``. Native kernels:
``trm.ops.native.stablemax_ce``. Tests: ``tests/test_ops_triton.py -k stablemax``.

Math: ``s(x) = x + 1`` for ``x >= 0``, ``1 / (1 - x)`` below; per token
``-log(s(x_label) / sum_j s(x_j))``, 0 where ignored; many rows per program (V is 6-12).
"""

from __future__ import annotations

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import (
    MAX_ROW, cdiv, kernel_dtypes, kernel_module, needs_grad, next_pow2, num_warps, on_device, outer, rows_layout,
    runs_here, tile_elements,
)


def _ce_geometry(Q: int, V: int) -> tuple[int, int]:
    BLOCK_V = next_pow2(V)
    BLOCK_Q = max(1, min(next_pow2(Q), tile_elements() // BLOCK_V))
    return BLOCK_Q, BLOCK_V


def _ce_forward(logits, labels, ignore_index, layout):
    V = logits.shape[-1]
    P, Q, ((sl_p, sl_q), (sb_p, sb_q)) = layout
    loss = torch.empty(labels.shape, dtype=torch.float64, device=logits.device)
    BLOCK_Q, BLOCK_V = _ce_geometry(Q, V)
    with on_device(logits):
        kernel_module("stablemax_ce").stablemax_ce_fwd_kernel[(P * cdiv(Q, BLOCK_Q),)](
            logits, labels, loss, Q, V, sl_p, sl_q, logits.stride(-1), sb_p, sb_q, ignore_index,
            BLOCK_Q=BLOCK_Q, BLOCK_V=BLOCK_V, num_warps=num_warps(BLOCK_Q * BLOCK_V),
        )
    return loss


def _ce_backward(grad, logits, labels, ignore_index):
    V = logits.shape[-1]
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    last = logits.dim() - 1
    shape, logit_strides = outer(logits, last)
    fixed = [logit_strides, list(labels.stride()), outer(dlogits, last)[1]]
    layout = rows_layout(shape, fixed + [list(grad.stride())])
    if layout is None:
        grad = grad.contiguous()
        layout = rows_layout(shape, fixed + [list(grad.stride())])
    P, Q, ((sl_p, sl_q), (sb_p, sb_q), (sd_p, sd_q), (sg_p, sg_q)) = layout
    BLOCK_Q, BLOCK_V = _ce_geometry(Q, V)
    with on_device(logits):
        kernel_module("stablemax_ce").stablemax_ce_bwd_kernel[(P * cdiv(Q, BLOCK_Q),)](
            logits, labels, grad, dlogits, Q, V,
            sl_p, sl_q, logits.stride(-1), sb_p, sb_q, sg_p, sg_q, sd_p, sd_q, dlogits.stride(-1),
            ignore_index,
            BLOCK_Q=BLOCK_Q, BLOCK_V=BLOCK_V, num_warps=num_warps(BLOCK_Q * BLOCK_V),
        )
    return dlogits


class _StablemaxCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, layout):
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index
        return _ce_forward(logits, labels, ignore_index, layout)

    @staticmethod
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        return _ce_backward(grad, logits, labels, ctx.ignore_index), None, None, None


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                            ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` (float64 result of fp32 math); 0 where ignored.

    A label outside [0, V) that is not ``ignore_index`` raises ValueError (eager mode).
    """
    logits, labels = logits_BLV, labels_BL
    layout = None
    if (logits.dim() >= 1 and logits.dtype in kernel_dtypes() and labels.shape == logits.shape[:-1]
            and not labels.dtype.is_floating_point and not labels.dtype.is_complex
            and labels.dtype != torch.bool and logits.shape[-1] <= MAX_ROW and runs_here(logits, labels)):
        shape, logit_strides = outer(logits, logits.dim() - 1)
        layout = rows_layout(shape, [logit_strides, list(labels.stride())])
    if layout is None:
        counters.fell_back("triton", "stablemax_cross_entropy", logits, labels)
        return reference.stablemax_cross_entropy(logits, labels, ignore_index)
    reference.check_labels(labels, logits.shape[-1], ignore_index)
    if not needs_grad(logits):
        return _ce_forward(logits, labels, ignore_index, layout)
    return _StablemaxCEFn.apply(logits, labels, ignore_index, layout)
