"""Split-KV ("flash-decoding") attention over a KV cache, one Triton source for NVIDIA and AMD.

attn_decode: program (split, row block) x (batch, KV head). The query heads that share one KV head are packed into
the program's rows (row r is query head hk * head_ratio + r // seqlen_q, query row r % seqlen_q), so each K/V byte is
read once for all of them. Each sequence's keys are cut into num_splits chunks (of its own length, a multiple of
BLOCK_N), one per program along axis 0, so a short batch still fills the device. With one split the program writes
the final output and LSE; with more, each writes its partial (output normalised by its own softmax sum, natural-log
LSE, -inf for a chunk with no visible key) and attn_decode_combine merges them, LSE-weighted.

Caches: contiguous (rows, seqlen_cache, nheads_k, headdim), row cache_batch_idx[b] (or b); or PAGED (num_blocks,
page_size, nheads_k, headdim) where logical position p of sequence b sits in block block_table[b, p // page_size] at
p % page_size. Sequence b's keys are the positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new) (the new
tokens are already in the cache). Masking follows fwd.py: with shift = n_keys - seqlen_q, query row i sees key j iff
i + shift - window_left <= j <= i + shift + window_right; rows with no key give 0 and LSE +inf.

attn_append: program (block of new tokens) x (batch, KV head); writes a call's new keys and values into the caches
at cache_seqlens[b] + i before attn_decode reads them (plain copies: rotated keys are written by torch ops).

PDL images (NVIDIA sm90+, variants.PDL_ARCHS): the merge is a programmatic dependent launch of the decode kernel.
attn_decode, when it splits, signals at its start that its dependents may launch (unsplit, the next launch is not
ours, so it never signals early), and attn_decode_combine waits (griddepcontrol.wait: the grid before it complete,
its writes visible) before reading the partials, so the merge's launch and prologue overlap the decode instead of
following it. Both instructions do nothing in a plain launch, so an image built with them is correct however it is
launched; only the launch attribute (the manifest's dependent_launch) saves the time.

Index values are never trusted (DESIGN point 10): the sequence end is clamped into [0, capacity] (capacity = the
positions one sequence can address), the start into [0, end], rows and block ids into [0, cache_rows); so every
load stays inside the given tensors, whatever the index tensors hold.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _page_blocks(pos, ok, BLOCK_TABLE, bt_row, page_size, cache_rows):
    """int64 pool blocks holding cache positions `pos` (masked by `ok`), clamped into the pool."""
    block = tl.load(BLOCK_TABLE + bt_row + pos // page_size, mask=ok, other=0)
    return _clamp(block, 0, cache_rows - 1).to(tl.int64)


@triton.jit
def attn_decode(
    Q, K, V, O, LSE, O_PART, LSE_PART, ALIBI, SEQLENS, BATCH_IDX, LEFTPAD, BLOCK_TABLE,  # noqa: E741
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_ab, stride_ah, stride_bt,
    batch, nheads, head_ratio, seqlen_q, seqlen_fixed, seqlen_new, capacity, cache_rows, page_size, num_splits,
    use_batch_idx, use_leftpad, use_softcap, use_alibi, head_dim_8, window_left, window_right, qk_scale_log2,
    softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr, PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        if num_splits > 1:  # the next launch is the merge, which waits for this grid before reading
            gdc_launch_dependents()
    # SOFTCAP and ALIBI_ON compile the softcap and ALiBi in; use_softcap and use_alibi switch them on per call (uniform
    # branches), so one image serves calls with and without them and a call without them skips their work.
    # Strides of q, the caches and out arrive in units of 8 elements (16-byte rows, as fwd.py); int64 offsets
    # throughout, since a cache easily exceeds 2**31 elements.
    stride_qb, stride_qh, stride_qm = stride_qb.to(tl.int64) * 8, stride_qh.to(tl.int64) * 8, stride_qm * 8
    stride_kb, stride_kh, stride_kn = stride_kb.to(tl.int64) * 8, stride_kh.to(tl.int64) * 8, stride_kn * 8
    stride_vb, stride_vh, stride_vn = stride_vb.to(tl.int64) * 8, stride_vh.to(tl.int64) * 8, stride_vn * 8
    stride_ob, stride_oh, stride_om = stride_ob.to(tl.int64) * 8, stride_oh.to(tl.int64) * 8, stride_om * 8
    head_dim = head_dim_8 * 8
    rows_total = seqlen_q * head_ratio
    n_mblocks = tl.cdiv(rows_total, BLOCK_M)
    split = tl.program_id(0) // n_mblocks
    mblock = tl.program_id(0) % n_mblocks
    nheads_k = nheads // head_ratio
    off_b = tl.program_id(1) // nheads_k
    off_hk = (tl.program_id(1) % nheads_k).to(tl.int64)

    # This sequence's keys, clamped into the cache whatever the index tensors hold.
    cache_len = seqlen_fixed
    if seqlen_fixed < 0:
        cache_len = tl.load(SEQLENS + off_b)
    end = _clamp(cache_len + seqlen_new, 0, capacity)
    start = 0
    if use_leftpad != 0:
        start = _clamp(tl.load(LEFTPAD + off_b), 0, end)
    n_keys = end - start
    cache_row = off_b.to(tl.int64)
    if use_batch_idx != 0:
        cache_row = _clamp(tl.load(BATCH_IDX + off_b), 0, cache_rows - 1).to(tl.int64)
    bt_row = off_b.to(tl.int64) * stride_bt
    chunk = tl.cdiv(tl.cdiv(n_keys, num_splits), BLOCK_N) * BLOCK_N
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, n_keys)

    offs_r = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < rows_total
    q_row = offs_r % seqlen_q
    off_h = off_hk * head_ratio + offs_r // seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    if D_MASK:
        d_ok = offs_d < head_dim
    else:
        d_ok = offs_d >= 0
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h[:, None] * stride_qh + q_row[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    alibi_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI_ON:
        alibi_log2 = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah, mask=row_ok, other=0.0) * LOG2E

    # Each row's band of keys, and the part of this split any row sees.
    shift = n_keys - seqlen_q
    key_lo = q_row + shift - window_left
    key_hi = tl.minimum(q_row + shift + window_right, n_keys - 1)
    lo = tl.maximum(tl.min(tl.where(row_ok, key_lo, n_keys), 0), k_lo)
    hi = tl.minimum(tl.max(tl.where(row_ok, key_hi, -1), 0) + 1, k_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_head = K + off_hk * stride_kh
    v_head = V + off_hk * stride_vh
    # Paged: each tile's block ids are loaded once for K and V, one iteration ahead of its copies (with 3 stages that
    # read paged caches 9-15% faster at batch 1-8 than per-key offsets computed in the iteration; decode-ab-h200.json).
    # PAGE_ALIGNED images (page sizes that are multiples of BLOCK_N) start tiles at multiples of BLOCK_N in cache
    # positions, so each tile lies in one page: one block id per tile, and the tile's rows are consecutive, addressed
    # as in a contiguous cache. Per-key offsets held 200 registers per thread on sm90 d128 (2 programs per SM), this
    # 164 (3), and it read 10-20% faster (decode-paged-aligned-h200.json).
    first_lo = lo
    blocks = tl.zeros([BLOCK_N], dtype=tl.int64)
    if PAGE_ALIGNED:
        first_lo = (start + lo) // BLOCK_N * BLOCK_N - start
        block = _page_blocks(start + first_lo, first_lo < hi, BLOCK_TABLE, bt_row, page_size, cache_rows)
    elif PAGED:
        blocks = _page_blocks(start + lo + offs_n, lo + offs_n < hi, BLOCK_TABLE, bt_row, page_size, cache_rows)
    for first in range(first_lo, hi, BLOCK_N):
        cols = first + offs_n
        pos = start + cols
        col_ok = cols < hi
        if PAGE_ALIGNED:
            col_ok &= cols >= lo  # the first tile may begin before this split's keys
            within = (start + first) % page_size + offs_n.to(tl.int64)
            k_off = block * stride_kb + within * stride_kn
            v_off = block * stride_vb + within * stride_vn
            block = _page_blocks(start + first + BLOCK_N, first + BLOCK_N < hi, BLOCK_TABLE, bt_row, page_size,
                                 cache_rows)
        elif PAGED:
            within = (pos % page_size).to(tl.int64)
            k_off = blocks * stride_kb + within * stride_kn
            v_off = blocks * stride_vb + within * stride_vn
            blocks = _page_blocks(pos + BLOCK_N, cols + BLOCK_N < hi, BLOCK_TABLE, bt_row, page_size, cache_rows)
        else:
            k_off = cache_row * stride_kb + pos.to(tl.int64) * stride_kn
            v_off = cache_row * stride_vb + pos.to(tl.int64) * stride_vn
        k = tl.load(k_head + k_off[None, :] + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k)
        s = qk * qk_scale_log2
        if SOFTCAP:
            if use_softcap != 0:
                s = _tanh(qk * softcap_in) * qk_scale_log2
        if ALIBI_ON:
            if use_alibi != 0:
                s -= alibi_log2[:, None] * tl.abs(cols[None, :] - (q_row + shift)[:, None]).to(tl.float32)
        keep = (cols[None, :] >= key_lo[:, None]) & (cols[None, :] <= key_hi[:, None]) & col_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2
    lse_row = (off_b * nheads + off_h).to(tl.int64) * seqlen_q + q_row
    if num_splits == 1:
        o_ptrs = O + off_b.to(tl.int64) * stride_ob + off_h[:, None] * stride_oh + q_row[:, None] * stride_om
        tl.store(o_ptrs + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + lse_row, tl.where(empty, float("inf"), lse), mask=row_ok)
    else:
        # Partials: (num_splits, batch, nheads, seqlen_q) rows of head_dim fp32, contiguous.
        part_row = split.to(tl.int64) * batch * nheads * seqlen_q + lse_row
        tl.store(O_PART + part_row[:, None] * head_dim + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + part_row, tl.where(empty, float("-inf"), lse), mask=row_ok)


@triton.jit
def attn_decode_combine(
    O, LSE, O_PART, LSE_PART,  # noqa: E741
    stride_ob, stride_oh, stride_om,
    batch, nheads, seqlen_q, num_splits, head_dim_8,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, D_MASK: tl.constexpr, PDL: tl.constexpr = False,
):
    """Merges attn_decode's partials of one query row (batch, head, row) per program: out = sum_s w_s * out_s /
    sum_s w_s with w_s = exp(lse_s - max_s lse_s); lse = max + log(sum w). A row no split saw gets 0 and LSE +inf.
    The partials are read BLOCK_S splits at a time as one tile, LSEs and outputs together, so up to BLOCK_S splits
    cost one round trip to L2 (a loop of one split per step waited once per split: about 9 of the 60 us of a batch-1
    32k step with 32 splits, docs/bench/decode-ab-h200.json). Each of the tile's BLOCK_S lanes keeps its own running
    maximum, sum and output over the steps (elementwise, no reduction across threads in the loop); the lanes merge
    once at the end. Timed alone on the H200 (docs/bench/decode-combine-ab-h200.json, b1 32k GQA, 32 splits): 7.07 us
    at the d128 tile (7.23 at d256) against 7.52 for a first pass over the LSEs alone and 8.38 for a merge across the
    lanes in every step (both d256). At batch 32-64 (2-8 splits, 1024-2048 programs: occupancy counts) this one's
    [BLOCK_S, BLOCK_D] state costs registers: 14.8 us at d128, 19.3 at d256, against 13.3 for the per-step merge;
    hence a combine tile per head-dim bucket."""
    stride_ob, stride_oh, stride_om = stride_ob.to(tl.int64) * 8, stride_oh.to(tl.int64) * 8, stride_om * 8
    head_dim = head_dim_8 * 8
    off_b = tl.program_id(1) // nheads
    off_h = tl.program_id(1) % nheads
    q_row = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    if D_MASK:
        d_ok = offs_d < head_dim
    else:
        d_ok = offs_d >= 0
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = (off_b * nheads + off_h).to(tl.int64) * seqlen_q + q_row
    plane = batch.to(tl.int64) * nheads * seqlen_q
    if PDL:
        gdc_wait()  # launched as a dependent of attn_decode: its partials are written and visible after this
    m_s = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        split = first + offs_s
        part = split * plane + lse_row
        ok = split < num_splits
        lse_s = tl.load(LSE_PART + part, mask=ok, other=float("-inf"))
        o_s = tl.load(O_PART + part[:, None] * head_dim + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_s, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_s - m_safe)
        w = tl.exp(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        den = den * alpha + w
        m_s = m_new
    m_max = tl.max(m_s, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    scale = tl.exp(m_s - m_safe)
    total = tl.sum(den * scale, 0)
    empty = total == 0.0
    out = tl.sum(acc * scale[:, None], 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    o_ptrs = O + off_b.to(tl.int64) * stride_ob + off_h * stride_oh + q_row * stride_om + offs_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + lse_row, lse)


@triton.jit
def attn_append(
    K, V, K_NEW, V_NEW, SEQLENS, BATCH_IDX, BLOCK_TABLE,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_knb, stride_knh, stride_knm,
    stride_vnb, stride_vnh, stride_vnm,
    stride_bt,
    nheads_k, seqlen_new, seqlen_fixed, capacity, cache_rows, page_size, use_batch_idx, head_dim_8,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
):
    """Writes BLOCK_M new tokens of one (batch, KV head) into the caches in place, at logical positions
    cache_seqlens[b] + i: one launch where the torch ops it replaces were four, for the append before attn_decode.
    Positions, rows and block ids are clamped as attn_decode clamps them, so malformed indices write wrong places
    of the caches at worst, never outside them. Cache strides arrive in units of 8 elements; the new keys' and
    values' strides in elements (any view with a contiguous last dim)."""
    stride_kb, stride_kh, stride_kn = stride_kb.to(tl.int64) * 8, stride_kh.to(tl.int64) * 8, stride_kn.to(tl.int64) * 8
    stride_vb, stride_vh, stride_vn = stride_vb.to(tl.int64) * 8, stride_vh.to(tl.int64) * 8, stride_vn.to(tl.int64) * 8
    off_b = tl.program_id(1) // nheads_k
    off_hk = (tl.program_id(1) % nheads_k).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_new
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < head_dim_8 * 8)[None, :]
    first = seqlen_fixed
    if seqlen_fixed < 0:
        first = tl.load(SEQLENS + off_b)
    pos = _clamp(first + rows, 0, capacity - 1)
    if PAGED:
        page = pos // page_size  # one division per position: the offset in the page from it
        block = tl.load(BLOCK_TABLE + off_b.to(tl.int64) * stride_bt + page, mask=row_ok, other=0)
        block = _clamp(block, 0, cache_rows - 1).to(tl.int64)
        within = (pos - page * page_size).to(tl.int64)
        k_off = block * stride_kb + within * stride_kn
        v_off = block * stride_vb + within * stride_vn
    else:
        cache_row = off_b.to(tl.int64)
        if use_batch_idx != 0:
            cache_row = _clamp(tl.load(BATCH_IDX + off_b), 0, cache_rows - 1).to(tl.int64)
        k_off = cache_row * stride_kb + pos.to(tl.int64) * stride_kn
        v_off = cache_row * stride_vb + pos.to(tl.int64) * stride_vn
    new_row = rows.to(tl.int64)[:, None]
    k = tl.load(K_NEW + off_b.to(tl.int64) * stride_knb + off_hk * stride_knh + new_row * stride_knm
                + offs_d[None, :], mask=ok)
    v = tl.load(V_NEW + off_b.to(tl.int64) * stride_vnb + off_hk * stride_vnh + new_row * stride_vnm
                + offs_d[None, :], mask=ok)
    tl.store(K + off_hk * stride_kh + k_off[:, None] + offs_d[None, :], k, mask=ok)
    tl.store(V + off_hk * stride_vh + v_off[:, None] + offs_d[None, :], v, mask=ok)


# The index tensors (int32, any alignment a view may have) and the slopes are not hinted 16-byte aligned.
UNHINTED_PARAMS = frozenset({"ALIBI", "SEQLENS", "BATCH_IDX", "LEFTPAD", "BLOCK_TABLE", "stride_ab", "stride_ah",
                             "stride_bt"})
COMBINE_UNHINTED_PARAMS = frozenset()
# The new keys and values may be any views (their bases and strides unaligned); the index tensors as above.
APPEND_UNHINTED_PARAMS = frozenset({"K_NEW", "V_NEW", "SEQLENS", "BATCH_IDX", "BLOCK_TABLE", "stride_knb",
                                    "stride_knh", "stride_knm", "stride_vnb", "stride_vnh", "stride_vnm", "stride_bt"})
# The layouts decode images are built for: a contiguous cache, or a paged one through a block table.
LAYOUTS = ("kvcache", "paged")
# The combine reads only the partials attn_decode wrote (its own layout, whatever the cache's).
COMBINE_LAYOUT = "partials"


def decode_params(dtype: str, layout: str = "kvcache") -> list[tuple[str, str]]:
    """attn_decode's run-time parameters in launch order (the same for both layouts: a contiguous call passes a
    block table pointer it never reads)."""
    ptr = f"*{dtype}"
    return [
        ("Q", ptr), ("K", ptr), ("V", ptr), ("O", ptr), ("LSE", "*fp32"), ("O_PART", "*fp32"),
        ("LSE_PART", "*fp32"), ("ALIBI", "*fp32"), ("SEQLENS", "*i32"), ("BATCH_IDX", "*i32"), ("LEFTPAD", "*i32"),
        ("BLOCK_TABLE", "*i32"),
        ("stride_qb", "i64"), ("stride_qh", "i64"), ("stride_qm", "i32"),
        ("stride_kb", "i64"), ("stride_kh", "i64"), ("stride_kn", "i32"),
        ("stride_vb", "i64"), ("stride_vh", "i64"), ("stride_vn", "i32"),
        ("stride_ob", "i64"), ("stride_oh", "i64"), ("stride_om", "i32"),
        ("stride_ab", "i32"), ("stride_ah", "i32"), ("stride_bt", "i64"),
        ("batch", "i32"), ("nheads", "i32"), ("head_ratio", "i32"), ("seqlen_q", "i32"), ("seqlen_fixed", "i32"),
        ("seqlen_new", "i32"), ("capacity", "i32"), ("cache_rows", "i32"), ("page_size", "i32"),
        ("num_splits", "i32"), ("use_batch_idx", "i32"), ("use_leftpad", "i32"), ("use_softcap", "i32"),
        ("use_alibi", "i32"), ("head_dim_8", "i32"),
        ("window_left", "i32"), ("window_right", "i32"), ("qk_scale_log2", "fp32"), ("softcap_in", "fp32"),
    ]


def combine_params(dtype: str, layout: str = COMBINE_LAYOUT) -> list[tuple[str, str]]:
    return [
        ("O", f"*{dtype}"), ("LSE", "*fp32"), ("O_PART", "*fp32"), ("LSE_PART", "*fp32"),
        ("stride_ob", "i64"), ("stride_oh", "i64"), ("stride_om", "i32"),
        ("batch", "i32"), ("nheads", "i32"), ("seqlen_q", "i32"), ("num_splits", "i32"), ("head_dim_8", "i32"),
    ]


def append_params(dtype: str, layout: str = "kvcache") -> list[tuple[str, str]]:
    """attn_append's run-time parameters in launch order (the same for both layouts)."""
    ptr = f"*{dtype}"
    return [
        ("K", ptr), ("V", ptr), ("K_NEW", ptr), ("V_NEW", ptr), ("SEQLENS", "*i32"), ("BATCH_IDX", "*i32"),
        ("BLOCK_TABLE", "*i32"),
        ("stride_kb", "i64"), ("stride_kh", "i64"), ("stride_kn", "i32"),
        ("stride_vb", "i64"), ("stride_vh", "i64"), ("stride_vn", "i32"),
        ("stride_knb", "i64"), ("stride_knh", "i64"), ("stride_knm", "i64"),
        ("stride_vnb", "i64"), ("stride_vnh", "i64"), ("stride_vnm", "i64"),
        ("stride_bt", "i64"),
        ("nheads_k", "i32"), ("seqlen_new", "i32"), ("seqlen_fixed", "i32"), ("capacity", "i32"),
        ("cache_rows", "i32"), ("page_size", "i32"), ("use_batch_idx", "i32"), ("head_dim_8", "i32"),
    ]


def decode_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                      layout: str = "kvcache", page_aligned: bool = False, pdl: bool = False) -> dict:
    """page_aligned: a paged image whose tiles lie in one page each (it takes page sizes that are multiples of
    block_n). pdl: a split call signals its dependents at its start (sm90+ only)."""
    if page_aligned and layout != "paged":
        raise ValueError(f"decode page_aligned: expected layout 'paged', got {layout!r}")
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": bucket, "D_MASK": d_mask,
            "SOFTCAP": "softcap" in features, "ALIBI_ON": "alibi" in features, "PAGED": layout == "paged",
            "PAGE_ALIGNED": page_aligned, "PDL": pdl}


def combine_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                       layout: str = COMBINE_LAYOUT, pdl: bool = False) -> dict:
    # The tile's block_n is the splits read per step; one query row per program (combine_grid), so block_m must be 1:
    # the kernel takes row program_id(0), and a larger block would leave rows unwritten.
    if block_m != 1:
        raise ValueError(f"decode_combine tile: expected block_m 1 (one query row per program), got {block_m}")
    # pdl: wait for the decode grid before reading its partials (sm90+ only).
    return {"BLOCK_S": block_n, "BLOCK_D": bucket, "D_MASK": d_mask, "PDL": pdl}


def append_constexprs(block_m: int, block_n: int, bucket: int, d_mask: bool, features: tuple[str, ...],
                      layout: str = "kvcache") -> dict:
    # The tile's block_m is the new tokens per program (block_n unused: no keys loop).
    return {"BLOCK_M": block_m, "BLOCK_D": bucket, "PAGED": layout == "paged"}


def append_grid(seqlen_new: int, batch: int, nheads_k: int, block_m: int):
    return (triton.cdiv(seqlen_new, block_m), batch * nheads_k, 1)


def decode_grid(num_splits: int, seqlen_q: int, head_ratio: int, batch: int, nheads_k: int, block_m: int):
    return (num_splits * triton.cdiv(seqlen_q * head_ratio, block_m), batch * nheads_k, 1)


def combine_grid(seqlen_q: int, batch: int, nheads: int, block_m: int):
    return (triton.cdiv(seqlen_q, block_m), batch * nheads, 1)
