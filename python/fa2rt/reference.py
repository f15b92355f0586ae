"""Float64 reference attention: plain math, used by the tests and by the doctor's numerical check.

The mask and bias helpers are shared with the SDPA fallback, so both follow one definition of the semantics.
Row i of the queries is aligned with key column i + seqlen_k - seqlen_q (bottom-right alignment, as flash-attn 2).
"""

import torch


def relative_position(seqlen_q, seqlen_k, device, rows=None):
    """(len(rows), seqlen_k) int64: key column j minus row i's diagonal, j - (i + seqlen_k - seqlen_q).

    rows: a range of query rows (default all), so callers working on chunks of rows get only their part.
    """
    rows = range(seqlen_q) if rows is None else rows
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j - (i + seqlen_k - seqlen_q)


def allowed_mask(seqlen_q, seqlen_k, window, device, rows=None):
    """(len(rows), seqlen_k) bool: whether row i may attend to key j under window (left, right), -1 unlimited.

    window is the effective one (causal already folded in as right = 0): j is allowed iff
    j >= i + shift - left (when left >= 0) and j <= i + shift + right (when right >= 0), shift = seqlen_k - seqlen_q.
    """
    left, right = window
    rel = relative_position(seqlen_q, seqlen_k, device, rows)
    allowed = torch.ones_like(rel, dtype=torch.bool)
    # rel lies in [1 - seqlen_k, seqlen_q - 1]: clamping the bounds changes nothing and keeps huge ints in int64.
    if left >= 0:
        allowed &= rel >= -min(left, seqlen_k)
    if right >= 0:
        allowed &= rel <= min(right, seqlen_q)
    return allowed


def alibi_bias(alibi_slopes, seqlen_q, seqlen_k, dtype, rows=None):
    """(batch or 1, nheads, len(rows), seqlen_k) in dtype: -slope[b, h] * |i + seqlen_k - seqlen_q - j|.

    alibi_slopes: (nheads,) (the same for every batch entry, hence a leading 1) or (batch, nheads).
    """
    lead = alibi_slopes.shape[0] if alibi_slopes.dim() == 2 else 1
    slopes = alibi_slopes.to(dtype).reshape(lead, alibi_slopes.shape[-1], 1, 1)
    distance = relative_position(seqlen_q, seqlen_k, alibi_slopes.device, rows).abs().to(dtype)
    return -slopes * distance


def fold_causal(window_size, causal):
    """The effective (left, right) window: causal means the window ends at the diagonal (right = 0)."""
    left, right = window_size
    return (left, 0) if causal else (left, right)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None):
    """Exact flash-attn 2 semantics, computed in float64 on the inputs' device.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0.
    score = scale * q.k; then softcap * tanh(score / softcap) when softcap > 0; then minus the alibi bias
    slope * |i + seqlen_k - seqlen_q - j|; keys outside the window (see allowed_mask; causal is right = 0, so
    causal alone is the bottom-right aligned mask j <= i + seqlen_k - seqlen_q) are left out of the softmax.
    Returns (out, lse): out (batch, seqlen_q, nheads, headdim) float64, lse (batch, nheads, seqlen_q) float64,
    natural log-sum-exp of the final scores. A query row that sees no key gets out 0 and lse +inf.
    Differentiable, and its gradient has no NaN for rows that see no key.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if nheads != nheads_k:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, torch.float64)
    allowed = allowed_mask(seqlen_q, seqlen_k, fold_causal(window_size, causal), q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1)  # (seqlen_q,)

    # Stable softmax; every where() picks a safe operand for rows without keys so backward stays NaN-free.
    row_max = scores.amax(dim=-1) if seqlen_k > 0 else scores.new_zeros(scores.shape[:-1])
    row_max = torch.where(has_key, row_max, 0.0).detach()
    e = torch.exp(scores - row_max[..., None])
    denom = torch.where(has_key, e.sum(dim=-1), 1.0)
    out = torch.einsum("bhqk,bkhd->bqhd", e / denom[..., None], v)
    lse = torch.where(has_key, row_max + torch.log(denom), float("inf"))
    return out, lse


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, **options):
    """attention_reference applied to each sequence of a packed call on its own (fa2rt.attention_varlen's
    semantics): q (total_q, nheads, headdim), k, v (total_k, nheads_k, headdim), cu_seqlens_* (batch + 1,);
    alibi_slopes (nheads,) or (batch, nheads), row b for sequence b; options as attention_reference.
    Returns (out (total_q, nheads, headdim), lse (nheads, total_q)), float64."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [q.new_zeros((0,) + q.shape[1:], dtype=torch.float64)]
    lses = [q.new_zeros((q.shape[1], 0), dtype=torch.float64)]
    for b in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention_reference(q[None, rows_q], k[None, rows_k], v[None, rows_k], alibi_slopes=slopes,
                                       **options)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


# --- KV cache (fa2rt.attention_with_kvcache) --------------------------------------------------------------------------

def rotary(x, cos, sin, positions, interleaved):
    """x (..., seqlen, nheads, headdim) with its first rotary_dim = 2 * cos.shape[1] features rotated by the angles of
    table rows `positions` ((seqlen,) or (..., seqlen) int64): pairs (2j, 2j + 1) when interleaved, else (j, j +
    rotary_dim / 2) (GPT-NeoX); the rest of the head unchanged. Computed in x's dtype."""
    half = cos.shape[-1]
    c = cos.to(x.dtype)[positions][..., None, :]  # (..., seqlen, 1, half): the same angle for every head
    s = sin.to(x.dtype)[positions][..., None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if interleaved:
        first, second = rot[..., 0::2], rot[..., 1::2]
        pairs = torch.stack((first * c - second * s, second * c + first * s), dim=-1)
        rot = pairs.flatten(-2)
    else:
        first, second = rot[..., :half], rot[..., half:]
        rot = torch.cat((first * c - second * s, second * c + first * s), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def kvcache_reference(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, rotary_interleaved=True,
                      causal=False, window_size=(-1, -1), alibi_slopes=None, num_splits=0, **options):
    """fa2rt.attention_with_kvcache's semantics in float64, one sequence at a time with plain indexing.

    Returns (out (batch, seqlen_q, nheads, headdim), lse (batch, nheads, seqlen_q), k_cache, v_cache): the caches
    as float64 copies with the new keys/values written (the given caches are not touched). Sequence b attends to the
    logical cache positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new) of cache row cache_batch_idx[b] (or of
    the pages block_table[b]); the new k/v (k rotated at positions cache_seqlens[b] + i) land at cache_seqlens[b] + i
    first. q is rotated at cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b] for every row.
    options (softmax_scale, softcap) go to attention_reference; num_splits (how the kernel divides the work) changes
    no value and is accepted so a call's arguments can be given as they are."""
    del num_splits
    f64 = torch.float64
    k_cache, v_cache = k_cache.to(f64).clone(), v_cache.to(f64).clone()
    batch, seqlen_q = q.shape[:2]
    seqlen_new = 0 if k is None else k.shape[1]
    page = k_cache.shape[1] if block_table is not None else None
    capacity = block_table.shape[1] * page if page else k_cache.shape[1]

    def per_batch(value, default):
        if value is None:
            return [default] * batch
        return [int(value)] * batch if isinstance(value, int) else [int(x) for x in value.tolist()]

    seqlens = per_batch(cache_seqlens, capacity)
    rows = per_batch(cache_batch_idx, None)
    pads = per_batch(cache_leftpad, 0)

    def slot(b, pos):  # (cache row or page, index inside it) of logical position pos of sequence b
        if page:
            return int(block_table[b, pos // page]), pos % page
        return (b if rows[b] is None else rows[b]), pos

    local = causal or tuple(window_size) != (-1, -1)
    outs, lses = [], []
    for b in range(batch):
        if k is not None:
            new_k = k[b].to(f64)
            if rotary_cos is not None:
                new_k = rotary(new_k, rotary_cos.to(f64), rotary_sin.to(f64),
                               torch.arange(seqlen_new) + seqlens[b], rotary_interleaved)
            for i in range(seqlen_new):
                k_cache[slot(b, seqlens[b] + i)] = new_k[i]
                v_cache[slot(b, seqlens[b] + i)] = v[b, i].to(f64)
    for b in range(batch):
        qb = q[b].to(f64)
        if rotary_cos is not None:
            offsets = torch.arange(seqlen_q) if local else torch.zeros(seqlen_q, dtype=torch.int64)
            qb = rotary(qb, rotary_cos.to(f64), rotary_sin.to(f64), offsets + seqlens[b], rotary_interleaved)
        keys = range(pads[b], seqlens[b] + seqlen_new)
        kb = torch.stack([k_cache[slot(b, p)] for p in keys]) if len(keys) else k_cache.new_zeros(
            (0,) + k_cache.shape[2:])
        vb = torch.stack([v_cache[slot(b, p)] for p in keys]) if len(keys) else kb
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention_reference(qb[None], kb[None], vb[None], causal=causal, window_size=window_size,
                                       alibi_slopes=slopes, **options)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses), k_cache, v_cache
