"""FlashAttention-2 forward kernel, one Triton source for NVIDIA and AMD.

Layout (batch, seqlen, nheads, headdim), last dim contiguous. One program computes BLOCK_M query rows of one
(batch, head); the online softmax runs in base 2 with the scale folded in.

Varlen images (VARLEN, a compile-time flag: dense images compile exactly as before) take packed sequences instead:
(total, nheads, headdim) tensors with cu_seqlens; batch indexes the sequence, whose first row and length a program
reads from CU_Q/CU_K (_sequence), and seqlen_q/seqlen_k arrive as the longest lengths (the grid's extent). The batch
strides are 0 and LSE is (nheads, total_q). Only where a program finds its sequence differs; the rest is shared.

Paged-KV images (PAGED, with VARLEN; forward only, for paged prefill) read K/V from a pool of pages (num_blocks,
page_size, nheads_k, headdim) instead: key j of sequence b sits in page BLOCK_TABLE[b, j // page_size] at row
j % page_size, and cu_seqlens_k gives only each sequence's key count. Each key tile gathers its rows through the
table (_paged_rows); page_size is a run-time value. Block ids are clamped into the pool and the lengths to the
table's capacity, so a malformed table or cu_seqlens_k gives wrong numbers at worst, never an access outside the
tensors. The other images compile exactly as before (the paged branches are compile-time).

Masking is one band, aligned to the bottom-right corner as in flash-attn 2: with shift = seqlen_k - seqlen_q, query
i sees key j iff i + shift - window_left <= j <= i + shift + window_right (and j < seqlen_k). Causal is
window_right = 0; "unlimited" arrives clamped to seqlen_k (left) and seqlen_q (right), so the band covers every key.
The key loop runs in three phases: the masked blocks at the band's left edge, the blocks every row of this program
sees whole (no mask at all), and the masked blocks at the right edge (causal diagonal, ragged seqlen_k). A row that
sees no key gets output 0 and LSE +inf, as flash-attn 2 does.

Scores: s = scale * q.k; with SOFTCAP s = softcap * tanh(s / softcap); with ALIBI s -= slope * |i + shift - j|.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
# Head dims arrive as head_dim // 8 and q/k/v/out strides in units of 8 elements: a product with 8 is provably a
# multiple of 8, so the head-dim mask is constant over 8-element (16-byte) groups and every row start is 16-byte
# aligned. Masked loads and stores stay vectorised without compiling one image per stride alignment.
HEAD_DIM_MULTIPLE = 8
STRIDE_UNIT = 8


@triton.jit
def _d_ok(offs_d, head_dim, D_MASK: tl.constexpr):
    # Without D_MASK the head dim equals the block, so the mask is a compile-time "all true".
    if D_MASK:
        return offs_d < head_dim
    else:
        return offs_d >= 0


@triton.jit
def _tanh(x):
    # tanh from exp2 (portable across vendors); saturates to +-1 correctly as exp2 over/underflows.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _sequence(CU, off_b, total, max_len):
    """(first row as int64, length) of sequence off_b of a packed tensor of `total` rows. Clamped so that malformed
    cu_seqlens (decreasing, out of range, longer than max_len) make a program read and write only rows of the given
    tensors, and index inside a sequence no further than the dispatcher's int32 range check allowed."""
    start = tl.minimum(tl.maximum(tl.load(CU + off_b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + off_b + 1), start), total)
    return start.to(tl.int64), tl.minimum(end - start, max_len)


@triton.jit
def _lse_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN: tl.constexpr):
    """Offset of a (sequence, head)'s first row in LSE (and the backward's DELTA): (batch, nheads, seqlen_q) dense,
    (nheads, total_q) packed, as flash-attn lays them out."""
    if VARLEN:
        return off_h * total_q + q_start
    else:
        return (off_b * nheads + off_h) * seqlen_q


@triton.jit
def _paged_rows(cols, bt_row, page_size, pool_blocks, stride_b, stride_n, seqlen_k, MASKED: tl.constexpr):
    """int64 offsets of keys `cols` of one sequence in a page pool (K or V): page bt_row[cols // page_size] (the
    sequence's block-table row), row cols % page_size. Keys past seqlen_k (masked tiles) read entry 0 of the row
    instead of one past it; every block id is clamped into the pool. Called once for K and once for V (the second
    table read hits the cache), so no offsets stay live across the tile's products: fewer registers."""
    pages = cols // page_size
    if MASKED:
        block = tl.load(bt_row + pages, mask=cols < seqlen_k, other=0)
    else:
        block = tl.load(bt_row + pages)
    block = tl.minimum(tl.maximum(block, 0), pool_blocks - 1).to(tl.int64)
    return block * stride_b + cols % page_size * stride_n


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, first, n_blocks, gap_at, gap, stride_kn, stride_vn, seqlen_k,
    shift, key_lo, key_hi, qk_scale_log2, softcap_in, alibi_log2, head_dim,
    bt_row, page_size, pool_blocks, stride_kb, stride_vb,
    BLOCK_N: tl.constexpr, D_MASK: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, PAGED: tl.constexpr,
):
    """n_blocks key blocks from key `first` on, skipping `gap` keys after the first gap_at blocks. PAGED: keys are
    gathered through the block-table row bt_row (_paged_rows); the other params of that line serve only it."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = _d_ok(offs_d, head_dim, D_MASK)
    for t in range(0, n_blocks):
        start_n = first + t * BLOCK_N
        if MASKED:
            start_n += tl.where(t >= gap_at, gap, 0)
        cols = start_n + offs_n
        if PAGED:
            k_rows = _paged_rows(cols, bt_row, page_size, pool_blocks, stride_kb, stride_kn, seqlen_k, MASKED)
            k_ptrs = k_base + k_rows[None, :] + offs_d[:, None]
        else:
            k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
        elif D_MASK:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, k)
        if MASKED or SOFTCAP or ALIBI:
            if SOFTCAP:
                s = _tanh(qk * softcap_in) * qk_scale_log2
            else:
                s = qk * qk_scale_log2
            if ALIBI:
                s -= alibi_log2 * tl.abs(cols[None, :] - (offs_m + shift)[:, None]).to(tl.float32)
            if MASKED:
                # Per-row key bounds, so the mask is two compares per score.
                keep = (cols[None, :] >= key_lo[:, None]) & (cols[None, :] <= key_hi[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with every key masked so far keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            # Hot path: no mask, plain scores; the scale is applied after the row max (scale >= 0 here, see attn_fwd),
            # so scaling and subtracting the max fuse into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
            m_shift = m_new
            p = tl.math.exp2(qk * qk_scale_log2 - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PAGED:
            v_rows = _paged_rows(cols, bt_row, page_size, pool_blocks, stride_vb, stride_vn, seqlen_k, MASKED)
            v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        elif D_MASK:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_phases(m0, seqlen_q, seqlen_k, shift, window_left, window_right, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key offsets lo <= full_lo <= full_hi <= hi (or hi < lo: no key at all): [lo, full_lo) and [full_hi, hi) need
    the mask, [full_lo, full_hi) is seen whole by every row of the program. All but hi are multiples of BLOCK_N."""
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = tl.maximum(m0 + shift - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_last + shift + window_right + 1, seqlen_k)
    full_lo = tl.cdiv(tl.maximum(m_last + shift - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(m0 + shift + window_right + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE, ALIBI,  # noqa: E741 - the paper's names
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_ab, stride_ah,
    nheads, head_ratio, seqlen_q, seqlen_k, head_dim_8, window_left, window_right,
    qk_scale_log2, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    VARLEN: tl.constexpr = False, CU_Q=None, CU_K=None, total_q=0, total_k=0,
    PAGED: tl.constexpr = False, BLOCK_TABLE=None, stride_bt=0, page_size=1, pool_blocks=1, max_blocks=0,
):
    # Programs with the most keys (last query blocks under a causal band) start first: a shorter tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    stride_qb, stride_qh, stride_qm = stride_qb * 8, stride_qh * 8, stride_qm * 8  # STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * 8, stride_kh * 8, stride_kn * 8
    stride_vb, stride_vh, stride_vn = stride_vb * 8, stride_vh * 8, stride_vn * 8
    stride_ob, stride_oh, stride_om = stride_ob * 8, stride_oh * 8, stride_om * 8
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    off_hk = off_h // head_ratio  # GQA/MQA: query heads share a KV head, no copy of K/V
    head_dim = head_dim_8 * 8
    q_start = 0
    if VARLEN:
        q_start, seqlen_q = _sequence(CU_Q, off_b, total_q, seqlen_q)
        k_start, seqlen_k = _sequence(CU_K, off_b, total_k, seqlen_k)
        if pid_m * BLOCK_M >= seqlen_q:  # the grid spans the longest sequence
            return
        Q += q_start * stride_qm
        O += q_start * stride_om  # noqa: E741 - the paper's names
        if PAGED:
            # Only the key count comes from cu_seqlens_k; no sequence reads past its row of the table.
            seqlen_k = tl.minimum(seqlen_k, max_blocks * page_size)
            bt_row = BLOCK_TABLE + off_b * stride_bt
        else:
            K += k_start * stride_kn
            V += k_start * stride_vn

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m[:, None] < seqlen_q
    d_ok = _d_ok(offs_d, head_dim, D_MASK)[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok & d_ok, other=0.0)
    alibi_log2 = 0.0
    if ALIBI_ON:
        alibi_log2 = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah) * LOG2E

    if PAGED:
        # stride_kb / stride_vb step between pages of the pool (_paged_rows), not between sequences.
        k_base = K + off_hk * stride_kh
        v_base = V + off_hk * stride_vh
    else:
        k_base = K + off_b * stride_kb + off_hk * stride_kh
        v_base = V + off_b * stride_vb + off_hk * stride_vh
        bt_row = BLOCK_TABLE

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    shift = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _key_phases(m0, seqlen_q, seqlen_k, shift, window_left, window_right, BLOCK_M,
                                           BLOCK_N)
    if not SOFTCAP:
        # The unmasked loop scales after the row max, which needs scale >= 0; a negative scale sends every block
        # through the masked loop, which scales first. (Moving the sign into q instead would make q a computed
        # value, which Triton then feeds to wgmma from registers, not shared memory: ~10% slower on sm90.)
        # With SOFTCAP, qk_scale_log2 is softcap * log2(e) > 0 and the scale's sign sits in softcap_in.
        all_masked = qk_scale_log2 < 0
        full_lo = tl.where(all_masked, lo, full_lo)
        full_hi = tl.where(all_masked, lo, full_hi)
    # The band of each row: keys key_lo[i] ..= key_hi[i].
    key_lo = offs_m + shift - window_left
    key_hi = tl.minimum(offs_m + shift + window_right, seqlen_k - 1)
    # Two loops, not three: one loop body per phase costs registers, so both masked edges share one loop.
    n_full = (full_hi - full_lo) // BLOCK_N
    n_left = tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N)  # full_lo may be clamped to hi, off the grid
    n_right = tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_N)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, full_lo, n_full, n_full, 0,
                               stride_kn, stride_vn, seqlen_k, shift, key_lo, key_hi, qk_scale_log2,
                               softcap_in, alibi_log2, head_dim, bt_row, page_size, pool_blocks, stride_kb,
                               stride_vb, BLOCK_N, D_MASK, False, SOFTCAP, ALIBI_ON, PAGED)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, lo, n_left + n_right, n_left,
                               full_hi - full_lo, stride_kn, stride_vn, seqlen_k, shift, key_lo, key_hi,
                               qk_scale_log2, softcap_in, alibi_log2, head_dim, bt_row, page_size, pool_blocks,
                               stride_kb, stride_vb, BLOCK_N, D_MASK, True, SOFTCAP, ALIBI_ON, PAGED)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok & d_ok)
    lse_row = _lse_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN)
    tl.store(LSE + lse_row + offs_m, lse, mask=offs_m < seqlen_q)


# Params the AOT build must not hint as 16-byte aligned: the ALiBi slopes are a small fp32 tensor of any alignment,
# cu_seqlens and the block table small int32 ones. Every other pointer is hinted (aot.py), and the dispatcher checks
# the hint holds.
UNHINTED_PARAMS = frozenset({"ALIBI", "stride_ab", "stride_ah", "CU_Q", "CU_K", "BLOCK_TABLE"})
# "varlen_paged": varlen queries, K/V in a page pool through a block table (the forward only: paged prefill).
LAYOUTS = ("dense", "varlen", "varlen_paged")
PAGED_LAYOUT = "varlen_paged"
# What a varlen image takes beyond a dense one, after the other params (the kernels' trailing parameters).
VARLEN_PARAMS = [("CU_Q", "*i32"), ("CU_K", "*i32"), ("total_q", "i32"), ("total_k", "i32")]
# What a paged image takes beyond a varlen one: the block table (int32 (batch, max_blocks), row stride stride_bt,
# unit column stride), the page size, the pool's page count and the table's width. Its total_k is unused (no packed
# K rows: the call passes the int32 maximum, so only cu_seqlens_k's differences count).
PAGED_PARAMS = [("BLOCK_TABLE", "*i32"), ("stride_bt", "i32"), ("page_size", "i32"), ("pool_blocks", "i32"),
                ("max_blocks", "i32")]


def _fixed(params) -> dict:
    """Params an image does not use, fixed as constants so it compiles exactly as a kernel without them."""
    return {name: (None if ty.startswith("*") else 0) for name, ty in params}


def layout_params(layout: str) -> list[tuple[str, str]]:
    """The run-time params a layout adds to the kernels' own (fwd_params, bwd.bwd_params; only the forward has a
    paged layout)."""
    return {"varlen": VARLEN_PARAMS, PAGED_LAYOUT: VARLEN_PARAMS + PAGED_PARAMS}.get(layout, [])


def layout_constexprs(layout: str) -> dict:
    """Compile-time params of a layout, for the kernels of both families: a dense image fixes the varlen params
    (unused there) as constants, so it compiles exactly as a kernel without them."""
    if layout in ("varlen", PAGED_LAYOUT):
        return {"VARLEN": True}
    return {"VARLEN": False} | _fixed(VARLEN_PARAMS)


def paged_constexprs(layout: str) -> dict:
    """The forward kernel's paging flag, with the paged params fixed (and 1 for the divisor) where it is off."""
    if layout == PAGED_LAYOUT:
        return {"PAGED": True}
    return {"PAGED": False} | _fixed(PAGED_PARAMS) | {"page_size": 1, "pool_blocks": 1}


# The kernel's run-time parameters in launch order, with their Triton types. The dispatcher packs arguments by
# these names (the manifest carries this list per image), so the kernel signature is stated here and nowhere else.
def fwd_params(dtype: str, layout: str = "dense") -> list[tuple[str, str]]:
    ptr = f"*{dtype}"
    return [
        ("Q", ptr), ("K", ptr), ("V", ptr), ("O", ptr), ("LSE", "*fp32"), ("ALIBI", "*fp32"),
        ("stride_qb", "i64"), ("stride_qh", "i64"), ("stride_qm", "i32"),
        ("stride_kb", "i64"), ("stride_kh", "i64"), ("stride_kn", "i32"),
        ("stride_vb", "i64"), ("stride_vh", "i64"), ("stride_vn", "i32"),
        ("stride_ob", "i64"), ("stride_oh", "i64"), ("stride_om", "i32"),
        ("stride_ab", "i32"), ("stride_ah", "i32"),
        ("nheads", "i32"), ("head_ratio", "i32"), ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim_8", "i32"),
        ("window_left", "i32"), ("window_right", "i32"), ("qk_scale_log2", "fp32"), ("softcap_in", "fp32"),
    ] + layout_params(layout)


def tile_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                    layout: str = "dense") -> dict:
    """Compile-time parameters both kernel families share (the variant grid's feature names map onto the kernels'
    flags); bwd.py's images take exactly these."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": bucket, "D_MASK": d_mask,
            "SOFTCAP": "softcap" in features, "ALIBI_ON": "alibi" in features} | layout_constexprs(layout)


def fwd_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                   layout: str = "dense") -> dict:
    """Compile-time parameters of one forward image."""
    return tile_constexprs(block_m, block_n, bucket, d_mask, features, layout) | paged_constexprs(layout)


def attn_fwd_grid(seqlen_q: int, batch: int, nheads: int, block_m: int) -> tuple[int, int, int]:
    return (triton.cdiv(seqlen_q, block_m), batch * nheads, 1)
