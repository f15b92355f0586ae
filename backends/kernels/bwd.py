"""FlashAttention-2 backward kernels, one Triton source for NVIDIA and AMD.

The forward's semantics (fwd.py: layout, band mask, softcap, ALiBi) differentiated. Probabilities are recomputed from
the forward's log-sum-exp, so nothing of size seqlen_q x seqlen_k is stored. With P = exp(S - lse):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O),
    dQ = scale * (dS * c) K,  dK = scale * (dS * c)^T Q,   c = 1 - tanh^2 (softcap) or 1.
Two kernels, no atomics, so gradients are bitwise deterministic:
- attn_bwd_dq: one program per BLOCK_M query rows of one (batch, head), looping over key blocks as the forward does;
  it first writes delta for its rows.
- attn_bwd_dkdv: one program per BLOCK_N keys of one (batch, KV head), looping over the query heads that share the
  KV head (GQA/MQA: their sum, in a fixed order) and over query blocks. Launched after attn_bwd_dq, which writes delta.
Both share one parameter list (bwd_params), so one argument set serves both launches. Varlen images (VARLEN) find
their sequence as the forward's do (fwd._sequence); DELTA is laid out as LSE.
"""

import triton
import triton.language as tl
from fwd import LOG2E, _d_ok, _key_phases, _lse_row, _sequence, _tanh, layout_params, tile_constexprs


@triton.jit
def _scores(qk, rows, cols, shift, qk_scale_log2, softcap_in, alibi_log2, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr):
    """Scores in base 2 as the forward computes them, and tanh of the capped score (the softcap derivative's
    input). rows and cols broadcast to qk's shape."""
    if SOFTCAP:
        t = _tanh(qk * softcap_in)
        s = t * qk_scale_log2
    else:
        t = qk
        s = qk * qk_scale_log2
    if ALIBI:
        s -= alibi_log2 * tl.abs(cols - (rows + shift)).to(tl.float32)
    return s, t


@triton.jit
def _dscores(p, dp, delta, t, SOFTCAP: tl.constexpr):
    # dS times the derivative of the capped score; the scale is applied once at the end.
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dq_block(
    dq, q, do, lse_log2, delta, k_base, v_base, offs_m, offs_d, first, n_blocks, gap_at, gap, stride_kn, stride_vn,
    seqlen_k, shift, key_lo, key_hi, qk_scale_log2, softcap_in, alibi_log2, head_dim,
    BLOCK_N: tl.constexpr, D_MASK: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """dQ over n_blocks key blocks from key `first` on, skipping `gap` keys after the first gap_at (as _fwd_block)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = _d_ok(offs_d, head_dim, D_MASK)
    for t in range(0, n_blocks):
        start_n = first + t * BLOCK_N
        if MASKED:
            start_n += tl.where(t >= gap_at, gap, 0)
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None]
        if MASKED:
            kv_ok = (cols[None, :] < seqlen_k) & d_ok[:, None]
            kt = tl.load(kt_ptrs, mask=kv_ok, other=0.0)
            vt = tl.load(vt_ptrs, mask=kv_ok, other=0.0)
        elif D_MASK:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        qk = tl.dot(q, kt)
        s, tc = _scores(qk, offs_m[:, None], cols[None, :], shift, qk_scale_log2, softcap_in, alibi_log2, SOFTCAP,
                        ALIBI)
        if MASKED:
            keep = (cols[None, :] >= key_lo[:, None]) & (cols[None, :] <= key_hi[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse_log2[:, None])
        dp = tl.dot(do, vt)
        ds = _dscores(p, dp, delta[:, None], tc, SOFTCAP)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, first, n_blocks, gap_at, gap, stride_qm,
    stride_dom, seqlen_q, shift, row_lo, row_hi, qk_scale_log2, softcap_in, alibi_log2, head_dim,
    BLOCK_M: tl.constexpr, D_MASK: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """dK, dV of this program's keys over n_blocks query blocks from row `first` on, skipping `gap` rows after the
    first gap_at. Works on transposed scores (keys x rows), so P^T and dS^T feed the matmuls directly."""
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = _d_ok(offs_d, head_dim, D_MASK)
    for t in range(0, n_blocks):
        start_m = first + t * BLOCK_M
        if MASKED:
            start_m += tl.where(t >= gap_at, gap, 0)
        rows = start_m + offs_m
        qt_ptrs = q_base + rows[None, :] * stride_qm + offs_d[:, None]
        do_ptrs = do_base + rows[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            row_ok = rows < seqlen_q
            qt = tl.load(qt_ptrs, mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # Rows past seqlen_q: lse +inf makes their probabilities 0.
            lse_log2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            qt = tl.load(qt_ptrs, mask=d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse_log2 = tl.load(lse_base + rows) * LOG2E
            delta = tl.load(delta_base + rows)
        qkt = tl.dot(k, qt)
        st, tc = _scores(qkt, rows[None, :], offs_n[:, None], shift, qk_scale_log2, softcap_in, alibi_log2, SOFTCAP,
                         ALIBI)
        if MASKED:
            keep = (rows[None, :] >= row_lo[:, None]) & (rows[None, :] <= row_hi[:, None])
            st = tl.where(keep, st, float("-inf"))
        pt = tl.math.exp2(st - lse_log2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = _dscores(pt, dpt, delta[None, :], tc, SOFTCAP)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def attn_bwd_dq(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, ALIBI,  # noqa: E741 - the paper's names
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ab, stride_ah,
    nheads, head_ratio, seqlen_q, seqlen_k, head_dim_8, window_left, window_right,
    qk_scale_log2, softcap_in, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    VARLEN: tl.constexpr = False, CU_Q=None, CU_K=None, total_q=0, total_k=0,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    off_hk = off_h // head_ratio
    head_dim = head_dim_8 * 8
    q_start = 0
    if VARLEN:
        q_start, seqlen_q = _sequence(CU_Q, off_b, total_q, seqlen_q)
        k_start, seqlen_k = _sequence(CU_K, off_b, total_k, seqlen_k)
        if pid_m * BLOCK_M >= seqlen_q:  # the grid spans the longest sequence
            return
        Q += q_start * (stride_qm * 8)
        O += q_start * (stride_om * 8)  # noqa: E741 - the paper's names
        DO += q_start * (stride_dom * 8)
        DQ += q_start * (stride_dqm * 8)
        K += k_start * (stride_kn * 8)
        V += k_start * (stride_vn * 8)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    tile_ok = row_ok[:, None] & _d_ok(offs_d, head_dim, D_MASK)[None, :]
    # Strides arrive in units of 8 elements (fwd.STRIDE_UNIT).
    rows_q = off_b * stride_qb * 8 + off_h * stride_qh * 8 + offs_m[:, None] * (stride_qm * 8) + offs_d[None, :]
    rows_o = off_b * stride_ob * 8 + off_h * stride_oh * 8 + offs_m[:, None] * (stride_om * 8) + offs_d[None, :]
    rows_do = off_b * stride_dob * 8 + off_h * stride_doh * 8 + offs_m[:, None] * (stride_dom * 8) + offs_d[None, :]
    q = tl.load(Q + rows_q, mask=tile_ok, other=0.0)
    do = tl.load(DO + rows_do, mask=tile_ok, other=0.0)
    o = tl.load(O + rows_o, mask=tile_ok, other=0.0)
    row_vec = _lse_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN) + offs_m
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_vec, delta, mask=row_ok)
    lse_log2 = tl.load(LSE + row_vec, mask=row_ok, other=float("inf")) * LOG2E
    alibi_log2 = 0.0
    if ALIBI_ON:
        alibi_log2 = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah) * LOG2E

    k_base = K + off_b * stride_kb * 8 + off_hk * stride_kh * 8
    v_base = V + off_b * stride_vb * 8 + off_hk * stride_vh * 8
    shift = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _key_phases(m0, seqlen_q, seqlen_k, shift, window_left, window_right, BLOCK_M,
                                           BLOCK_N)
    key_lo = offs_m + shift - window_left
    key_hi = tl.minimum(offs_m + shift + window_right, seqlen_k - 1)
    n_full = (full_hi - full_lo) // BLOCK_N
    n_left = tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N)
    n_right = tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_block(dq, q, do, lse_log2, delta, k_base, v_base, offs_m, offs_d, full_lo, n_full, n_full, 0,
                   stride_kn * 8, stride_vn * 8, seqlen_k, shift, key_lo, key_hi, qk_scale_log2, softcap_in,
                   alibi_log2, head_dim, BLOCK_N, D_MASK, False, SOFTCAP, ALIBI_ON)
    dq = _dq_block(dq, q, do, lse_log2, delta, k_base, v_base, offs_m, offs_d, lo, n_left + n_right, n_left,
                   full_hi - full_lo, stride_kn * 8, stride_vn * 8, seqlen_k, shift, key_lo, key_hi, qk_scale_log2,
                   softcap_in, alibi_log2, head_dim, BLOCK_N, D_MASK, True, SOFTCAP, ALIBI_ON)
    dq_ptrs = DQ + off_b * stride_dqb * 8 + off_h * stride_dqh * 8 + offs_m[:, None] * (stride_dqm * 8)
    tl.store(dq_ptrs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, ALIBI,  # noqa: E741 - the paper's names
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ab, stride_ah,
    nheads, head_ratio, seqlen_q, seqlen_k, head_dim_8, window_left, window_right,
    qk_scale_log2, softcap_in, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    VARLEN: tl.constexpr = False, CU_Q=None, CU_K=None, total_q=0, total_k=0,
):
    # Key blocks with the most query rows (the first ones under a causal band) start first.
    pid_n = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bhk = tl.program_id(1)
    nheads_k = nheads // head_ratio
    off_b = (pid_bhk // nheads_k).to(tl.int64)
    off_hk = (pid_bhk % nheads_k).to(tl.int64)
    head_dim = head_dim_8 * 8
    q_start = 0
    if VARLEN:
        # Keys of a sequence with no query rows still get their (zero) dK, dV; only programs past the keys stop.
        q_start, seqlen_q = _sequence(CU_Q, off_b, total_q, seqlen_q)
        k_start, seqlen_k = _sequence(CU_K, off_b, total_k, seqlen_k)
        if pid_n * BLOCK_N >= seqlen_k:  # the grid spans the longest sequence
            return
        Q += q_start * (stride_qm * 8)
        DO += q_start * (stride_dom * 8)
        K += k_start * (stride_kn * 8)
        V += k_start * (stride_vn * 8)
        DK += k_start * (stride_dkn * 8)
        DV += k_start * (stride_dvn * 8)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_n < seqlen_k)[:, None] & _d_ok(offs_d, head_dim, D_MASK)[None, :]
    k = tl.load(K + off_b * stride_kb * 8 + off_hk * stride_kh * 8 + offs_n[:, None] * (stride_kn * 8)
                + offs_d[None, :], mask=tile_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb * 8 + off_hk * stride_vh * 8 + offs_n[:, None] * (stride_vn * 8)
                + offs_d[None, :], mask=tile_ok, other=0.0)

    # The band seen from the keys: key j is seen by rows j - shift - right ..= j - shift + left, the forward's
    # phases with the roles of rows and keys swapped. Keys past seqlen_k only fill rows of dK/dV never stored.
    shift = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _key_phases(n0, seqlen_k, seqlen_q, -shift, window_right, window_left, BLOCK_N,
                                           BLOCK_M)
    row_lo = offs_n - shift - window_right
    row_hi = tl.minimum(offs_n - shift + window_left, seqlen_q - 1)
    n_full = (full_hi - full_lo) // BLOCK_M
    n_left = tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_M)
    n_right = tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r in range(0, head_ratio):
        off_h = off_hk * head_ratio + r
        q_base = Q + off_b * stride_qb * 8 + off_h * stride_qh * 8
        do_base = DO + off_b * stride_dob * 8 + off_h * stride_doh * 8
        lse_row = _lse_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN)
        lse_base = LSE + lse_row
        delta_base = DELTA + lse_row
        alibi_log2 = 0.0
        if ALIBI_ON:
            alibi_log2 = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah) * LOG2E
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, full_lo, n_full,
                             n_full, 0, stride_qm * 8, stride_dom * 8, seqlen_q, shift, row_lo, row_hi,
                             qk_scale_log2, softcap_in, alibi_log2, head_dim, BLOCK_M, D_MASK, False, SOFTCAP,
                             ALIBI_ON)
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, lo,
                             n_left + n_right, n_left, full_hi - full_lo, stride_qm * 8, stride_dom * 8, seqlen_q,
                             shift, row_lo, row_hi, qk_scale_log2, softcap_in, alibi_log2, head_dim, BLOCK_M,
                             D_MASK, True, SOFTCAP, ALIBI_ON)
    rows_dk = off_b * stride_dkb * 8 + off_hk * stride_dkh * 8 + offs_n[:, None] * (stride_dkn * 8) + offs_d[None, :]
    rows_dv = off_b * stride_dvb * 8 + off_hk * stride_dvh * 8 + offs_n[:, None] * (stride_dvn * 8) + offs_d[None, :]
    tl.store(DK + rows_dk, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + rows_dv, dv.to(DV.dtype.element_ty), mask=tile_ok)


# Row vectors and slopes: small fp32 tensors of any alignment, read one value per row.
UNHINTED_PARAMS = frozenset({"LSE", "DELTA", "ALIBI", "stride_ab", "stride_ah", "CU_Q", "CU_K"})
GRAD_TENSORS = ("q", "k", "v", "o", "do", "dq", "dk", "dv")


def bwd_params(dtype: str, layout: str = "dense") -> list[tuple[str, str]]:
    """Run-time parameters of both backward kernels, in launch order, with their Triton types."""
    ptr = f"*{dtype}"
    params = [(name.upper(), ptr) for name in GRAD_TENSORS]
    params += [("LSE", "*fp32"), ("DELTA", "*fp32"), ("ALIBI", "*fp32")]
    for name in GRAD_TENSORS:
        row = "n" if name in ("k", "v", "dk", "dv") else "m"
        params += [(f"stride_{name}b", "i64"), (f"stride_{name}h", "i64"), (f"stride_{name}{row}", "i32")]
    params += [("stride_ab", "i32"), ("stride_ah", "i32")]
    params += [(name, "i32") for name in ("nheads", "head_ratio", "seqlen_q", "seqlen_k", "head_dim_8",
                                          "window_left", "window_right")]
    return params + [("qk_scale_log2", "fp32"), ("softcap_in", "fp32"), ("sm_scale", "fp32")] + layout_params(layout)


# Compile-time parameters of one backward image: the tile and layout flags shared with the forward (no paged layout:
# paged prefill is inference).
bwd_constexprs = tile_constexprs


# --- around the warp-specialised backward (bwd_ws.py, sm90): its prologue and epilogue ------------------------------
# That kernel adds dQ^T (head_dim x rows, fp32) into an accumulator of layout (batch, heads, head_dim, acc_rows) from
# every key block, by TMA reduce; acc_rows (the runtime's choice, ops.py) keeps each row 16-byte aligned, as TMA needs.
# attn_bwd_prep runs first: delta = rowsum(dO * O) as LSE is laid out, and the accumulator zeroed; attn_bwd_convert
# runs last: the accumulator transposed into dQ in the inputs' dtype. One program per BLOCK_M rows of one
# (batch, head), both sharing one parameter list (aux_params).

@triton.jit
def _aux_rows(pid_bh, nheads, seqlen_q, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return off_b, off_h, offs_m, tl.arange(0, BLOCK_D), offs_m < seqlen_q


@triton.jit
def attn_bwd_prep(
    O, DO, DQ, DELTA, DQACC,  # noqa: E741 - the paper's names
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    nheads, seqlen_q, acc_rows,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    off_b, off_h, offs_m, offs_d, row_ok = _aux_rows(pid_bh, nheads, seqlen_q, BLOCK_M, BLOCK_D)
    # Strides arrive in units of 8 elements (fwd.STRIDE_UNIT).
    o = tl.load(O + off_b * stride_ob * 8 + off_h * stride_oh * 8 + offs_m[:, None] * (stride_om * 8)
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob * 8 + off_h * stride_doh * 8 + offs_m[:, None] * (stride_dom * 8)
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=row_ok)
    acc = DQACC + pid_bh.to(tl.int64) * BLOCK_D * acc_rows + offs_d[:, None] * acc_rows + offs_m[None, :]
    tl.store(acc, tl.zeros((BLOCK_D, BLOCK_M), tl.float32), mask=row_ok[None, :])


@triton.jit
def attn_bwd_convert(
    O, DO, DQ, DELTA, DQACC,  # noqa: E741 - the paper's names
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    nheads, seqlen_q, acc_rows,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    off_b, off_h, offs_m, offs_d, row_ok = _aux_rows(pid_bh, nheads, seqlen_q, BLOCK_M, BLOCK_D)
    acc = tl.load(DQACC + pid_bh.to(tl.int64) * BLOCK_D * acc_rows + offs_d[None, :] * acc_rows + offs_m[:, None],
                  mask=row_ok[:, None], other=0.0)
    tl.store(DQ + off_b * stride_dqb * 8 + off_h * stride_dqh * 8 + offs_m[:, None] * (stride_dqm * 8)
             + offs_d[None, :], acc.to(DQ.dtype.element_ty), mask=row_ok[:, None])


AUX_TENSORS = ("o", "do", "dq")
# DELTA is a row vector; the accumulator's rows are 16-byte aligned, its base 256 (torch's allocator) like the others.
AUX_UNHINTED_PARAMS = frozenset({"DELTA"})


def aux_params(dtype: str, layout: str = "dense") -> list[tuple[str, str]]:
    """Run-time parameters of attn_bwd_prep and attn_bwd_convert (dense calls only), in launch order."""
    params = [(name.upper(), f"*{dtype}") for name in AUX_TENSORS] + [("DELTA", "*fp32"), ("DQACC", "*fp32")]
    for name in AUX_TENSORS:
        params += [(f"stride_{name}b", "i64"), (f"stride_{name}h", "i64"), (f"stride_{name}m", "i32")]
    return params + [("nheads", "i32"), ("seqlen_q", "i32"), ("acc_rows", "i32")]


def aux_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                   layout: str = "dense") -> dict:
    """Their compile-time parameters: rows per program and the exact head dim (their images take no masked dims)."""
    return {"BLOCK_M": block_m, "BLOCK_D": bucket}
