"""The front door of every performance-critical op: the model calls only ``trm.ops.*``.

Each op has a plain-PyTorch reference (``trm.ops.reference``; float32 math, the ground truth of
the tests). Fused backends plug in behind the same names (see DESIGN.md, "Ops") and are chosen
by ``set_backend(auto | cuda | triton | cpu | torch)``, globally or per op
(``set_backend("torch", op="rms_norm")``); see ``trm.ops.dispatch``. The default is ``torch``
(the reference); the trainer sets the config key ``kernels``. Native C++ CPU / CUDA kernels:
``trm.ops.native`` (``csrc/cpu``, ``csrc/cuda``); Triton kernels: ``trm.ops.triton_backend``
(``csrc/triton``).

Shape legend: B batch, L positions (prefix included), D hidden, H heads, K head_dim,
V vocabulary.
"""

from trm.ops.dispatch import (
    BACKENDS,
    adam_atan2,
    describe,
    apply_rope,
    attention,
    get_backend,
    log_stablemax,
    rms_norm,
    set_backend,
    softmax_cross_entropy,
    stablemax_cross_entropy,
    swiglu,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "adam_atan2",
    "describe",
    "apply_rope",
    "attention",
    "get_backend",
    "log_stablemax",
    "rms_norm",
    "set_backend",
    "softmax_cross_entropy",
    "stablemax_cross_entropy",
    "swiglu",
    "use_backend",
]
