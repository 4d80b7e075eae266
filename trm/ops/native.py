"""The native kernels of ``trm.ops``: C++ CPU and CUDA C++ (``csrc/``), as ``torch.ops.trm.*``.

Loading (``load()``; importing this module loads and builds nothing):

1. ``import trm._C``: the extension ``setup.py`` built ahead of time (``pip install
   --no-build-isolation -e .``), CPU kernels plus CUDA kernels when a toolkit was found;
2. else (no ``trm._C``, or it is older than a file under ``csrc/``, or ``TRM_FORCE_JIT=1``) a JIT
   build with ninja (``torch.utils.cpp_extension.load``, cached in torch's extension dir) of the
   CPU sources, plus the CUDA sources when a GPU is visible and a toolkit is found
   (``csrc/build_config.py`` holds the flags both paths share).

Then the fake (meta) and autograd implementations of every op are registered (below) and a small
self-check against ``trm.ops.reference`` runs (on the GPU too, the first time ``available_cuda()``
is asked). Nothing here raises: a failure makes the backend unavailable, with the reason in
``status()`` and in ``available_cpu()`` / ``available_cuda()``.

The dispatcher (``trm.ops.dispatch``) uses ``IMPLS_CPU`` / ``IMPLS_CUDA``: op name -> function
with the front-door signature of ``trm.ops.reference``. Each function runs the kernel for the
inputs it supports (float32/float16/bfloat16 tensors on its device; adam_atan2: float32,
contiguous) and hands anything else (float64, other devices, shapes the kernel does not take)
to the reference, so it never returns a wrong answer and never raises for a legal input.
``rms_norm`` runs the forward-only kernel (no rstd saved) when no gradient is needed.

Ops (``torch.ops.trm.<name>``; schemas in ``csrc/trm_ops.cpp``): rms_norm_fwd, rms_norm_fwd_only,
rms_norm_bwd, swiglu_fwd, swiglu_bwd, stablemax_ce_fwd, stablemax_ce_bwd, adam_atan2.

Test:   python -m pytest tests/test_ops_cpu.py tests/test_ops_cuda_build.py -q
Timing: python -m trm.ops.native --bench [--device cuda]   (median ms, kernel vs reference)
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from trm.ops import reference

log = logging.getLogger("trm.ops")

NATIVE_OPS = ("rms_norm_fwd", "rms_norm_fwd_only", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd",
              "stablemax_ce_fwd", "stablemax_ce_bwd", "adam_atan2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
BUILD_HINT = ("build it with: pip install torch 'setuptools>=77' wheel ninja pybind11 && "
              "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .")

_lock = threading.RLock()
_registered = False
_state: dict = {
    "status": "not loaded",   # not loaded | ok | unavailable
    "reason": None,           # why unavailable
    "source": None,           # "aot" (trm._C) | "jit"
    "build_s": None,          # seconds to import / build + load
    "cuda_built": False,      # CUDA kernels registered
    "cuda_archs": None,       # arch list they were built for
    "cuda_status": "not checked",  # not checked | ok | unavailable
    "cuda_reason": None,
    "notes": [],              # e.g. why trm._C was not used
}


# ---------------------------------------------------------------------------------------------
# Building / loading
# ---------------------------------------------------------------------------------------------

def _build_config():
    """``csrc/build_config.py`` as a module, or None (no sources: a non-editable install)."""
    path = CSRC / "build_config.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("trm_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, sources: list[str], with_cuda: bool = False,
           build_directory: str | None = None) -> tuple[bool, str | None]:
    """JIT-build and load the library ``name`` from ``sources``; ``(ok, reason)``, never raises.

    ``build_directory``: default torch's extension cache (``TORCH_EXTENSIONS_DIR``,
    ``~/.cache/torch_extensions``), where ninja rebuilds only what changed.
    """
    try:
        from torch.utils.cpp_extension import load as _load

        for src in sources:
            if not os.path.exists(src):
                return False, f"source file missing: {src}"
        cfg = _build_config()
        cflags = list(cfg.CXX_FLAGS) + cfg.isystem_flags() if cfg else ["-O3"]
        cuda_flags: list[str] = []
        if with_cuda and cfg is not None:
            arch_flags, arch_list = cfg.cuda_arch_flags(ahead_of_time=False)
            cuda_flags = list(cfg.NVCC_FLAGS) + arch_flags + cfg.isystem_flags()
            macros = cfg.macros(True, arch_list)
            _state["cuda_archs"] = arch_list
        else:
            macros = cfg.macros(False, "") if cfg else []
        defines = [f"-D{k}={v}" for k, v in macros]
        _load(name=name, sources=sources, extra_cflags=cflags + defines,
              extra_cuda_cflags=cuda_flags + defines if with_cuda else None,
              is_python_module=False, build_directory=build_directory,
              verbose=os.environ.get("TRM_JIT_VERBOSE") == "1")
        return True, None
    except Exception as exc:  # noqa: BLE001 -- any build/load failure means "unavailable"
        msg = str(exc).strip().splitlines()
        tail = " | ".join(msg[-6:]) if msg else ""
        return False, f"{type(exc).__name__}: {tail}"


def _aot_stale(module_file: str) -> str | None:
    """Why the ahead-of-time library is older than its sources, or None."""
    cfg = _build_config()
    if cfg is None:
        return None
    built = os.path.getmtime(module_file)
    newer = [f for f in cfg.all_source_files() if os.path.getmtime(f) > built]
    if newer:
        return f"trm._C ({module_file}) is older than {os.path.relpath(newer[0], CSRC.parent)}"
    return None


def _import_aot() -> tuple[bool, str | None]:
    try:
        import trm._C as ext
    except Exception as exc:  # noqa: BLE001 -- e.g. built against another torch
        return False, f"import trm._C failed ({type(exc).__name__}: {exc})"
    _state["source"] = "aot"
    _state["cuda_built"] = bool(ext.with_cuda)
    _state["cuda_archs"] = ext.cuda_archs.replace("_", ";") if ext.with_cuda else None
    if not ext.with_cuda:
        _state["cuda_reason"] = ("trm._C was built without CUDA kernels (no CUDA toolkit at build time, "
                                 "or TRM_SKIP_CUDA_BUILD=1); " + BUILD_HINT)
    return True, None


def _load_library() -> tuple[bool, str | None]:
    """Load ``trm._C`` or JIT-build; fills ``_state`` source/cuda fields."""
    notes = _state["notes"]
    spec = None
    if os.environ.get("TRM_FORCE_JIT") == "1":
        notes.append("TRM_FORCE_JIT=1: trm._C not used")
    else:
        spec = importlib.util.find_spec("trm._C")
        stale = _aot_stale(spec.origin) if spec is not None and spec.origin else None
        if spec is None:
            notes.append("trm._C is not built (pure-Python install)")
        elif stale:
            notes.append(stale + ": JIT-building the current sources instead (reinstall to refresh trm._C)")
            log.warning("trm.ops: %s", notes[-1])
        else:
            ok, why = _import_aot()
            if ok:
                return True, None
            spec = None
            notes.append(why + "; JIT-building instead")
            log.warning("trm.ops: %s", notes[-1])
    ok, reason = _load_jit()
    if not ok and spec is not None:      # the JIT build failed: the older trm._C beats nothing
        notes.append(f"JIT build failed ({reason}); using the older trm._C")
        log.warning("trm.ops: %s", notes[-1])
        return _import_aot()
    return ok, reason


def _load_jit() -> tuple[bool, str | None]:
    cfg = _build_config()
    if cfg is None:
        return False, f"trm._C is unavailable and the csrc/ sources are not here to JIT-build; {BUILD_HINT}"
    with_cuda = False
    if torch.cuda.is_available():
        home, why = cfg.cuda_toolkit()
        with_cuda = home is not None
        if not with_cuda:
            _state["cuda_reason"] = f"JIT build without CUDA kernels: {why}"
    else:
        _state["cuda_reason"] = "no CUDA device is visible"
    sources = cfg.cpu_sources() + (cfg.cuda_sources() if with_cuda else [])
    ok, reason = _build("trm_ops_jit_cuda" if with_cuda else "trm_ops_jit_cpu", sources, with_cuda)
    if ok:
        _state["source"] = "jit"
        _state["cuda_built"] = with_cuda
    return ok, reason


def load() -> bool:
    """Load/build (first call only), register, self-check; True when the native CPU kernels are usable."""
    if _state["status"] == "ok":
        return True
    if _state["status"] == "unavailable":
        return False
    with _lock:
        if _state["status"] != "not loaded":
            return _state["status"] == "ok"
        t0 = time.perf_counter()
        ok, reason = _load_library()
        _state["build_s"] = time.perf_counter() - t0
        if ok:
            try:
                _register_python_side()
                _state["status"] = "checking"
                reason = _self_check("cpu")
            except Exception as exc:  # noqa: BLE001
                reason = f"registration/self-check raised {type(exc).__name__}: {exc}"
        if reason is None:
            _state["status"] = "ok"
            log.info("trm native kernels ready (%s, %.1fs; CUDA kernels: %s)", _state["source"], _state["build_s"],
                     _state["cuda_built"])
            return True
        _state["status"], _state["reason"] = "unavailable", reason
        log.warning("trm native kernels unavailable: %s", reason)
        return False


def _cuda_registered() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"trm::{op}", "CUDA") for op in NATIVE_OPS)


def available_cpu() -> tuple[bool, str | None]:
    """``(True, None)`` when the C++ CPU kernels run here, else ``(False, reason)``. Never raises."""
    try:
        if not load():
            return False, _state["reason"]
        return True, None
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def available_cuda() -> tuple[bool, str | None]:
    """``(True, None)`` when the CUDA kernels run here (built, GPU visible, self-check passed)."""
    try:
        if not load():
            return False, _state["reason"]
        if _state["cuda_status"] == "ok":
            return True, None
        if _state["cuda_status"] == "unavailable":
            return False, _state["cuda_reason"]
        with _lock:
            if not (_state["cuda_built"] and _cuda_registered()):
                reason = _state["cuda_reason"] or "the trm extension has no CUDA kernels; " + BUILD_HINT
            elif not torch.cuda.is_available():
                reason = "no CUDA device is visible (torch.cuda.is_available() is False)"
            else:
                _state["cuda_status"] = "checking"
                try:
                    reason = _self_check("cuda")
                except Exception as exc:  # noqa: BLE001
                    reason = f"CUDA self-check raised {type(exc).__name__}: {exc}"
            _state["cuda_status"] = "ok" if reason is None else "unavailable"
            _state["cuda_reason"] = reason
            return reason is None, reason
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def available() -> tuple[bool, str | None]:
    """Alias of ``available_cpu()``."""
    return available_cpu()


def status() -> dict:
    """A copy of the loader state (see ``_state``): ``status``, ``reason``, ``source``, ``cuda_*`` ..."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _state.items()}


# ---------------------------------------------------------------------------------------------
# Fake (meta) and autograd registrations
# ---------------------------------------------------------------------------------------------

def _rows(x: torch.Tensor, dim: int) -> int:
    dim = dim % x.dim()
    return math.prod(s for d, s in enumerate(x.shape) if d != dim)


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    lib = "trm::"

    @torch.library.register_fake(lib + "rms_norm_fwd")
    def _(x, residual, dim, eps):
        return torch.empty_like(x), x.new_empty((_rows(x, dim),), dtype=torch.float32)

    @torch.library.register_fake(lib + "rms_norm_fwd_only")
    def _(x, residual, dim, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "rms_norm_bwd")
    def _(grad_y, y, rstd, dim):
        return torch.empty_like(y)

    @torch.library.register_fake(lib + "swiglu_fwd")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake(lib + "swiglu_bwd")
    def _(grad_out, gate_up):
        return gate_up.new_empty(gate_up.shape)

    @torch.library.register_fake(lib + "stablemax_ce_fwd")
    def _(logits, labels, ignore_index):
        return logits.new_empty(logits.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(lib + "stablemax_ce_bwd")
    def _(grad_loss, logits, labels, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "adam_atan2")
    def _(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, weight_decay):
        return None

    # rms_norm: ds = rstd * (dy - y * mean(dy * y)) is the gradient of x and of residual alike
    def rms_setup(ctx, inputs, output):
        x, residual, dim, _eps = inputs
        y, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(y, rstd)
        ctx.dim, ctx.has_residual = dim, residual is not None

    def rms_backward(ctx, grad_y, _grad_rstd):
        y, rstd = ctx.saved_tensors
        ds = torch.ops.trm.rms_norm_bwd(grad_y, y, rstd, ctx.dim)
        return (ds if ctx.needs_input_grad[0] else None,
                ds if ctx.has_residual and ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd(lib + "rms_norm_fwd", rms_backward, setup_context=rms_setup)

    # the forward-only variant saves nothing; if a gradient is asked of it anyway, recompute
    def rms_only_setup(ctx, inputs, output):
        x, residual, dim, eps = inputs
        ctx.save_for_backward(x, residual)
        ctx.dim, ctx.eps, ctx.has_residual = dim, eps, residual is not None

    def rms_only_backward(ctx, grad_y):
        x, residual = ctx.saved_tensors
        y, rstd = torch.ops.trm.rms_norm_fwd(x.detach(), residual.detach() if ctx.has_residual else None,
                                             ctx.dim, ctx.eps)
        ds = torch.ops.trm.rms_norm_bwd(grad_y, y, rstd, ctx.dim)
        return (ds if ctx.needs_input_grad[0] else None,
                ds if ctx.has_residual and ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd(lib + "rms_norm_fwd_only", rms_only_backward, setup_context=rms_only_setup)

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def swiglu_backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return torch.ops.trm.swiglu_bwd(grad_out, gate_up)

    torch.library.register_autograd(lib + "swiglu_fwd", swiglu_backward, setup_context=swiglu_setup)

    def ce_setup(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index

    def ce_backward(ctx, grad_loss):
        logits, labels = ctx.saved_tensors
        return torch.ops.trm.stablemax_ce_bwd(grad_loss, logits, labels, ctx.ignore_index), None, None

    torch.library.register_autograd(lib + "stablemax_ce_fwd", ce_backward, setup_context=ce_setup)

    # The backward kernels are not differentiable: a second-order gradient through them raises
    # (without a registration autograd would only warn and return zeros).
    def no_double_backward(op):
        def backward(ctx, *grads):
            raise RuntimeError(f"trm::{op} is a backward kernel with no backward of its own: higher-order "
                               f"gradients through the native kernels are not supported; use kernels=torch")
        return backward

    for op in ("rms_norm_bwd", "swiglu_bwd", "stablemax_ce_bwd"):
        torch.library.register_autograd(lib + op, no_double_backward(op), setup_context=lambda ctx, inputs, output: None)
    _registered = True


# ---------------------------------------------------------------------------------------------
# Implementations with the front-door signatures
# ---------------------------------------------------------------------------------------------

def _ensure(device_type: str) -> None:
    if device_type == "cpu":
        if _state["status"] in ("ok", "checking") or load():
            return
        raise RuntimeError(f"trm native CPU kernels are unavailable: {_state['reason']}")
    if _state["cuda_status"] in ("ok", "checking"):
        return
    ok, reason = available_cuda()
    if not ok:
        raise RuntimeError(f"trm native CUDA kernels are unavailable: {reason}")


def _float_on(t: torch.Tensor, device_type: str) -> bool:
    return t.device.type == device_type and t.dtype in FLOAT_DTYPES


def _make_impls(device_type: str) -> dict[str, Callable]:
    def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Weightless RMSNorm of ``x + residual`` over ``dim`` (any strides, no transpose copy)."""
        if (not _float_on(x, device_type) or x.dim() == 0 or x.numel() == 0 or not -x.dim() <= dim < x.dim()
                or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                              or residual.device != x.device))):
            return reference.rms_norm(x, eps, dim, residual)
        _ensure(device_type)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
        if needs_grad:
            return torch.ops.trm.rms_norm_fwd(x, residual, dim, float(eps))[0]
        return torch.ops.trm.rms_norm_fwd_only(x, residual, dim, float(eps))

    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of the packed ``gate_up = [gate, up]`` (last dim)."""
        if not _float_on(gate_up, device_type) or gate_up.dim() == 0 or gate_up.numel() == 0 or gate_up.shape[-1] % 2:
            return reference.swiglu(gate_up)
        _ensure(device_type)
        return torch.ops.trm.swiglu_fwd(gate_up)

    def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                                ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
        """Per-token stablemax cross-entropy, float64 dtype like the reference (float32 values)."""
        if (not _float_on(logits_BLV, device_type) or logits_BLV.dim() == 0 or logits_BLV.shape[-1] == 0
                or labels_BL.device != logits_BLV.device or labels_BL.dtype not in (torch.int64, torch.int32)
                or labels_BL.shape != logits_BLV.shape[:-1]):
            return reference.stablemax_cross_entropy(logits_BLV, labels_BL, ignore_index)
        _ensure(device_type)
        if device_type != "cpu":
            reference.check_labels(labels_BL, logits_BLV.shape[-1], ignore_index)  # the CPU kernel checks itself
        return torch.ops.trm.stablemax_ce_fwd(logits_BLV, labels_BL, int(ignore_index)).to(torch.float64)

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
            return reference.adam_atan2(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                                        beta2=beta2, weight_decay=weight_decay)
        _ensure(device_type)
        with torch.no_grad():
            torch.ops.trm.adam_atan2(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), int(step),
                                     float(lr), float(beta1), float(beta2), float(weight_decay))

    return {"rms_norm": rms_norm, "swiglu": swiglu, "stablemax_cross_entropy": stablemax_cross_entropy,
            "adam_atan2": adam_atan2}


IMPLS_CPU: dict[str, Callable] = _make_impls("cpu")
IMPLS_CUDA: dict[str, Callable] = _make_impls("cuda")
# the pre-dispatcher names (CPU)
rms_norm = IMPLS_CPU["rms_norm"]
stablemax_cross_entropy = IMPLS_CPU["stablemax_cross_entropy"]


# ---------------------------------------------------------------------------------------------
# Self-check (tiny; once per process and device)
# ---------------------------------------------------------------------------------------------

def _self_check(device_type: str) -> str | None:
    """Each op vs the reference on tiny float32 inputs (incl. the transposed mlp_t view); a reason on failure."""
    impls = IMPLS_CPU if device_type == "cpu" else IMPLS_CUDA
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device_type)

    def close(a, b, rtol, atol):
        return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))

    base, res = rand(2, 5, 12), rand(2, 12, 5)
    for x, r in ((base, None), (base.transpose(1, 2), res)):  # last axis; mlp_t view + residual
        a = x.detach().clone().requires_grad_(True) if r is None else x.detach().requires_grad_(True)
        b = x.detach().clone().requires_grad_(True)
        ya, yb = impls["rms_norm"](a, 1e-5, -1, r), reference.rms_norm(b, 1e-5, -1, r)
        dy = rand(*ya.shape)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        with torch.no_grad():
            y_nograd = impls["rms_norm"](x, 1e-5, -1, r)
        if not (close(ya, yb, 1e-5, 1e-6) and close(a.grad, b.grad, 1e-4, 1e-5) and close(y_nograd, yb, 1e-5, 1e-6)):
            return f"self-check failed ({device_type}): rms_norm differs from the reference"
    gu = rand(3, 4, 10).requires_grad_(True)
    gu_ref = gu.detach().clone().requires_grad_(True)
    out, out_ref = impls["swiglu"](gu), reference.swiglu(gu_ref)
    out.sum().backward()
    out_ref.sum().backward()
    if not (close(out, out_ref, 1e-5, 1e-6) and close(gu.grad, gu_ref.grad, 1e-5, 1e-6)):
        return f"self-check failed ({device_type}): swiglu differs from the reference"
    logits = rand(4, 7, 11) * 3
    labels = torch.randint(0, 11, (4, 7), generator=g).to(device_type)
    labels[1, 2] = reference.IGNORE_LABEL_ID
    la, lb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_a, loss_b = impls["stablemax_cross_entropy"](la, labels), reference.stablemax_cross_entropy(lb, labels)
    loss_a.sum().backward()
    loss_b.sum().backward()
    if not (close(loss_a, loss_b, 1e-6, 1e-7) and close(la.grad, lb.grad, 1e-5, 1e-7)):
        return f"self-check failed ({device_type}): stablemax_cross_entropy differs from the reference"
    params = [rand(37), rand(3, 5)]
    states = [[p.clone() for p in params] for _ in range(2)]
    grads = [rand(*p.shape) for p in params]
    for k, fn in enumerate((impls["adam_atan2"], reference.adam_atan2)):
        ps, ms, vs = states[k], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        for t in (1, 2):
            fn(ps, grads, ms, vs, step=t, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    if not all(close(a, b, 1e-6, 1e-7) for a, b in zip(*states)):
        return f"self-check failed ({device_type}): adam_atan2 differs from the reference"
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _median_ms(fn, repeats: int, device_type: str, warmup: int = 3) -> float:
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def bench(repeats: int = 21, device_type: str = "cpu", dtype: torch.dtype = torch.float32,
          batch: int = 64) -> dict[str, tuple[float, float]]:
    """Median ms ``{name: (native_ms, reference_ms)}`` on the shapes of a TRM step (batch x 97 x 512)."""
    ok, reason = available_cpu() if device_type == "cpu" else available_cuda()
    if not ok:
        raise RuntimeError(f"trm native {device_type} kernels are unavailable: {reason}")
    impls = IMPLS_CPU if device_type == "cpu" else IMPLS_CUDA
    dev = torch.device(device_type)
    B, L, D, V = batch, 97, 512, 11
    out: dict[str, tuple[float, float]] = {}

    def pair(name, make_fn, *args):
        out[name] = tuple(_median_ms(make_fn(fn), repeats, device_type, *args)
                          for fn in (impls[name.split()[0]], getattr(reference, name.split()[0])))

    x = torch.randn(B, L, D, device=dev, dtype=dtype)
    r = torch.randn(B, L, D, device=dev, dtype=dtype)
    leaf = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)

    def rms_train(fn):
        def run():
            leaf.grad = None
            fn(leaf, 1e-5, -1, r).backward(dy)
        return run

    def rms_nograd(fn):
        def run():
            with torch.no_grad():
                fn(x, 1e-5, -1, r)
        return run

    xt = x.transpose(1, 2)                                   # the mlp_t view (B, D, L), norm over L
    rt = torch.randn(B, D, L, device=dev, dtype=dtype)

    def rms_mlp_t(fn):
        def run():
            with torch.no_grad():
                fn(xt, 1e-5, -1, rt)
        return run

    sfx = f"{B}x{L}x{D} {str(dtype).replace('torch.', '')}"
    pair(f"rms_norm fwd+bwd residual {sfx}", rms_train)
    pair(f"rms_norm no-grad residual {sfx}", rms_nograd)
    pair(f"rms_norm no-grad mlp_t view {sfx}", rms_mlp_t)
    gu = torch.randn(B, L, 2 * 4 * D // 3 // 2 * 2, device=dev, dtype=dtype).requires_grad_(True)

    def swiglu_train(fn):
        def run():
            gu.grad = None
            fn(gu).sum().backward()
        return run

    pair(f"swiglu fwd+bwd {tuple(gu.shape)} {sfx.split()[1]}", swiglu_train)
    logits = (torch.randn(B, 81, V, device=dev, dtype=dtype) * 3).requires_grad_(True)
    labels = torch.randint(0, V, (B, 81), device=dev)
    labels[:, :5] = reference.IGNORE_LABEL_ID

    def ce_train(fn):
        def run():
            logits.grad = None
            fn(logits, labels).sum().backward()
        return run

    pair(f"stablemax_cross_entropy fwd+bwd {B}x81x{V}", ce_train)
    shapes = [(512, 512)] * 8 + [(1536, 512)] * 4 + [(10, 512), (512,)]
    ps = [torch.randn(s, device=dev) for s in shapes]
    gs = [torch.randn(s, device=dev) for s in shapes]
    ms = [torch.zeros(s, device=dev) for s in shapes]
    vs = [torch.zeros(s, device=dev) for s in shapes]

    def adam(fn):
        def run():
            fn(ps, gs, ms, vs, step=3, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
        return run

    pair(f"adam_atan2 step {sum(math.prod(s) for s in shapes) / 1e6:.1f}M params", adam)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m trm.ops.native [--bench] [--device cpu|cuda] [--dtype bfloat16]``."""
    import argparse

    p = argparse.ArgumentParser(description="Load (or build) the trm native kernels; optionally time them.")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    t = time.perf_counter()
    ok = load()
    print(f"load: {ok} in {time.perf_counter() - t:.1f}s; cuda: {available_cuda()}; threads={torch.get_num_threads()}")
    print(status())
    if ok and args.bench:
        for name, (nat, ref) in bench(args.repeats, args.device, getattr(torch, args.dtype), args.batch).items():
            print(f"{name}: native {nat:.3f} ms, reference {ref:.3f} ms, reference/native {ref / nat:.2f}x")


if __name__ == "__main__":
    main()
