"""Native C++ CPU kernels (``csrc/cpu/trm_ops_cpu.cpp``) vs the PyTorch reference, and the backend switch.

Run: ``python -m pytest tests/test_ops_cpu.py -q``. The first run JIT-builds the extension
(~20 s on 2 cores; cached in torch's extension dir afterwards). A failed build FAILS these tests:
building here is expected to work.

Error rule (DESIGN.md, "Ops"): against an fp64 reference, the kernel's max error is at most 2x
the max error of the plain PyTorch implementation run at the same precision; NaN never passes.
The loss is within 1e-6 relative of the float64 formula. Fresh random inputs each test.
"""

from __future__ import annotations

import math

import pytest
import torch

from trm import ops
from trm.ops import dispatch, native, reference

RMS_SHAPES = [(5, 97, 512), (3, 916, 64), (7, 3, 11), (1, 7)]
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def built():
    ok = native.load()
    assert ok, f"native CPU extension failed to build/load: {native.status()['reason']}"


@pytest.fixture(autouse=True)
def restore_backend():
    saved_global, saved_per_op = dispatch._global_backend, dict(dispatch._per_op)
    yield
    dispatch._restore(saved_global, saved_per_op)


def fresh_gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())


def max_err(a: torch.Tensor, b64: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN never passes"
    return (a.double() - b64).abs().max().item()


def assert_error_rule(native_out, torch_out, ref64, what: str, floor: float = 0.0):
    e_nat, e_pt = max_err(native_out, ref64), max_err(torch_out, ref64)
    assert e_nat <= 2 * e_pt + floor, f"{what}: native err {e_nat:.3e} > 2 x torch err {e_pt:.3e}"


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

def rms64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_forward_error_rule(shape, dtype):
    g = fresh_gen()
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    y_nat, rstd = torch.ops.trm.rms_norm_fwd(x, EPS)
    y_pt = reference.rms_norm(x, EPS)
    assert y_nat.dtype == dtype and y_nat.shape == x.shape and rstd.dtype == torch.float32
    assert rstd.shape == x.shape[:-1]
    ref = rms64(x)
    # fp32: both sides are a few ulp off; one ulp of the output's scale absorbs a lucky reference
    floor = torch.finfo(torch.float32).eps * ref.abs().max().item() if dtype == torch.float32 else 0.0
    assert_error_rule(y_nat, y_pt, ref, f"rms_norm fwd {dtype}", floor)
    r64 = torch.rsqrt(x.double().square().mean(-1) + EPS)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=0)
    assert torch.equal(ops.rms_norm(x, EPS), y_pt)                 # default backend: the reference
    with ops.use_backend("cpu"):
        assert torch.equal(ops.rms_norm(x, EPS), y_nat)


@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_backward_fp32_error_rule(shape):
    g = fresh_gen()
    x = torch.randn(shape, generator=g) * 2 - 0.3
    dy = torch.randn(shape, generator=g)
    grads = {}
    for name, fn, inp in (("native", native.rms_norm, x), ("torch", reference.rms_norm, x), ("fp64", rms64, x.double())):
        leaf = inp.clone().requires_grad_(True)
        fn(leaf, EPS).backward(dy.to(inp.dtype)) if name != "fp64" else fn(leaf).backward(dy.double())
        grads[name] = leaf.grad
    assert grads["native"].dtype == torch.float32
    # one ulp of the terms before cancellation (r * dy): dx = r (dy - y mean(dy y)) cancels hard
    # when D is tiny (D = 1: dx ~ eps), and there both sides' errors are that rounding only
    r = torch.rsqrt(x.double().square().mean(-1, keepdim=True) + EPS)
    floor = torch.finfo(torch.float32).eps * (r * dy.double().abs()).max().item()
    assert_error_rule(grads["native"], grads["torch"], grads["fp64"], "rms_norm bwd fp32", floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_backward_low_precision_is_close(dtype):
    """bf16/fp16 backward uses the stored (rounded) y, so it is checked to the dtype's rounding,
    not with the 2x rule (the reference's autograd recomputes from x in fp32)."""
    g = fresh_gen()
    x = torch.randn(5, 97, 512, generator=g).to(dtype)
    dy = torch.randn(5, 97, 512, generator=g).to(dtype)
    a, b = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    native.rms_norm(a, EPS).backward(dy)
    rms64(b).backward(dy.double())
    assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol * b.grad.abs().max().item())


def test_rms_norm_non_contiguous_and_other_dims():
    g = fresh_gen()
    base = torch.randn(3, 64, 11, generator=g)
    x = base.transpose(1, 2)                                      # the mlp_t layout: norm over L
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn(x.shape, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    with ops.use_backend("cpu"):
        ya = ops.rms_norm(a.transpose(1, 2).transpose(1, 2), EPS)  # non-contiguous input
        y_dim1 = ops.rms_norm(base, EPS, dim=1)                     # other dim: reference
    yb = reference.rms_norm(b, EPS)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(y_dim1, reference.rms_norm(base, EPS, dim=1))


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


def awkward_batch(shape=(7, 3, 11), dtype=torch.float32):
    g = fresh_gen()
    V = shape[-1]
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
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
    return logits, labels


@pytest.mark.parametrize("shape", [(7, 3, 11), (64, 81, 11), (5, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_stablemax_ce_forward_backward_fp32(shape):
    logits, labels = awkward_batch(shape)
    loss64, grad64 = stablemax_ce64(logits, labels)
    leaf = logits.clone().requires_grad_(True)
    loss = torch.ops.trm.stablemax_ce_fwd(leaf, labels, -100)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert torch.isfinite(loss).all()
    assert ((loss.double() - loss64).abs() <= 1e-6 * loss64.abs()).all(), "loss not within 1e-6 relative"
    w = torch.rand(loss.shape, generator=fresh_gen())
    (loss * w).sum().backward()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
    ref64 = grad64 * w.double()[..., None]
    ref_leaf = logits.clone().requires_grad_(True)
    (reference.stablemax_cross_entropy(ref_leaf, labels) * w.double()).sum().backward()
    floor = torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert_error_rule(leaf.grad, ref_leaf.grad, ref64, "stablemax_ce bwd fp32", floor)
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (leaf.grad[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stablemax_ce_low_precision_logits(dtype):
    logits, labels = awkward_batch((7, 3, 11), dtype)
    loss64, grad64 = stablemax_ce64(logits, labels)              # of the rounded logits
    leaf = logits.clone().requires_grad_(True)
    loss = native.stablemax_cross_entropy(leaf, labels)
    assert ((loss - loss64).abs() <= 1e-6 * loss64.abs()).all()
    loss.sum().backward()
    assert leaf.grad.dtype == dtype
    torch.testing.assert_close(leaf.grad.double(), grad64.to(dtype).double(), rtol=0, atol=0)


def test_stablemax_ce_front_door_keeps_reference_contract():
    logits, labels = awkward_batch((7, 3, 11))
    with ops.use_backend("cpu"):
        a = logits.clone().requires_grad_(True)
        loss = ops.stablemax_cross_entropy(a, labels, ignore_index=-100)
        assert loss.dtype == torch.float64                          # like the reference
        loss.sum().backward()
        l64 = logits.double().requires_grad_(True)                  # float64 logits: reference path
        loss64 = ops.stablemax_cross_entropy(l64, labels)
    b = logits.clone().requires_grad_(True)
    ref = reference.stablemax_cross_entropy(b, labels)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(loss64, reference.stablemax_cross_entropy(logits.double(), labels))
    # a custom ignore_index and int32 labels
    labels32 = labels.clamp_min(0).to(torch.int32)
    labels32[0, 0] = 5
    with ops.use_backend("cpu"):
        got = ops.stablemax_cross_entropy(logits, labels32, ignore_index=5)
    torch.testing.assert_close(got, reference.stablemax_cross_entropy(logits, labels32, ignore_index=5), rtol=1e-6, atol=1e-7)
    assert got[0, 0] == 0


def test_stablemax_ce_out_of_range_label_raises():
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 5
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.trm.stablemax_ce_fwd(logits, labels, -100)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------

def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 33, generator=g)
    y, rstd = torch.ops.trm.rms_norm_fwd(x, EPS)
    logits, labels = torch.randn(3, 5, 11, generator=g) * 3, torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 0] = -100
    return {
        "rms_norm_fwd": (torch.ops.trm.rms_norm_fwd.default, (x.clone().requires_grad_(True), EPS)),
        "rms_norm_fwd_bf16": (torch.ops.trm.rms_norm_fwd.default, (x.bfloat16().requires_grad_(True), EPS)),
        "rms_norm_bwd": (torch.ops.trm.rms_norm_bwd.default, (torch.randn(3, 7, 33, generator=g), y, rstd)),
        "stablemax_ce_fwd": (torch.ops.trm.stablemax_ce_fwd.default, (logits.clone().requires_grad_(True), labels, -100)),
        "stablemax_ce_bwd": (torch.ops.trm.stablemax_ce_bwd.default, (torch.rand(3, 5, generator=g), logits, labels, -100)),
    }


@pytest.mark.parametrize("case", ["rms_norm_fwd", "rms_norm_fwd_bf16", "rms_norm_bwd", "stablemax_ce_fwd", "stablemax_ce_bwd"])
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# The whole model: backend cpu == backend torch
# ---------------------------------------------------------------------------------------------

TINY = dict(
    name="trm", hidden_size=32, num_heads=4, expansion=2.0, H_cycles=2, L_cycles=2, L_layers=2,
    halt_max_steps=4, halt_exploration_prob=0.0, pos_encodings="rope", mlp_t=False,
    puzzle_emb_len=2, puzzle_emb_ndim=32, forward_dtype="float32", rms_norm_eps=1e-5,
    rope_theta=10000.0, no_ACT_continue=True, seq_len=9, vocab_size=7, num_puzzle_identifiers=5,
    batch_size=3,
)


def run_model(backend: str, overrides: dict, steps: int = 2):
    from trm.model import act_loss, build_model

    torch.manual_seed(0)
    cfg = {**TINY, **overrides}
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    batch = {
        "inputs": torch.randint(0, cfg["vocab_size"], (3, cfg["seq_len"]), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, cfg["vocab_size"], (3, cfg["seq_len"]), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(0, cfg["num_puzzle_identifiers"], (3,), generator=g, dtype=torch.int32),
    }
    batch["labels"][0, :2] = -100
    outs = []
    with ops.use_backend(backend):
        carry = model.initial_carry(batch)
        for _ in range(steps):
            carry, out = model(carry, batch)
            total, _ = act_loss(out, batch["labels"], carry.halted, carry.steps)
            total.backward()
            outs.append({k: v.detach().clone() for k, v in out.items()} | {"total": total.detach()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


# mlp_t runs one supervision step: its norm over the 11-long sequence axis amplifies fp32
# summation-order noise through the recursion, and at step 2 the two backends differ by ~1.2e-5
# on logits of scale 3 (both are equally far, ~3e-5, from a run with an fp64-accurate norm).
@pytest.mark.parametrize("overrides,steps", [({}, 2), (dict(mlp_t=True, pos_encodings="none", puzzle_emb_ndim=40,
                                                            H_cycles=2, L_cycles=1), 1)], ids=["attention", "mlp_t"])
def test_model_cpu_backend_matches_torch_backend(overrides, steps, monkeypatch):
    calls = {"rms_norm": 0, "stablemax_cross_entropy": 0}
    for op in calls:
        fn = dispatch._NATIVE_CPU[op]

        def counted(*a, _fn=fn, _op=op, **k):
            calls[_op] += 1
            return _fn(*a, **k)

        monkeypatch.setitem(dispatch._NATIVE_CPU, op, counted)
    outs_t, grads_t = run_model("torch", overrides, steps)
    assert calls == {"rms_norm": 0, "stablemax_cross_entropy": 0}
    outs_c, grads_c = run_model("cpu", overrides, steps)
    assert calls["rms_norm"] > 0 and calls["stablemax_cross_entropy"] == steps, calls
    for a, b in zip(outs_c, outs_t):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"output {k}: {m}")
    assert grads_c.keys() == grads_t.keys() and grads_c
    for n in grads_c:
        torch.testing.assert_close(grads_c[n], grads_t[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")


# ---------------------------------------------------------------------------------------------
# The backend switch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_future_backends_raise_clearly(name):
    with pytest.raises(ValueError, match="not available yet"):
        ops.set_backend(name)
    with pytest.raises(ValueError, match="not available yet"):
        ops.set_backend(name, op="rms_norm")
    assert ops.get_backend() == "torch"


def test_set_backend_validation_and_per_op_override():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="unknown op"):
        ops.set_backend("torch", op="layer_norm")
    with pytest.raises(ValueError, match="no native cpu kernel"):
        ops.set_backend("cpu", op="swiglu")
    ops.set_backend("cpu")
    ops.set_backend("torch", op="rms_norm")
    assert ops.get_backend() == "cpu" and ops.get_backend("rms_norm") == "torch"
    x = torch.randn(4, 8)
    assert dispatch._select("rms_norm", x) is reference.rms_norm
    assert dispatch._select("stablemax_cross_entropy", x) is dispatch._NATIVE_CPU["stablemax_cross_entropy"]
    assert dispatch._select("swiglu", x) is reference.swiglu      # no native kernel: the reference
    ops.set_backend(None, op="rms_norm")
    assert dispatch._select("rms_norm", x) is dispatch._NATIVE_CPU["rms_norm"]
    ops.set_backend("auto")
    assert dispatch._select("rms_norm", x) is dispatch._NATIVE_CPU["rms_norm"]
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(RuntimeError, match="requested for rms_norm but its input is on meta"):
        with ops.use_backend("cpu"):
            ops.rms_norm(meta, EPS)


def test_missing_native_auto_falls_back_once_explicit_raises(monkeypatch):
    monkeypatch.setitem(native._state, "status", "unavailable")
    monkeypatch.setitem(native._state, "reason", "simulated build failure")
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="simulated build failure"):
        ops.set_backend("cpu")
    ops.set_backend("auto")
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        y = ops.rms_norm(x, EPS)
    assert torch.equal(y, reference.rms_norm(x, EPS))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # named once only
        ops.stablemax_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


def test_failed_build_is_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++ {\n")
    ok, reason = native._build("trm_ops_cpu_broken_test", [str(bad)])
    assert not ok and reason
    ok, reason = native._build("trm_ops_cpu_missing_test", [str(tmp_path / "nope.cpp")])
    assert not ok and "missing" in reason


def test_import_builds_nothing_and_default_is_reference():
    import subprocess
    import sys

    code = ("import trm, trm.model, trm.ops as o; from trm.ops import native; "
            "assert native.status()['status'] == 'not loaded'; assert o.get_backend() == 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert math.isfinite(native.status()["build_s"])
