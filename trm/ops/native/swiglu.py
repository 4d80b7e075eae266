"""swiglu, native backend: ``torch.ops.trm.swiglu_fwd / swiglu_bwd``.

Kernels: ``csrc/cpu/swiglu.cpp``, ``csrc/cuda/swiglu.cu`` (schemas in ``csrc/trm_ops.cpp``).
Reference: ``trm.ops.reference.swiglu``. Tests: ``tests/test_ops_cpu.py -k swiglu``.

Math: ``gate, up = gate_up.chunk(2, -1)``, ``y = silu(gate) * up``; backward
``d_up = dy * silu(gate)``, ``d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))``,
both written into one ``[..., 2F]`` buffer (no chunk/cat copy).
"""

from __future__ import annotations

from typing import Callable

import torch

from trm.ops import reference
from trm.ops import counters
from trm.ops.native.loader import close, ensure, float_on, launch, register_backward_kernel

OP = "swiglu"
KERNELS = ("swiglu_fwd", "swiglu_bwd")


def register() -> None:
    """Fake (meta) and autograd implementations of the kernels."""
    @torch.library.register_fake("trm::swiglu_fwd")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake("trm::swiglu_bwd")
    def _(grad_out, gate_up):
        return gate_up.new_empty(gate_up.shape)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return launch("swiglu", "swiglu_bwd", grad_out, gate_up)

    torch.library.register_autograd("trm::swiglu_fwd", backward, setup_context=setup)
    register_backward_kernel("swiglu_bwd")


def make(device_type: str) -> Callable:
    """The front door for ``device_type`` tensors (signature of ``reference.swiglu``)."""
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of the packed ``gate_up = [gate, up]`` (last dim)."""
        if not float_on(gate_up, device_type) or gate_up.dim() == 0 or gate_up.numel() == 0 or gate_up.shape[-1] % 2:
            counters.fell_back(device_type, OP, gate_up)
            return reference.swiglu(gate_up)
        ensure(device_type)
        return launch("swiglu", "swiglu_fwd", gate_up)

    return swiglu


def self_check(fn: Callable, device_type: str) -> str | None:
    """``fn`` vs the reference (forward and gradient) on a tiny fp32 input."""
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(3, 4, 10, generator=g).to(device_type).requires_grad_(True)
    gu_ref = gu.detach().clone().requires_grad_(True)
    out, out_ref = fn(gu), reference.swiglu(gu_ref)
    out.sum().backward()
    out_ref.sum().backward()
    if not (close(out, out_ref, 1e-5, 1e-6) and close(gu.grad, gu_ref.grad, 1e-5, 1e-6)):
        return f"self-check failed ({device_type}): swiglu differs from the reference"
    return None
