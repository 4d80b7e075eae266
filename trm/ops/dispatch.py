"""One front door per op: ``trm.ops.<op>(...)`` picks the backend, the model never does.

Backends (DESIGN.md, "Ops"); each provides some ops, all with the reference's signature:

- ``torch``: the plain-PyTorch reference (``trm.ops.reference``); every op. What ``trm.ops``
  starts with when imported as a library (the trainer's config default is ``auto``).
- ``cpu``: native C++ CPU kernels (``trm.ops.native.<op>``, ``torch.ops.trm.*``), CPU tensors.
- ``cuda``: native CUDA C++ kernels (``trm.ops.native.<op>``), CUDA tensors.
- ``triton``: Triton kernels (``trm.ops.triton.<op>``, sources in ``csrc/triton``), CUDA
  tensors; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``).
- ``auto``: per call, for the tensors' device, the first candidate of ``AUTO_ORDER[op][device]``
  that (a) this device class's committed benchmark baseline shows faster than the reference
  (``trm.ops.baselines``: which file, which entries count), (b) is available here and (c) passes
  the run-time verification on this device (``trm.ops.verify``); else the reference. So a device
  without a recorded baseline runs the reference ops until one is recorded
  (``benchmarks/device_check.sh`` on a GPU). A missing backend and a refused kernel are named once
  (warning). Under ``torch.compile`` on CPU, auto traces the reference so inductor can fuse it
  (our C++ ops are opaque to it); on a GPU a trace uses what eager ``auto`` chose (``set_backend``
  chooses up front).

Explicit choices fail loudly instead of falling back: ``set_backend("cuda")`` raises at once when
the backend cannot run here (with the reason), and running an op of an explicit backend on
tensors of the wrong device raises. Under a global explicit backend, ops that backend has no
kernel for run the reference (named once); naming such an op in a per-op override raises.

``set_backend(name)`` sets the global backend; ``set_backend(name, op="rms_norm")`` overrides one
op (``set_backend(None, op=...)`` removes the override); ``use_backend`` is the context manager.
``describe()`` says, per op and device, what runs now and why; ``summary(device)`` says it in a
few words (the run's start line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Callable, Iterator

import torch

from trm.ops import baselines, reference, verify

log = logging.getLogger("trm.ops")

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
NATIVE_BACKENDS = ("cuda", "triton", "cpu")
OPS = ("adam_atan2", "apply_rope", "attention", "linear", "log_stablemax", "rms_norm", "softmax_cross_entropy",
       "stablemax_cross_entropy", "swiglu")

# auto: the candidates per op and device type, preferred first (anything not listed runs the
# reference). A candidate runs only where the device's baseline shows it faster (trm.ops.baselines):
# on this CPU that keeps adam_atan2 on PyTorch's foreach (0.22x), and attention stays on PyTorch's
# SDPA on a GPU until a baseline there shows the Triton kernel faster at TRM shapes.
_ROWWISE_GPU = ("cuda", "triton")
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "rms_norm": {"cpu": ("cpu",), "cuda": _ROWWISE_GPU},
    "stablemax_cross_entropy": {"cpu": ("cpu",), "cuda": _ROWWISE_GPU},
    "swiglu": {"cpu": ("cpu",), "cuda": _ROWWISE_GPU},
    "linear": {"cpu": ("cpu",)},      # oneDNN's GEMMs (trm/ops/native/linear.py); cuBLAS on a GPU is F.linear's
    "apply_rope": {"cuda": ("triton",)},
    "adam_atan2": {"cpu": ("cpu",), "cuda": _ROWWISE_GPU},
    "attention": {"cuda": ("triton",)},
    "log_stablemax": {},
    "softmax_cross_entropy": {},
}

_REFERENCE: dict[str, Callable] = {op: getattr(reference, op) for op in OPS}

_global_backend = "torch"
_per_op: dict[str, str] = {}
_warned: set[str] = set()
_chosen_eagerly: dict[tuple[str, str], str] = {}   # (op, device type) -> what eager auto last ran: a GPU trace's choice


# ---------------------------------------------------------------------------------------------
# Backend providers (imported lazily: importing trm.ops builds and imports nothing)
# ---------------------------------------------------------------------------------------------

def _provider(name: str) -> tuple[dict[str, Callable], Callable[[], tuple[bool, str | None]]]:
    """``(impls, available)`` of a native backend."""
    if name in ("cpu", "cuda"):
        from trm.ops import native
        if name == "cpu":
            return native.IMPLS_CPU, native.available_cpu
        return native.IMPLS_CUDA, native.available_cuda
    if name == "triton":
        from trm.ops import triton as triton_ops
        return triton_ops.IMPLS, triton_ops.available
    raise ValueError(f"unknown kernel backend {name!r}")


def impls(name: str) -> dict[str, Callable]:
    """The ops backend ``name`` implements (``torch``: all of them)."""
    return dict(_REFERENCE) if name == "torch" else dict(_provider(name)[0])


def available(name: str) -> tuple[bool, str | None]:
    """Whether backend ``name`` can run here, and why not. Never raises."""
    if name == "torch":
        return True, None
    try:
        return _provider(name)[1]()
    except Exception as exc:  # noqa: BLE001 -- a broken backend is "unavailable", with the reason
        return False, f"{type(exc).__name__}: {exc}"


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return True


def _warn_once(key: str, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------

def _validate(name: str, op: str | None) -> None:
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {' | '.join(BACKENDS)}")
    if name in NATIVE_BACKENDS:
        ok, reason = available(name)
        if not ok:
            raise RuntimeError(f"kernel backend {name!r} was requested but cannot run here: {reason}. "
                               f"Use kernels=auto (fastest available, else PyTorch) or kernels=torch.")
        if op is not None and op not in impls(name):
            raise ValueError(f"op {op!r} has no {name} kernel; {name} implements: "
                             f"{', '.join(sorted(impls(name)))}")


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
    if name == "auto":
        _preload_auto()
    if op is None:
        _global_backend = name
    else:
        _per_op[op] = name


def _preload_auto() -> None:
    """Choose what ``auto`` runs on this machine NOW, eagerly: read the baselines, load (build,
    self-check) and verify (``trm.ops.verify``) every backed candidate; none of it may happen inside
    a ``torch.compile`` trace (it cannot run there)."""
    for op, order in AUTO_ORDER.items():
        for dev in _devices():
            if order.get(dev):
                with _routed("auto", op):
                    resolve(op, dev)  # baseline, availability, then verification, of the candidates in order


@contextlib.contextmanager
def _routed(name: str, op: str) -> Iterator[None]:
    """Temporarily route ``op`` to ``name`` without ``set_backend``'s checks (``_preload_auto``)."""
    saved_global, saved_per_op = _global_backend, dict(_per_op)
    _per_op[op] = name
    try:
        yield
    finally:
        _restore(saved_global, saved_per_op)


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


def resolve(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` for tensors on ``device`` now (``torch`` = the reference)."""
    device = torch.device(device)
    name = _per_op.get(op, _global_backend)
    if name == "torch":
        return "torch"
    if name != "auto":
        if op not in _provider(name)[0]:
            _warn_once(f"{name}:{op}", f"trm.ops: backend {name!r} has no {op} kernel; {op} runs the PyTorch reference")
            return "torch"
        if not _device_ok(name, device):
            raise RuntimeError(f"kernel backend {name!r} was requested for {op} but its input is on {device}"
                               + (" (Triton runs CPU tensors only under TRITON_INTERPRET=1)" if name == "triton" else ""))
        ok, reason = available(name)
        if not ok:
            raise RuntimeError(f"kernel backend {name!r} was requested for {op} but cannot run here: {reason}")
        return name
    if torch.compiler.is_compiling():
        if device.type == "cpu":
            # under torch.compile on CPU, inductor fuses the reference's elementwise ops into the
            # matmuls' neighbours; an opaque C++ op would cut those fusions (measured in
            # benchmarks/test_bench_e2e.py: 0.79x of the plain model compiled), so auto traces the reference
            return "torch"
        return _chosen_eagerly.get((op, device.type), "torch")   # baselines and verification need eager code
    chosen = _chosen_eagerly[(op, device.type)] = _auto_choice(op, device)[0]
    return chosen


def _auto_choice(op: str, device: torch.device, explain: bool = False) -> tuple[str, str]:
    """``(backend, why)`` ``auto`` runs ``op`` on ``device`` with now (``why`` only with ``explain``):
    the first candidate that the baseline backs, that is available and that verification accepts."""
    candidates = AUTO_ORDER.get(op, {}).get(device.type, ())
    if not candidates:
        return "torch", f"no kernel of {op} is a candidate on {device.type}" if explain else ""
    skipped: dict[str, list[str]] = {}    # why -> the candidates it kept out
    for candidate in candidates:
        evidence = baselines.evidence(candidate, op, device)
        if not evidence.backed:
            if explain:
                skipped.setdefault(evidence.why, []).append(candidate)
            continue
        ok, reason = available(candidate)
        if not ok:
            _warn_once(f"auto:{candidate}", f"trm.ops: kernel backend {candidate!r} is unavailable ({reason}); "
                                            f"'auto' uses the next candidate or the PyTorch reference")
            skipped.setdefault(f"unavailable ({reason})", []).append(candidate)
            continue
        kernel = _provider(candidate)[0].get(op)
        if kernel is None or not _device_ok(candidate, device):
            skipped.setdefault(f"takes no {device.type} tensors for {op}", []).append(candidate)
            continue
        refused = verify.refusal(candidate, op, kernel, device.type)
        if refused is None:
            return candidate, f"verified on {device.type}, {evidence.why}" if explain else ""
        _warn_once(f"auto:verify:{candidate}:{op}:{device.type}",
                   f"trm.ops: 'auto' refuses the {candidate} {op} kernel on {device.type}: {refused}; "
                   f"it uses the next candidate or the PyTorch reference")
        skipped.setdefault(f"refused by verification: {refused}", []).append(candidate)
    return "torch", "; ".join(f"{'/'.join(names)} kernel not used, {why}" for why, names in skipped.items())


def _select(op: str, t: torch.Tensor) -> Callable:
    name = resolve(op, t.device)
    return _REFERENCE[op] if name == "torch" else _provider(name)[0][op]


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def describe() -> dict[str, dict[str, str]]:
    """Per op and device type (CPU, and CUDA when visible): what runs now and why, e.g.
    ``"cpu kernel: verified on cpu, baseline cpu-...-1t: 1.20x-2.28x the reference in its 4 entries"``
    or ``"reference: cuda/triton kernel not used, no baseline for nvidia-h200 in ...; record one: ..."``."""
    out: dict[str, dict[str, str]] = {}
    for op in OPS:
        out[op] = {}
        for dev in _devices():
            out[op][dev] = _explain(op, torch.device(dev))
    return out


def _explain(op: str, device: torch.device) -> str:
    name = _per_op.get(op, _global_backend)
    if name == "torch":
        return "reference: kernels=torch"
    if name == "auto":
        backend, why = _auto_choice(op, device, explain=True)
        return f"{'reference' if backend == 'torch' else backend + ' kernel'}: {why}"
    if op not in _provider(name)[0]:
        return f"reference: {name} has no {op} kernel"
    try:
        return f"{resolve(op, device)} kernel: kernels={name}"
    except RuntimeError as exc:
        return f"error: {exc}"


def summary(device: torch.device | str) -> str:
    """What runs on ``device`` in a few words: ``"cpu: rms_norm, stablemax_cross_entropy, swiglu; the
    rest the reference"``; when nothing but the reference runs under ``auto``, the main reason."""
    device = torch.device(device)
    by_backend: dict[str, list[str]] = {}
    for op in OPS:
        name = _per_op.get(op, _global_backend)
        try:
            lacks = name in NATIVE_BACKENDS and op not in _provider(name)[0]   # (resolve would warn)
            by_backend.setdefault("torch" if lacks else resolve(op, device), []).append(op)
        except RuntimeError:
            by_backend.setdefault("error", []).append(op)
    kernels = [f"{backend}: {', '.join(names)}" for backend, names in by_backend.items() if backend != "torch"]
    if kernels:
        return "; ".join(kernels) + ("; the rest the reference" if "torch" in by_backend else "")
    if "auto" in (_global_backend, *_per_op.values()):
        path, why = baselines.locate(device)
        if path is None:
            return f"the reference ({why.split(';')[0]}; trm.ops.describe() says more)"
    return "the reference"


def verify_candidates() -> dict[tuple[str, str, str], dict]:
    """Verify every available candidate of ``AUTO_ORDER`` on every visible device type now, backed by
    a baseline or not (``benchmarks/device_check.sh``: does auto trust each kernel here?); returns
    ``verify.report()``."""
    for op, order in AUTO_ORDER.items():
        for dev in _devices():
            for candidate in order.get(dev, ()):
                device = torch.device(dev)
                if available(candidate)[0] and op in _provider(candidate)[0] and _device_ok(candidate, device):
                    verify.refusal(candidate, op, _provider(candidate)[0][op], dev)
    return verify.report()


# ---------------------------------------------------------------------------------------------
# The front doors: the reference signatures
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Weightless RMSNorm of ``x + residual`` (or ``x``) over ``dim``, fp32 inside, ``x.dtype`` out."""
    return _select("rms_norm", x)(x, eps, dim, residual)


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                            ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` (float64 result); 0 where the label is ignored."""
    return _select("stablemax_cross_entropy", logits_BLV)(logits_BLV, labels_BL, ignore_index)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` (``F.linear``): every linear layer of the model."""
    return _select("linear", x)(x, weight, bias)


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


def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float,
               weight_decay: float) -> None:
    """In-place AdamATan2 update of same-device, same-dtype tensor lists at step ``step`` (>= 1)."""
    if not params:
        return
    _select("adam_atan2", params[0])(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr,
                                     beta1=beta1, beta2=beta2, weight_decay=weight_decay)
