"""FlashAttention-2 forward kernel, one Triton source for NVIDIA and AMD.

Layout (batch, seqlen, nheads, headdim), last dim contiguous. One program computes BLOCK_M query rows of one
(batch, head); the online softmax runs in base 2 with the scale folded in. The key loop is split in two phases:
blocks that need no mask at all, then the few boundary blocks (causal diagonal, ragged seqlen_k) that do.

Causal masking is aligned to the bottom-right corner (flash-attn 2): query i sees key j iff j <= i + seqlen_k -
seqlen_q. A row that sees no key at all gets output 0 and LSE +inf, as flash-attn 2 does.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _d_ok(offs_d, head_dim, D_MASK: tl.constexpr):
    # Without D_MASK the head dim equals the block, so the mask is a compile-time "all true" and the loads and
    # stores stay 16-byte vectors.
    if D_MASK:
        return offs_d < head_dim
    else:
        return offs_d >= 0


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, start, stop, stride_kn, stride_vn, seqlen_k, causal_shift,
    qk_scale_log2, BLOCK_N: tl.constexpr, D_MASK: tl.constexpr, head_dim, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[None, :] < seqlen_k) & _d_ok(offs_d, head_dim, D_MASK)[:, None], other=0.0)
        elif D_MASK:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, k) * qk_scale_log2
        if MASKED:
            keep = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with every key masked so far keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & _d_ok(offs_d, head_dim, D_MASK)[None, :], other=0.0)
        elif D_MASK:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE,  # noqa: E741 - the paper's names
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    nheads, head_ratio, seqlen_q, seqlen_k, head_dim, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    off_hk = off_h // head_ratio  # GQA/MQA: query heads share a KV head, no copy of K/V

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    row_ok = offs_m[:, None] < seqlen_q
    d_ok = _d_ok(offs_d, head_dim, D_MASK)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok & d_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_shift = seqlen_k - seqlen_q
    if IS_CAUSAL:
        # Keys visible to the last row of this block, and keys visible to every row of it.
        stop = tl.minimum(seqlen_k, tl.maximum(pid_m * BLOCK_M + BLOCK_M + causal_shift, 0))
        full = tl.minimum(seqlen_k, tl.maximum(pid_m * BLOCK_M + 1 + causal_shift, 0))
    else:
        stop = seqlen_k
        full = seqlen_k
    full = (full // BLOCK_N) * BLOCK_N

    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, 0, full, stride_kn, stride_vn,
                               seqlen_k, causal_shift, qk_scale_log2, BLOCK_N, D_MASK, head_dim, False, IS_CAUSAL)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, full, stop, stride_kn, stride_vn,
                               seqlen_k, causal_shift, qk_scale_log2, BLOCK_N, D_MASK, head_dim, True, IS_CAUSAL)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(LSE + (off_b * nheads + off_h) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


# The kernel's run-time parameters in launch order, with their Triton types. The dispatcher packs arguments by
# these names (the manifest carries this list per image), so the kernel signature is stated here and nowhere else.
def fwd_params(dtype: str) -> list[tuple[str, str]]:
    ptr = f"*{dtype}"
    return [
        ("Q", ptr), ("K", ptr), ("V", ptr), ("O", ptr), ("LSE", "*fp32"),
        ("stride_qb", "i64"), ("stride_qh", "i64"), ("stride_qm", "i32"),
        ("stride_kb", "i64"), ("stride_kh", "i64"), ("stride_kn", "i32"),
        ("stride_vb", "i64"), ("stride_vh", "i64"), ("stride_vn", "i32"),
        ("stride_ob", "i64"), ("stride_oh", "i64"), ("stride_om", "i32"),
        ("nheads", "i32"), ("head_ratio", "i32"), ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim", "i32"),
        ("qk_scale_log2", "fp32"),
    ]


def attn_fwd_grid(seqlen_q: int, batch: int, nheads: int, block_m: int) -> tuple[int, int, int]:
    return (triton.cdiv(seqlen_q, block_m), batch * nheads, 1)
