"""Run-time verification of the kernels ``auto`` may pick (``trm.ops.dispatch.AUTO_ORDER``).

Before ``auto`` lets a backend run an op on a device type, it runs that backend's op there on
every input dtype the model may feed it (float32, float16, bfloat16; adam_atan2: float32) and
every layout the model uses, forward and gradient:

    rms_norm                 last axis; last axis + residual; mlp_t's sequence axis (a strided
                             view) + residual; a middle axis; forward only (no grad)
    swiglu                   packed [gate, up]; forward only
    linear                   x @ W^T; with a bias; mlp_t's sequence axis (a strided view); forward only
    stablemax_cross_entropy  int64 labels with ignored positions; int32 labels
    apply_rope               q and k as views of a packed qkv, fp32 tables
    attention                [B, L, H, K] views of a packed qkv, head dim 32
    adam_atan2               two steps over a matrix and a vector (float32, weight decay on)

and compares it with a float64 evaluation of the same formula under the tests' error rule
(DESIGN.md, "Ops"): the kernel's max error is at most twice the max error of the PyTorch
reference run at the same precision, plus ``ULPS`` ulps of the output dtype at the output's scale
(the references of some ops compute in float64, so their own error can be below the kernel's
float32 rounding); NaN never passes. A planted 0.1% error is 1000x the float32 bound. A case the kernel does not take (its front door hands it to the reference, seen in
``trm.ops.counters``) is recorded as such, not failed: the reference is what runs for it. The
first failing case refuses the (backend, op, device type) with a reason that names the dtype,
the layout, the output and the error against its bound; ``auto`` then tries its next candidate.
Results are cached per process; ``report()`` lists them. Inputs are tiny (milliseconds per op on
a GPU or in the C++ CPU kernels).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import torch

from trm.ops import counters, reference

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5
ULPS = 4

_lock = threading.RLock()
_results: dict[tuple[str, str, str], dict] = {}


# ---------------------------------------------------------------------------------------------
# float64 truths (the references compute some ops in float32; the truth must not)
# ---------------------------------------------------------------------------------------------

def _rms_norm64(x, eps, dim=-1, residual=None):
    s = x.double() + (residual.double() if residual is not None else 0.0)
    return s * torch.rsqrt(s.square().mean(dim, keepdim=True) + eps)


def _truth(op: str) -> Callable:
    return _rms_norm64 if op == "rms_norm" else getattr(reference, op)


# ---------------------------------------------------------------------------------------------
# Cases: (layout name, inputs builder(dtype, device, generator) -> (args, kwargs, grad_args))
# ---------------------------------------------------------------------------------------------

def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _rms_cases():
    yield "last axis", lambda g: ((_randn(g, 3, 7, 64, scale=2.0, shift=0.3), EPS, -1, None), (0,))
    yield "last axis + residual", lambda g: ((_randn(g, 3, 7, 64), EPS, -1, _randn(g, 3, 7, 64)), (0, 3))
    yield "mlp_t sequence axis (strided view) + residual", lambda g: (
        (_randn(g, 2, 9, 16, shift=0.2).transpose(1, 2), EPS, -1, _randn(g, 2, 16, 9)), (0, 3))
    yield "middle axis", lambda g: ((_randn(g, 2, 9, 16), EPS, 1, None), (0,))
    yield "forward only", lambda g: ((_randn(g, 3, 7, 64), EPS, -1, _randn(g, 3, 7, 64)), ())


def _swiglu_cases():
    yield "packed gate|up", lambda g: ((_randn(g, 3, 7, 48, scale=2.0),), (0,))
    yield "forward only", lambda g: ((_randn(g, 3, 7, 48, scale=2.0),), ())


def _linear_cases():
    yield "x @ W^T", lambda g: ((_randn(g, 3, 7, 48), _randn(g, 20, 48, scale=0.15), None), (0, 1))
    yield "x @ W^T + bias", lambda g: ((_randn(g, 3, 7, 48), _randn(g, 20, 48, scale=0.15), _randn(g, 20)), (0, 1, 2))
    yield "mlp_t sequence axis (strided view)", lambda g: (
        (_randn(g, 2, 9, 16).transpose(1, 2), _randn(g, 24, 9, scale=0.3), None), (0, 1))
    yield "forward only", lambda g: ((_randn(g, 3, 7, 48), _randn(g, 20, 48, scale=0.15), None), ())


def _stablemax_cases():
    def labels(g, dtype):
        lab = torch.randint(0, 11, (3, 7), generator=g)
        lab[0, :2] = reference.IGNORE_LABEL_ID
        return lab.to(dtype)
    yield "int64 labels, ignored positions", lambda g: ((_randn(g, 3, 7, 11, scale=3.0), labels(g, torch.int64)), (0,))
    yield "int32 labels", lambda g: ((_randn(g, 3, 7, 11, scale=3.0), labels(g, torch.int32)), (0,))


def _rope_tables(L, K):
    inv = 1.0 / (10000 ** (torch.arange(0, K, 2, dtype=torch.float64) / K))
    angles = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rope_cases():
    def build(g):
        qkv = _randn(g, 2, 9, 3 * 2, 32)
        cos, sin = _rope_tables(9, 32)
        return (qkv[:, :, :2], qkv[:, :, 2:4], cos, sin), (0, 1)
    yield "q, k views of packed qkv", build


def _attention_cases():
    def build(g):
        qkv = _randn(g, 1, 20, 3 * 2, 32)
        return (qkv[:, :, :2], qkv[:, :, 2:4], qkv[:, :, 4:]), (0, 1, 2)
    yield "views of packed qkv, head dim 32", build


CASES: dict[str, Callable[[], Iterator]] = {
    "rms_norm": _rms_cases, "swiglu": _swiglu_cases, "linear": _linear_cases, "stablemax_cross_entropy": _stablemax_cases,
    "apply_rope": _rope_cases, "attention": _attention_cases,
}
FLOAT_ARGS = {"apply_rope": (0, 1)}  # only these float args take the case's dtype (rope tables stay fp32)


# ---------------------------------------------------------------------------------------------
# The error rule
# ---------------------------------------------------------------------------------------------

def _bound(dtype: torch.dtype, truth: torch.Tensor, plain: torch.Tensor) -> tuple[float, float]:
    """(the plain implementation's max error, the kernel's allowed max error)."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    plain_err = (plain.double() - truth).abs().max().item() if truth.numel() else 0.0
    return plain_err, 2.0 * plain_err + ULPS * torch.finfo(dtype).eps * scale


def _compare(what: str, got: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> str | None:
    if got.shape != truth.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    if torch.isnan(got).any():
        return f"{what}: NaN"
    plain_err, bound = _bound(dtype, truth, plain)
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    if not err <= bound:
        return f"{what}: max error {err:.3g} > bound {bound:.3g} (2 x the reference's {plain_err:.3g} + {ULPS} ulp)"
    return None


def _cast_args(op: str, args: tuple, dtype: torch.dtype, device: torch.device, grad_args: tuple) -> tuple:
    floats = FLOAT_ARGS.get(op)
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                target = dtype if floats is None or i in floats else (torch.float32 if dtype != torch.float64 else dtype)
                # keep the view's strides: cast the base, then take the same view
                t = _same_view(a, target, device)
                if i in grad_args:
                    t.requires_grad_(True)
            else:
                t = a.to(device)
            out.append(t)
        else:
            out.append(a)
    return tuple(out)


def _same_view(a: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``a`` in ``dtype`` on ``device`` with the same strides (a strided view stays a strided view)."""
    base = torch.empty_strided(a.shape, a.stride(), dtype=dtype, device=device)
    with torch.no_grad():
        base.copy_(a)
    return base


def _outputs(fn: Callable, args: tuple, grad_args: tuple, cotangents: list[torch.Tensor] | None):
    """Forward outputs and (with grad_args) the gradients of sum(out * cotangent) w.r.t. them."""
    if not grad_args:
        with torch.no_grad():
            out = fn(*args)
        return [o.detach() for o in (out if isinstance(out, tuple) else (out,))], []
    out = fn(*args)
    outs = list(out if isinstance(out, tuple) else (out,))
    total = sum((o.double() * c.to(o.device).double()).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(total, [args[i] for i in grad_args])
    return [o.detach() for o in outs], list(grads)


def _check_case(op: str, impl: Callable, device: torch.device, dtype: torch.dtype, layout: str,
                build: Callable, backend: str) -> tuple[str, str | None]:
    """('kernel' | 'reference runs', None) or (..., reason)."""
    g = torch.Generator().manual_seed(1234)
    args64, grad_args = build(g)
    truth_args = _cast_args(op, args64, torch.float64, device, grad_args)
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(_truth(op), truth_args, (), None)[0]]
    cots = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]
    truth_out, truth_grads = _outputs(_truth(op), truth_args, grad_args, cots)
    plain_out, plain_grads = _outputs(getattr(reference, op), _cast_args(op, args64, dtype, device, grad_args), grad_args, cots)
    with counters.record() as seen:
        got_out, got_grads = _outputs(impl, _cast_args(op, args64, dtype, device, grad_args), grad_args, cots)
    ran = bool(seen.kernels(backend))
    if not ran:
        return "reference runs", None
    names = [f"output {i}" for i in range(len(truth_out))] + [f"gradient of input {i}" for i in grad_args]
    for name, got, plain, truth in zip(names, got_out + got_grads, plain_out + plain_grads, truth_out + truth_grads):
        reason = _compare(name, got, plain, truth, dtype)
        if reason is not None:
            return "kernel", f"{str(dtype).removeprefix('torch.')}, {layout}: {reason}"
    return "kernel", None


def _check_adam(impl: Callable, device: torch.device, backend: str) -> tuple[str, str | None]:
    g = torch.Generator().manual_seed(1234)
    shapes = [(5, 3), (4,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * 0.1 for s in shapes] for _ in range(2)]

    def run(fn, dtype):
        p = [t.to(device, dtype).clone() for t in init]
        m = [torch.zeros_like(t) for t in p]
        v = [torch.zeros_like(t) for t in p]
        for step, gs in enumerate(grads, start=1):
            fn(p, [t.to(device, dtype) for t in gs], m, v, step=step, lr=0.01, beta1=0.9, beta2=0.95, weight_decay=0.1)
        return p + m + v

    truth = run(reference.adam_atan2, torch.float64)
    plain = run(reference.adam_atan2, torch.float32)
    with counters.record() as seen:
        got = run(impl, torch.float32)
    if not seen.kernels(backend):
        return "reference runs", None
    for i, (a, b, t) in enumerate(zip(got, plain, truth)):
        reason = _compare(f"state tensor {i}", a, b, t, torch.float32)
        if reason is not None:
            return "kernel", f"float32, two steps: {reason}"
    return "kernel", None


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _device(device_type: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)


def run(backend: str, op: str, impl: Callable, device_type: str) -> dict:
    """Verify ``impl`` (``backend``'s ``op``) on ``device_type`` now: ``{"refused": reason | None,
    "cases": {"<dtype>, <layout>": "kernel" | "reference runs" | "WRONG"}}`` (not cached)."""
    device = _device(device_type)
    cases: dict[str, str] = {}
    # the first use may come from inside no_grad / inference_mode (a model's no-grad cycles, the
    # service): the gradient cases need autograd whatever the caller's mode
    with torch.inference_mode(False), torch.enable_grad():
        return _run_cases(backend, op, impl, device, cases)


def _run_cases(backend: str, op: str, impl: Callable, device: torch.device, cases: dict[str, str]) -> dict:
    try:
        if op == "adam_atan2":
            ran, reason = _check_adam(impl, device, backend)
            cases["float32, two steps"] = "WRONG" if reason else ran
            return {"refused": reason, "cases": cases}
        if op not in CASES:
            return {"refused": f"no verification cases for {op}", "cases": cases}
        for dtype in FLOATS:
            for layout, build in CASES[op]():
                ran, reason = _check_case(op, impl, device, dtype, layout, build, backend)
                cases[f"{str(dtype).removeprefix('torch.')}, {layout}"] = "WRONG" if reason else ran
                if reason is not None:
                    return {"refused": reason, "cases": cases}
    except Exception as exc:  # noqa: BLE001 -- a kernel that raises on a legal input is refused too
        return {"refused": f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "cases": cases}
    return {"refused": None, "cases": cases}


def refusal(backend: str, op: str, impl: Callable, device_type: str) -> str | None:
    """Why ``auto`` must not use ``backend``'s ``op`` on ``device_type`` (None: verified). Runs the
    verification on the first call per (backend, op, device type); inside a ``torch.compile``
    trace an unverified kernel is refused (verification needs eager execution;
    ``set_backend("auto")`` verifies up front for that reason)."""
    key = (backend, op, device_type)
    result = _results.get(key)
    if result is None:
        if torch.compiler.is_compiling():
            return "not verified before torch.compile traced it (call trm.ops.set_backend('auto') first)"
        with _lock:
            result = _results.get(key)
            if result is None:
                result = _results[key] = run(backend, op, impl, device_type)
    return result["refused"]


def report() -> dict[tuple[str, str, str], dict]:
    """Every verification run so far: (backend, op, device type) -> ``run()``'s result."""
    return {k: {"refused": v["refused"], "cases": dict(v["cases"])} for k, v in _results.items()}


def forget() -> None:
    """Drop the cached results (tests; a later use verifies again)."""
    with _lock:
        _results.clear()
