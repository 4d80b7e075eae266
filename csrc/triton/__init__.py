"""Triton kernels of the trm ops: one file per op, forward and backward kernels side by side.

    rms_norm.py      weightless RMSNorm (+ fused residual), any axis via strides; forward-only variant
    swiglu.py        silu(gate) * up on the packed gate_up tensor
    rope.py          rotate-half RoPE of q and k (views into the packed qkv) in one launch
    attention.py     flash-style non-causal attention (forward, Delta, dK/dV, dQ)
    stablemax_ce.py  stablemax cross-entropy per token, many rows per program
    adam_atan2.py    fused multi-tensor AdamATan2 step (+ the fp32 atan2 it needs)

These files are plain Python modules with ``@triton.jit`` functions; they hold no launch logic.
``trm.ops.triton.loader`` loads them BY FILE PATH (csrc is not on ``sys.path``: do not add it,
this package's name would shadow the ``triton`` module); ``trm.ops.triton.<same name>`` picks the
block sizes, launches them, wraps them in ``torch.autograd.Function`` and is the op's ``triton``
backend.

Test: ``python -m pytest tests/test_ops_triton.py -q`` (CPU: the Triton interpreter; GPU: ``gpu``
tests). Time: ``python -m trm.ops.triton --bench [op ...]`` on a GPU.
"""
