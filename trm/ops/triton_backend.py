"""The Triton backend of ``trm.ops``: the kernels of ``csrc/triton/`` behind the reference signatures.

``IMPLS[op]`` has exactly the signature and semantics of ``trm.ops.reference.<op>``;
``available()`` says whether the kernels can run here (never raises). Importing this module
does not import triton: the kernel modules are loaded by file path (``csrc/triton/*.py``; csrc is
not a Python package) on the first ``available()`` or kernel call.

Where the kernels run: CUDA tensors on a GPU; with the Triton interpreter on
(``TRITON_INTERPRET=1`` in the environment before the first use) CPU tensors, the programs run
one by one in numpy (correctness only, slow). Any input the kernels do not cover -- another
device, float64, a head dim outside {16, 32, 64, 128}, a layout that cannot be addressed as
[P, Q, N] without a copy, bf16 in the interpreter (it computes bf16 dots wrong and truncates
fp32 -> bf16 stores), empty tensors -- runs the reference instead: never a wrong answer, never
an error for a legal input.

Gradients: each op with a backward is a ``torch.autograd.Function`` whose backward is a Triton
kernel too. When no gradient is needed (``torch.is_grad_enabled()`` off, or no input requires
grad) the forward kernel runs alone and saves nothing (``rms_norm`` then skips even the 1/rms
it would keep for the backward).

Test: ``python -m pytest tests/test_ops_triton.py -q`` (interpreter on a CPU-only machine,
GPU tests marked ``gpu``). Time: ``python -m trm.ops.triton_backend --bench [op ...]`` (GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from trm.ops import reference

KERNEL_DIR = Path(__file__).resolve().parents[2] / "csrc" / "triton"
KERNEL_FILES = ("rms_norm", "swiglu", "rope", "attention", "stablemax_ce", "adam_atan2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
MAX_ROW = 32768                     # longest rms_norm row / vocabulary held in one program

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "interpret": False, "modules": {}}


# ---------------------------------------------------------------------------------------------
# Loading and availability
# ---------------------------------------------------------------------------------------------

def _load_file(name: str):
    path = KERNEL_DIR / f"{name}.py"
    module_name = f"trm_triton_kernels.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Triton kernel file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module          # registered like an import (inspect finds it by name)
    spec.loader.exec_module(module)
    return module


def _load() -> bool:
    """Import triton and the kernel files once; False (reason kept) on any failure."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        try:
            import triton

            interpret = bool(triton.knobs.runtime.interpret)
            modules = {name: _load_file(name) for name in KERNEL_FILES}
        except Exception as exc:  # noqa: BLE001 -- any import failure means "unavailable"
            _state["error"] = f"{type(exc).__name__}: {exc}"
            return False
        _state.update(interpret=interpret, modules=modules, loaded=True)
        return True


def available() -> tuple[bool, str | None]:
    """``(True, None)`` when the kernels can run here, else ``(False, reason)``; never raises."""
    try:
        if not _load():
            return False, f"triton kernels cannot be loaded: {_state['error']}"
        if _state["interpret"]:
            return True, None
        if torch.cuda.is_available():
            return True, None
        return False, ("no CUDA GPU is visible and the Triton interpreter is off "
                       "(set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors)")
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def _kernels(name: str):
    return _state["modules"][name]


def _interpreting() -> bool:
    return _load() and _state["interpret"]


def _kernel_dtypes() -> tuple[torch.dtype, ...]:
    """Input dtypes the kernels take. The interpreter computes bf16 dots wrong and truncates
    fp32 -> bf16 stores (a GPU rounds to nearest): bf16 runs the reference there."""
    return (torch.float32, torch.float16) if _interpreting() else FLOAT_DTYPES


def _runs_here(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these tensors: all on the kernel device, none empty."""
    if not available()[0]:
        return False
    device = tensors[0].device
    if _state["interpret"]:
        ok_device = device.type == "cpu"
    else:
        ok_device = device.type == "cuda"
    return ok_device and all(t.device == device and t.numel() > 0 for t in tensors)


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (triton launches on the current device); a no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Launch geometry
# ---------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile_elements() -> int:
    """Elements per program: a few thousand on a GPU; many more in the (numpy) interpreter."""
    return 32768 if _interpreting() else 4096


def _num_warps(elements: int) -> int:
    return 4 if elements <= 4096 else 8 if elements <= 8192 else 16


def _rows_layout(outer_shape: Sequence[int], outer_strides: Sequence[Sequence[int]]):
    """Address the rows of several same-shape tensors as ``[P, Q]``: ``(P, Q, [(s_p, s_q), ...])``.

    Adjacent leading dims merge when every tensor's strides allow it; None when more than two
    groups remain (the caller then copies or uses the reference). Row ``p * Q + q`` is the
    row-major index over ``outer_shape`` whatever the merge.
    """
    groups: list[list] = []                     # [size, [stride per tensor]]
    for i, size in enumerate(outer_shape):
        if size == 1:
            continue
        strides = [s[i] for s in outer_strides]
        if groups and all(prev == size * cur for prev, cur in zip(groups[-1][1], strides)):
            groups[-1][0] *= size
            groups[-1][1] = strides
        else:
            groups.append([size, strides])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, [1, [0] * len(outer_strides)])
    (P, p_strides), (Q, q_strides) = groups
    return P, Q, list(zip(p_strides, q_strides))


def _outer(t: torch.Tensor, dim: int) -> tuple[list[int], list[int]]:
    shape = [s for i, s in enumerate(t.shape) if i != dim]
    strides = [s for i, s in enumerate(t.stride()) if i != dim]
    return shape, strides


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------

def _rms_norm_layout(x, residual, dim):
    """The ``[P, Q]`` row layout shared by x, residual and y = empty_like(x), or None."""
    shape, x_strides = _outer(x, dim)
    y_like = torch.empty_like(x, device="meta")            # y's strides, nothing allocated
    strides = [x_strides, _outer(y_like, dim)[1]]
    if residual is not None:
        strides.append(_outer(residual, dim)[1])
    return _rows_layout(shape, strides)


def _rms_norm_forward(x, residual, eps, dim, layout, store_rstd):
    y = torch.empty_like(x)
    P, Q, strides = layout
    (sx_p, sx_q), (sy_p, sy_q) = strides[0], strides[1]
    sr_p, sr_q = strides[2] if residual is not None else (0, 0)
    N = x.shape[dim]
    BLOCK_N = _next_pow2(N)
    BLOCK_Q = max(1, min(_next_pow2(Q), _tile_elements() // BLOCK_N))
    rstd = torch.empty(P * Q if store_rstd else 1, device=x.device, dtype=torch.float32)
    with _on_device(x):
        _kernels("rms_norm").rms_norm_fwd_kernel[(P * _cdiv(Q, BLOCK_Q),)](
            x, residual if residual is not None else x, y, rstd, Q, N,
            sx_p, sx_q, x.stride(dim),
            sr_p, sr_q, residual.stride(dim) if residual is not None else 0,
            sy_p, sy_q, y.stride(dim),
            eps,
            HAS_RESIDUAL=residual is not None, STORE_RSTD=store_rstd,
            BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_Q * BLOCK_N),
        )
    return y, rstd


def _rms_norm_backward(dy, y, rstd, dim):
    dx = torch.empty_like(y)
    shape, _ = _outer(y, dim)
    layout = _rows_layout(shape, [_outer(t, dim)[1] for t in (dy, y, dx)])
    if layout is None:                         # an odd dy layout: one copy, then y's layout holds
        dy = dy.contiguous()
        layout = _rows_layout(shape, [_outer(t, dim)[1] for t in (dy, y, dx)])
    P, Q, ((sdy_p, sdy_q), (sy_p, sy_q), (sdx_p, sdx_q)) = layout
    N = y.shape[dim]
    BLOCK_N = _next_pow2(N)
    BLOCK_Q = max(1, min(_next_pow2(Q), _tile_elements() // BLOCK_N))
    with _on_device(y):
        _kernels("rms_norm").rms_norm_bwd_kernel[(P * _cdiv(Q, BLOCK_Q),)](
            dy, y, rstd, dx, Q, N,
            sdy_p, sdy_q, dy.stride(dim),
            sy_p, sy_q, y.stride(dim),
            sdx_p, sdx_q, dx.stride(dim),
            BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_Q * BLOCK_N),
        )
    return dx


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, eps, dim, layout):
        y, rstd = _rms_norm_forward(x, residual, eps, dim, layout, store_rstd=True)
        ctx.save_for_backward(y, rstd)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        dx = _rms_norm_backward(dy, y, rstd, ctx.dim)
        return dx, (dx if ctx.needs_input_grad[1] else None), None, None, None


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Weightless RMSNorm of ``x + residual`` (or ``x``) over ``dim``, fp32 math, output in x.dtype."""
    layout = None
    if -x.dim() <= dim < x.dim() and x.dtype in _kernel_dtypes():
        axis = dim % x.dim()
        same = residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)
        tensors = (x,) if residual is None else (x, residual)
        if same and x.shape[axis] <= MAX_ROW and _runs_here(*tensors):
            layout = _rms_norm_layout(x, residual, axis)
    if layout is None:
        return reference.rms_norm(x, eps, dim, residual=residual)
    if not _needs_grad(x, residual):
        return _rms_norm_forward(x, residual, float(eps), axis, layout, store_rstd=False)[0]
    return _RMSNormFn.apply(x, residual, float(eps), axis, layout)


# ---------------------------------------------------------------------------------------------
# swiglu
# ---------------------------------------------------------------------------------------------

def _swiglu_geometry(Q: int, F: int) -> tuple[int, int]:
    BLOCK_F = min(_next_pow2(F), 8192 if _interpreting() else 1024)
    BLOCK_Q = max(1, min(_next_pow2(Q), _tile_elements() // BLOCK_F))
    return BLOCK_Q, BLOCK_F


def _swiglu_forward(gate_up, layout):
    F = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], F, dtype=gate_up.dtype, device=gate_up.device)
    P, Q, ((sg_p, sg_q), (sy_p, sy_q)) = layout
    BLOCK_Q, BLOCK_F = _swiglu_geometry(Q, F)
    with _on_device(gate_up):
        _kernels("swiglu").swiglu_fwd_kernel[(P * _cdiv(Q, BLOCK_Q) * _cdiv(F, BLOCK_F),)](
            gate_up, y, Q, F, sg_p, sg_q, gate_up.stride(-1), sy_p, sy_q, y.stride(-1),
            BLOCK_Q=BLOCK_Q, BLOCK_F=BLOCK_F, num_warps=_num_warps(BLOCK_Q * BLOCK_F),
        )
    return y


def _swiglu_backward(dy, gate_up):
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    last = gate_up.dim() - 1
    shape, _ = _outer(gate_up, last)
    layout = _rows_layout(shape, [_outer(t, last)[1] for t in (gate_up, dy, dgu)])
    if layout is None:
        dy = dy.contiguous()
        layout = _rows_layout(shape, [_outer(t, last)[1] for t in (gate_up, dy, dgu)])
    P, Q, ((sg_p, sg_q), (sdy_p, sdy_q), (sd_p, sd_q)) = layout
    F = gate_up.shape[-1] // 2
    BLOCK_Q, BLOCK_F = _swiglu_geometry(Q, F)
    with _on_device(gate_up):
        _kernels("swiglu").swiglu_bwd_kernel[(P * _cdiv(Q, BLOCK_Q) * _cdiv(F, BLOCK_F),)](
            gate_up, dy, dgu, Q, F,
            sg_p, sg_q, gate_up.stride(-1), sdy_p, sdy_q, dy.stride(-1), sd_p, sd_q, dgu.stride(-1),
            BLOCK_Q=BLOCK_Q, BLOCK_F=BLOCK_F, num_warps=_num_warps(BLOCK_Q * BLOCK_F),
        )
    return dgu


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, layout):
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(gate_up, layout)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward(dy, gate_up), None


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.chunk(2, -1)``; fp32 math inside."""
    layout = None
    if (gate_up.dim() > 0 and gate_up.dtype in _kernel_dtypes() and gate_up.shape[-1] % 2 == 0
            and _runs_here(gate_up)):
        last = gate_up.dim() - 1
        shape, strides = _outer(gate_up, last)
        y_strides = torch.empty(shape, device="meta").stride()      # y is contiguous [..., F]
        layout = _rows_layout(shape, [strides, [s * (gate_up.shape[-1] // 2) for s in y_strides]])
    if layout is None:
        return reference.swiglu(gate_up)
    if not _needs_grad(gate_up):
        return _swiglu_forward(gate_up, layout)
    return _SwiGLUFn.apply(gate_up, layout)


# ---------------------------------------------------------------------------------------------
# apply_rope
# ---------------------------------------------------------------------------------------------

def _rope_launch(q, k, cos, sin, transpose: bool):
    B, L, H, K = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_rows = B * L * H
    BLOCK_HALF = _next_pow2(K // 2)
    BLOCK_R = max(1, min(_next_pow2(n_rows), _tile_elements() // (2 * BLOCK_HALF)))
    with _on_device(q):
        _kernels("rope").rope_kernel[(_cdiv(n_rows, BLOCK_R),)](
            q, k, q_out, k_out, cos, sin, n_rows, L, H, K // 2,
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(),
            TRANSPOSE=transpose, BLOCK_R=BLOCK_R, BLOCK_HALF=BLOCK_HALF,
            num_warps=_num_warps(BLOCK_R * 2 * BLOCK_HALF),
        )
    return q_out, k_out


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq_out, dk_out, cos, sin, transpose=True)
        return dq, dk, None, None


def apply_rope(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor):
    """Rotate-half RoPE of q and k (strided [B, L, H, K] views allowed); fp32 tables [L, K]."""
    q, k, cos, sin = q_BLHK, k_BLHK, cos_LK, sin_LK
    supported = (
        q.dim() == 4 and q.shape == k.shape and q.dtype == k.dtype and q.dtype in _kernel_dtypes()
        and q.shape[-1] % 2 == 0
        and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (q.shape[1], q.shape[3])
        and cos.stride() == sin.stride()
        and not _needs_grad(cos, sin)
        and _runs_here(q, k, cos, sin)
    )
    if not supported:
        return reference.apply_rope(q, k, cos, sin)
    if not _needs_grad(q, k):
        return _rope_launch(q, k, cos, sin, transpose=False)
    return _RopeFn.apply(q, k, cos, sin)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _attention_blocks(K: int, L: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): big blocks in the interpreter (few numpy steps, still several blocks at
    L = 916); on a GPU sized so the backward's shared memory stays under ~110 KB (sm_80 / sm_90,
    measured from the sm_90 compile): fp32 tiles are twice the bytes of fp16/bf16 ones."""
    if _interpreting():
        block = min(256, max(16, _next_pow2(L)))
        return block, block
    if dtype == torch.float32:
        return (64, 64) if K <= 32 else (64, 32) if K <= 64 else (32, 32)
    return (64, 64) if K <= 64 else (64, 32)


def _attention_forward(q, k, v):
    B, L, H, K = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    BLOCK_M, BLOCK_N = _attention_blocks(K, L, q.dtype)
    scale = 1.0 / math.sqrt(K)
    with _on_device(q):
        _kernels("attention").attention_fwd_kernel[(B * H, _cdiv(L, BLOCK_M))](
            q, k, v, o, lse, H, L, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            scale * math.log2(math.e),
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
    return o, lse


def _attention_backward(do, q, k, v, o, lse):
    B, L, H, K = q.shape
    BLOCK_M, BLOCK_N = _attention_blocks(K, L, q.dtype)
    scale = 1.0 / math.sqrt(K)
    kernels = _kernels("attention")
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    with _on_device(q):
        kernels.attention_bwd_delta_kernel[(B * H, _cdiv(L, BLOCK_M))](
            o, do, delta, H, L, *o.stride(), *do.stride(), HEAD_DIM=K, BLOCK_M=BLOCK_M, num_warps=4,
        )
        kernels.attention_bwd_dkdv_kernel[(B * H, _cdiv(L, BLOCK_N))](
            q, k, v, do, lse, delta, dk, dv, H, L,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            scale * math.log2(math.e), scale,
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
        kernels.attention_bwd_dq_kernel[(B * H, _cdiv(L, BLOCK_M))](
            q, k, v, do, lse, delta, dq, H, L,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            scale * math.log2(math.e), scale,
            HEAD_DIM=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
        )
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _attention_backward(do, *ctx.saved_tensors)


def attention(q_BLHK: torch.Tensor, k_BLHK: torch.Tensor, v_BLHK: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(K), on [B, L, H, K] (strided views allowed)."""
    q, k, v = q_BLHK, k_BLHK, v_BLHK
    supported = (
        q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
        and q.dtype in _kernel_dtypes() and q.shape[-1] in ATTENTION_HEAD_DIMS
        and _runs_here(q, k, v)
    )
    if not supported:
        return reference.attention(q, k, v)
    if not _needs_grad(q, k, v):
        return _attention_forward(q, k, v)[0]
    return _AttentionFn.apply(q, k, v)


# ---------------------------------------------------------------------------------------------
# stablemax_cross_entropy
# ---------------------------------------------------------------------------------------------

def _ce_geometry(Q: int, V: int) -> tuple[int, int]:
    BLOCK_V = _next_pow2(V)
    BLOCK_Q = max(1, min(_next_pow2(Q), _tile_elements() // BLOCK_V))
    return BLOCK_Q, BLOCK_V


def _ce_forward(logits, labels, ignore_index, layout):
    V = logits.shape[-1]
    P, Q, ((sl_p, sl_q), (sb_p, sb_q)) = layout
    loss = torch.empty(labels.shape, dtype=torch.float64, device=logits.device)
    BLOCK_Q, BLOCK_V = _ce_geometry(Q, V)
    with _on_device(logits):
        _kernels("stablemax_ce").stablemax_ce_fwd_kernel[(P * _cdiv(Q, BLOCK_Q),)](
            logits, labels, loss, Q, V, sl_p, sl_q, logits.stride(-1), sb_p, sb_q, ignore_index,
            BLOCK_Q=BLOCK_Q, BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_Q * BLOCK_V),
        )
    return loss


def _ce_backward(grad, logits, labels, ignore_index):
    V = logits.shape[-1]
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    last = logits.dim() - 1
    shape, logit_strides = _outer(logits, last)
    fixed = [logit_strides, list(labels.stride()), _outer(dlogits, last)[1]]
    layout = _rows_layout(shape, fixed + [list(grad.stride())])
    if layout is None:
        grad = grad.contiguous()
        layout = _rows_layout(shape, fixed + [list(grad.stride())])
    P, Q, ((sl_p, sl_q), (sb_p, sb_q), (sd_p, sd_q), (sg_p, sg_q)) = layout
    BLOCK_Q, BLOCK_V = _ce_geometry(Q, V)
    with _on_device(logits):
        _kernels("stablemax_ce").stablemax_ce_bwd_kernel[(P * _cdiv(Q, BLOCK_Q),)](
            logits, labels, grad, dlogits, Q, V,
            sl_p, sl_q, logits.stride(-1), sb_p, sb_q, sg_p, sg_q, sd_p, sd_q, dlogits.stride(-1),
            ignore_index,
            BLOCK_Q=BLOCK_Q, BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_Q * BLOCK_V),
        )
    return dlogits


class _StablemaxCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, layout):
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index
        return _ce_forward(logits, labels, ignore_index, layout)

    @staticmethod
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        return _ce_backward(grad, logits, labels, ctx.ignore_index), None, None, None


def stablemax_cross_entropy(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
                            ignore_index: int = reference.IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` (float64 result of fp32 math); 0 where ignored.

    A label outside [0, V) that is not ``ignore_index`` raises ValueError (eager mode).
    """
    logits, labels = logits_BLV, labels_BL
    layout = None
    if (logits.dim() >= 1 and logits.dtype in _kernel_dtypes() and labels.shape == logits.shape[:-1]
            and not labels.dtype.is_floating_point and not labels.dtype.is_complex
            and labels.dtype != torch.bool and logits.shape[-1] <= MAX_ROW and _runs_here(logits, labels)):
        shape, logit_strides = _outer(logits, logits.dim() - 1)
        layout = _rows_layout(shape, [logit_strides, list(labels.stride())])
    if layout is None:
        return reference.stablemax_cross_entropy(logits, labels, ignore_index)
    reference.check_labels(labels, logits.shape[-1], ignore_index)
    if not _needs_grad(logits):
        return _ce_forward(logits, labels, ignore_index, layout)
    return _StablemaxCEFn.apply(logits, labels, ignore_index, layout)


# ---------------------------------------------------------------------------------------------
# adam_atan2
# ---------------------------------------------------------------------------------------------

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE_SIZE = 8


def _adam_table(lists: Sequence[Sequence[torch.Tensor]], block: int) -> torch.Tensor:
    """The int64 launch table (see csrc/triton/adam_atan2.py), cached by its own content."""
    numels = [t.numel() for t in lists[0]]
    device = lists[0][0].device
    key = (device, block, *(t.data_ptr() for ts in lists for t in ts), *numels)
    table = _TABLE_CACHE.get(key)
    if table is None:
        block_tensor, block_start = [], []
        for i, n in enumerate(numels):
            starts = range(0, n, block)
            block_tensor.extend([i] * len(starts))
            block_start.extend(starts)
        values = [t.data_ptr() for ts in lists for t in ts] + numels + block_tensor + block_start
        table = torch.tensor(values, dtype=torch.int64, device=device)
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = table
    return table


def adam_atan2(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float,
               weight_decay: float) -> None:
    """In-place AdamATan2 step of every tensor in one launch (math of trm.train.optim.AdamATan2).

    ``step`` is the step number after the increment (>= 1). fp32, contiguous, same-device
    tensors run the kernel; anything else runs the reference.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    n = len(params)
    if any(len(ts) != n for ts in lists):
        raise ValueError(f"adam_atan2: params, grads, exp_avgs, exp_avg_sqs must have the same length, "
                         f"got {[len(ts) for ts in lists]}")
    if step < 1:
        raise ValueError(f"adam_atan2: step must be >= 1 (the step number after the increment), got {step}")
    if n == 0:
        return
    flat = [t for ts in lists for t in ts]
    supported = (
        all(t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad for t in flat)
        and all(params[i].shape == grads[i].shape == exp_avgs[i].shape == exp_avg_sqs[i].shape for i in range(n))
        and _runs_here(*flat)
    )
    if not supported:
        reference.adam_atan2(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                             beta2=beta2, weight_decay=weight_decay)
        return
    block = 65536 if _interpreting() else 1024
    table = _adam_table(lists, block)
    n_blocks = sum(_cdiv(t.numel(), block) for t in params)
    with _on_device(params[0]):
        _kernels("adam_atan2").adam_atan2_kernel[(n_blocks,)](
            table, n,
            1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2,
            math.sqrt(1.0 - beta2 ** step), lr / (1.0 - beta1 ** step),
            HAS_DECAY=weight_decay != 0.0, BLOCK=block, num_warps=4,
        )


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 ``atan2`` on two contiguous same-shape fp32 tensors (for tests)."""
    if not (y.shape == x.shape and y.dtype == x.dtype == torch.float32 and _runs_here(y, x)):
        raise ValueError("atan2: needs two same-shape float32 tensors on the kernel device")
    y, x = y.contiguous(), x.contiguous()
    out = torch.empty_like(y)
    block = 65536 if _interpreting() else 1024
    with _on_device(y):
        _kernels("adam_atan2").atan2_kernel[(_cdiv(y.numel(), block),)](y, x, out, y.numel(), BLOCK=block)
    return out


IMPLS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "swiglu": swiglu,
    "apply_rope": apply_rope,
    "attention": attention,
    "stablemax_cross_entropy": stablemax_cross_entropy,
    "adam_atan2": adam_atan2,
}


# ---------------------------------------------------------------------------------------------
# Timing: python -m trm.ops.triton_backend --bench [op ...]
# ---------------------------------------------------------------------------------------------

BenchCase = tuple[str, Callable[[], object], Callable[[], object]]    # (label, kernel run, reference run)


def _bench_cases(device: str, batch: int = 256) -> dict[str, list[BenchCase]]:
    """op -> [(case, run with the kernel, run with the reference)]: forward + backward, TRM shapes
    (``batch`` sequences of 97 positions, hidden 512, 8 heads of 64, vocabulary 11)."""
    B = batch
    bf16 = dict(device=device, dtype=torch.bfloat16)

    def fwd_bwd(fn, make_inputs):
        inputs = make_inputs()

        def run():
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o.float().sum() for o in outs])
        return run

    def leaf(*shape, **kw):
        return torch.randn(*shape, **{**bf16, **kw}).requires_grad_(True)

    cases: dict[str, list] = {op: [] for op in IMPLS}
    for label, make in (
        (f"{B}x97x512 bf16 +residual", lambda: (leaf(B, 97, 512), leaf(B, 97, 512))),
        (f"{B}x512x97 (over L, strided) bf16 +residual", lambda: (leaf(B, 97, 512).transpose(1, 2), leaf(B, 512, 97))),
    ):
        cases["rms_norm"].append((label, fwd_bwd(lambda x, r: IMPLS["rms_norm"](x, 1e-5, -1, r), make),
                                  fwd_bwd(lambda x, r: reference.rms_norm(x, 1e-5, -1, residual=r), make)))
    make = lambda: (leaf(B, 97, 2 * 1536),)                                       # noqa: E731
    cases["swiglu"].append((f"{B}x97x3072 bf16", fwd_bwd(IMPLS["swiglu"], make), fwd_bwd(reference.swiglu, make)))
    cos, sin = (t.to(device) for t in (torch.randn(97, 64), torch.randn(97, 64)))

    def rope_with(fn):
        return lambda qkv: fn(*qkv.view(B, 97, 24, 64).split(8, dim=2)[:2], cos, sin)

    make = lambda: (leaf(B, 97, 24 * 64),)                                        # noqa: E731
    cases["apply_rope"].append((f"{B}x97x8x64 bf16 (views of qkv)", fwd_bwd(rope_with(IMPLS["apply_rope"]), make),
                                fwd_bwd(rope_with(reference.apply_rope), make)))
    for n, L in ((B, 97), (max(1, B // 8), 916)):
        def attn_with(fn, n=n, L=L):
            return lambda qkv: fn(*qkv.view(n, L, 24, 64).split(8, dim=2))
        make = lambda n=n, L=L: (leaf(n, L, 24 * 64),)                           # noqa: E731
        cases["attention"].append((f"{n}x{L}x8x64 bf16", fwd_bwd(attn_with(IMPLS["attention"]), make),
                                   fwd_bwd(attn_with(reference.attention), make)))
    labels = torch.randint(0, 11, (3 * B, 97), device=device)
    make = lambda: (leaf(3 * B, 97, 11, dtype=torch.float32),)                   # noqa: E731
    cases["stablemax_cross_entropy"].append((
        f"{3 * B}x97x11 fp32", fwd_bwd(lambda x: IMPLS["stablemax_cross_entropy"](x, labels), make),
        fwd_bwd(lambda x: reference.stablemax_cross_entropy(x, labels), make)))
    shapes = [(512, 512)] * 12 + [(1536, 512)] * 4 + [(512, 1536)] * 4 + [(11, 512), (512,)]
    state = [[torch.randn(s, device=device) for s in shapes] for _ in range(4)]
    state[3] = [t.abs() for t in state[3]]
    step_args = dict(step=10, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
    cases["adam_atan2"].append((f"{len(shapes)} tensors, {sum(t.numel() for t in state[0]) / 1e6:.1f}M fp32",
                                lambda: IMPLS["adam_atan2"](*state, **step_args),
                                lambda: reference.adam_atan2(*state, **step_args)))
    return cases


def main(argv: list[str] | None = None) -> None:
    """Print kernel vs reference times (median ms, triton.testing.do_bench) on a CUDA GPU."""
    import argparse

    parser = argparse.ArgumentParser(description="Time the Triton kernels against the PyTorch reference.")
    parser.add_argument("--bench", nargs="*", metavar="OP", help=f"ops to time (default all): {', '.join(IMPLS)}")
    args = parser.parse_args(argv)
    ok, why = available()
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU; none is visible")
    if not ok or _interpreting():
        raise SystemExit(f"timing needs the compiled kernels: {why or 'unset TRITON_INTERPRET'}")
    if args.bench is None:
        parser.print_help()
        return
    from triton.testing import do_bench

    unknown = set(args.bench) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown op(s) {sorted(unknown)}; ops: {', '.join(IMPLS)}")
    print(f"{'op':<24} {'case':<44} {'triton ms':>10} {'torch ms':>10} {'speedup':>8}")
    for op, cases in _bench_cases("cuda").items():
        if args.bench and op not in args.bench:
            continue
        for label, ours, theirs in cases:
            t_ours, t_ref = do_bench(ours), do_bench(theirs)
            print(f"{op:<24} {label:<44} {t_ours:>10.3f} {t_ref:>10.3f} {t_ref / t_ours:>7.2f}x")


if __name__ == "__main__":
    main()
