"""Native kernels (``torch.ops.trm.*``, ``csrc/``) vs the PyTorch reference, on the CPU.

Run: ``python -m pytest tests/test_ops_cpu.py -q`` (after ``pip install --no-build-isolation -e .``,
which builds ``trm._C``; without it the first run JIT-builds the CPU kernels, a few minutes).
A failed build FAILS these tests: building here is expected to work.

Error rule (DESIGN.md, "Ops"): against a float64 reference, the kernel's max error is at most 2x
the max error of the plain PyTorch implementation run at the same precision (for float16 and
bfloat16 that is the formula evaluated in that dtype; for float32, ``trm.ops.reference``); NaN
never passes. The floor is one ulp of the output dtype at the output's scale (``ulp_floor``):
storing the result costs up to half of that whatever the kernel, and on small tensors the plain
error can be luckily smaller. The loss is within 1e-6 relative of the float64 formula. Random inputs
come from the test's seed (tests/conftest.py; a failure names it, TRM_TEST_SEED=N redraws them).

The ``check_*`` helpers take a device: ``tests/test_ops_cuda_build.py`` runs them on a GPU.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import proves_kernels_ran
from trm.ops import counters, native, reference
from trm.ops.native import loader as native_loader

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RMS_SHAPES = [(5, 97, 512), (3, 916, 64), (7, 3, 11), (1, 7)]


def ulp_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """One ulp of ``dtype`` at the scale of ``ref`` (the error rule's floor, see the module doc)."""
    return torch.finfo(dtype).eps * ref.abs().max().item() if ref.numel() else 0.0


@pytest.fixture(scope="module", autouse=True)
def built():
    ok = native.load()
    assert ok, f"native extension failed to build/load: {native.status()['reason']}"


def impls(device: str) -> dict:
    return native.IMPLS_CPU if device == "cpu" else native.IMPLS_CUDA


def fresh_gen() -> torch.Generator:
    """A generator drawn from torch's global one, which conftest seeds per test."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def randn(shape, g, device, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dtype)


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN never passes"
    return (a.double() - ref64).abs().max().item() if a.numel() else 0.0


def assert_error_rule(kernel_out, plain_out, ref64, what: str, floor: float = 0.0):
    e_kernel, e_plain = max_err(kernel_out, ref64), max_err(plain_out, ref64)
    assert e_kernel <= 2 * e_plain + floor, f"{what}: kernel err {e_kernel:.3e} > 2 x plain err {e_plain:.3e} + {floor:.1e}"


class OpLog(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher (``trm.rms_norm_fwd_only.default``...)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

def plain_rms(x, eps, dim=-1, residual=None):
    """The formula in the inputs' own dtype (the 'plain PyTorch at the same precision' baseline)."""
    s = x if residual is None else x + residual
    return s * torch.rsqrt(s.square().mean(dim, keepdim=True) + eps)


def rms_inputs(layout: str, shape, device, dtype, with_residual: bool, g):
    """(x, residual, dim): 'last' = contiguous, norm over the last axis; 'mlp_t' = the transposed
    view (B, D, L) of a contiguous (B, L, D) tensor, norm over L, residual contiguous (B, D, L);
    'dim1' = contiguous, norm over axis 1."""
    if layout == "mlp_t":
        B, L, D = shape
        x = randn((B, L, D), g, device, dtype, 2.0, 0.3).transpose(1, 2)
        r = randn((B, D, L), g, device, dtype) if with_residual else None
        return x, r, -1
    x = randn(shape, g, device, dtype, 2.0, 0.3)
    r = randn(shape, g, device, dtype) if with_residual else None
    return x, r, (1 if layout == "dim1" else -1)


@proves_kernels_ran(lambda device, *a, **k: device, "rms_norm", "rms_norm", "rms_norm_fwd", "rms_norm_bwd")
def check_rms_norm(device, dtype, layout, shape, with_residual):
    """Forward and backward of impls(device)['rms_norm'] under the error rule; residual grad == x grad."""
    g = fresh_gen()
    x, r, dim = rms_inputs(layout, shape, device, dtype, with_residual, g)
    runs = {}
    for name, fn, cast in (("kernel", impls(device)["rms_norm"], dtype), ("plain", plain_rms, dtype),
                           ("fp64", plain_rms, torch.float64)):
        xl = x.detach().to(cast).requires_grad_(True)
        rl = r.detach().to(cast).requires_grad_(True) if r is not None else None
        y = fn(xl, EPS, dim, rl)
        runs[name] = (y, xl, rl)
    y = runs["kernel"][0]
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == torch.empty_like(x).stride()
    ref = runs["fp64"][0].detach()
    assert_error_rule(y.detach(), runs["plain"][0].detach(), ref, f"rms_norm fwd {layout} {dtype}",
                      ulp_floor(dtype, ref))
    dy = randn(x.shape, g, device)
    for name, (yy, _, _) in runs.items():
        yy.backward(dy.to(yy.dtype))
    kx, px, fx = (runs[n][1].grad for n in ("kernel", "plain", "fp64"))
    s64 = x.double() + (r.double() if r is not None else 0)
    rstd64 = torch.rsqrt(s64.square().mean(dim, keepdim=True) + EPS)
    assert kx.dtype == dtype
    # scale: the terms before the cancellation in rstd * (dy - y mean(dy y))
    assert_error_rule(kx, px, fx, f"rms_norm bwd {layout} {dtype}", ulp_floor(dtype, rstd64 * dy.double()))
    if r is not None:
        assert torch.equal(runs["kernel"][2].grad, kx), "d residual must equal d x"


@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+res"])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_last_axis(dtype, shape, with_residual):
    check_rms_norm("cpu", dtype, "last", shape, with_residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+res"])
@pytest.mark.parametrize("shape", [(5, 97, 512), (3, 916, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_mlp_t_transposed_view(dtype, shape, with_residual):
    check_rms_norm("cpu", dtype, "mlp_t", shape, with_residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_other_axis(dtype):
    check_rms_norm("cpu", dtype, "dim1", (3, 91, 40), True)


def test_rms_norm_transposed_view_runs_without_copy():
    """The mlp_t call reads the transposed view in place: no aten::copy_/clone/contiguous inside."""
    from torch.profiler import ProfilerActivity, profile

    base = torch.randn(3, 97, 64)
    x, r = base.transpose(1, 2), torch.randn(3, 64, 97)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y, _ = torch.ops.trm.rms_norm_fwd(x, r, -1, EPS)
    names = {e.name for e in prof.events()}
    assert "trm::rms_norm_fwd" in names
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous"}, names
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, reference.rms_norm(x, EPS, -1, r), rtol=1e-5, atol=1e-6)
    # a layout whose rows do not fold into one stride falls back to one copy, and stays right
    odd = base[:, ::2, :]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y_odd, _ = torch.ops.trm.rms_norm_fwd(odd, None, -1, EPS)
    assert "aten::copy_" in {e.name for e in prof.events()}
    torch.testing.assert_close(y_odd, reference.rms_norm(odd, EPS), rtol=1e-5, atol=1e-6)


@proves_kernels_ran(lambda device, *a, **k: device, "rms_norm", "rms_norm", "rms_norm_fwd", "rms_norm_fwd_only")
def check_forward_only(device):
    """no_grad (or no input needing grad) runs rms_norm_fwd_only; with grad, rms_norm_fwd."""
    g = fresh_gen()
    x, r, dim = rms_inputs("mlp_t", (2, 13, 24), device, torch.float32, True, g)
    fn = impls(device)["rms_norm"]
    expected = reference.rms_norm(x, EPS, dim, r)
    for grad_mode, needs in ((False, True), (True, False), (True, True)):
        xl = x.detach().requires_grad_(needs)
        with torch.set_grad_enabled(grad_mode), OpLog() as log:
            y = fn(xl, EPS, dim, r)
        ops = [n for n in log.names if n.startswith("trm.")]
        want = "trm.rms_norm_fwd.default" if grad_mode and needs else "trm.rms_norm_fwd_only.default"
        assert ops == [want], (grad_mode, needs, log.names)
        assert y.requires_grad == (grad_mode and needs)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # a gradient asked of the forward-only op anyway is still right (it recomputes)
    xl = x.detach().requires_grad_(True)
    y = torch.ops.trm.rms_norm_fwd_only(xl, r, dim, EPS)
    y.sum().backward()
    xr = x.detach().requires_grad_(True)
    reference.rms_norm(xr, EPS, dim, r).sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_rms_norm_forward_only_under_no_grad():
    check_forward_only("cpu")


def test_self_checks_pass_when_first_called_under_no_grad():
    """The first native call may come from the model's no-grad cycles; the load-time self-checks
    run backward, so they must enable gradients themselves (else the kernels load as unavailable)."""
    with torch.no_grad():
        assert native_loader._self_check_all("cpu") is None


def test_rms_norm_routes_unsupported_inputs_to_reference():
    fn = native.IMPLS_CPU["rms_norm"]
    x64 = torch.randn(4, 9, dtype=torch.float64)
    with counters.record() as seen:
        assert torch.equal(fn(x64, EPS), reference.rms_norm(x64, EPS))
        x = torch.randn(4, 9)
        r16 = torch.randn(4, 9, dtype=torch.float16)              # mixed dtypes: the reference's promotion
        assert torch.equal(fn(x, EPS, -1, r16), reference.rms_norm(x, EPS, -1, r16))
        rb = torch.randn(1, 9)                                    # broadcast residual
        assert torch.equal(fn(x, EPS, -1, rb), reference.rms_norm(x, EPS, -1, rb))
    assert not seen.launches, seen                                # each fell back, and says so:
    assert seen.fell_back("cpu", "rms_norm") == ["float64[4, 9] cpu", "float32[4, 9] cpu, float16[4, 9] cpu",
                                                 "float32[4, 9] cpu, float32[1, 9] cpu"]
    with pytest.raises(IndexError):                               # bad dim: the reference's error
        fn(x, EPS, 2)
    with OpLog() as log:
        fn(x, EPS, 0)                                             # a legal other axis runs the kernel
    assert log.names == ["trm.rms_norm_fwd_only.default"]


def test_rms_norm_kernel_errors_are_clear():
    with pytest.raises(RuntimeError, match="residual has shape"):
        torch.ops.trm.rms_norm_fwd(torch.randn(3, 4), torch.randn(3, 5), -1, EPS)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.trm.rms_norm_fwd(torch.randn(3, 4, dtype=torch.float64), None, -1, EPS)
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.trm.rms_norm_fwd(torch.randn(3, 0), None, -1, EPS)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------

@proves_kernels_ran(lambda device, *a, **k: device, "swiglu", "swiglu", "swiglu_fwd", "swiglu_bwd")
def check_swiglu(device, dtype, shape, transposed=False):
    g = fresh_gen()
    gu = randn(shape, g, device, dtype, 2.0)
    if transposed:                                                # a non-contiguous gate_up
        gu = gu.transpose(0, 1).contiguous().transpose(0, 1)
    runs = {}
    for name, fn, cast in (("kernel", impls(device)["swiglu"], dtype), ("plain", reference.swiglu, dtype),
                           ("fp64", reference.swiglu, torch.float64)):
        leaf = gu.detach().to(cast).requires_grad_(True)
        runs[name] = (fn(leaf), leaf)
    out = runs["kernel"][0]
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    ref = runs["fp64"][0].detach()
    assert_error_rule(out.detach(), runs["plain"][0].detach(), ref, f"swiglu fwd {dtype}", ulp_floor(dtype, ref))
    dout = randn(out.shape, g, device)
    for o, _ in runs.values():
        o.backward(dout.to(o.dtype))
    kg, pg, fg = (runs[n][1].grad for n in ("kernel", "plain", "fp64"))
    assert kg.dtype == dtype and kg.shape == gu.shape
    assert_error_rule(kg, pg, fg, f"swiglu bwd {dtype}", ulp_floor(dtype, fg))


@pytest.mark.parametrize("shape", [(5, 97, 1024), (3, 916, 128), (7, 3, 22), (4, 9, 600)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu(dtype, shape):
    check_swiglu("cpu", dtype, shape)


def test_swiglu_bfloat16_rounds_once_and_keeps_special_values():
    """bfloat16 runs float blocks (widen, the float32 loop, narrow with round-to-nearest-even): each
    output is the float32 formula rounded once (within half a bfloat16 step), and NaN / inf go through
    as the formula says (the narrowing is written on the bits, so these are worth pinning)."""
    g = torch.Generator().manual_seed(5)
    gu = (torch.randn(6, 2 * 300, generator=g) * 4).to(torch.bfloat16)   # 300: a block of 256 and a tail
    gu[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -100.0])
    gu[0, 300:304] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    out = torch.ops.trm.swiglu_fwd(gu)
    want = reference.swiglu(gu.float())
    assert torch.isnan(out[0, 0]) and out[0, 1] == float("inf")      # silu(inf) * 2 = inf
    assert torch.isnan(out[0, 2]) and torch.isnan(want[0, 2])        # silu(-inf) = -inf * 0: nan, as the formula
    assert abs(out[0, 3].item()) < 1e-30                              # silu(-100) * 3: 0 to float precision
    finite = torch.isfinite(want)
    step = 0.51 * torch.finfo(torch.bfloat16).eps * want.abs() + 1e-30   # half a step (+ a floor: exp clamps at -87)
    assert ((out.float() - want).abs()[finite] <= step[finite]).all(), "bfloat16 swiglu is not one rounding of the float32 formula"
    dout = torch.randn(6, 300, generator=g).to(torch.bfloat16)
    grad = torch.ops.trm.swiglu_bwd(dout, gu)
    leaf = gu.float().requires_grad_(True)
    reference.swiglu(leaf).backward(dout.float())
    fin = torch.isfinite(leaf.grad)
    fin[0, :4] = False
    tol = torch.finfo(torch.bfloat16).eps * leaf.grad.abs() + 1e-30
    assert ((grad.float() - leaf.grad).abs()[fin] <= 2 * tol[fin]).all(), "bfloat16 swiglu backward drifts from float32"
    assert torch.isnan(grad[0, 0]) and torch.isnan(grad[0, 300])


def test_swiglu_non_contiguous_and_routing():
    check_swiglu("cpu", torch.float32, (6, 5, 18), transposed=True)
    fn = native.IMPLS_CPU["swiglu"]
    gu64 = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(fn(gu64), reference.swiglu(gu64))
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.trm.swiglu_fwd(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------
# Linear (oneDNN's GEMMs, trm/ops/native/linear.py)
# ---------------------------------------------------------------------------------------------

LINEAR_CASES = {                      # name -> (x shape, out features, bias, x a transposed view)
    "hidden 5x81x128->128": ((5, 81, 128), 128, False, False),
    "mlp_t 4x128x81->64 (seq axis view)": ((4, 128, 81), 64, False, True),
    "bias 3x7x12->5": ((3, 7, 12), 5, True, False),
    "vector 12->5": ((12,), 5, True, False),
}


def linear_numerics(x_shape, n_out, bias, strided):
    """Forward and the three gradients of the cpu linear under the error rule (fp32, no floor
    beyond one ulp at the output's scale)."""
    g = fresh_gen()
    K = x_shape[-1]
    if strided:                        # mlp_t: x is the (B, D, L) view of a contiguous (B, L, D) tensor
        x = randn((x_shape[0], x_shape[2], x_shape[1]), g, "cpu").transpose(1, 2)
    else:
        x = randn(x_shape, g, "cpu")
    w = randn((n_out, K), g, "cpu", scale=K ** -0.5)
    b = randn((n_out,), g, "cpu") if bias else None
    runs = {}
    for name, fn, cast in (("kernel", native.IMPLS_CPU["linear"], torch.float32),
                           ("plain", reference.linear, torch.float32), ("fp64", reference.linear, torch.float64)):
        leaves = [t.detach().to(cast).requires_grad_(True) if t is not None else None for t in (x, w, b)]
        runs[name] = (fn(*leaves), leaves)
    y = runs["kernel"][0]
    assert y.dtype == torch.float32 and y.shape == (*x_shape[:-1], n_out)
    ref = runs["fp64"][0].detach()
    assert_error_rule(y.detach(), runs["plain"][0].detach(), ref, "linear fwd", ulp_floor(torch.float32, ref))
    dy = randn(y.shape, g, "cpu")
    for out, _ in runs.values():
        out.backward(dy.to(out.dtype))
    for i, what in enumerate(("x", "weight", "bias")):
        if i == 2 and not bias:
            continue
        kg, pg, fg = (runs[n][1][i].grad for n in ("kernel", "plain", "fp64"))
        assert kg.shape == (x, w, b)[i].shape
        assert_error_rule(kg, pg, fg, f"linear grad {what}", ulp_floor(torch.float32, fg))


check_linear = proves_kernels_ran("cpu", "linear", "linear", "onednn_fwd", "onednn_dgrad")(linear_numerics)


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear(case):
    check_linear(*LINEAR_CASES[case])


def test_a_planted_0_1_percent_error_in_the_linear_kernels_fails_its_test(monkeypatch):
    """The check above catches a GEMM that is 0.1% off, in the forward and in the input gradient."""
    from trm.ops.native import linear as native_linear

    real = native_linear._gemm
    for wrong in ("onednn_fwd", "onednn_dgrad"):
        monkeypatch.setattr(native_linear, "_gemm", lambda a, w, b, what, wrong=wrong: real(a, w, b, what) * (
            1.001 if what == wrong else 1.0))
        with pytest.raises(AssertionError, match="kernel err"):
            check_linear(*LINEAR_CASES["hidden 5x81x128->128"])
    monkeypatch.setattr(native_linear, "_gemm", real)
    check_linear(*LINEAR_CASES["hidden 5x81x128->128"])


@pytest.mark.parametrize("x_shape, n_out, ran", [
    ((5, 81, 128), 1024, {"onednn_fwd"}),          # gate|up: the input gradient sums 1024 terms
    ((5, 81, 512), 128, {"onednn_dgrad"}),         # down: the forward sums 512 terms
    ((5, 81, 256), 512, set()),                    # both over 128: the reference, said as a fallback
], ids=["gate_up", "down", "wide"])
def test_linear_leaves_dot_products_over_128_terms_to_mkl(x_shape, n_out, ran):
    """oneDNN's single-pass sums over more than MAX_INNER terms have 1.5-2.7x MKL's max error, over
    the error rule: those GEMMs run MKL's (the reference's), and the layer stays within the rule."""
    from trm.ops.native import linear as native_linear

    assert native_linear.MAX_INNER == 128
    with counters.record() as seen:
        linear_numerics(x_shape, n_out, False, False)
    assert {k.split("/")[1] for k in seen.kernels("cpu")} == ran, seen
    assert bool(seen.fell_back("cpu", "linear")) == (not ran), seen


def test_linear_gradients_are_computed_only_where_asked():
    """The model's frozen input (the embeddings' output under no grad) and a frozen weight."""
    fn = native.IMPLS_CPU["linear"]
    x, w = torch.randn(6, 16), torch.randn(8, 16, requires_grad=True)
    with counters.record() as seen:
        fn(x, w).sum().backward()
    assert seen.ran("cpu", "linear", "onednn_fwd") and not seen.ran("cpu", "linear", "onednn_dgrad")
    torch.testing.assert_close(w.grad, torch.ones(6, 8).t() @ x)
    x.requires_grad_(True)
    w2 = w.detach()
    with counters.record() as seen:
        fn(x, w2).sum().backward()
    assert seen.ran("cpu", "linear", "onednn_dgrad")
    torch.testing.assert_close(x.grad, torch.ones(6, 8) @ w2)


@pytest.mark.parametrize("what", ["float64", "float16", "bfloat16", "empty", "no features"])
def test_linear_routes_unsupported_inputs_to_the_reference_and_says_so(what):
    fn = native.IMPLS_CPU["linear"]
    x, w = torch.randn(3, 4, 16), torch.randn(5, 16)
    if what in ("float64", "float16", "bfloat16"):
        x, w = x.to(getattr(torch, what)), w.to(getattr(torch, what))
    elif what == "empty":
        x = torch.randn(0, 4, 16)
    else:
        x, w = torch.randn(3, 0), torch.randn(5, 0)
    with counters.record() as seen:
        y = fn(x, w)
    assert not seen.launches and seen.fell_back("cpu", "linear"), seen
    assert torch.equal(y, reference.linear(x, w))


def test_linear_with_mixed_dtypes_raises_as_the_reference_does():
    with counters.record() as seen, pytest.raises(RuntimeError):
        native.IMPLS_CPU["linear"](torch.randn(3, 16), torch.randn(5, 16, dtype=torch.float64))
    assert seen.fell_back("cpu", "linear") and not seen.launches


# ---------------------------------------------------------------------------------------------
# Stablemax cross-entropy
# ---------------------------------------------------------------------------------------------

def stablemax_ce64(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """float64 loss and analytic gradient of -log(s(v_y) / sum_j s(v_j)), written from the spec."""
    v = logits.double()
    neg = v < 0
    s = torch.where(neg, 1.0 / (1.0 - torch.where(neg, v, 0.0)), torch.where(neg, 0.0, v) + 1.0)
    ds = torch.where(neg, s * s, 1.0)
    total = s.sum(-1, keepdim=True)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    s_y = s.gather(-1, safe[..., None])[..., 0]
    loss = torch.where(valid, -(torch.log(s_y) - torch.log(total[..., 0])), 0.0)
    onehot = torch.zeros_like(v).scatter_(-1, safe[..., None], 1.0)
    grad = ds / total - onehot * (ds / s)
    return loss, torch.where(valid[..., None], grad, 0.0)


def plain_ce(logits, labels, ignore_index=-100):
    """The loss evaluated in the logits' own dtype (the low-precision baseline)."""
    logprobs = reference.log_stablemax(logits, dim=-1)
    valid = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).long()[..., None])[..., 0]
    return -torch.where(valid, picked, 0.0)


def awkward_batch(shape, dtype, device, g):
    V = shape[-1]
    logits = torch.randn(shape, generator=g) * 3
    logits[0, 0] = 0.0                                            # exactly 0 ...
    logits[0, 1] = 1.0                                            # ... and exactly 1
    logits[0, 2, : V // 2] = 0.0
    logits[0, 2, V // 2:] = 1.0
    logits[1, 0, 0] = -1e30 if dtype == torch.float32 else -1e4
    logits[1, 1, 1] = 1e4
    labels = torch.randint(0, V, shape[:-1], generator=g)
    labels[1, 0] = 0                                              # label on a huge negative logit
    labels[2] = -100                                              # a fully ignored row
    labels[3, 1] = -100
    labels[0, 0] = 3
    return logits.to(device=device, dtype=dtype), labels.to(device)


@proves_kernels_ran(lambda device, *a, **k: device, "stablemax_cross_entropy", "stablemax_ce", "stablemax_ce_fwd", "stablemax_ce_bwd")
def check_stablemax_ce(device, dtype, shape):
    g = fresh_gen()
    logits, labels = awkward_batch(shape, dtype, device, g)
    loss64, grad64 = stablemax_ce64(logits, labels)               # of the (rounded) logits
    leaf = logits.clone().requires_grad_(True)
    loss = impls(device)["stablemax_cross_entropy"](leaf, labels)
    assert loss.dtype == torch.float64 and loss.shape == labels.shape    # the reference's contract
    assert torch.isfinite(loss).all()
    rel = ((loss - loss64).abs() / loss64.abs().clamp_min(1e-300)).max().item()
    assert ((loss - loss64).abs() <= 1e-6 * loss64.abs()).all(), f"loss not within 1e-6 relative ({rel:.2e})"
    w = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(device)
    (loss * w).sum().backward()
    plain_leaf = logits.clone().requires_grad_(True)
    (plain_ce(plain_leaf, labels).double() * w).sum().backward()
    ref64 = grad64 * w[..., None]
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()
    assert_error_rule(leaf.grad, plain_leaf.grad, ref64, f"stablemax_ce bwd {dtype}", ulp_floor(dtype, ref64))
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (leaf.grad[ignored] == 0).all()


@pytest.mark.parametrize("shape", [(7, 3, 11), (64, 81, 11), (5, 97, 6), (5, 4, 12)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stablemax_ce(dtype, shape):
    check_stablemax_ce("cpu", dtype, shape)


def test_stablemax_ce_labels_and_routing():
    g = fresh_gen()
    fn = native.IMPLS_CPU["stablemax_cross_entropy"]
    logits, labels = awkward_batch((7, 3, 11), torch.float32, "cpu", g)
    labels32 = labels.clamp_min(0).to(torch.int32)                # int32 labels, custom ignore_index
    labels32[0, 0] = 5
    got = fn(logits, labels32, ignore_index=5)
    torch.testing.assert_close(got, reference.stablemax_cross_entropy(logits, labels32, ignore_index=5),
                               rtol=1e-6, atol=1e-12)
    assert got[0, 0] == 0
    l64 = logits.double()                                         # float64: the reference, bit for bit
    assert torch.equal(fn(l64, labels), reference.stablemax_cross_entropy(l64, labels))


@pytest.mark.parametrize("bad", [11, -1, 1000], ids=lambda b: f"label{b}")
def test_stablemax_ce_out_of_range_labels_raise(bad):
    logits = torch.randn(2, 3, 11)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = bad
    grad_loss = torch.ones(2, 3)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.trm.stablemax_ce_fwd(logits, labels, -100)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.trm.stablemax_ce_bwd(grad_loss, logits, labels, -100)
    with pytest.raises(IndexError, match="out of range"):
        native.IMPLS_CPU["stablemax_cross_entropy"](logits, labels)
    labels[1, 2] = -100                                           # ignored: fine
    assert torch.isfinite(native.IMPLS_CPU["stablemax_cross_entropy"](logits, labels)).all()


# ---------------------------------------------------------------------------------------------
# AdamATan2
# ---------------------------------------------------------------------------------------------

ADAM_SHAPES = [(97, 13), (1,), (512, 3), (0,), (70001,)]


def adam64(p, g, m, v, *, step, lr, beta1, beta2, weight_decay):
    """One AdamATan2 step in float64, out of place."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    p = p * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    p = p - lr / (1 - beta1**step) * torch.atan2(m, v.sqrt() / math.sqrt(1 - beta2**step))
    return p, m, v


@proves_kernels_ran(lambda device, *a, **k: device, "adam_atan2", "adam_atan2", "adam_atan2")
def check_adam_atan2(device, shapes=ADAM_SHAPES, steps=(1, 2, 7)):
    g = fresh_gen()
    params = [randn(s, g, device) for s in shapes]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95)
    for weight_decay in (0.0, 0.1):
        k_state = [[p.clone() for p in params], [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params]]
        r_state = [[t.clone() for t in lst] for lst in k_state]
        ptrs = [t.data_ptr() for lst in k_state for t in lst]
        for step in steps:
            grads = [randn(s, g, device, scale=0.1) for s in shapes]
            starts = [[t.clone() for t in lst] for lst in r_state]
            impls(device)["adam_atan2"](*k_state[:1], grads, *k_state[1:], step=step, weight_decay=weight_decay, **hp)
            reference.adam_atan2(*r_state[:1], grads, *r_state[1:], step=step, weight_decay=weight_decay, **hp)
            # per step, both from the same (reference) state: each vs the float64 step
            k_step = [[t.clone() for t in lst] for lst in starts]
            impls(device)["adam_atan2"](*k_step[:1], grads, *k_step[1:], step=step, weight_decay=weight_decay, **hp)
            for i in range(len(shapes)):
                exact = adam64(starts[0][i], grads[i], starts[1][i], starts[2][i], step=step,
                               weight_decay=weight_decay, **hp)
                for j, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
                    assert_error_rule(k_step[j][i], r_state[j][i], exact[j],
                                      f"adam_atan2 {name}[{i}] step {step} wd {weight_decay}",
                                      ulp_floor(torch.float32, exact[j]))
        assert [t.data_ptr() for lst in k_state for t in lst] == ptrs, "the update must be in place"
        for k_list, r_list in zip(k_state, r_state):              # several steps: still the reference
            for a, b in zip(k_list, r_list):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_atan2():
    check_adam_atan2("cpu")


def test_adam_atan2_routing_and_errors():
    fn = native.IMPLS_CPU["adam_atan2"]
    p64 = [torch.randn(5, dtype=torch.float64)]
    g64, m64, v64 = torch.randn(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    ref = [t.clone() for t in (p64[0], m64, v64)]
    hp = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    fn(p64, [g64], [m64], [v64], **hp)                            # float64: the reference
    reference.adam_atan2([ref[0]], [g64], [ref[1]], [ref[2]], **hp)
    assert torch.equal(p64[0], ref[0]) and torch.equal(m64, ref[1])
    with pytest.raises(ValueError, match="step must be >= 1"):
        fn([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], **{**hp, "step": 0})
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        torch.ops.trm.adam_atan2([torch.zeros(3)], [], [torch.zeros(3)], [torch.zeros(3)], 1, 1e-2, 0.9, 0.95, 0.0)
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.trm.adam_atan2([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)],
                                 [torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)],
                                 1, 1e-2, 0.9, 0.95, 0.0)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch -- for EVERY op
# ---------------------------------------------------------------------------------------------

def opcheck_cases(device: str) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    x = r(3, 7, 33)
    y, rstd = torch.ops.trm.rms_norm_fwd(x, None, -1, EPS)
    xt_base = r(2, 9, 6)
    yt, rstdt = torch.ops.trm.rms_norm_fwd(xt_base.transpose(1, 2), None, -1, EPS)
    logits = r(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g).to(device)
    labels[0, 0] = -100
    gu = r(4, 3, 16)
    op = torch.ops.trm
    return {
        "rms_norm_fwd": (op.rms_norm_fwd.default, (r(3, 7, 33, grad=True), None, -1, EPS)),
        "rms_norm_fwd/mlp_t+res": (op.rms_norm_fwd.default, (r(2, 9, 6, grad=True).transpose(1, 2),
                                                              r(2, 6, 9, grad=True), -1, EPS)),
        "rms_norm_fwd/bf16 dim1": (op.rms_norm_fwd.default, (r(3, 7, 5, dtype=torch.bfloat16, grad=True), None, 1, EPS)),
        "rms_norm_fwd_only": (op.rms_norm_fwd_only.default, (r(3, 7, 33, grad=True), r(3, 7, 33), -1, EPS)),
        "rms_norm_bwd": (op.rms_norm_bwd.default, (r(3, 7, 33), y, rstd, -1)),
        "rms_norm_bwd/mlp_t": (op.rms_norm_bwd.default, (r(2, 6, 9), yt, rstdt, -1)),
        "swiglu_fwd": (op.swiglu_fwd.default, (gu.clone().requires_grad_(True),)),
        "swiglu_bwd": (op.swiglu_bwd.default, (r(4, 3, 8), gu)),
        "stablemax_ce_fwd": (op.stablemax_ce_fwd.default, (logits.clone().requires_grad_(True), labels, -100)),
        "stablemax_ce_fwd/int32": (op.stablemax_ce_fwd.default, (logits.clone().requires_grad_(True),
                                                                 labels.clamp_min(0).int(), 3)),
        "stablemax_ce_bwd": (op.stablemax_ce_bwd.default, (r(3, 5).abs(), logits, labels, -100)),
        "adam_atan2": (op.adam_atan2.default, ([r(5, 3), r(7)], [r(5, 3), r(7)], [r(5, 3), r(7)],
                                               [r(5, 3).abs(), r(7).abs()], 3, 1e-2, 0.9, 0.95, 0.1)),
    }


OPCHECK_NAMES = ["rms_norm_fwd", "rms_norm_fwd/mlp_t+res", "rms_norm_fwd/bf16 dim1", "rms_norm_fwd_only",
                 "rms_norm_bwd", "rms_norm_bwd/mlp_t", "swiglu_fwd", "swiglu_bwd", "stablemax_ce_fwd",
                 "stablemax_ce_fwd/int32", "stablemax_ce_bwd", "adam_atan2"]


@pytest.mark.parametrize("case", OPCHECK_NAMES)
def test_opcheck(case):
    op, args = opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


def declared_ops() -> set[str]:
    """The op names declared in csrc/trm_ops.cpp (the one TORCH_LIBRARY(trm, m) block)."""
    src = (native.CSRC / "trm_ops.cpp").read_text()
    return set(re.findall(r'"\s*([a-z_0-9]+)\(', src.split("TORCH_LIBRARY(trm, m)")[1].split("}")[0]))


def test_every_declared_op_is_registered_and_opchecked():
    declared = declared_ops()
    assert declared == set(native.NATIVE_OPS), "native.NATIVE_OPS out of date with csrc/trm_ops.cpp"
    assert {name.split("/")[0] for name in OPCHECK_NAMES} == declared, "every op needs an opcheck case"
    for op in declared:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"trm::{op}", "CPU"), f"trm::{op} has no CPU kernel"
    in_registry = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("trm::")}
    assert declared <= in_registry


def test_second_order_gradients_raise_instead_of_returning_zeros():
    x = torch.randn(3, 8, requires_grad=True)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (3, 4))
    outs = {"rms_norm_bwd": lambda: native.IMPLS_CPU["rms_norm"](x, EPS) ** 3,
            "swiglu_bwd": lambda: native.IMPLS_CPU["swiglu"](x) ** 3,
            "stablemax_ce_bwd": lambda: native.IMPLS_CPU["stablemax_cross_entropy"](logits, labels) ** 3}
    for op, make in outs.items():
        inp = logits if op == "stablemax_ce_bwd" else x
        (g,) = torch.autograd.grad(make().sum(), inp, create_graph=True)
        with pytest.raises(RuntimeError, match=f"trm::{op} is a backward kernel"):
            torch.autograd.grad(g.sum(), inp)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def test_status_and_availability():
    st = native.status()
    assert st["status"] == "ok" and st["reason"] is None and st["source"] in ("aot", "jit")
    assert native.available_cpu() == (True, None)
    ok, reason = native.available_cuda()
    if not torch.cuda.is_available():
        assert not ok and reason
    assert set(native.IMPLS_CUDA) == {"rms_norm", "swiglu", "stablemax_cross_entropy", "adam_atan2"}
    assert set(native.IMPLS_CPU) == set(native.IMPLS_CUDA) | {"linear"}     # linear: oneDNN, CPU only


def test_failed_build_is_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++ {\n")
    ok, reason = native_loader._build("trm_ops_broken_test", [str(bad)], build_directory=str(tmp_path))
    assert not ok and reason
    ok, reason = native_loader._build("trm_ops_missing_test", [str(tmp_path / "nope.cpp")], build_directory=str(tmp_path))
    assert not ok and "missing" in reason


def test_stale_aot_library_is_detected(tmp_path):
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    import os
    os.utime(so, (0, 0))                                          # older than every source
    assert "older than csrc/" in native_loader._aot_stale(str(so))
    newest = max(os.path.getmtime(f) for f in native_loader._build_config().all_source_files())
    os.utime(so, (newest + 10, newest + 10))
    assert native_loader._aot_stale(str(so)) is None


def test_import_builds_nothing_and_a_failed_jit_falls_back_to_the_older_aot():
    """Importing trm builds/loads nothing; when trm._C is stale and the JIT build fails, the stale
    trm._C still serves (a fresh process: this one already holds a library)."""
    code = """
import importlib.util, sys, trm, trm.model, trm.ops
from trm.ops import native
from trm.ops.native import loader as native_loader
assert native.status()['status'] == 'not loaded' and 'trm._C' not in sys.modules, native.status()
if importlib.util.find_spec('trm._C') is not None:
    native_loader._aot_stale = lambda f: 'pretend stale'
    native_loader._load_jit = lambda: (False, 'pretend: no compiler')
    assert native.load(), native.status()
    st = native.status()
    assert st['source'] == 'aot' and any('using the older trm._C' in n for n in st['notes']), st
"""
    subprocess.run([sys.executable, "-c", code], check=True)
