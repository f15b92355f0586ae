"""KV-cache attention (fa2rt.attention_with_kvcache): validation, the exact fallback, and the call.

A call names a cache, contiguous (batch_cache, seqlen_cache, nheads_k, headdim) or paged (num_blocks, page_size,
nheads_k, headdim) with a block table, and the logical positions of each sequence in it: sequence b owns positions
[cache_leftpad[b], cache_seqlens[b] + seqlen_new); the new keys/values (if given) are written at cache_seqlens[b] + i
first, in place. Logical position p of sequence b lives at k_cache[cache_batch_idx[b], p] (contiguous) or at
k_cache[block_table[b, p // page_size], p % page_size] (paged).

Index values (cache_seqlens, cache_batch_idx, cache_leftpad, block_table) are checked where that costs no device
sync (CPU tensors) or when FA2RT_CHECK_INDICES=1, and always on the fallback (it reads them to the host anyway);
the kernel path clamps every index so malformed values give wrong numbers at worst, never an access outside the
given tensors (DESIGN point 10).
"""

import numbers
from dataclasses import dataclass

import torch

from . import config, devices, policy, reference
from .fallback import sdpa_attention
from .validate import (
    PAGE_MULTIPLE,
    _check_alibi,
    _check_causal,
    _check_scale,
    _check_softcap,
    _check_tensor,
    _check_window,
    _fail,
    _same_as_q,
    should_check_values,
)

INDEX_DTYPE = torch.int32
CACHE_LAYOUT = "(batch_cache, seqlen_cache, nheads_k, headdim)"
PAGED_LAYOUT = "(num_blocks, page_size, nheads_k, headdim)"


@dataclass(frozen=True)
class KVShapes:
    """A validated KV-cache call. capacity: the logical positions one sequence can address (seqlen_cache, or
    max_blocks * page_size when paged); cache_seqlens_int: the int form of cache_seqlens (None for a tensor)."""

    batch: int
    seqlen_q: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    softmax_scale: float
    causal: bool
    window: tuple[int, int]  # effective (left, right): causal folded in as right = 0
    softcap: float
    has_alibi: bool
    seqlen_new: int  # new tokens appended per sequence (0 without k, v)
    paged: bool
    page_size: int  # 0 when contiguous
    cache_rows: int  # batch_cache, or num_blocks when paged
    capacity: int
    rotary_dim: int  # 0 without rotary
    rotary_interleaved: bool
    rotate_q_per_token: bool  # q row i at cache_seqlens + i (causal or windowed), else every row at cache_seqlens
    num_splits: int
    cache_seqlens_int: int | None

    @property
    def layout(self) -> str:
        return "paged" if self.paged else "kvcache"


def _check_index_tensor(name, t, q, shape):
    expected = f"None or a {INDEX_DTYPE} tensor of shape {shape} on q's device"
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, expected, type(t).__name__)
    if t.layout != torch.strided:
        _fail(ValueError, name, "a dense (strided) tensor", f"layout {t.layout}")
    if tuple(t.shape) != shape:
        _fail(ValueError, name, f"shape {shape}", f"shape {tuple(t.shape)}")
    if t.dtype != INDEX_DTYPE:
        _fail(ValueError, name, f"dtype {INDEX_DTYPE}", t.dtype)
    if t.device != q.device:
        _fail(ValueError, name, f"device {q.device} (same as q)", t.device)


def _check_int(name, value, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(TypeError, name, expected, f"{value!r} ({type(value).__name__})")
    return int(value)


def _check_bool(name, value):
    if not isinstance(value, bool):
        _fail(TypeError, name, "a bool", f"{value!r} ({type(value).__name__})")


def _check_caches(q, k_cache, v_cache, paged):
    layout = PAGED_LAYOUT if paged else CACHE_LAYOUT
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, 4, layout)
        _same_as_q(name, t, q)
    nheads, head_dim = q.shape[2], q.shape[3]
    if k_cache.shape[3] != head_dim:
        _fail(ValueError, "k_cache", f"head dim {head_dim} (same as q)", f"{k_cache.shape[3]} "
              f"(shape {tuple(k_cache.shape)})")
    if v_cache.shape != k_cache.shape:
        _fail(ValueError, "v_cache", f"shape {tuple(k_cache.shape)} (same as k_cache)", f"shape {tuple(v_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        _fail(ValueError, "k_cache", f"a number of heads that divides q's nheads={nheads} (MQA/GQA)",
              f"nheads_k={nheads_k}")


def _check_new(q, k, v, k_cache) -> int:
    """seqlen_new of the new keys/values (0 when neither is given)."""
    if (k is None) != (v is None):
        missing, given = ("k", "v") if k is None else ("v", "k")
        _fail(ValueError, missing, f"a tensor when {given} is given (new keys and values come together)", "None")
    if k is None:
        return 0
    batch, head_dim, nheads_k = q.shape[0], q.shape[3], k_cache.shape[2]
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t)
        _same_as_q(name, t, q)
    expected = (batch, k.shape[1], nheads_k, head_dim)
    if tuple(k.shape) != expected:
        _fail(ValueError, "k", f"shape (batch={batch}, seqlen_new, nheads_k={nheads_k}, headdim={head_dim})",
              f"shape {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(ValueError, "v", f"shape {tuple(k.shape)} (same as k)", f"shape {tuple(v.shape)}")
    return k.shape[1]


def _check_paging(q, k_cache, block_table, cache_batch_idx) -> tuple[int, int]:
    """(page_size, capacity) of a paged cache."""
    expected = f"a 2-D {INDEX_DTYPE} tensor (batch={q.shape[0]}, max_blocks) on q's device"
    if not isinstance(block_table, torch.Tensor):
        _fail(TypeError, "block_table", expected, type(block_table).__name__)
    if block_table.dim() != 2:
        _fail(ValueError, "block_table", expected, f"shape {tuple(block_table.shape)}")
    _check_index_tensor("block_table", block_table, q, (q.shape[0], block_table.shape[1]))
    page_size = k_cache.shape[1]
    if page_size == 0 or page_size % PAGE_MULTIPLE:
        _fail(ValueError, "k_cache", f"a page size (dim 1 of a paged cache) that is a positive multiple of "
              f"{PAGE_MULTIPLE}", f"{page_size} (shape {tuple(k_cache.shape)})")
    if cache_batch_idx is not None:
        _fail(ValueError, "cache_batch_idx", "None with block_table (a paged cache is addressed by its block table)",
              "a tensor")
    return page_size, block_table.shape[1] * page_size


def _check_rotary(q, rotary_cos, rotary_sin, seqlen_new, capacity) -> int:
    """rotary_dim (0 without rotary)."""
    if (rotary_cos is None) != (rotary_sin is None):
        missing, given = ("rotary_cos", "rotary_sin") if rotary_cos is None else ("rotary_sin", "rotary_cos")
        _fail(ValueError, missing, f"a tensor when {given} is given", "None")
    if rotary_cos is None:
        return 0
    if seqlen_new == 0:
        _fail(ValueError, "rotary_cos", "None when k and v are not given (rotary applies to the new keys and q)",
              "a tensor")
    head_dim = q.shape[3]
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, "None or a torch.Tensor", type(t).__name__)
        if t.dim() != 2 or 2 * t.shape[1] > head_dim or t.shape[1] == 0:
            _fail(ValueError, name, f"shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= headdim={head_dim}",
                  f"shape {tuple(t.shape)}")
        _same_as_q(name, t, q)
        if t.shape[0] < capacity:
            _fail(ValueError, name, f"at least {capacity} rows (seqlen_ro >= the cache's length {capacity})",
                  f"shape {tuple(t.shape)}")
    if rotary_sin.shape != rotary_cos.shape:
        _fail(ValueError, "rotary_sin", f"shape {tuple(rotary_cos.shape)} (same as rotary_cos)",
              f"shape {tuple(rotary_sin.shape)}")
    return 2 * rotary_cos.shape[1]


def _check_cache_seqlens(cache_seqlens, q, capacity, seqlen_new) -> int | None:
    if cache_seqlens is None:
        if seqlen_new:
            _fail(ValueError, "cache_seqlens", "an int or a tensor when k and v are given (where to append them)",
                  "None")
        return None
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index_tensor("cache_seqlens", cache_seqlens, q, (q.shape[0],))
        return None
    value = _check_int("cache_seqlens", cache_seqlens, "None, an int or an int32 tensor (batch,)")
    if not 0 <= value <= capacity - seqlen_new:
        _fail(ValueError, "cache_seqlens", f"an int in [0, {capacity - seqlen_new}] (cache length {capacity}, "
              f"{seqlen_new} new tokens appended)", value)
    return value


def check_kvcache_values(shapes: KVShapes, seqlens, rows, pads, block_table) -> None:
    """The values of the index arguments, as host lists (block_table a CPU tensor): every position a sequence reads
    or writes lies in its cache row or in pages of the pool. seqlens/rows/pads: None where not given."""
    end_max = shapes.capacity - shapes.seqlen_new
    for b in range(shapes.batch):
        seqlen = shapes.capacity if seqlens is None else seqlens[b]
        if not 0 <= seqlen <= end_max:
            _fail(ValueError, f"cache_seqlens[{b}]", f"a value in [0, {end_max}] (cache length {shapes.capacity}, "
                  f"{shapes.seqlen_new} new tokens appended)", seqlen)
        pad = 0 if pads is None else pads[b]
        if not 0 <= pad <= seqlen:
            _fail(ValueError, f"cache_leftpad[{b}]", f"a value in [0, cache_seqlens[{b}]={seqlen}]", pad)
        if rows is not None and not 0 <= rows[b] < shapes.cache_rows:
            _fail(ValueError, f"cache_batch_idx[{b}]", f"a row of k_cache in [0, {shapes.cache_rows})", rows[b])
        if block_table is not None:
            used = range(pad // shapes.page_size, -(-(seqlen + shapes.seqlen_new) // shapes.page_size))
            for j in used:
                block = int(block_table[b, j])
                if not 0 <= block < shapes.cache_rows:
                    _fail(ValueError, f"block_table[{b}, {j}]", f"a block of the pool in [0, {shapes.cache_rows}) "
                          f"(k_cache dim 0)", block)


def _host_values(shapes: KVShapes, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    """(seqlens, rows, pads, block_table) on the host, None where not given; an int cache_seqlens repeated."""
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = cache_seqlens.tolist()
    else:
        seqlens = None if cache_seqlens is None else [int(cache_seqlens)] * shapes.batch
    rows = None if cache_batch_idx is None else cache_batch_idx.tolist()
    pads = None if cache_leftpad is None else cache_leftpad.tolist()
    table = None if block_table is None else block_table.cpu()
    return seqlens, rows, pads, table


def check_kvcache_inputs(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                         cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                         softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         rotary_interleaved=True, alibi_slopes=None, num_splits=0) -> KVShapes:
    """Validate an attention_with_kvcache call (every argument, and the index values where they can be read without
    a device sync, see should_check_values) and return its KVShapes."""
    _check_tensor("q", q)
    paged = block_table is not None
    _check_caches(q, k_cache, v_cache, paged)
    seqlen_new = _check_new(q, k, v, k_cache)
    batch, seqlen_q, nheads, head_dim = q.shape
    if paged:
        page_size, capacity = _check_paging(q, k_cache, block_table, cache_batch_idx)
    else:
        page_size, capacity = 0, k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            _fail(ValueError, "k_cache", f"at least {batch} rows (q's batch; sequence b uses row b without "
                  "cache_batch_idx)", f"{k_cache.shape[0]} (shape {tuple(k_cache.shape)})")
    if seqlen_new > capacity:
        _fail(ValueError, "k", f"at most {capacity} new tokens (the cache's length)", f"seqlen_new={seqlen_new}")
    seqlens_int = _check_cache_seqlens(cache_seqlens, q, capacity, seqlen_new)
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _check_index_tensor(name, t, q, (batch,))
    rotary_dim = _check_rotary(q, rotary_cos, rotary_sin, seqlen_new, capacity)
    _check_bool("rotary_interleaved", rotary_interleaved)
    _check_causal(causal)
    window = _check_window(window_size, causal)
    splits = _check_int("num_splits", num_splits, "an int >= 0 (0: chosen from the problem)")
    if splits < 0:
        _fail(ValueError, "num_splits", "an int >= 0 (0: chosen from the problem)", splits)
    shapes = KVShapes(batch=batch, seqlen_q=seqlen_q, nheads=nheads, nheads_k=k_cache.shape[2], head_dim=head_dim,
                      dtype=q.dtype, device=q.device, softmax_scale=_check_scale(softmax_scale, head_dim),
                      causal=causal, window=window, softcap=_check_softcap(softcap),
                      has_alibi=_check_alibi(alibi_slopes, q, batch, nheads), seqlen_new=seqlen_new, paged=paged,
                      page_size=page_size, cache_rows=k_cache.shape[0], capacity=capacity, rotary_dim=rotary_dim,
                      rotary_interleaved=rotary_interleaved,
                      rotate_q_per_token=causal or tuple(window_size) != (-1, -1), num_splits=splits,
                      cache_seqlens_int=seqlens_int)
    indices = [t for t in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table) if isinstance(t, torch.Tensor)]
    if indices and all(should_check_values(t) for t in indices):
        check_kvcache_values(shapes, *_host_values(shapes, cache_seqlens, cache_batch_idx, cache_leftpad, block_table))
    return shapes


# --- the fallback -----------------------------------------------------------------------------------------------------

def _rotated(x, rotary_cos, rotary_sin, positions, interleaved):
    # In float32 (float64 for float64 inputs), stored back in x's dtype, as the kernels' caches hold it.
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return reference.rotary(x.to(work), rotary_cos, rotary_sin, positions, interleaved).to(x.dtype)


def kvcache_fallback(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                     cache_leftpad, block_table, alibi_slopes, shapes: KVShapes, return_lse: bool):
    """The exact fallback: append (in place), then each sequence's keys gathered from the cache and attended by
    fa2rt.fallback.sdpa_attention (bottom-right aligned). The index values are read to the host (a sync) and always
    checked. Returns (out like q, lse float32 (batch, nheads, seqlen_q) or None)."""
    seqlens, rows, pads, table = _host_values(shapes, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    check_kvcache_values(shapes, seqlens, rows, pads, table)
    batch, seqlen_q = shapes.batch, shapes.seqlen_q
    seqlens = seqlens or [shapes.capacity] * batch
    rows = rows or list(range(batch))
    pads = pads or [0] * batch
    device = q.device

    def slots(b, start, stop):
        positions = torch.arange(start, stop, device=device)
        if shapes.paged:
            return table[b].to(device)[positions // shapes.page_size].long(), positions % shapes.page_size
        return torch.full_like(positions, rows[b]), positions

    for b in range(batch):
        if not shapes.seqlen_new:
            break
        where = slots(b, seqlens[b], seqlens[b] + shapes.seqlen_new)
        new_k = k[b]
        if shapes.rotary_dim:
            positions = torch.arange(seqlens[b], seqlens[b] + shapes.seqlen_new, device=device)
            new_k = _rotated(new_k, rotary_cos, rotary_sin, positions, shapes.rotary_interleaved)
        k_cache[where] = new_k
        v_cache[where] = v[b]

    outs, lses = [], []
    for b in range(batch):
        qb = q[b]
        if shapes.rotary_dim:
            offsets = torch.arange(seqlen_q, device=device) if shapes.rotate_q_per_token else torch.zeros(
                seqlen_q, dtype=torch.int64, device=device)
            qb = _rotated(qb, rotary_cos, rotary_sin, offsets + seqlens[b], shapes.rotary_interleaved)
        where = slots(b, pads[b], seqlens[b] + shapes.seqlen_new)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = sdpa_attention(qb[None], k_cache[where][None], v_cache[where][None], causal=shapes.causal,
                                  softmax_scale=shapes.softmax_scale, window_size=shapes.window,
                                  softcap=shapes.softcap, alibi_slopes=slopes, return_lse=return_lse)
        outs.append(out[0])
        lses.append(lse[0] if return_lse else None)
    out = torch.stack(outs) if outs else torch.empty_like(q)
    if not return_lse:
        return out, None
    lse = torch.stack(lses) if lses else torch.empty((0, shapes.nheads, seqlen_q), dtype=torch.float32,
                                                     device=device)
    return out, lse


# --- the call ---------------------------------------------------------------------------------------------------------

def _fallback(reason, message, info=None) -> "policy.Decision":
    return policy.Decision("fallback", reason, message, device=policy._device_dict(info) if info else {})


def _gate(shapes: KVShapes):
    """(device info, None) when the kernels may take the call, else (None, the Decision saying why not)."""
    if config.disabled():
        return None, _fallback("disabled", f"{config.DISABLE} is set")
    if 0 in (shapes.batch, shapes.seqlen_q, shapes.nheads):
        return None, policy.Decision("trivial", "empty_input", "an input has a zero-size dimension")
    info, code, why = devices.describe(shapes.device)
    if code:
        return None, _fallback(code, why)
    if shapes.dtype not in policy.KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in policy.KERNEL_DTYPES)
        return None, _fallback("dtype", f"kernels take {names}; got {str(shapes.dtype).removeprefix('torch.')}", info)
    return info, None


def decide(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes,
           shapes: KVShapes) -> "policy.Decision":
    """Kernel or fallback for a validated call, touching nothing (see fa2rt.explain_with_kvcache)."""
    info, decision = _gate(shapes)
    if decision is not None:
        return decision
    from . import kvcache_ops

    return kvcache_ops.decide(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                              alibi_slopes, shapes, info)


def run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, alibi_slopes, shapes: KVShapes, return_lse: bool):
    """A validated call on the decode kernels when they take it, else on the announced fallback: (out, lse or None,
    the kvcache_ops.KVCall that ran it or None for the fallback)."""
    info, decision = _gate(shapes)
    if decision is None:
        from . import kvcache_ops  # the kernel path needs the native module's launch plans

        result = kvcache_ops.run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                 cache_leftpad, block_table, alibi_slopes, shapes, info)
        if not isinstance(result, policy.Decision):
            out, lse, call = result
            return out, (lse if return_lse else None), call
        decision = result
    if decision.path == "fallback":
        policy.announce(decision)
    out, lse = kvcache_fallback(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                cache_leftpad, block_table, alibi_slopes, shapes, return_lse)
    return out, lse, None
