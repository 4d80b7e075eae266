"""swiglu, Triton backend: launchers and autograd of ``csrc/triton/swiglu.py``.

Reference: ``trm.ops.reference.swiglu``. Native kernels: ``trm.ops.native.swiglu``.
Tests: ``tests/test_ops_triton.py -k swiglu``.

Math: ``gate, up = gate_up.chunk(2, -1)``, ``y = silu(gate) * up``; the backward writes
``[d_gate, d_up]`` into one buffer shaped like ``gate_up``.
"""

from __future__ import annotations

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import (
    cdiv, interpreting, kernel_dtypes, kernel_module, needs_grad, next_pow2, num_warps, on_device, outer,
    rows_layout, runs_here, tile_elements,
)


def _swiglu_geometry(Q: int, F: int) -> tuple[int, int]:
    BLOCK_F = min(next_pow2(F), 8192 if interpreting() else 1024)
    BLOCK_Q = max(1, min(next_pow2(Q), tile_elements() // BLOCK_F))
    return BLOCK_Q, BLOCK_F


def _swiglu_forward(gate_up, layout):
    F = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], F, dtype=gate_up.dtype, device=gate_up.device)
    P, Q, ((sg_p, sg_q), (sy_p, sy_q)) = layout
    BLOCK_Q, BLOCK_F = _swiglu_geometry(Q, F)
    with on_device(gate_up):
        kernel_module("swiglu").swiglu_fwd_kernel[(P * cdiv(Q, BLOCK_Q) * cdiv(F, BLOCK_F),)](
            gate_up, y, Q, F, sg_p, sg_q, gate_up.stride(-1), sy_p, sy_q, y.stride(-1),
            BLOCK_Q=BLOCK_Q, BLOCK_F=BLOCK_F, num_warps=num_warps(BLOCK_Q * BLOCK_F),
        )
    return y


def _swiglu_backward(dy, gate_up):
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    last = gate_up.dim() - 1
    shape, _ = outer(gate_up, last)
    layout = rows_layout(shape, [outer(t, last)[1] for t in (gate_up, dy, dgu)])
    if layout is None:
        dy = dy.contiguous()
        layout = rows_layout(shape, [outer(t, last)[1] for t in (gate_up, dy, dgu)])
    P, Q, ((sg_p, sg_q), (sdy_p, sdy_q), (sd_p, sd_q)) = layout
    F = gate_up.shape[-1] // 2
    BLOCK_Q, BLOCK_F = _swiglu_geometry(Q, F)
    with on_device(gate_up):
        kernel_module("swiglu").swiglu_bwd_kernel[(P * cdiv(Q, BLOCK_Q) * cdiv(F, BLOCK_F),)](
            gate_up, dy, dgu, Q, F,
            sg_p, sg_q, gate_up.stride(-1), sdy_p, sdy_q, dy.stride(-1), sd_p, sd_q, dgu.stride(-1),
            BLOCK_Q=BLOCK_Q, BLOCK_F=BLOCK_F, num_warps=num_warps(BLOCK_Q * BLOCK_F),
        )
    return dgu


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, layout):
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(gate_up, layout)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward(dy, gate_up), None


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.chunk(2, -1)``; fp32 math inside."""
    layout = None
    if (gate_up.dim() > 0 and gate_up.dtype in kernel_dtypes() and gate_up.shape[-1] % 2 == 0
            and runs_here(gate_up)):
        last = gate_up.dim() - 1
        shape, strides = outer(gate_up, last)
        y_strides = torch.empty(shape, device="meta").stride()      # y is contiguous [..., F]
        layout = rows_layout(shape, [strides, [s * (gate_up.shape[-1] // 2) for s in y_strides]])
    if layout is None:
        counters.fell_back("triton", "swiglu", gate_up)
        return reference.swiglu(gate_up)
    if not needs_grad(gate_up):
        return _swiglu_forward(gate_up, layout)
    return _SwiGLUFn.apply(gate_up, layout)
