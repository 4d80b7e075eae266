"""adam_atan2, Triton backend: the one-launch multi-tensor step of ``csrc/triton/adam_atan2.py``.

Reference: ``trm.ops.reference.adam_atan2``. Native kernels: ``trm.ops.native.adam_atan2``.
Tests: ``tests/test_ops_triton.py -k adam``.

Math, per element at step t: ``p *= 1 - lr * wd``; ``m = b1 m + (1 - b1) g``;
``v = b2 v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * atan2(m, sqrt(v / (1 - b2^t)))``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from trm.ops import counters, reference
from trm.ops.triton.loader import cdiv, interpreting, kernel_module, on_device, runs_here


_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE_SIZE = 8


def _adam_table(lists: Sequence[Sequence[torch.Tensor]], block: int) -> torch.Tensor:
    """The int64 launch table (see csrc/triton/adam_atan2.py), cached by its own content."""
    numels = [t.numel() for t in lists[0]]
    device = lists[0][0].device
    key = (device, block, *(t.data_ptr() for ts in lists for t in ts), *numels)
    table = _TABLE_CACHE.get(key)
    if table is None:
        block_tensor, block_start = [], []
        for i, n in enumerate(numels):
            starts = range(0, n, block)
            block_tensor.extend([i] * len(starts))
            block_start.extend(starts)
        values = [t.data_ptr() for ts in lists for t in ts] + numels + block_tensor + block_start
        table = torch.tensor(values, dtype=torch.int64, device=device)
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = table
    return table


def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float,
               weight_decay: float) -> None:
    """In-place AdamATan2 step of every tensor in one launch (math of trm.train.optim.AdamATan2).

    ``step`` is the step number after the increment (>= 1). fp32, contiguous, same-device
    tensors run the kernel; anything else runs the reference.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    n = len(params)
    if any(len(ts) != n for ts in lists):
        raise ValueError(f"adam_atan2: params, grads, exp_avgs, exp_avg_sqs must have the same length, "
                         f"got {[len(ts) for ts in lists]}")
    if step < 1:
        raise ValueError(f"adam_atan2: step must be >= 1 (the step number after the increment), got {step}")
    if n == 0:
        return
    flat = [t for ts in lists for t in ts]
    supported = (
        all(t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad for t in flat)
        and all(params[i].shape == grads[i].shape == exp_avgs[i].shape == exp_avg_sqs[i].shape for i in range(n))
        and runs_here(*flat)
    )
    if not supported:
        counters.fell_back("triton", "adam_atan2", params, grads, exp_avgs, exp_avg_sqs)
        reference.adam_atan2(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                             beta2=beta2, weight_decay=weight_decay)
        return
    block = 65536 if interpreting() else 1024
    table = _adam_table(lists, block)
    n_blocks = sum(cdiv(t.numel(), block) for t in params)
    with on_device(params[0]):
        kernel_module("adam_atan2").adam_atan2_kernel[(n_blocks,)](
            table, n,
            1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2,
            math.sqrt(1.0 - beta2 ** step), lr / (1.0 - beta1 ** step),
            HAS_DECAY=weight_decay != 0.0, BLOCK=block, num_warps=4,
        )


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 ``atan2`` on two contiguous same-shape fp32 tensors (for tests)."""
    if not (y.shape == x.shape and y.dtype == x.dtype == torch.float32 and runs_here(y, x)):
        raise ValueError("atan2: needs two same-shape float32 tensors on the kernel device")
    y, x = y.contiguous(), x.contiguous()
    out = torch.empty_like(y)
    block = 65536 if interpreting() else 1024
    with on_device(y):
        kernel_module("adam_atan2").atan2_kernel[(cdiv(y.numel(), block),)](y, x, out, y.numel(), BLOCK=block)
    return out

