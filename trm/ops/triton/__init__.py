"""The Triton backend of ``trm.ops``: the kernels of ``csrc/triton/`` behind the reference signatures.

One module per op (its launchers, launch geometry and ``torch.autograd.Function``), next to the
kernel file of the same name; ``loader`` loads triton and the kernel files and holds what every
launcher shares (availability, device/dtype rules, the ``[P, Q]`` row layout):

    op                        module            kernels
    rms_norm                  rms_norm.py       csrc/triton/rms_norm.py
    swiglu                    swiglu.py         csrc/triton/swiglu.py
    apply_rope                rope.py           csrc/triton/rope.py
    attention                 attention.py      csrc/triton/attention.py
    stablemax_cross_entropy   stablemax_ce.py   csrc/triton/stablemax_ce.py
    adam_atan2                adam_atan2.py     csrc/triton/adam_atan2.py

``IMPLS[op]`` has exactly the signature and semantics of ``trm.ops.reference.<op>``;
``available()`` says whether the kernels can run here (never raises). Importing this package
does not import triton.

Where the kernels run: CUDA tensors on a GPU; with the Triton interpreter on
(``TRITON_INTERPRET=1`` in the environment before the first use) CPU tensors, the programs run
one by one in numpy (correctness only, slow). Any input the kernels do not cover -- another
device, float64, a head dim outside {16, 32, 64, 128}, a layout that cannot be addressed as
[P, Q, N] without a copy, bf16 in the interpreter (it computes bf16 dots wrong and truncates
fp32 -> bf16 stores), empty tensors -- runs the reference instead: never a wrong answer, never
an error for a legal input.

Gradients: each op with a backward is a ``torch.autograd.Function`` whose backward is a Triton
kernel too. When no gradient is needed (``torch.is_grad_enabled()`` off, or no input requires
grad) the forward kernel runs alone and saves nothing (``rms_norm`` then skips even the 1/rms
it would keep for the backward).

Test: ``python -m pytest tests/test_ops_triton.py -q`` (interpreter on a CPU-only machine,
GPU tests marked ``gpu``). Time: ``python -m trm.ops.triton --bench [op ...]`` (GPU).
"""

from __future__ import annotations

from typing import Callable

from trm.ops.triton import adam_atan2, attention, rms_norm, rope, stablemax_ce, swiglu
from trm.ops.triton.loader import available

IMPLS: dict[str, Callable] = {
    "rms_norm": rms_norm.rms_norm,
    "swiglu": swiglu.swiglu,
    "apply_rope": rope.apply_rope,
    "attention": attention.attention,
    "stablemax_cross_entropy": stablemax_ce.stablemax_cross_entropy,
    "adam_atan2": adam_atan2.adam_atan2,
}

__all__ = ["IMPLS", "available"]
