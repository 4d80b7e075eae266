"""One front door per op: ``trm.ops.<op>(...)`` picks the backend, the model never does.

Backends (DESIGN.md, "Ops"):

- ``torch``: the plain-PyTorch reference (``trm.ops.reference``). The default, until the
  trainer wires the config key ``kernels``.
- ``cpu``: the native C++ CPU kernels (``trm.ops.native``; JIT-built on first use) for the ops
  that have one (``rms_norm``, ``stablemax_cross_entropy``). Requesting it explicitly raises if
  the extension is unavailable, or if such an op gets a non-CPU tensor. Ops without a CPU kernel
  keep running the reference under a global ``cpu`` (naming such an op in a per-op
  ``set_backend("cpu", op=...)`` raises).
- ``auto``: per call, the fastest verified backend for the tensors' device: the native CPU
  kernel for CPU tensors when it built and passed its self-check, else the reference. A backend
  that is missing is named once (warning) and the reference runs.
- ``cuda`` / ``triton``: reserved names, not implemented yet: requesting them raises ValueError.

``set_backend(name)`` sets the global backend; ``set_backend(name, op="rms_norm")`` overrides one
op (``set_backend(None, op=...)`` removes the override). ``use_backend`` is the context-manager
form. Some inputs always run the reference whatever the backend, because the native kernels
don't cover them: ``rms_norm`` over a dim other than the last, float64 inputs (the loss's float64
contract is bit-exact in the reference).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator

import torch

from trm.ops import native, reference

log = logging.getLogger("trm.ops")

BACKENDS = ("auto", "cpu", "torch")              # implemented
FUTURE_BACKENDS = ("cuda", "triton")             # reserved; other work adds them
OPS = ("apply_rope", "attention", "log_stablemax", "rms_norm", "softmax_cross_entropy",
       "stablemax_cross_entropy", "swiglu")

_REFERENCE: dict[str, Callable] = {op: getattr(reference, op) for op in OPS}
_NATIVE_CPU: dict[str, Callable] = {
    "rms_norm": native.rms_norm,
    "stablemax_cross_entropy": native.stablemax_cross_entropy,
}

_global_backend = "torch"
_per_op: dict[str, str] = {}
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _validate(name: str, op: str | None) -> None:
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if name in FUTURE_BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not available yet: this build implements "
                         f"{' | '.join(BACKENDS)} (cuda/triton kernels are future work)")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {' | '.join(BACKENDS)}")
    if name == "cpu":
        if op is not None and op not in _NATIVE_CPU:
            raise ValueError(f"op {op!r} has no native cpu kernel; ops with one: {', '.join(sorted(_NATIVE_CPU))}")
        if not native.load():
            raise RuntimeError(f"kernel backend 'cpu' requested but the native CPU extension is unavailable: "
                               f"{native.status()['reason']}")


def set_backend(name: str | None, op: str | None = None) -> None:
    """Select the backend globally, or for one op (``name=None`` with ``op`` drops its override)."""
    global _global_backend
    if name is None:
        if op is None:
            raise ValueError("set_backend(None) needs op=...; to reset the global backend use set_backend('torch')")
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        _per_op.pop(op, None)
        return
    name = name.lower()
    _validate(name, op)
    if op is None:
        _global_backend = name
    else:
        _per_op[op] = name


def get_backend(op: str | None = None) -> str:
    """The backend in force for ``op`` (its override, else the global one), or the global one."""
    return _global_backend if op is None else _per_op.get(op, _global_backend)


@contextlib.contextmanager
def use_backend(name: str | None, op: str | None = None) -> Iterator[None]:
    """Temporarily ``set_backend(name, op)``."""
    saved_global, saved_per_op = _global_backend, dict(_per_op)
    try:
        set_backend(name, op)
        yield
    finally:
        _restore(saved_global, saved_per_op)


def _restore(global_backend: str, per_op: dict[str, str]) -> None:
    global _global_backend
    _global_backend = global_backend
    _per_op.clear()
    _per_op.update(per_op)


def _select(op: str, t: torch.Tensor) -> Callable:
    name = _per_op.get(op, _global_backend)
    if name == "torch":
        return _REFERENCE[op]
    fn = _NATIVE_CPU.get(op)
    if fn is None:                       # no native kernel for this op: the reference is the op
        return _REFERENCE[op]
    on_cpu = t.device.type == "cpu"
    if name == "cpu":
        if not on_cpu:
            raise RuntimeError(f"kernel backend 'cpu' was requested for {op} but its input is on {t.device}")
        if not native.load():
            raise RuntimeError(f"kernel backend 'cpu' requested but the native CPU extension is unavailable: "
                               f"{native.status()['reason']}")
        return fn
    # auto
    if on_cpu:
        if native.load():
            return fn
        _warn_once("cpu", f"trm.ops: native CPU kernels unavailable ({native.status()['reason']}); "
                          f"'auto' falls back to the PyTorch reference")
        return _REFERENCE[op]
    _warn_once(f"device:{t.device.type}", f"trm.ops: no fused kernels for {t.device.type} tensors yet; "
                                          f"'auto' uses the PyTorch reference")
    return _REFERENCE[op]


# ---------------------------------------------------------------------------------------------
# The front doors: the reference signatures
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """Weightless RMSNorm over ``dim``: ``x / sqrt(mean(x^2) + eps)``, in fp32, cast back."""
    return _select("rms_norm", x)(x, eps, dim)


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                            ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` (float64 result); 0 where the label is ignored."""
    return _select("stablemax_cross_entropy", logits_BLV)(logits_BLV, labels_BL, ignore_index)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.chunk(2, -1)``."""
    return _select("swiglu", gate_up)(gate_up)


def apply_rope(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor):
    """Rotate-half rotary embedding of q and k."""
    return _select("apply_rope", q_BLHK)(q_BLHK, k_BLHK, cos_LK, sin_LK)


def attention(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, v_BLHK: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(K); returns [B, L, H, K]."""
    return _select("attention", q_BLHK)(q_BLHK, k_BLHK, v_BLHK)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(s(x_i) / sum_j s(x_j))``."""
    return _select("log_stablemax", x)(x, dim)


def softmax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                          ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token softmax cross-entropy in float32; 0 where the label is ignored."""
    return _select("softmax_cross_entropy", logits_BLV)(logits_BLV, labels_BL, ignore_index)
