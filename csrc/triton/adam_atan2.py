"""Fused multi-tensor AdamATan2 step (Triton): every parameter tensor updated in place by ONE launch.

Per element of each (param p, grad g, exp_avg m, exp_avg_sq v), step t (t >= 1, after the
increment), the math of ``trm.train.optim.AdamATan2``::

    p *= 1 - lr * weight_decay                                  (decay, only when wd != 0)
    m = lerp(m, g, 1 - beta1);  v = lerp(v, g * g, 1 - beta2)   (torch.lerp's two-sided formula)
    p -= (lr / (1 - beta1^t)) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

Multi-tensor scheme: the host builds one int64 table ``[p_ptrs | g_ptrs | m_ptrs | v_ptrs |
numels | block_tensor | block_start]`` (T tensors, NB blocks of BLOCK elements; cached by the
caller while the tensors stay put); program ``i`` looks up its tensor and offset, casts the
stored addresses to fp32 pointers and updates ``BLOCK`` elements. ``atan2`` is our own
(libdevice is not available in the Triton interpreter): octant reduction to ``r`` in
[-1/3, 1/2], a degree-13 odd minimax polynomial (relative error 3e-10 before rounding) and
hi+lo constants for pi/4, pi/2, pi; measured max error 1.8 ulp (1.6e-7 relative) against fp64
``atan2`` in fp32, with IEEE zeros, signs and infinities. Divisions and square roots are the
correctly rounded ``div_rn`` / ``sqrt_rn`` (plain ``/`` and ``tl.sqrt`` are approximate on GPU).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k adam_atan2``
Time:  ``python -m trm.ops.triton --bench adam_atan2`` (vs the torch._foreach optimizer).
"""

import triton
import triton.language as tl

# atan(r) = r + r * z * P(z), z = r^2, |r| <= 1/2: minimax coefficients of P (fitted here in fp64).
_ATAN_C0 = tl.constexpr(-0.333333283662796)
_ATAN_C1 = tl.constexpr(0.19999489188194275)
_ATAN_C2 = tl.constexpr(-0.1427207887172699)
_ATAN_C3 = tl.constexpr(0.10940980911254883)
_ATAN_C4 = tl.constexpr(-0.07984056323766708)
_ATAN_C5 = tl.constexpr(0.03872314840555191)
# pi/4, pi/2, pi as fp32 hi + lo pairs.
_PI_4_HI = tl.constexpr(0.7853981852531433)
_PI_4_LO = tl.constexpr(-2.1855694143368964e-08)
_PI_2_HI = tl.constexpr(1.5707963705062866)
_PI_2_LO = tl.constexpr(-4.371138828673793e-08)
_PI_HI = tl.constexpr(3.1415927410125732)
_PI_LO = tl.constexpr(-8.742277657347586e-08)


@triton.jit
def atan2(y, x):
    """Elementwise fp32 ``atan2(y, x)`` (see the module docstring for accuracy)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    mn = tl.minimum(ax, ay)
    equal = mn == mx
    # a = mn / mx > 1/2: atan(a) = pi/4 + atan(r), r = (mn - mx) / (mn + mx) (mn - mx is exact)
    big = (mn * 2.0 > mx) | (equal & (mx > 0.0))
    scale = tl.where(mx > 1e37, 0.25, 1.0)              # keeps mn + mx finite
    r_big = tl.div_rn(mn * scale - mx * scale, tl.where(mx == 0.0, 1.0, mn * scale + mx * scale))
    r_small = tl.div_rn(mn, tl.where(mx == 0.0, 1.0, mx))
    r = tl.where(equal, 0.0, tl.where(big, r_big, r_small))
    z = r * r
    poly = _ATAN_C5
    poly = poly * z + _ATAN_C4
    poly = poly * z + _ATAN_C3
    poly = poly * z + _ATAN_C2
    poly = poly * z + _ATAN_C1
    poly = poly * z + _ATAN_C0
    angle = r + r * (z * poly)
    angle = tl.where(big, _PI_4_HI + (angle + _PI_4_LO), angle)
    angle = tl.where(ay > ax, _PI_2_HI + (_PI_2_LO - angle), angle)
    x_negative = x.to(tl.int32, bitcast=True) < 0       # sign bit: atan2(+-0, -0) = +-pi
    angle = tl.where(x_negative, _PI_HI + (_PI_LO - angle), angle)
    angle = tl.where(y.to(tl.int32, bitcast=True) < 0, -angle, angle)
    return tl.where((x != x) | (y != y), x + y, angle)  # NaN in, NaN out


@triton.jit
def atan2_kernel(y_ptr, x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Elementwise atan2 of two contiguous fp32 buffers (the test's window on ``atan2``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, atan2(y, x), mask=mask)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp: ``start + w * (end - start)`` for w < 0.5, else ``end - (end - start) * (1 - w)``."""
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


@triton.jit
def adam_atan2_kernel(
    table_ptr, T,
    decay, weight1, weight2, bias2_sqrt, step_size,
    HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (NB,). ``table_ptr`` is the int64 table above; the scalars are fp32:
    decay = 1 - lr*wd, weight1 = 1 - beta1, weight2 = 1 - beta2,
    bias2_sqrt = sqrt(1 - beta2^t), step_size = lr / (1 - beta1^t)."""
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    tensor = tl.load(table_ptr + 5 * T + pid)
    start = tl.load(table_ptr + 5 * T + n_blocks + pid)
    numel = tl.load(table_ptr + 4 * T + tensor)
    p_ptr = tl.load(table_ptr + tensor).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(table_ptr + T + tensor).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(table_ptr + 2 * T + tensor).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(table_ptr + 3 * T + tensor).to(tl.pointer_type(tl.float32))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_DECAY:
        p = p * decay
    m = _lerp(m, g, weight1)
    v = _lerp(v, g * g, weight2)
    direction = atan2(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt))
    p = p - direction * step_size
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
