"""The front door of every performance-critical op: the model calls only ``trm.ops.*``.

Each op has a plain-PyTorch reference (float32 math, the ground truth of the tests).
Fused Triton / CUDA / C++ backends plug in behind the same names (see DESIGN.md, "Ops");
until a backend is registered, the reference is what runs.

Shape legend: B batch, L positions (prefix included), D hidden, H heads, K head_dim,
V vocabulary.
"""

from trm.ops.reference import (
    apply_rope,
    attention,
    log_stablemax,
    rms_norm,
    softmax_cross_entropy,
    stablemax_cross_entropy,
    swiglu,
)

__all__ = [
    "apply_rope",
    "attention",
    "log_stablemax",
    "rms_norm",
    "softmax_cross_entropy",
    "stablemax_cross_entropy",
    "swiglu",
]
