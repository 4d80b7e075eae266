"""rms_norm, native backend: ``torch.ops.trm.rms_norm_fwd / rms_norm_fwd_only / rms_norm_bwd``.

Kernels: ``csrc/cpu/rms_norm.cpp``, ``csrc/cuda/rms_norm.cu`` (schemas in ``csrc/trm_ops.cpp``).
Reference: ``trm.ops.reference.rms_norm``. Tests: ``tests/test_ops_cpu.py -k rms_norm``,
``tests/test_ops_cuda_build.py``.

Math: ``s = x + residual`` (or ``x``), ``y = s * rstd`` with ``rstd = 1 / sqrt(mean(s^2) + eps)``
over ``dim``, fp32 inside. Backward from the output alone (no weight):
``ds = rstd * (dy - y * mean(dy * y))``, the gradient of x and of residual alike. The forward-only
kernel saves nothing (the no-grad cycles); any axis via strides (mlp_t's sequence axis, no copy).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from trm.ops import reference
from trm.ops import counters
from trm.ops.native.loader import close, ensure, float_on, launch, register_backward_kernel

OP = "rms_norm"
KERNELS = ("rms_norm_fwd", "rms_norm_fwd_only", "rms_norm_bwd")


def _rows(x: torch.Tensor, dim: int) -> int:
    dim = dim % x.dim()
    return math.prod(s for d, s in enumerate(x.shape) if d != dim)


def register() -> None:
    """Fake (meta) and autograd implementations of the kernels."""
    @torch.library.register_fake("trm::rms_norm_fwd")
    def _(x, residual, dim, eps):
        return torch.empty_like(x), x.new_empty((_rows(x, dim),), dtype=torch.float32)

    @torch.library.register_fake("trm::rms_norm_fwd_only")
    def _(x, residual, dim, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("trm::rms_norm_bwd")
    def _(grad_y, y, rstd, dim):
        return torch.empty_like(y)

    def setup(ctx, inputs, output):
        x, residual, dim, _eps = inputs
        y, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(y, rstd)
        ctx.dim, ctx.has_residual = dim, residual is not None

    def backward(ctx, grad_y, _grad_rstd):
        y, rstd = ctx.saved_tensors
        ds = launch("rms_norm", "rms_norm_bwd", grad_y, y, rstd, ctx.dim)
        return (ds if ctx.needs_input_grad[0] else None,
                ds if ctx.has_residual and ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd("trm::rms_norm_fwd", backward, setup_context=setup)

    # the forward-only variant saves nothing; if a gradient is asked of it anyway, recompute
    def only_setup(ctx, inputs, output):
        x, residual, dim, eps = inputs
        ctx.save_for_backward(x, residual)
        ctx.dim, ctx.eps, ctx.has_residual = dim, eps, residual is not None

    def only_backward(ctx, grad_y):
        x, residual = ctx.saved_tensors
        y, rstd = launch("rms_norm", "rms_norm_fwd", x.detach(), residual.detach() if ctx.has_residual else None,
                         ctx.dim, ctx.eps)
        ds = launch("rms_norm", "rms_norm_bwd", grad_y, y, rstd, ctx.dim)
        return (ds if ctx.needs_input_grad[0] else None,
                ds if ctx.has_residual and ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd("trm::rms_norm_fwd_only", only_backward, setup_context=only_setup)
    register_backward_kernel("rms_norm_bwd")


def make(device_type: str) -> Callable:
    """The front door for ``device_type`` tensors (signature of ``reference.rms_norm``)."""
    def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Weightless RMSNorm of ``x + residual`` over ``dim`` (any strides, no transpose copy)."""
        if (not float_on(x, device_type) or x.dim() == 0 or x.numel() == 0 or not -x.dim() <= dim < x.dim()
                or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                              or residual.device != x.device))):
            counters.fell_back(device_type, OP, x, residual)
            return reference.rms_norm(x, eps, dim, residual)
        ensure(device_type)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
        if needs_grad:
            return launch("rms_norm", "rms_norm_fwd", x, residual, dim, float(eps))[0]
        return launch("rms_norm", "rms_norm_fwd_only", x, residual, dim, float(eps))

    return rms_norm


def self_check(fn: Callable, device_type: str) -> str | None:
    """``fn`` vs the reference on tiny fp32 inputs: last axis, and the mlp_t view with a residual."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 12, generator=g).to(device_type)
    res = torch.randn(2, 12, 5, generator=g).to(device_type)
    for x, r in ((base, None), (base.transpose(1, 2), res)):
        a = x.detach().clone().requires_grad_(True) if r is None else x.detach().requires_grad_(True)
        b = x.detach().clone().requires_grad_(True)
        ya, yb = fn(a, 1e-5, -1, r), reference.rms_norm(b, 1e-5, -1, r)
        dy = torch.randn(*ya.shape, generator=g).to(device_type)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        with torch.no_grad():
            y_nograd = fn(x, 1e-5, -1, r)
        if not (close(ya, yb, 1e-5, 1e-6) and close(a.grad, b.grad, 1e-4, 1e-5) and close(y_nograd, yb, 1e-5, 1e-6)):
            return f"self-check failed ({device_type}): rms_norm differs from the reference"
    return None
