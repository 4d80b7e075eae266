"""Rotate-half rotary position embedding of q and k in one launch (Triton), forward and backward.

With ``x = [x1, x2]`` split in halves along the head dim K and fp32 tables ``cos, sin`` [L, K]
(split the same way into ``c1, c2`` and ``s1, s2``)::

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
        i.e. out1 = x1 * c1 - x2 * s1,  out2 = x2 * c2 + x1 * s2
    backward (the transpose):  dx1 = g1 * c1 + g2 * s2,  dx2 = g2 * c2 - g1 * s1

q and k are [B, L, H, K] tensors addressed through their own four strides: in the model they are
views into the packed qkv projection, read in place. The outputs are new tensors (any strides,
passed in). A program rotates ``BLOCK_R`` rows (a row = one (b, l, h)) of q and the same rows
of k. Math in fp32; loads go to fp32 first (the interpreter gets bf16 math wrong).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k rope``
Time:  ``python -m trm.ops.triton --bench apply_rope``
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_rows(
    x_ptr, o_ptr, cos_ptr, sin_ptr, rows, n_rows, L, H, HALF,
    sx_b, sx_l, sx_h, sx_k, so_b, so_l, so_h, so_k, sc_l, sc_k,
    TRANSPOSE: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    h = rows % H
    l = (rows // H) % L
    b = rows // (H * L)
    k = tl.arange(0, BLOCK_HALF).to(tl.int64)
    mask = (rows < n_rows)[:, None] & (k < HALF)[None, :]
    x_base = (b * sx_b + l * sx_l + h * sx_h)[:, None] + k[None, :] * sx_k
    o_base = (b * so_b + l * so_l + h * so_h)[:, None] + k[None, :] * so_k
    c_base = (l * sc_l)[:, None] + k[None, :] * sc_k
    x1 = tl.load(x_ptr + x_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_base + HALF * sx_k, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_base, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_base + HALF * sc_k, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_base, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_base + HALF * sc_k, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr + o_base, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + o_base + HALF * so_k, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    n_rows, L, H, HALF,
    sq_b, sq_l, sq_h, sq_k,
    sk_b, sk_l, sk_h, sk_k,
    sqo_b, sqo_l, sqo_h, sqo_k,
    sko_b, sko_l, sko_h, sko_k,
    sc_l, sc_k,
    TRANSPOSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Forward (TRANSPOSE=False: q, k -> rotated) or backward (TRANSPOSE=True: grads -> grads)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    _rotate_rows(q_ptr, qo_ptr, cos_ptr, sin_ptr, rows, n_rows, L, H, HALF,
                 sq_b, sq_l, sq_h, sq_k, sqo_b, sqo_l, sqo_h, sqo_k, sc_l, sc_k, TRANSPOSE, BLOCK_HALF)
    _rotate_rows(k_ptr, ko_ptr, cos_ptr, sin_ptr, rows, n_rows, L, H, HALF,
                 sk_b, sk_l, sk_h, sk_k, sko_b, sko_l, sko_h, sko_k, sc_l, sc_k, TRANSPOSE, BLOCK_HALF)
