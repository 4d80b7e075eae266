"""stablemax_cross_entropy, native backend: ``torch.ops.trm.stablemax_ce_fwd / stablemax_ce_bwd``.

Kernels: ``csrc/cpu/stablemax_ce.cpp``, ``csrc/cuda/stablemax_ce.cu`` (schemas in
``csrc/trm_ops.cpp``). Reference: ``trm.ops.reference.stablemax_cross_entropy``. Tests:
``tests/test_ops_cpu.py -k stablemax``, ``tests/test_ops_cuda_build.py``.

Math: ``s(x) = x + 1`` for ``x >= 0``, ``1 / (1 - x)`` below; per token
``loss = -log(s(x_label) / sum_j s(x_j))``, 0 where the label is ``ignore_index``; fp32 math,
returned as float64 like the reference. A label outside ``[0, V)`` raises (the CPU kernel checks
itself; on CUDA the labels are checked before the launch).
"""

from __future__ import annotations

from typing import Callable

import torch

from trm.ops import reference
from trm.ops import counters
from trm.ops.native.loader import close, ensure, float_on, launch, register_backward_kernel

OP = "stablemax_cross_entropy"
KERNELS = ("stablemax_ce_fwd", "stablemax_ce_bwd")


def register() -> None:
    """Fake (meta) and autograd implementations of the kernels."""
    @torch.library.register_fake("trm::stablemax_ce_fwd")
    def _(logits, labels, ignore_index):
        return logits.new_empty(logits.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("trm::stablemax_ce_bwd")
    def _(grad_loss, logits, labels, ignore_index):
        return logits.new_empty(logits.shape)

    def setup(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index

    def backward(ctx, grad_loss):
        logits, labels = ctx.saved_tensors
        return launch("stablemax_ce", "stablemax_ce_bwd", grad_loss, logits, labels, ctx.ignore_index), None, None

    torch.library.register_autograd("trm::stablemax_ce_fwd", backward, setup_context=setup)
    register_backward_kernel("stablemax_ce_bwd")


def make(device_type: str) -> Callable:
    """The front door for ``device_type`` tensors (signature of ``reference.stablemax_cross_entropy``)."""
    def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                                ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
        """Per-token stablemax cross-entropy, float64 dtype like the reference (float32 values)."""
        if (not float_on(logits_BLV, device_type) or logits_BLV.dim() == 0 or logits_BLV.shape[-1] == 0
                or labels_BL.device != logits_BLV.device or labels_BL.dtype not in (torch.int64, torch.int32)
                or labels_BL.shape != logits_BLV.shape[:-1]):
            counters.fell_back(device_type, OP, logits_BLV, labels_BL)
            return reference.stablemax_cross_entropy(logits_BLV, labels_BL, ignore_index)
        ensure(device_type)
        if device_type != "cpu":
            reference.check_labels(labels_BL, logits_BLV.shape[-1], ignore_index)  # the CPU kernel checks itself
        return launch("stablemax_ce", "stablemax_ce_fwd", logits_BLV, labels_BL, int(ignore_index)).to(torch.float64)

    return stablemax_cross_entropy


def self_check(fn: Callable, device_type: str) -> str | None:
    """``fn`` vs the reference (loss and gradient) on tiny fp32 logits with one ignored label."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g).to(device_type) * 3
    labels = torch.randint(0, 11, (4, 7), generator=g).to(device_type)
    labels[1, 2] = reference.IGNORE_LABEL_ID
    la, lb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_a, loss_b = fn(la, labels), reference.stablemax_cross_entropy(lb, labels)
    loss_a.sum().backward()
    loss_b.sum().backward()
    if not (close(loss_a, loss_b, 1e-6, 1e-7) and close(la.grad, lb.grad, 1e-5, 1e-7)):
        return f"self-check failed ({device_type}): stablemax_cross_entropy differs from the reference"
    return None
