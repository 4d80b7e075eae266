"""adam_atan2, native backend: ``torch.ops.trm.adam_atan2`` (in place, multi-tensor).

Kernels: ``csrc/cpu/adam_atan2.cpp``, ``csrc/cuda/adam_atan2.cu`` (schema in ``csrc/trm_ops.cpp``).
Reference: ``trm.ops.reference.adam_atan2`` (the math of ``trm.train.optim.AdamATan2``). Tests:
``tests/test_ops_cpu.py -k adam``.

Math, per element at step t: ``p *= 1 - lr * wd``; ``m = b1 m + (1 - b1) g``;
``v = b2 v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * atan2(m, sqrt(v / (1 - b2^t)))``.
"""

from __future__ import annotations

from typing import Callable

import torch

from trm.ops import reference
from trm.ops import counters
from trm.ops.native.loader import close, ensure, launch

OP = "adam_atan2"
KERNELS = ("adam_atan2",)


def register() -> None:
    """Fake (meta) implementation (the op mutates its inputs and has no autograd)."""
    @torch.library.register_fake("trm::adam_atan2")
    def _(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, weight_decay):
        return None


def make(device_type: str) -> Callable:
    """The front door for ``device_type`` tensors (signature of ``reference.adam_atan2``)."""
    def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                   exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float,
                   weight_decay: float) -> None:
        """In-place fused AdamATan2 step over the four lists (float32, contiguous; else the reference)."""
        lists = (params, grads, exp_avgs, exp_avg_sqs)
        supported = (step >= 1 and len(params) > 0 and all(len(lst) == len(params) for lst in lists)
                     and all(t.device == params[0].device and t.device.type == device_type
                             and t.dtype == torch.float32 and t.is_contiguous() for lst in lists for t in lst)
                     and all(g.numel() == p.numel() and m.numel() == p.numel() and v.numel() == p.numel()
                             for p, g, m, v in zip(*lists)))
        if not supported:
            counters.fell_back(device_type, OP, params, grads, exp_avgs, exp_avg_sqs)
            return reference.adam_atan2(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                                        beta2=beta2, weight_decay=weight_decay)
        ensure(device_type)
        with torch.no_grad():
            launch("adam_atan2", "adam_atan2", list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), int(step),
                   float(lr), float(beta1), float(beta2), float(weight_decay))

    return adam_atan2


def self_check(fn: Callable, device_type: str) -> str | None:
    """Two steps of ``fn`` vs two of the reference on a vector and a matrix."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, generator=g).to(device_type), torch.randn(3, 5, generator=g).to(device_type)]
    grads = [torch.randn(*p.shape, generator=g).to(device_type) for p in params]
    states = [[p.clone() for p in params] for _ in range(2)]
    for k, step_fn in enumerate((fn, reference.adam_atan2)):
        ps, ms, vs = states[k], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        for t in (1, 2):
            step_fn(ps, grads, ms, vs, step=t, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    if not all(close(a, b, 1e-6, 1e-7) for a, b in zip(*states)):
        return f"self-check failed ({device_type}): adam_atan2 differs from the reference"
    return None
