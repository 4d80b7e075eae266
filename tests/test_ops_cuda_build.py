"""The ahead-of-time extension ``trm._C``: it built, links, imports and registers every kernel; and
(``gpu`` marker) every CUDA kernel against the reference, in bfloat16, float16 and float32.

Run: ``python -m pytest tests/test_ops_cuda_build.py -q``. On a machine without a GPU this checks
the build ``pip install --no-build-isolation -e .`` made: ``trm._C`` imports (in a fresh process,
so every symbol resolves), is not older than ``csrc/``, has a CPU kernel for every op declared in
``csrc/trm_ops.cpp`` and -- when a CUDA toolkit is present -- a CUDA kernel for every op, compiled
for sm_80 and sm_90. A toolkit present but no CUDA kernels is a FAILURE (the build silently went
CPU-only). The ``gpu`` tests are skipped without a GPU; with one, they run the numerical checks of
``tests/test_ops_cpu.py`` on CUDA tensors (error rule of DESIGN.md) plus opcheck on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_ops_cpu import (DTYPES, OPCHECK_NAMES, RMS_SHAPES, assert_error_rule, check_adam_atan2,
                          check_forward_only, check_rms_norm, check_stablemax_ce, check_swiglu, declared_ops,
                          opcheck_cases)
from trm.ops import native
from trm.ops.native import loader as native_loader

BUILD = ("build it: pip install torch 'setuptools>=77' wheel ninja pybind11 && "
         "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e '.[dev]'  (see README, Quickstart)")

PROBE = r"""
import json, torch
try:
    import trm._C as C
except Exception as exc:
    print(json.dumps({"import_error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("trm::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(json.dumps({"file": C.__file__, "with_cuda": bool(C.with_cuda), "cuda_archs": C.cuda_archs,
                  "kernels": {op: {key: has("trm::" + op, key) for key in ("CPU", "CUDA")} for op in ops}}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """What a fresh ``import trm._C`` registers (a subprocess: this one may hold a JIT build)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"probing trm._C crashed:\n{proc.stderr[-4000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if "import_error" in info:
        pytest.fail(f"trm._C does not import ({info['import_error']}); {BUILD}")
    return info


def cuda_toolkit_here() -> str | None:
    """The toolkit a build here would use (CUDA_HOME, else /usr/local/cuda), if it has nvcc."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def test_extension_imports_links_and_is_current(probe):
    assert os.path.basename(os.path.dirname(probe["file"])) == "trm"
    stale = native_loader._aot_stale(probe["file"])
    assert stale is None, f"{stale}: the installed kernels are not the sources' ({BUILD})"


def test_every_declared_op_has_a_cpu_kernel(probe):
    declared = declared_ops()
    assert declared <= set(probe["kernels"]), f"ops declared but not registered: {declared - set(probe['kernels'])}"
    missing = sorted(op for op in declared if not probe["kernels"][op]["CPU"])
    assert not missing, f"no CPU kernel for: {missing}"


def test_cuda_part_built_for_sm80_sm90_and_every_op_has_a_cuda_kernel(probe):
    home = cuda_toolkit_here()
    if home is None:
        pytest.skip("no CUDA toolkit here (no nvcc under $CUDA_HOME or /usr/local/cuda): nothing CUDA was built")
    assert probe["with_cuda"], (f"a CUDA toolkit is installed ({home}/bin/nvcc) but trm._C was built WITHOUT its "
                                f"CUDA kernels (TRM_SKIP_CUDA_BUILD=1, or the toolkit was not found at build "
                                f"time); {BUILD}")
    archs = probe["cuda_archs"].split("_")
    for arch in ("8.0", "9.0"):
        assert any(a.split("+")[0] == arch for a in archs), f"trm._C has no sm_{arch.replace('.', '')} code: {archs}"
    missing = sorted(op for op in declared_ops() if not probe["kernels"][op]["CUDA"])
    assert not missing, f"no CUDA kernel registered for: {missing}"


# ---------------------------------------------------------------------------------------------
# On a GPU: every CUDA kernel vs the reference (the error rule), bf16 / fp16 / fp32
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_kernels():
    ok, reason = native.available_cuda()
    assert ok, f"CUDA kernels unavailable on this GPU machine: {reason}"


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+res"])
@pytest.mark.parametrize("shape", RMS_SHAPES + [(64, 97, 512), (4, 7, 4096)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rms_norm_last_axis(cuda_kernels, dtype, shape, with_residual):
    check_rms_norm("cuda", dtype, "last", shape, with_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+res"])
@pytest.mark.parametrize("shape", [(5, 97, 512), (3, 916, 64), (64, 97, 512)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rms_norm_mlp_t_transposed_view(cuda_kernels, dtype, shape, with_residual):
    check_rms_norm("cuda", dtype, "mlp_t", shape, with_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rms_norm_other_axis_and_forward_only(cuda_kernels, dtype):
    check_rms_norm("cuda", dtype, "dim1", (3, 91, 40), True)
    check_forward_only("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 97, 1024), (3, 916, 128), (7, 3, 22)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_swiglu(cuda_kernels, dtype, shape):
    check_swiglu("cuda", dtype, shape)
    check_swiglu("cuda", dtype, shape[:-1] + (shape[-1] + 2,), transposed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7, 3, 11), (768, 81, 11), (5, 97, 6), (5, 4, 12)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_stablemax_ce(cuda_kernels, dtype, shape):
    check_stablemax_ce("cuda", dtype, shape)


@pytest.mark.gpu
def test_cuda_stablemax_ce_out_of_range_labels(cuda_kernels):
    logits = torch.randn(2, 3, 11, device="cuda")
    labels = torch.zeros(2, 3, dtype=torch.long, device="cuda")
    labels[1, 2] = 11
    with pytest.raises(IndexError, match="out of range"):
        native.IMPLS_CUDA["stablemax_cross_entropy"](logits, labels)
    # the kernel itself never reads out of bounds: that token's loss and gradient are NaN
    loss = torch.ops.trm.stablemax_ce_fwd(logits, labels, -100)
    grad = torch.ops.trm.stablemax_ce_bwd(torch.ones(2, 3, device="cuda"), logits, labels, -100)
    assert torch.isnan(loss[1, 2]) and torch.isnan(grad[1, 2]).all()
    assert torch.isfinite(loss[:, :2]).all() and torch.isfinite(grad[:, :2]).all()


@pytest.mark.gpu
def test_cuda_adam_atan2(cuda_kernels):
    check_adam_atan2("cuda")


@pytest.mark.gpu
def test_cuda_adam_atan2_many_tensors_and_chunks(cuda_kernels):
    """More tensors (41) than one launch carries (32) and more chunks than its blocks (256)."""
    shapes = [(3,)] * 20 + [(5_000_003,)] + [(1000, 17)] * 20
    check_adam_atan2("cuda", shapes, steps=(1, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK_NAMES)
def test_cuda_opcheck(cuda_kernels, case):
    op, args = opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_cuda_matches_cpu_kernels(cuda_kernels):
    """The two native backends agree (float32, the mlp_t view with a residual) to rounding."""
    base = torch.randn(4, 97, 64)
    r = torch.randn(4, 64, 97)
    y_cpu = native.IMPLS_CPU["rms_norm"](base.transpose(1, 2), 1e-5, -1, r)
    y_gpu = native.IMPLS_CUDA["rms_norm"](base.cuda().transpose(1, 2), 1e-5, -1, r.cuda())
    ref64 = (lambda s: s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5))(base.double().transpose(1, 2)
                                                                                 + r.double())
    assert_error_rule(y_gpu.cpu(), y_cpu, ref64, "cuda vs cpu rms_norm", torch.finfo(torch.float32).eps * 4)


@pytest.mark.gpu
def test_cuda_rms_norm_mixed_devices_is_a_clear_error(cuda_kernels):
    """A CPU input with a CUDA residual dispatches to the CUDA kernel (any CUDA argument does): it
    must name the misplaced tensor, not fail inside the device guard."""
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8, device="cuda")
    for call in (lambda: torch.ops.trm.rms_norm_fwd(x, r, -1, 1e-5),
                 lambda: torch.ops.trm.rms_norm_fwd_only(x, r, -1, 1e-5)):
        with pytest.raises(RuntimeError, match=r"x is on cpu; move it to cuda"):
            call()
    y, rstd = torch.ops.trm.rms_norm_fwd(r, None, -1, 1e-5)
    with pytest.raises(RuntimeError, match=r"y is on cpu; move it to cuda"):
        torch.ops.trm.rms_norm_bwd(y, y.cpu(), rstd, -1)
