"""The native kernels of ``trm.ops``: C++ CPU and CUDA C++ (``csrc/``), as ``torch.ops.trm.*``.

One module per op, each holding that op's fake/autograd registrations, its front door (the
signature of ``trm.ops.reference.<op>``) and its self-check; ``loader`` builds/loads the
extension and runs the registrations and self-checks (importing this package builds nothing):

    op                        module            kernels (csrc/)
    rms_norm                  rms_norm.py       cpu/rms_norm.cpp      cuda/rms_norm.cu
    swiglu                    swiglu.py         cpu/swiglu.cpp        cuda/swiglu.cu
    stablemax_cross_entropy   stablemax_ce.py   cpu/stablemax_ce.cpp  cuda/stablemax_ce.cu
    adam_atan2                adam_atan2.py     cpu/adam_atan2.cpp    cuda/adam_atan2.cu
    linear                    linear.py         oneDNN's GEMMs via torch.ops.mkldnn (CPU only)

The dispatcher (``trm.ops.dispatch``) uses ``IMPLS_CPU`` / ``IMPLS_CUDA``: op name -> front door.
Each front door runs the kernel for the inputs it supports (float32/float16/bfloat16 tensors on
its device; adam_atan2: float32, contiguous) and hands anything else (float64, other devices,
shapes the kernel does not take) to the reference, so it never returns a wrong answer and never
raises for a legal input.

Test:   python -m pytest tests/test_ops_cpu.py tests/test_ops_cuda_build.py -q
Timing: python -m trm.ops.native --bench [--device cuda]   (median ms, kernel vs reference)
"""

from __future__ import annotations

from typing import Callable

from trm.ops.native import adam_atan2, linear, rms_norm, stablemax_ce, swiglu
from trm.ops.native.loader import (
    CSRC,
    FLOAT_DTYPES,
    _state,
    available,
    available_cpu,
    available_cuda,
    load,
    status,
)

OP_MODULES = (rms_norm, swiglu, stablemax_ce, adam_atan2, linear)
# every torch.ops.trm op (csrc/trm_ops.cpp declares exactly these)
NATIVE_OPS = tuple(kernel for module in OP_MODULES for kernel in module.KERNELS)
IMPLS_CPU: dict[str, Callable] = {module.OP: module.make("cpu") for module in OP_MODULES}
IMPLS_CUDA: dict[str, Callable] = {module.OP: module.make("cuda") for module in OP_MODULES
                                   if "cuda" in getattr(module, "DEVICES", ("cpu", "cuda"))}

__all__ = ["CSRC", "FLOAT_DTYPES", "IMPLS_CPU", "IMPLS_CUDA", "NATIVE_OPS", "OP_MODULES", "available",
           "available_cpu", "available_cuda", "load", "status", "_state"]
