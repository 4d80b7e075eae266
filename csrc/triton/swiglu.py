"""SwiGLU on the packed gate_up tensor (Triton), forward and backward.

Computes, with ``gate = gate_up[..., :F]`` and ``up = gate_up[..., F:]`` (F = half the last dim)::

    y = silu(gate) * up = gate * sigmoid(gate) * up                  (fp32 math, y in the input dtype)
    backward:  d gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
               d up   = dy * silu(gate)

Rows (all leading dims) are addressed as ``[P, Q]`` with per-tensor strides, so any view works
without a copy. A program handles a ``[BLOCK_Q, BLOCK_F]`` tile of one ``p``; narrow rows are
packed many to a program. Loads go to fp32 first (the interpreter gets bf16 math wrong).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k swiglu``
Time:  ``python -m trm.ops.triton --bench swiglu``
"""

import triton
import triton.language as tl


@triton.jit
def swiglu_fwd_kernel(
    gu_ptr, y_ptr, Q, F,
    sgu_p, sgu_q, sgu_f,
    sy_p, sy_q, sy_f,
    BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (P * cdiv(Q, BLOCK_Q) * cdiv(F, BLOCK_F),)."""
    pid = tl.program_id(0)
    f_blocks = (F + BLOCK_F - 1) // BLOCK_F
    q_blocks = (Q + BLOCK_Q - 1) // BLOCK_Q
    rest = pid // f_blocks
    p = (rest // q_blocks).to(tl.int64)
    q = ((rest % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    f = ((pid % f_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    mask = (q < Q)[:, None] & (f < F)[None, :]
    gate_offs = p * sgu_p + q[:, None] * sgu_q + f[None, :] * sgu_f
    gate = tl.load(gu_ptr + gate_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + gate_offs + F * sgu_f, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + p * sy_p + q[:, None] * sy_q + f[None, :] * sy_f, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    gu_ptr, dy_ptr, dgu_ptr, Q, F,
    sgu_p, sgu_q, sgu_f,
    sdy_p, sdy_q, sdy_f,
    sdgu_p, sdgu_q, sdgu_f,
    BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid as the forward; recomputes silu from gate_up (nothing else saved)."""
    pid = tl.program_id(0)
    f_blocks = (F + BLOCK_F - 1) // BLOCK_F
    q_blocks = (Q + BLOCK_Q - 1) // BLOCK_Q
    rest = pid // f_blocks
    p = (rest // q_blocks).to(tl.int64)
    q = ((rest % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    f = ((pid % f_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    mask = (q < Q)[:, None] & (f < F)[None, :]
    gate_offs = p * sgu_p + q[:, None] * sgu_q + f[None, :] * sgu_f
    gate = tl.load(gu_ptr + gate_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + gate_offs + F * sgu_f, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + p * sdy_p + q[:, None] * sdy_q + f[None, :] * sdy_f, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * gate * sig
    dgate_offs = p * sdgu_p + q[:, None] * sdgu_q + f[None, :] * sdgu_f
    tl.store(dgu_ptr + dgate_offs, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + dgate_offs + F * sdgu_f, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)
