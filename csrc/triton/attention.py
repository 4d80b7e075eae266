"""Non-causal softmax attention, flash-style (Triton): forward and backward, no L x L matrix in memory.

For one (batch b, head h), with ``scale = 1 / sqrt(K)``::

    S = Q K^T * scale,  P = softmax(S, over keys),  O = P V
    forward saves  lse = logsumexp of each row of S  (kept in base 2: lse2 = lse * log2(e))
    backward:  Delta = rowsum(dO * O)
               dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = dS K * scale,  dK = dS^T Q * scale
               (P recomputed blockwise as exp2(S * log2(e) - lse2))

Forward: a program owns BLOCK_M query rows and streams the keys in BLOCK_N blocks with the
online softmax (running max m, running sum l, rescaled accumulator). Backward: a preprocess
kernel computes Delta; one kernel per key block accumulates dK, dV over all query blocks, one
per query block accumulates dQ over all key blocks (no atomics). Positions past L are masked, so
odd lengths (97, 916) work; the head dim K is one block (16, 32, 64 or 128). q, k, v, o and dO
are [B, L, H, K] addressed through their own strides (views into the packed qkv are read in
place). fp16/bf16 inputs go to the tensor cores with fp32 accumulation (P and dS are rounded to
the input dtype before their matmuls, as in FlashAttention); fp32 inputs use exact fp32 dots
(``input_precision="ieee"``, no TF32).

Test:  ``python -m pytest tests/test_ops_triton.py -q -k attention``
Time:  ``python -m trm.ops.triton --bench attention`` (vs PyTorch SDPA).
"""

import triton
import triton.language as tl


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    H, L,
    sq_b, sq_l, sq_h, sq_k,
    sk_b, sk_l, sk_h, sk_k,
    sv_b, sv_l, sv_h, sv_k,
    so_b, so_l, so_h, so_k,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(L, BLOCK_M)). ``qk_scale = scale * log2(e)``; lse is [B * H, L] (base 2)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_mask = (rows < L)[:, None]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_l + d[None, :] * sq_k,
                mask=row_mask, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h + d[None, :] * sk_k
    v_base = v_ptr + b * sv_b + h * sv_h + d[None, :] * sv_k
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = (cols < L)[:, None]
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * sk_l, mask=col_mask, other=0.0)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * sv_l, mask=col_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where((cols < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_l + d[None, :] * so_k,
             acc.to(o_ptr.dtype.element_ty), mask=row_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, m_i + tl.log2(l_i), mask=rows < L)


@triton.jit
def attention_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    H, L,
    so_b, so_l, so_h, so_k,
    sdo_b, sdo_l, sdo_h, sdo_k,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (B * H, cdiv(L, BLOCK_M)): Delta = rowsum(dO * O) in fp32, [B * H, L]."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_mask = (rows < L)[:, None]
    r = rows.to(tl.int64)[:, None]
    o = tl.load(o_ptr + b * so_b + h * so_h + r * so_l + d[None, :] * so_k, mask=row_mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + r * sdo_l + d[None, :] * sdo_k, mask=row_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, L,
    sq_b, sq_l, sq_h, sq_k,
    sk_b, sk_l, sk_h, sk_k,
    sv_b, sv_l, sv_h, sv_k,
    sdo_b, sdo_l, sdo_h, sdo_k,
    sdk_b, sdk_l, sdk_h, sdk_k,
    sdv_b, sdv_l, sdv_h, sdv_k,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(L, BLOCK_N)): dK, dV of BLOCK_N keys, summed over every query block."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    col_mask = (cols < L)[:, None]
    c = cols.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + c * sk_l + d[None, :] * sk_k, mask=col_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + c * sv_l + d[None, :] * sv_k, mask=col_mask, other=0.0)
    q_base = q_ptr + b * sq_b + h * sq_h + d[None, :] * sq_k
    do_base = do_ptr + b * sdo_b + h * sdo_h + d[None, :] * sdo_k
    stats = bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = (rows < L)[:, None]
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * sq_l, mask=row_mask, other=0.0)
        do = tl.load(do_base + rows.to(tl.int64)[:, None] * sdo_l, mask=row_mask, other=0.0)
        lse = tl.load(lse_ptr + stats + rows, mask=rows < L, other=0.0)
        delta = tl.load(delta_ptr + stats + rows, mask=rows < L, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        p_t = tl.where((rows < L)[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    dk *= sm_scale
    tl.store(dk_ptr + b * sdk_b + h * sdk_h + c * sdk_l + d[None, :] * sdk_k,
             dk.to(dk_ptr.dtype.element_ty), mask=col_mask)
    tl.store(dv_ptr + b * sdv_b + h * sdv_h + c * sdv_l + d[None, :] * sdv_k,
             dv.to(dv_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, L,
    sq_b, sq_l, sq_h, sq_k,
    sk_b, sk_l, sk_h, sk_k,
    sv_b, sv_l, sv_h, sv_k,
    sdo_b, sdo_l, sdo_h, sdo_k,
    sdq_b, sdq_l, sdq_h, sdq_k,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(L, BLOCK_M)): dQ of BLOCK_M queries, summed over every key block."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_mask = (rows < L)[:, None]
    r = rows.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + r * sq_l + d[None, :] * sq_k, mask=row_mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + r * sdo_l + d[None, :] * sdo_k, mask=row_mask, other=0.0)
    stats = bh.to(tl.int64) * L
    lse = tl.load(lse_ptr + stats + rows, mask=rows < L, other=0.0)
    delta = tl.load(delta_ptr + stats + rows, mask=rows < L, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h + d[None, :] * sk_k
    v_base = v_ptr + b * sv_b + h * sv_h + d[None, :] * sv_k
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = (cols < L)[:, None]
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * sk_l, mask=col_mask, other=0.0)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * sv_l, mask=col_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.where((cols < L)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dq *= sm_scale
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + r * sdq_l + d[None, :] * sdq_k,
             dq.to(dq_ptr.dtype.element_ty), mask=row_mask)
