"""The native C++ CPU kernels (``csrc/cpu/trm_ops_cpu.cpp``), JIT-built on first use.

``load()`` builds the extension with ``torch.utils.cpp_extension.load`` (ninja, ``-O3``, cached
in torch's extension dir, so only the first build in a fresh cache pays the compile), registers
the fake (meta) and autograd implementations of ``torch.ops.trm.*`` and runs a small self-check
against the PyTorch reference. It never raises: on any failure the kernels are "unavailable",
the reason is logged once and kept in ``status()``. Importing this module builds nothing.

Wrappers with the reference signatures:

- ``rms_norm(x, eps, dim=-1)``: native for float32/float16/bfloat16 over the last dim; any
  other dim or dtype runs the reference.
- ``stablemax_cross_entropy(logits, labels, ignore_index=-100)``: native for
  float32/float16/bfloat16 logits (float64 math inside, float32 per-token loss, returned as
  float64 like the reference); float64 logits run the reference (bit-exact float64 contract).

Both require CPU tensors (the dispatcher in ``trm.ops.dispatch`` only routes CPU tensors here).

Timing: ``python -c "from trm.ops import native; native.main(['--bench'])"`` (median of repeats, native vs reference).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from trm.ops import reference

log = logging.getLogger("trm.ops")

EXT_NAME = "trm_ops_cpu"
SOURCES = [str(Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "trm_ops_cpu.cpp")]
NATIVE_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.RLock()
_state: dict = {"status": "not loaded", "reason": None, "build_s": None}


def _build(name: str, sources: list[str]) -> tuple[bool, str | None]:
    """Build + load the extension ``name``; ``(ok, reason)``, never raises."""
    try:
        from torch.utils.cpp_extension import load as _load

        for src in sources:
            if not os.path.exists(src):
                return False, f"source file missing: {src}"
        _load(name=name, sources=sources, extra_cflags=["-O3"], is_python_module=False, verbose=False)
        return True, None
    except Exception as exc:  # noqa: BLE001 -- any build/load failure means "unavailable"
        msg = str(exc).strip().splitlines()
        tail = " | ".join(msg[-6:]) if msg else ""
        return False, f"{type(exc).__name__}: {tail}"


def _register_python_side() -> None:
    """Fake (meta) + autograd implementations of the ops defined by the C++ library."""

    @torch.library.register_fake("trm::rms_norm_fwd")
    def _rms_norm_fwd_fake(x, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("trm::rms_norm_bwd")
    def _rms_norm_bwd_fake(grad_y, y, rstd):
        return y.new_empty(y.shape)

    @torch.library.register_fake("trm::stablemax_ce_fwd")
    def _stablemax_ce_fwd_fake(logits, labels, ignore_index):
        return logits.new_empty(logits.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("trm::stablemax_ce_bwd")
    def _stablemax_ce_bwd_fake(grad_loss, logits, labels, ignore_index):
        return logits.new_empty(logits.shape)

    def _rms_setup(ctx, inputs, output):
        y, rstd = output
        ctx.save_for_backward(y, rstd)

    def _rms_backward(ctx, grad_y, grad_rstd):
        # rstd is a by-product saved for backward; a gradient flowing into it is not supported.
        y, rstd = ctx.saved_tensors
        if grad_y is None:
            return None, None
        return torch.ops.trm.rms_norm_bwd(grad_y, y, rstd), None

    torch.library.register_autograd("trm::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)

    def _ce_setup(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index

    def _ce_backward(ctx, grad_loss):
        logits, labels = ctx.saved_tensors
        return torch.ops.trm.stablemax_ce_bwd(grad_loss, logits, labels, ctx.ignore_index), None, None

    torch.library.register_autograd("trm::stablemax_ce_fwd", _ce_backward, setup_context=_ce_setup)


def _self_check() -> str | None:
    """Tiny native-vs-reference comparison, forward and backward; a reason string on failure."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g, dtype=torch.float32)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ya = rms_norm(a, 1e-5)
    yb = reference.rms_norm(b, 1e-5)
    dy = torch.randn(ya.shape, generator=g)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    if not torch.allclose(ya, yb, rtol=1e-5, atol=1e-6) or not torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5):
        return "self-check failed: rms_norm differs from the reference"
    logits = torch.randn(4, 7, 11, generator=g) * 3
    logits[0, 0, :3] = torch.tensor([0.0, 1.0, -1.0])
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[1, 2] = reference.IGNORE_LABEL_ID
    la = logits.clone().requires_grad_(True)
    lb = logits.clone().requires_grad_(True)
    loss_a = stablemax_cross_entropy(la, labels)
    loss_b = reference.stablemax_cross_entropy(lb, labels)
    w = torch.rand(loss_a.shape, generator=g, dtype=torch.float64)
    (loss_a * w).sum().backward()
    (loss_b * w).sum().backward()
    if not torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7) or not torch.allclose(la.grad, lb.grad, rtol=1e-5, atol=1e-7):
        return "self-check failed: stablemax_cross_entropy differs from the reference"
    return None


def load() -> bool:
    """Build (first call only), register and self-check; True when the native kernels are usable."""
    if _state["status"] == "ok":
        return True
    if _state["status"] == "unavailable":
        return False
    with _lock:
        if _state["status"] != "not loaded":
            return _state["status"] == "ok"
        t0 = time.perf_counter()
        ok, reason = _build(EXT_NAME, SOURCES)
        _state["build_s"] = time.perf_counter() - t0
        if ok:
            try:
                _register_python_side()
                _state["status"] = "checking"
                reason = _self_check()
            except Exception as exc:  # noqa: BLE001
                reason = f"registration/self-check raised {type(exc).__name__}: {exc}"
        if reason is None:
            _state["status"] = "ok"
            log.info("trm native CPU kernels ready (build/load %.1fs)", _state["build_s"])
            return True
        _state["status"], _state["reason"] = "unavailable", reason
        log.warning("trm native CPU kernels unavailable: %s", reason)
        return False


def available() -> bool:
    """Alias of ``load()``."""
    return load()


def status() -> dict:
    """``{"status": "not loaded"|"ok"|"unavailable", "reason": str|None, "build_s": float|None}``."""
    return dict(_state)


# ---------------------------------------------------------------------------------------------
# Wrappers with the reference signatures
# ---------------------------------------------------------------------------------------------

def _ready() -> None:
    if _state["status"] not in ("ok", "checking") and not load():
        raise RuntimeError(f"trm native CPU kernels are unavailable: {_state['reason']}")


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """Weightless RMSNorm; native over the last dim for float32/16/bf16, else the reference."""
    if x.dim() == 0 or dim not in (-1, x.dim() - 1) or x.dtype not in NATIVE_FLOAT_DTYPES:
        return reference.rms_norm(x, eps, dim)
    _ready()
    return torch.ops.trm.rms_norm_fwd(x, float(eps))[0]


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                            ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token stablemax CE (float64 dtype like the reference); native for float32/16/bf16 logits."""
    if logits_BLV.dtype not in NATIVE_FLOAT_DTYPES:
        return reference.stablemax_cross_entropy(logits_BLV, labels_BL, ignore_index)
    _ready()
    return torch.ops.trm.stablemax_ce_fwd(logits_BLV, labels_BL, int(ignore_index)).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def bench(repeats: int = 21) -> dict[str, tuple[float, float]]:
    """Median ms of fwd+bwd, ``{name: (native_ms, reference_ms)}``, on the shapes of a TRM step."""
    if not load():
        raise RuntimeError(f"trm native CPU kernels are unavailable: {_state['reason']}")
    g = torch.Generator().manual_seed(0)
    out = {}
    leaf = torch.randn(64, 97, 512, generator=g).requires_grad_(True)
    dy = torch.randn(64, 97, 512, generator=g)

    def rms(fn):
        leaf.grad = None
        fn(leaf, 1e-5).backward(dy)

    out["rms_norm fwd+bwd 64x97x512 fp32"] = (_median_ms(lambda: rms(rms_norm), repeats),
                                               _median_ms(lambda: rms(reference.rms_norm), repeats))
    logits = (torch.randn(64, 81, 11, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, 11, (64, 81), generator=g)
    labels[:, :5] = reference.IGNORE_LABEL_ID

    def ce(fn):
        logits.grad = None
        fn(logits, labels).sum().backward()

    out["stablemax_ce fwd+bwd 64x81x11 fp32"] = (_median_ms(lambda: ce(stablemax_cross_entropy), repeats),
                                                  _median_ms(lambda: ce(reference.stablemax_cross_entropy), repeats))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -c "from trm.ops import native; native.main(['--bench'])"``."""
    import argparse

    p = argparse.ArgumentParser(description="Build/load the trm native CPU kernels; optionally time them.")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    t = time.perf_counter()
    ok = load()
    print(f"load: {ok} in {time.perf_counter() - t:.1f}s; {status()}; threads={torch.get_num_threads()}")
    if ok and args.bench:
        for name, (nat, ref) in bench(args.repeats).items():
            print(f"{name}: native {nat:.3f} ms, reference {ref:.3f} ms, reference/native {ref / nat:.2f}x")


if __name__ == "__main__":
    main()
