"""linear, native CPU backend: the GEMMs of ``x @ W^T (+ b)`` on oneDNN instead of MKL.

Kernels: oneDNN's (the ``dnnl`` library bundled in torch's CPU build), reached through torch's
``torch.ops.mkldnn._linear_pointwise``; nothing of it is in ``csrc/``. Reference:
``trm.ops.reference.linear`` (``F.linear``, MKL's sgemm in torch's CPU build). Tests:
``tests/test_ops_cpu.py -k linear``.

Why: about three quarters of a CPU training step are the linear layers' GEMMs, and their inner
dimensions are short (the hidden size, 64-512; the sequence, 81). On the AMD EPYC (AVX-512)
machine here oneDNN runs those GEMMs 1.1-1.8x faster than MKL, whose sgemm does not use AVX-512
on that CPU (``MKL_VERBOSE=1``: "Intel(R) Architecture processors"; oneDNN's ``ONEDNN_VERBOSE=1``:
"isa:Intel AVX-512 ..."). oneDNN is used only where it is as accurate as the reference: up to ``MAX_INNER`` (128)
terms per dot product its results equal MKL's error for error; beyond, MKL splits the sum into
blocks and oneDNN does not, and oneDNN's max error is 1.5-2.7x MKL's (measured over 12 seeds at
inner dims 256-1024), over the error rule's 2x. So, per GEMM:

    forward          y  = x @ W^T (+ b)      oneDNN when K <= 128 (else MKL)   linear/onednn_fwd
    input gradient   dx = dy @ W             oneDNN when N <= 128 (else MKL)   linear/onednn_dgrad
    weight gradient  dW = dy^T @ x; db = sum(dy)   MKL (torch.mm), as the reference: its inner
                                                   dimension is B * L, where MKL is the faster

A layer with K and N both over 128 runs the reference (counted as a fallback).

The kernel takes float32 CPU tensors: ``x`` [..., K] (any strides: a strided view, e.g. mlp_t's
transposed activations, is made contiguous first, as ``F.linear`` does), ``weight`` [N, K],
``bias`` [N] or None. Everything else (other dtypes, devices, empty tensors, a torch without
oneDNN) runs the reference, counted in ``trm.ops.counters``. Whether it is faster is the device
class's: ``auto`` uses it only where the committed baseline shows it faster
(``benchmarks/test_bench_ops.py``'s linear cases), so on a CPU class without such entries
(e.g. the Intel Xeon baseline, recorded before this op existed) the reference runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from trm.ops import counters, reference
from trm.ops.native.loader import close

OP = "linear"
KERNELS: tuple[str, ...] = ()     # no torch.ops.trm kernel: oneDNN's, through torch.ops.mkldnn
DEVICES = ("cpu",)                # no CUDA variant: cuBLAS is what F.linear runs there
MAX_INNER = 128                   # the longest dot product oneDNN computes (see above)


def onednn_available() -> bool:
    """Whether this torch has oneDNN and its fused linear op (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _gemm(a2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, what: str) -> torch.Tensor:
    counters.launched("cpu", f"linear/{what}")
    return torch.ops.mkldnn._linear_pointwise(a2, w, b, "none", [], "")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.is_contiguous() else t2.contiguous()


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = _rows(x)
        w = weight if weight.is_contiguous() else weight.contiguous()
        if x2.shape[1] <= MAX_INNER:
            y2 = _gemm(x2, w, bias, "onednn_fwd")
        else:
            y2 = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        dy2 = _rows(grad_y)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if weight.shape[0] <= MAX_INNER:
                dx = _gemm(dy2, weight.t().contiguous(), None, "onednn_dgrad").view(ctx.x_shape)
            else:
                dx = torch.mm(dy2, weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dy2.t(), x2)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) + ((bias,) if bias is not None else ())
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.shape[-1] > 0
            and weight.shape[0] > 0 and x.numel() > 0 and (bias is None or bias.shape == (weight.shape[0],))
            and min(weight.shape) <= MAX_INNER
            and onednn_available())


def make(device_type: str) -> Callable:
    """The front door for ``device_type`` (``cpu``) tensors (signature of ``reference.linear``)."""
    if device_type not in DEVICES:
        raise ValueError(f"the native linear has no {device_type} variant")

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight^T (+ bias)`` with oneDNN's GEMMs (float32 CPU tensors; else the reference)."""
        if torch.compiler.is_compiling():
            # inductor lowers the reference's GEMM itself (its mkldnn lowering wants constant
            # weights, so this Function cannot be traced); counted as nothing: nothing runs yet
            return reference.linear(x, weight, bias)
        if not _takes(x, weight, bias):
            counters.fell_back(device_type, OP, x, weight)
            return reference.linear(x, weight, bias)
        return _OneDnnLinear.apply(x, weight, bias)

    return linear


def register() -> None:
    """Nothing to register: the kernels are torch's own ops."""


def self_check(fn: Callable, device_type: str) -> str | None:
    """``fn`` vs the reference (output and the three gradients) on a tiny fp32 input. Without
    oneDNN the front door runs the reference: nothing to check (and the cpu backend's other ops
    stay available)."""
    if not onednn_available():
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g).to(device_type).requires_grad_(True)
    w = torch.randn(7, 12, generator=g).to(device_type).requires_grad_(True)
    b = torch.randn(7, generator=g).to(device_type).requires_grad_(True)
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    out, out_ref = fn(x, w, b), reference.linear(xr, wr, br)
    cot = torch.randn(out_ref.shape, generator=g).to(device_type)
    (out * cot).sum().backward()
    (out_ref * cot).sum().backward()
    pairs = ((out, out_ref), (x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad))
    if not all(close(a, r, 1e-5, 1e-5) for a, r in pairs):
        return f"self-check failed ({device_type}): linear differs from the reference"
    return None
