"""The backend switch (``trm.ops.dispatch``) and the model under every backend that runs here.

Run: ``python -m pytest tests/test_ops_dispatch.py -q``. The Triton backend runs in its CPU
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` when no GPU is visible); the native
CPU extension is JIT-built on first use when ``pip install`` did not build it.

- explicit backends fail loudly (unknown name, unavailable backend with its reason, wrong device,
  an op the backend lacks), ``auto`` falls back and names the missing backend once (what auto
  picks from the baselines: tests/test_ops_auto.py; here a temporary baseline backs every candidate);
- the model gives the same outputs and gradients under ``cpu`` and ``triton`` as under ``torch``
  (and the kernels really ran: their launches are counted, ``trm.ops.counters``, and no call fell
  back to the reference), and compiles with ``torch.compile``; on a GPU the same for ``cuda``,
  ``triton`` and ``auto`` on CUDA tensors (``gpu``-marked);
- on a GPU machine the interpreter is off and the Triton cases run on CUDA tensors instead
  (``kernel_device``), so the whole file passes there too;
- AdamATan2 through each backend equals the reference update.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from trm import ops
from trm.ops import counters, dispatch, native, reference

from conftest import BACKED

EPS = 1e-5


def kernel_device(backend: str) -> str:
    """The device whose tensors ``backend``'s kernels take in this session: Triton takes CPU tensors
    only under the interpreter (no GPU visible, tests/conftest.py), else CUDA tensors."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


@pytest.fixture(autouse=True)
def restore_backend(kernel_baselines):
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        kernel_baselines(BACKED, dev)
    saved_global, saved_per_op = dispatch._global_backend, dict(dispatch._per_op)
    yield
    dispatch._restore(saved_global, saved_per_op)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="unknown op"):
        ops.set_backend("torch", op="layer_norm")
    with pytest.raises(ValueError, match="needs op="):
        ops.set_backend(None)
    assert ops.get_backend() == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_backend_without_gpu_names_the_reason():
    with pytest.raises(RuntimeError, match="kernel backend 'cuda' was requested but cannot run here"):
        ops.set_backend("cuda")
    assert ops.get_backend() == "torch"
    ops.set_backend("auto")                       # auto never needs a GPU
    x = torch.randn(3, 8)
    assert dispatch.resolve("rms_norm", x.device) in ("cpu", "torch")


def test_per_op_override_and_ops_a_backend_lacks():
    cpu_ops = set(dispatch.impls("cpu"))
    assert {"rms_norm", "stablemax_cross_entropy"} <= cpu_ops
    missing = sorted(set(dispatch.OPS) - cpu_ops)
    assert missing, "every op has a cpu kernel: pick another op for this test"
    with pytest.raises(ValueError, match="has no cpu kernel"):
        ops.set_backend("cpu", op=missing[0])
    ops.set_backend("cpu")
    ops.set_backend("torch", op="rms_norm")
    assert ops.get_backend() == "cpu" and ops.get_backend("rms_norm") == "torch"
    x = torch.randn(4, 8)
    assert dispatch._select("rms_norm", x) is reference.rms_norm
    assert dispatch._select("stablemax_cross_entropy", x) is native.IMPLS_CPU["stablemax_cross_entropy"]
    with pytest.warns(RuntimeWarning, match=f"no {missing[0]} kernel"):
        assert dispatch._select(missing[0], x) is getattr(reference, missing[0])
    ops.set_backend(None, op="rms_norm")
    assert dispatch._select("rms_norm", x) is native.IMPLS_CPU["rms_norm"]
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(RuntimeError, match="requested for rms_norm but its input is on meta"):
        ops.rms_norm(meta, EPS)


def test_auto_picks_native_cpu_and_describe_says_so():
    ops.set_backend("auto")
    x = torch.randn(4, 8)
    assert dispatch._select("rms_norm", x) is native.IMPLS_CPU["rms_norm"]
    assert dispatch._select("attention", x) is reference.attention
    table = ops.describe()
    assert table["rms_norm"]["cpu"].startswith("cpu kernel: verified on cpu, baseline "), table
    assert table["attention"]["cpu"] == "reference: no kernel of attention is a candidate on cpu", table


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "available", lambda name: (True, None))
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.swiglu(torch.randn(2, 8))


def test_missing_native_auto_falls_back_once_explicit_raises(monkeypatch):
    monkeypatch.setitem(native._state, "status", "unavailable")
    monkeypatch.setitem(native._state, "reason", "simulated build failure")
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="simulated build failure"):
        ops.set_backend("cpu")
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        ops.set_backend("auto")                                  # named when auto is chosen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.rms_norm(x, EPS)
    assert torch.equal(y, reference.rms_norm(x, EPS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # named once only
        ops.stablemax_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


def test_import_builds_and_imports_nothing():
    code = ("import sys, trm, trm.model, trm.ops as o; from trm.ops import native; "
            "assert native.status()['status'] == 'not loaded', native.status(); "
            "assert o.get_backend() == 'torch'; assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# The model under each backend
# ---------------------------------------------------------------------------------------------

TINY = dict(
    name="trm", hidden_size=32, num_heads=2, expansion=2.0, H_cycles=2, L_cycles=2, L_layers=1,
    halt_max_steps=4, halt_exploration_prob=0.0, pos_encodings="rope", mlp_t=False,
    puzzle_emb_len=2, puzzle_emb_ndim=32, forward_dtype="float32", rms_norm_eps=1e-5,
    rope_theta=10000.0, no_ACT_continue=True, seq_len=9, vocab_size=7, num_puzzle_identifiers=5,
    batch_size=3,
)
MODEL_CASES = [({}, 2), (dict(mlp_t=True, pos_encodings="none", H_cycles=2, L_cycles=1), 1)]


def make_batch(cfg):
    g = torch.Generator().manual_seed(1)
    batch = {
        "inputs": torch.randint(0, cfg["vocab_size"], (3, cfg["seq_len"]), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, cfg["vocab_size"], (3, cfg["seq_len"]), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(0, cfg["num_puzzle_identifiers"], (3,), generator=g, dtype=torch.int32),
    }
    batch["labels"][0, :2] = -100
    return batch


def run_model(backend: str, overrides: dict, steps: int, compile_: bool = False, device: str = "cpu"):
    from trm.model import act_loss, build_model

    torch.manual_seed(0)
    cfg = {**TINY, **overrides}
    model = build_model(cfg).train().to(device)
    batch = {k: v.to(device) for k, v in make_batch(cfg).items()}
    step_fn = torch.compile(model, dynamic=False) if compile_ else model
    outs = []
    with ops.use_backend(backend):
        carry = model.initial_carry(batch)
        for _ in range(steps):
            carry, out = step_fn(carry, batch)
            total, _ = act_loss(out, batch["labels"], carry.halted, carry.steps)
            total.backward()
            outs.append({k: v.detach().clone() for k, v in out.items()} | {"total": total.detach()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def assert_same(a_outs, a_grads, b_outs, b_grads, tol):
    for a, b in zip(a_outs, b_outs):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"output {k}: {m}")
    assert a_grads.keys() == b_grads.keys() and a_grads
    for n in a_grads:
        torch.testing.assert_close(a_grads[n], b_grads[n], rtol=tol, atol=tol, msg=lambda m, n=n: f"grad {n}: {m}")


def expected_kernels(backend: str, overrides: dict, device: str) -> dict[str, str]:
    """csrc file -> the backend whose kernels of that file the model must launch under ``backend``."""
    uses_attention = not overrides.get("mlp_t")
    files = {"rms_norm": "rms_norm", "stablemax_cross_entropy": "stablemax_ce", "swiglu": "swiglu",
             "attention": "attention", "apply_rope": "rope"}
    model_ops = ["rms_norm", "stablemax_cross_entropy", "swiglu"] + (["attention", "apply_rope"] if uses_attention else [])
    if backend == "auto":   # the first candidate of AUTO_ORDER (backed here): a correct kernel is never refused
        picks = {op: dispatch.AUTO_ORDER[op].get(device, ("torch",))[0] for op in model_ops}
        assert picks == {op: dispatch.resolve(op, device) for op in model_ops}, dispatch.describe()
    else:
        picks = {op: backend for op in model_ops}
    return {files[op]: b for op, b in picks.items() if b != "torch" and op in dispatch.impls(b)}


def check_model_runs_kernels(backend: str, overrides: dict, steps: int, device: str, tol: float) -> None:
    with counters.record() as none:
        outs_t, grads_t = run_model("torch", overrides, steps, device=device)
    assert not none.launches, f"kernels=torch launched kernels: {none}"
    if backend == "auto":
        ops.set_backend("auto")     # verifies the candidates first (trm.ops.verify)
    with counters.record() as seen:
        outs_b, grads_b = run_model(backend, overrides, steps, device=device)
    expected = expected_kernels(backend, overrides, device)
    assert expected, "nothing to check"
    for file, kernel_backend in expected.items():
        assert seen.ran(kernel_backend, file), f"no {kernel_backend} {file} kernel ran under {backend}: {seen}"
    assert not seen.fell_back(), f"calls fell back to the reference: {seen.fallbacks}"
    ce = "stablemax_ce_fwd_kernel" if expected["stablemax_ce"] == "triton" else "stablemax_ce_fwd"
    assert seen.launches[(expected["stablemax_ce"], f"stablemax_ce/{ce}")] == steps, seen
    assert_same(outs_b, grads_b, outs_t, grads_t, tol=tol)


# mlp_t runs one supervision step: its norm over the short sequence axis amplifies fp32
# summation-order noise through the recursion (both backends are equally far from fp64).
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("overrides,steps", MODEL_CASES, ids=["attention", "mlp_t"])
def test_model_backend_matches_torch(backend, overrides, steps):
    ok, reason = dispatch.available(backend)
    assert ok, f"backend {backend} must run on this machine: {reason}"
    check_model_runs_kernels(backend, overrides, steps, kernel_device(backend), tol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
@pytest.mark.parametrize("overrides,steps", MODEL_CASES, ids=["attention", "mlp_t"])
def test_model_on_gpu_matches_torch(backend, overrides, steps):
    """The GPU variant: every kernel backend auto may pick there, and auto itself, on CUDA tensors."""
    if backend != "auto":
        ok, reason = dispatch.available(backend)
        assert ok, f"backend {backend} must run on this GPU machine: {reason}"
    check_model_runs_kernels(backend, overrides, steps, "cuda", tol=1e-4)


def test_model_compiles_with_torch_compile():
    """Inductor traces the native custom ops (fake + autograd registrations) inside the model.

    One backend and a one-cycle model keep the C++ compile of this 2-core machine short."""
    torch._dynamo.reset()
    small = dict(H_cycles=1, L_cycles=1)
    outs_e, grads_e = run_model("cpu", small, 1)
    outs_c, grads_c = run_model("cpu", small, 1, compile_=True)
    assert_same(outs_c, grads_c, outs_e, grads_e, tol=2e-5)


def test_auto_traces_the_reference_under_compile_on_cpu():
    """Eager auto runs the C++ rms_norm; under torch.compile auto hands inductor the reference ops
    (fusable) while an explicit ``cpu`` backend keeps the custom op in the graph."""
    def graph_targets(backend):
        torch._dynamo.reset()
        seen = []

        def capture(gm, example_inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        ops.set_backend(backend)
        x = torch.randn(4, 8)
        out = torch.compile(lambda a: ops.rms_norm(a, EPS), backend=capture, fullgraph=True)(x)
        torch.testing.assert_close(out, reference.rms_norm(x, EPS))
        return seen

    ops.set_backend("auto")
    assert dispatch.resolve("rms_norm", "cpu") == "cpu"          # eager: the native kernel
    auto_targets = graph_targets("auto")
    assert auto_targets and not any("trm" in t for t in auto_targets), auto_targets
    assert any("trm" in t for t in graph_targets("cpu"))


# ---------------------------------------------------------------------------------------------
# AdamATan2 through the front door
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_adam_atan2_backends_match_reference(backend):
    if "adam_atan2" not in dispatch.impls(backend):
        pytest.fail(f"backend {backend} must implement adam_atan2 (issue 4)")
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    shapes = [(97, 33), (512,), (3, 5, 7)]
    device = kernel_device(backend)

    def fresh():
        return [torch.randn(s, generator=g).to(device) for s in shapes]

    p0, m0, v0 = fresh(), fresh(), [t.abs() for t in fresh()]
    grads = fresh()
    grads[1].zero_()                                 # atan2(0, 0) = 0 path
    ref = [[t.clone() for t in ts] for ts in (p0, m0, v0)]
    out = [[t.clone() for t in ts] for ts in (p0, m0, v0)]
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    reference.adam_atan2(*ref[:1], grads, *ref[1:], **kw)
    with ops.use_backend(backend, op="adam_atan2"), counters.record() as seen:
        ops.adam_atan2(*out[:1], grads, *out[1:], **kw)
    assert seen.ran(backend, "adam_atan2") and not seen.fell_back(), seen
    for a_list, b_list in zip(out, ref):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("bad", [11, -1])
def test_out_of_range_labels_raise_the_same_error_on_every_backend(backend, bad):
    """A bad label is a data bug: every backend says so with one error type (IndexError) naming the
    label and its position; the ignore_index is never out of range."""
    device = kernel_device(backend)
    logits = torch.randn(2, 3, 11, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    labels[1, 2] = bad
    with ops.use_backend(backend, op="stablemax_cross_entropy"):
        with pytest.raises(IndexError, match=rf"label {bad} .*out of range \[0, 11\)"):
            ops.stablemax_cross_entropy(logits, labels)
        labels[1, 2] = reference.IGNORE_LABEL_ID
        assert torch.isfinite(ops.stablemax_cross_entropy(logits, labels)).all()
