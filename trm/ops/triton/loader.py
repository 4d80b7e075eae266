"""Loading the Triton kernels (``csrc/triton/*.py``) and what every op's launcher shares:
availability, the device and dtype rules, launch geometry.

Importing this module does not import triton: the kernel files are loaded by file path (csrc is
not a Python package) on the first ``available()`` or kernel call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Sequence

import torch

from trm.ops import counters

KERNEL_DIR = Path(__file__).resolve().parents[3] / "csrc" / "triton"
KERNEL_FILES = ("rms_norm", "swiglu", "rope", "attention", "stablemax_ce", "adam_atan2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 32768                     # longest rms_norm row / vocabulary held in one program

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "interpret": False, "modules": {}}


# ---------------------------------------------------------------------------------------------
# Loading and availability
# ---------------------------------------------------------------------------------------------

def _load_file(name: str):
    path = KERNEL_DIR / f"{name}.py"
    module_name = f"trm_triton_kernels.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Triton kernel file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module          # registered like an import (inspect finds it by name)
    spec.loader.exec_module(module)
    return module


def _load() -> bool:
    """Import triton and the kernel files once; False (reason kept) on any failure."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        try:
            import triton

            interpret = bool(triton.knobs.runtime.interpret)
            modules = {name: _load_file(name) for name in KERNEL_FILES}
        except Exception as exc:  # noqa: BLE001 -- any import failure means "unavailable"
            _state["error"] = f"{type(exc).__name__}: {exc}"
            return False
        _state.update(interpret=interpret, modules=modules, loaded=True)
        return True


def available() -> tuple[bool, str | None]:
    """``(True, None)`` when the kernels can run here, else ``(False, reason)``; never raises."""
    try:
        if not _load():
            return False, f"triton kernels cannot be loaded: {_state['error']}"
        if _state["interpret"]:
            return True, None
        if torch.cuda.is_available():
            return True, None
        return False, ("no CUDA GPU is visible and the Triton interpreter is off "
                       "(set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors)")
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


class _CountedKernels:
    """A kernel file whose ``*_kernel`` attributes count a launch in ``trm.ops.counters`` when read
    (each launch site reads its kernel once: ``kernel_module("rms_norm").rms_norm_fwd_kernel[grid](...)``)."""

    def __init__(self, name: str, module):
        self._name, self._module = name, module

    def __getattr__(self, attr: str):
        value = getattr(self._module, attr)
        if attr.endswith("_kernel"):
            counters.launched("triton", f"{self._name}/{attr}")
        return value


def kernel_module(name: str):
    """The loaded kernel file ``csrc/triton/<name>.py`` (after ``available()``); reading a kernel
    from it counts one launch."""
    return _CountedKernels(name, _state["modules"][name])


def interpreting() -> bool:
    return _load() and _state["interpret"]


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """Input dtypes the kernels take. The interpreter computes bf16 dots wrong and truncates
    fp32 -> bf16 stores (a GPU rounds to nearest): bf16 runs the reference there."""
    return (torch.float32, torch.float16) if interpreting() else FLOAT_DTYPES


def runs_here(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these tensors: all on the kernel device, none empty."""
    if not available()[0]:
        return False
    device = tensors[0].device
    if _state["interpret"]:
        ok_device = device.type == "cpu"
    else:
        ok_device = device.type == "cuda"
    return ok_device and all(t.device == device and t.numel() > 0 for t in tensors)


def on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (triton launches on the current device); a no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Launch geometry
# ---------------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_elements() -> int:
    """Elements per program: a few thousand on a GPU; many more in the (numpy) interpreter."""
    return 32768 if interpreting() else 4096


def num_warps(elements: int) -> int:
    return 4 if elements <= 4096 else 8 if elements <= 8192 else 16


def rows_layout(outer_shape: Sequence[int], outer_strides: Sequence[Sequence[int]]):
    """Address the rows of several same-shape tensors as ``[P, Q]``: ``(P, Q, [(s_p, s_q), ...])``.

    Adjacent leading dims merge when every tensor's strides allow it; None when more than two
    groups remain (the caller then copies or uses the reference). Row ``p * Q + q`` is the
    row-major index over ``outer_shape`` whatever the merge.
    """
    groups: list[list] = []                     # [size, [stride per tensor]]
    for i, size in enumerate(outer_shape):
        if size == 1:
            continue
        strides = [s[i] for s in outer_strides]
        if groups and all(prev == size * cur for prev, cur in zip(groups[-1][1], strides)):
            groups[-1][0] *= size
            groups[-1][1] = strides
        else:
            groups.append([size, strides])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, [1, [0] * len(outer_strides)])
    (P, p_strides), (Q, q_strides) = groups
    return P, Q, list(zip(p_strides, q_strides))


def outer(t: torch.Tensor, dim: int) -> tuple[list[int], list[int]]:
    shape = [s for i, s in enumerate(t.shape) if i != dim]
    strides = [s for i, s in enumerate(t.stride()) if i != dim]
    return shape, strides
