"""The front door of every performance-critical op: the model calls only ``trm.ops.*``.

Each op has a plain-PyTorch reference (``trm.ops.reference``; float32 math, the ground truth of
the tests). Fused backends plug in behind the same names (see DESIGN.md, "Ops") and are chosen
by ``set_backend(auto | cuda | triton | cpu | torch)``, globally or per op
(``set_backend("torch", op="rms_norm")``); see ``trm.ops.dispatch``. Imported as a library
``trm.ops`` starts at ``torch`` (the reference); the trainer sets the config key ``kernels``
(default ``auto``: a kernel runs only where it is verified and a committed benchmark baseline of
the device class shows it faster, ``trm.ops.baselines``). ``describe()`` says what runs and why.

Where an op lives (one home per op; paths under ``trm/ops/`` and ``csrc/``; every reference is in
``trm/ops/reference.py``):

    op                       native glue (CPU, CUDA)  Triton glue             kernels
    rms_norm                 native/rms_norm.py       triton/rms_norm.py      {cpu,cuda,triton}/rms_norm.*
    swiglu                   native/swiglu.py         triton/swiglu.py        {cpu,cuda,triton}/swiglu.*
    apply_rope               -                        triton/rope.py          triton/rope.py
    attention                -                        triton/attention.py     triton/attention.py
    stablemax_cross_entropy  native/stablemax_ce.py   triton/stablemax_ce.py  {cpu,cuda,triton}/stablemax_ce.*
    adam_atan2               native/adam_atan2.py     triton/adam_atan2.py    {cpu,cuda,triton}/adam_atan2.*
    linear                   native/linear.py         -                       oneDNN's (torch's CPU build), CPU only

The glue module of an op holds its launcher(s), its autograd (a ``torch.autograd.Function`` for
Triton; ``torch.library`` fake + autograd registrations for the native ``torch.ops.trm.*``) and
its front door for that backend; ``native/loader.py`` and ``triton/loader.py`` build/load the
kernels and hold what the ops share. Tests: ``tests/test_ops_cpu.py`` (native, CPU),
``tests/test_ops_cuda_build.py`` (native, CUDA), ``tests/test_ops_triton.py`` (Triton),
``tests/test_ops_dispatch.py`` (choosing), ``tests/test_ops_auto.py`` (what auto picks); ``-k <op>`` selects one op (``-k stablemax``, ``-k adam``). Benchmarks:
``benchmarks/test_bench_ops.py``.

Shape legend: B batch, L positions (prefix included), D hidden, H heads, K head_dim,
V vocabulary.
"""

from trm.ops.dispatch import (
    BACKENDS,
    adam_atan2,
    describe,
    apply_rope,
    attention,
    get_backend,
    linear,
    log_stablemax,
    rms_norm,
    set_backend,
    softmax_cross_entropy,
    stablemax_cross_entropy,
    summary,
    swiglu,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "adam_atan2",
    "describe",
    "apply_rope",
    "attention",
    "get_backend",
    "linear",
    "log_stablemax",
    "rms_norm",
    "set_backend",
    "softmax_cross_entropy",
    "stablemax_cross_entropy",
    "summary",
    "swiglu",
    "use_backend",
]
