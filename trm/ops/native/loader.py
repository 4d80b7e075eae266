"""Building, loading and checking the native extension (``torch.ops.trm.*``); the ops' glue is
in the per-op modules next to this one.

Loading (``load()``; importing this module loads and builds nothing):

1. ``import trm._C``: the extension ``setup.py`` built ahead of time (``pip install
   --no-build-isolation -e .``), CPU kernels plus CUDA kernels when a toolkit was found;
2. else (no ``trm._C``, or it is older than a file under ``csrc/``, or ``TRM_FORCE_JIT=1``) a JIT
   build with ninja (``torch.utils.cpp_extension.load``, cached in torch's extension dir) of the
   CPU sources, plus the CUDA sources when a GPU is visible and a toolkit is found
   (``csrc/build_config.py`` holds the flags both paths share).

Then every op module's ``register()`` adds the fake (meta) and autograd implementations and its
``self_check()`` compares the kernels with ``trm.ops.reference`` on tiny inputs (on the GPU too,
the first time ``available_cuda()`` is asked). Nothing here raises: a failure makes the backend
unavailable, with the reason in ``status()`` and in ``available_cpu()`` / ``available_cuda()``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import torch

from trm.ops import counters

log = logging.getLogger("trm.ops")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CSRC = Path(__file__).resolve().parents[3] / "csrc"
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
                _register_all()
                _state["status"] = "checking"
                reason = _self_check_all("cpu")
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
    from trm.ops.native import NATIVE_OPS

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
                    reason = _self_check_all("cuda")
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
# The per-op modules: registrations, self-checks, and what their front doors call
# ---------------------------------------------------------------------------------------------

def _register_all() -> None:
    """Every op module's fake and autograd registrations, once per process."""
    global _registered
    if _registered:
        return
    from trm.ops.native import OP_MODULES

    for module in OP_MODULES:
        module.register()
    _registered = True


def _self_check_all(device_type: str) -> str | None:
    """Each op module's ``self_check`` on ``device_type``; the first failure's reason, or None.
    Gradients are enabled for the checks: the first native call may come from a ``torch.no_grad``
    region (the model's no-grad cycles), and the checks run backward."""
    from trm.ops.native import IMPLS_CPU, IMPLS_CUDA, OP_MODULES

    impls = IMPLS_CPU if device_type == "cpu" else IMPLS_CUDA
    with torch.enable_grad():
        for module in OP_MODULES:
            if module.OP not in impls:       # an op without a kernel for this device type (linear: CPU only)
                continue
            reason = module.self_check(impls[module.OP], device_type)
            if reason is not None:
                return reason
    return None


def register_backward_kernel(op: str) -> None:
    """Make a second-order gradient through backward kernel ``trm::<op>`` raise (without a
    registration autograd would only warn and return zeros)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"trm::{op} is a backward kernel with no backward of its own: higher-order "
                           f"gradients through the native kernels are not supported; use kernels=torch")

    torch.library.register_autograd(f"trm::{op}", backward, setup_context=lambda ctx, inputs, output: None)


def ensure(device_type: str) -> None:
    """Load the kernels for ``device_type`` (``cpu`` | ``cuda``) or raise with the reason."""
    if device_type == "cpu":
        if _state["status"] in ("ok", "checking") or load():
            return
        raise RuntimeError(f"trm native CPU kernels are unavailable: {_state['reason']}")
    if _state["cuda_status"] in ("ok", "checking"):
        return
    ok, reason = available_cuda()
    if not ok:
        raise RuntimeError(f"trm native CUDA kernels are unavailable: {reason}")


def launch(file: str, kernel: str, *args):
    """``torch.ops.trm.<kernel>(*args)``, counted in ``trm.ops.counters`` as ``<file>/<kernel>`` of the
    backend named by its first tensor's device (``cpu`` | ``cuda``)."""
    first = next(a[0] if isinstance(a, (list, tuple)) else a for a in args
                 if isinstance(a, torch.Tensor) or (isinstance(a, (list, tuple)) and a))
    counters.launched(first.device.type, f"{file}/{kernel}")
    return getattr(torch.ops.trm, kernel)(*args)


def float_on(t: torch.Tensor, device_type: str) -> bool:
    """Whether ``t`` is a float32/float16/bfloat16 tensor on ``device_type`` (what the kernels take)."""
    return t.device.type == device_type and t.dtype in FLOAT_DTYPES


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """Same shape and ``allclose`` in float64 (the self-checks' comparison)."""
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))
