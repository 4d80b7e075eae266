"""``auto``'s run-time verification (``trm.ops.verify``) and the evidence it rests on
(``trm.ops.counters``): correct kernels are accepted in every dtype and layout; a planted wrong
C++ CPU kernel, a kernel wrong only in one layout, one dtype or its gradient, one that raises, and a
planted wrong Triton kernel (its source changed, run in the interpreter) are refused by ``auto``
with a reason that names what is wrong, and the next candidate (or the reference) runs instead."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import pytest
import torch

from trm import ops
from trm.ops import counters, dispatch, native, reference, verify
from trm.ops.triton import loader as triton_loader

from conftest import BACKED

EPS = 1e-5


@pytest.fixture(autouse=True)
def fresh_verification(monkeypatch, kernel_baselines):
    """Each test verifies afresh and leaves the backend, the warnings and AUTO_ORDER as it found them;
    a temporary baseline backs every candidate, so verification alone decides here."""
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        kernel_baselines(BACKED, dev)
    saved_global, saved_per_op = dispatch._global_backend, dict(dispatch._per_op)
    monkeypatch.setattr(dispatch, "_warned", set())
    verify.forget()
    yield
    dispatch._restore(saved_global, saved_per_op)
    verify.forget()


def _auto_choice(op: str, device: str = "cpu") -> tuple[str, list[str]]:
    """What auto runs for ``op`` now, and the warnings it gave choosing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.set_backend("auto")
        choice = dispatch.resolve(op, device)
    return choice, [str(w.message) for w in caught]


def test_auto_verifies_the_cpu_kernels_in_every_dtype_and_layout_and_accepts_them():
    choice, said = _auto_choice("rms_norm")
    assert choice == "cpu" and not said
    report = verify.report()
    for op in ("rms_norm", "stablemax_cross_entropy"):
        result = report[("cpu", op, "cpu")]
        assert result["refused"] is None
        dtypes = {case.split(",")[0] for case in result["cases"]}
        assert dtypes == {"float32", "float16", "bfloat16"}, result["cases"]
        assert set(result["cases"].values()) == {"kernel"}, f"every case must have run the kernel: {result}"
    assert "float32, mlp_t sequence axis (strided view) + residual" in report[("cpu", "rms_norm", "cpu")]["cases"]


def _wrong(real, *, scale=1.001, when=lambda *a: True, gradient=False):
    """``real`` with its output (or only its gradient) off by ``scale`` when ``when(*args)``; it still
    launches the real kernel, so the verification sees a kernel, not a fallback."""
    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, dy):
            return dy * scale

    def fn(*args, **kwargs):
        y = real(*args, **kwargs)
        if not when(*args):
            return y
        return ScaleGrad.apply(y) if gradient else y * scale
    return fn


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_first_use_inside_no_grad_or_inference_mode_still_verifies_gradients(mode):
    """The model's no-grad cycles and the service reach auto's first use without autograd: the
    gradient cases must still run (they used to fail there and refuse correct kernels)."""
    with getattr(torch, mode)():
        choice, said = _auto_choice("swiglu")
    assert choice == "cpu" and not said, said
    result = verify.report()[("cpu", "swiglu", "cpu")]
    assert result["refused"] is None and set(result["cases"].values()) == {"kernel"}, result


@pytest.mark.parametrize("plant, named", [
    (dict(), "float32, last axis: output 0"),
    (dict(gradient=True), "float32, last axis: gradient of input 0"),
    (dict(when=lambda x, *a: not x.is_contiguous()), "float32, mlp_t sequence axis (strided view) + residual"),
    (dict(scale=1.2, when=lambda x, *a: x.dtype == torch.bfloat16), "bfloat16, last axis: output 0"),
], ids=["everywhere", "gradient-only", "mlp_t-layout-only", "bf16-only"])
def test_a_planted_wrong_cpu_kernel_is_refused_with_a_reason(monkeypatch, plant, named):
    monkeypatch.setitem(native.IMPLS_CPU, "rms_norm", _wrong(native.IMPLS_CPU["rms_norm"], **plant))
    choice, said = _auto_choice("rms_norm")
    assert choice == "torch", "auto must not run a kernel that disagrees with the reference"
    reason = verify.report()[("cpu", "rms_norm", "cpu")]["refused"]
    assert reason.startswith(named) and "max error" in reason and "> bound" in reason, reason
    assert any("'auto' refuses the cpu rms_norm kernel on cpu" in m and named in m for m in said), said
    x = torch.randn(3, 8)
    with counters.record() as seen:
        y = ops.rms_norm(x, EPS)
    assert not seen.launches and torch.equal(y, reference.rms_norm(x, EPS))


@pytest.mark.parametrize("plant, named", [
    (dict(gradient=True), "float32, x @ W^T: gradient of input 0"),
    (dict(when=lambda x, *a: not x.is_contiguous()), "float32, mlp_t sequence axis (strided view): output 0"),
], ids=["gradient-only", "mlp_t-layout-only"])
def test_a_planted_wrong_linear_kernel_is_refused_with_a_reason(monkeypatch, plant, named):
    """The oneDNN linear: verified in the layouts the model feeds it (float32; the other dtypes
    run the reference, recorded as such), and refused when one of them is off by 0.1%."""
    choice, _ = _auto_choice("linear")
    cases = verify.report()[("cpu", "linear", "cpu")]["cases"]
    assert choice == "cpu" and cases["float32, mlp_t sequence axis (strided view)"] == "kernel", cases
    assert cases["bfloat16, x @ W^T"] == "reference runs", cases
    verify.forget()
    monkeypatch.setitem(native.IMPLS_CPU, "linear", _wrong(native.IMPLS_CPU["linear"], **plant))
    choice, said = _auto_choice("linear")
    assert choice == "torch"
    reason = verify.report()[("cpu", "linear", "cpu")]["refused"]
    assert reason.startswith(named) and "> bound" in reason, reason
    assert any("'auto' refuses the cpu linear kernel on cpu" in m for m in said), said


def test_a_kernel_that_raises_is_refused(monkeypatch):
    def broken(logits, labels, ignore_index=-100):
        counters.launched("cpu", "stablemax_ce/stablemax_ce_fwd")
        raise RuntimeError("illegal memory access (planted)")

    monkeypatch.setitem(native.IMPLS_CPU, "stablemax_cross_entropy", broken)
    choice, said = _auto_choice("stablemax_cross_entropy")
    assert choice == "torch"
    assert "raised RuntimeError: illegal memory access (planted)" in verify.report()[
        ("cpu", "stablemax_cross_entropy", "cpu")]["refused"]


def test_inside_a_compile_trace_an_unverified_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reason = verify.refusal("cpu", "swiglu", native.IMPLS_CPU["swiglu"], "cpu")
    assert "not verified before torch.compile traced it" in reason


def _wrong_triton_rms_norm(tmp_path):
    """csrc/triton/rms_norm.py with the forward's output scaled by 1.001, loaded as a kernel file."""
    source = (triton_loader.KERNEL_DIR / "rms_norm.py").read_text()
    good = "    y = s * rstd[:, None]\n"
    assert source.count(good) == 1, "the planted change no longer applies; update this test"
    path = tmp_path / "rms_norm_wrong.py"
    path.write_text(source.replace(good, "    y = s * rstd[:, None] * 1.001\n"))
    spec = importlib.util.spec_from_file_location("trm_triton_kernels.rms_norm_wrong", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRETING else "cuda"   # where Triton takes tensors (tests/conftest.py)
NATIVE_ON = {"cpu": "cpu", "cuda": "cuda"}           # the native backend of a device: auto's next candidate here


def test_a_planted_wrong_triton_kernel_is_refused_and_auto_takes_the_next_candidate(monkeypatch, tmp_path,
                                                                                    kernel_baselines):
    """With Triton first in auto's list (CPU tensors in the interpreter; CUDA tensors on a GPU), the
    real kernel passes the verification and runs; the same kernel source with a 0.1% error is
    refused, naming why, and auto runs the native kernel, the next candidate."""
    assert triton_loader.available()[0], triton_loader.available()
    dev, native_backend = TRITON_DEVICE, NATIVE_ON[TRITON_DEVICE]
    monkeypatch.setitem(dispatch.AUTO_ORDER, "rms_norm", {dev: ("triton", native_backend)})
    kernel_baselines(BACKED, dev)
    choice, said = _auto_choice("rms_norm", dev)
    assert choice == "triton" and not said, said
    cases = verify.report()[("triton", "rms_norm", dev)]["cases"]
    assert cases["float32, mlp_t sequence axis (strided view) + residual"] == "kernel"
    # the interpreter's bf16 goes to the reference (it rounds bf16 wrong); compiled, bf16 is a kernel case
    assert cases["bfloat16, last axis"] == ("reference runs" if INTERPRETING else "kernel")

    verify.forget()
    monkeypatch.setitem(triton_loader._state["modules"], "rms_norm", _wrong_triton_rms_norm(tmp_path))
    choice, said = _auto_choice("rms_norm", dev)
    assert choice == native_backend, "the wrong Triton kernel must be refused and the next candidate used"
    reason = verify.report()[("triton", "rms_norm", dev)]["refused"]
    assert reason.startswith("float32, last axis: output 0: max error") and "> bound" in reason, reason
    assert any(f"'auto' refuses the triton rms_norm kernel on {dev}" in m for m in said), said
    x = torch.randn(3, 8, device=dev)
    with counters.record() as seen:
        ops.rms_norm(x, EPS)
    assert seen.kernels() == {"rms_norm/rms_norm_fwd_only"} and seen.ran(native_backend, "rms_norm"), seen


def test_fallbacks_are_counted_with_what_the_kernel_did_not_take():
    fn = native.IMPLS_CPU["swiglu"]
    assert native.load()                                # (its self-checks launch kernels too)
    with counters.record() as seen:
        fn(torch.randn(3, 8, dtype=torch.float64))
        fn(torch.randn(8, 6).t())                       # strided [6, 8]: the kernel takes it
        fn(torch.empty(0, 8))                           # empty: the reference
    assert seen.fell_back("cpu", "swiglu") == ["float64[3, 8] cpu", "float32[0, 8] cpu"]
    assert seen.launches == {("cpu", "swiglu/swiglu_fwd"): 1}
