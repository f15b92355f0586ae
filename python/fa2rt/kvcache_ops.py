"""The KV-cache kernel path: the in-place append and rotary, the split choice, and the append, decode and combine
launches (backends/kernels/decode.py) through the dispatcher.

A call never syncs with the host and allocates nothing whose size depends on index values. New keys and values are
written by the append kernel, one launch (a decode step's torch ops for it cost about 70 us of host time and 14 us of
GPU time on the H200); rotated keys and the rotary of q are torch ops on clamped indices, exact and shared with the
fallback. Either way positions, rows and block ids are clamped into the given tensors, so malformed values write
wrong places of the cache at worst, never outside it. The split count depends only on shapes and the device; each
sequence's keys are cut into that many chunks of its own length inside the kernel.
"""

import math
from dataclasses import dataclass

import torch

from . import _C, builds, config, policy, reference
from .kvcache import KVShapes
from .ops import device_and_stream, empty_contiguous, empty_floats

DECODE_OP, COMBINE_OP, APPEND_OP = "decode", "decode_combine", "append"
COMBINE_LAYOUT = "partials"  # decode.COMBINE_LAYOUT: the combine reads only the decode kernel's partials
# The split heuristic (num_splits=0), from sweeps of ci/decode_splits.py (bf16 d128, GQA 32/8 and MHA 32/32, batch
# 1-64, caches 4k-128k, splits 1-128, CUDA graph replays). The rule takes the largest power-of-two split whose programs
# all fit in one wave of `resident` programs per SM, and one split once the sequences alone fill a wave (no partials,
# no merge, and the longer key block of a one-split image: b64 4k GQA on the H200 4.44 TB/s against 4.11 with 4
# splits). How many programs a wave should hold depends on the device and on how the images read the keys. On the
# H200 (4.8 TB/s) waves of up to 2 programs per SM read fastest and of 4 slower, on contiguous caches and 64-token pages
# (docs/bench/decode-splits-h200.json, -fill-, -n128-: the entry's own tile, which split calls run, and the 16 x 128
# one-split tile). On an H100 (3.35 TB/s, the same 132 SMs) waves of up to 1 per SM, with 2 reading 1-6% slower at
# batch 1-8 (decode-splits-s50-h100.json), except on pages that are not whole 64-key tiles: the images that gather
# each key's page (200 registers a thread at d128 against 157) read fastest there with waves of up to 2, and 3-29%
# slower with 1 (decode-splits-paged16-s51-h100.json). Each takes the middle of its two: RESIDENT by the driver's
# device name for contiguous caches and whole-tile pages, DEFAULT_RESIDENT (the H200's) for the gathering images and
# for devices not measured. Where the sweeps measured the images a choice runs, it reads within 2.7% of the best split
# (tests/cpu/test_kvcache.py checks it against them). No split is shorter than MIN_KEYS_PER_SPLIT keys (a partial
# costs a write and a merge read; at batch 1, cache 4k, GQA 32/8, 32 splits of 128 keys read paged caches 3-4% faster
# than 16 of 256 and contiguous ones as fast: decode-splits-b1-4k-h200.json), none beyond MAX_SPLITS.
DEFAULT_RESIDENT = 3.0
RESIDENT = {"NVIDIA H100 80GB HBM3": 1.5}
WHOLE_TILE_PAGES = 64  # pages of a multiple of this many keys run page-aligned images (the d64/d128 key block)
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 128
PACKED_ROWS = 16  # rows of the decode tiles (tiles.json block_m): query heads of one KV head packed per program


def resident(device_name: str, shapes: KVShapes) -> float:
    """Decode programs per SM (CU) the split rule fills a wave with for this call on this device."""
    if shapes.paged and shapes.page_size % WHOLE_TILE_PAGES:
        return DEFAULT_RESIDENT
    return RESIDENT.get(device_name, DEFAULT_RESIDENT)


def choose_splits(shapes: KVShapes, multiprocessors: int, per_sm: float = DEFAULT_RESIDENT,
                  block_m: int = PACKED_ROWS) -> int:
    """Splits of each sequence's keys: the caller's num_splits (at most MAX_SPLITS), or for 0 the heuristic above
    with waves of per_sm programs per SM."""
    if shapes.num_splits:
        return min(shapes.num_splits, MAX_SPLITS)
    row_blocks = math.ceil(shapes.seqlen_q * (shapes.nheads // shapes.nheads_k) / block_m)
    programs = max(1, shapes.batch * shapes.nheads_k * row_blocks)
    slots = int(per_sm * max(multiprocessors, 1))
    one_wave = 1 << (slots // programs).bit_length() - 1 if programs <= slots else 1
    return max(1, min(one_wave, shapes.capacity // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def device_splits(shapes: KVShapes, info) -> int:
    """choose_splits on the call's device (a DeviceInfo)."""
    return choose_splits(shapes, info.multiprocessors, resident(info.name, shapes))


# --- append and rotary (torch ops on clamped indices) ----------------------------------------------------------------

def seqlens_tensor(cache_seqlens, shapes: KVShapes, device) -> torch.Tensor:
    """(batch,) tokens already cached per sequence: the given int32 tensor, or an int (None: the whole cache)
    repeated as int64. Index arithmetic with an int64 operand gives int64; alone it stays int32."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    value = shapes.capacity if cache_seqlens is None else int(cache_seqlens)
    return torch.full((shapes.batch,), value, dtype=torch.int64, device=device)


_ROW_STARTS: dict = {}


def _row_starts(batch: int, rows_of: int, device) -> torch.Tensor:
    """(batch, 1) int64: the first slot of cache row b in the merged (rows * seqlen) view, b * rows_of; made once
    per shape (a decode step appends with two torch ops, not four)."""
    key = (batch, rows_of, device)
    starts = _ROW_STARTS.get(key)
    if starts is None:
        if len(_ROW_STARTS) >= 64:
            _ROW_STARTS.clear()
        starts = _ROW_STARTS[key] = torch.arange(batch, device=device)[:, None] * rows_of
    return starts


def _rotate(x, rotary_cos, rotary_sin, positions, interleaved):
    # In float32, stored in x's dtype; table rows clamped into the table.
    positions = positions.clamp(0, rotary_cos.shape[0] - 1)
    return reference.rotary(x.float(), rotary_cos, rotary_sin, positions, interleaved).to(x.dtype)


def _slots(cache) -> torch.Tensor | None:
    """cache as (rows * seqlen, nheads_k, headdim) when its first two dims merge into one without a copy, else None."""
    rows, seqlen = cache.shape[:2]
    if rows * seqlen and cache.stride(0) != seqlen * cache.stride(1):
        return None
    return cache.view(rows * seqlen, *cache.shape[2:])


def append(k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, block_table, shapes: KVShapes):
    """Write the new k (rotated when rotary is on) and v at positions seqlens[b] + i of each sequence, in place.
    Few torch ops: each costs host time in a decode step (a decode step appends one token: no arange then)."""
    logical = seqlens[:, None]  # (batch, seqlen_new)
    if shapes.seqlen_new > 1:
        logical = logical + torch.arange(shapes.seqlen_new, device=k.device)
    positions = logical.clamp(0, shapes.capacity - 1)
    if shapes.rotary_dim:
        k = _rotate(k, rotary_cos, rotary_sin, logical, shapes.rotary_interleaved)
    rows_of = shapes.page_size if shapes.paged else shapes.capacity  # positions per cache row (page or sequence)
    if shapes.paged:
        rows = block_table.long().gather(1, (positions // rows_of).long()).clamp_(0, shapes.cache_rows - 1)
        positions = positions % rows_of
    elif cache_batch_idx is not None:
        rows = cache_batch_idx.long().clamp(0, shapes.cache_rows - 1)[:, None]
    else:
        rows = None  # row b: the sequence's own
    flat_k, flat_v = _slots(k_cache), _slots(v_cache)
    if flat_k is not None and flat_v is not None:
        # One index_copy_ per cache: an indexed assignment costs several times its host time and a sort on the GPU.
        if rows is None:
            where = positions.add(_row_starts(shapes.batch, rows_of, k.device)).view(-1)
        else:
            where = positions.add(rows, alpha=rows_of).view(-1)
        flat_k.index_copy_(0, where, k.reshape(-1, *k.shape[2:]))
        flat_v.index_copy_(0, where, v.reshape(-1, *v.shape[2:]))
    else:
        rows = torch.arange(shapes.batch, device=k.device)[:, None] if rows is None else rows
        where = (rows.expand_as(positions), positions.long())
        k_cache[where] = k
        v_cache[where] = v


def rotate_q(q, rotary_cos, rotary_sin, seqlens, shapes: KVShapes):
    """q rotated at seqlens[b] + i (causal or windowed calls) or at seqlens[b] for every row."""
    offsets = torch.arange(shapes.seqlen_q, device=q.device) if shapes.rotate_q_per_token else torch.zeros(
        shapes.seqlen_q, dtype=torch.int64, device=q.device)
    return _rotate(q, rotary_cos, rotary_sin, seqlens[:, None] + offsets[None, :], shapes.rotary_interleaved)


# --- kernel arguments ---------------------------------------------------------------------------------------------

_dummies: dict = {}


def _dummies_on(device) -> tuple[torch.Tensor, torch.Tensor]:
    """One-element float32 and int32 tensors standing in for pointers the kernels do not read (slopes and index tensors
    not given); made once per device (one lookup per call)."""
    pair = _dummies.get(device)
    if pair is None:
        pair = _dummies[device] = tuple(torch.zeros(1, dtype=dtype, device=device)
                                        for dtype in (torch.float32, torch.int32))
    return pair


def _rows_strides(name, t) -> dict:
    """(batch or block, head, row) strides of a (rows, seqlen, nheads, headdim) tensor in units of STRIDE_MULTIPLE."""
    unit = _C.STRIDE_MULTIPLE
    return {f"stride_{name}b": t.stride(0) // unit, f"stride_{name}h": t.stride(2) // unit,
            f"stride_{name}{'n' if name in ('k', 'v') else 'm'}": t.stride(1) // unit}


def _window_bound(side: int, shapes: KVShapes) -> int:
    # "Unlimited" (-1) and longer windows become a bound past every key, keeping the kernel's int32 math safe.
    reach = shapes.capacity + shapes.seqlen_q
    return reach if side < 0 else min(side, reach)


def _index_or(t, dummy):
    return dummy if t is None else t.contiguous()


# attn_decode's pointer arguments in order (decode.decode_params); the combine's are a run of them.
DECODE_POINTERS = ("Q", "K", "V", "O", "LSE", "O_PART", "LSE_PART", "ALIBI", "SEQLENS", "BATCH_IDX", "LEFTPAD",
                   "BLOCK_TABLE")
COMBINE_POINTERS = ("O", "LSE", "O_PART", "LSE_PART")
_COMBINE_RUN = slice(DECODE_POINTERS.index(COMBINE_POINTERS[0]), DECODE_POINTERS.index(COMBINE_POINTERS[-1]) + 1)
assert DECODE_POINTERS[_COMBINE_RUN] == COMBINE_POINTERS


def _inputs(alibi, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, device) -> tuple:
    """The slopes and index tensors as attn_decode reads them (unused ones: small dummies)."""
    seqlens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    no_floats, no_ints = _dummies_on(device)
    return (no_floats if alibi is None else alibi, _index_or(seqlens, no_ints), _index_or(cache_batch_idx, no_ints),
            _index_or(cache_leftpad, no_ints), _index_or(block_table, no_ints))


def decode_tensors(q, k_cache, v_cache, out, lse, o_part, lse_part, alibi, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table) -> dict:
    """attn_decode's pointer arguments by name, in DECODE_POINTERS order."""
    inputs = _inputs(alibi, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, q.device)
    return dict(zip(DECODE_POINTERS, (q, k_cache, v_cache, out, lse, o_part, lse_part, *inputs), strict=True))


def _seqlen_fixed(cache_seqlens, shapes: KVShapes) -> int:
    """The kernels' seqlen_fixed: -1 when cache_seqlens is a tensor (read per sequence), else its value."""
    if isinstance(cache_seqlens, torch.Tensor):
        return -1
    return shapes.capacity - shapes.seqlen_new if cache_seqlens is None else int(cache_seqlens)


def decode_constants(tensors: dict, alibi, cache_seqlens, shapes: KVShapes, splits: int, use_batch_idx: bool,
                     use_leftpad: bool) -> dict:
    """attn_decode's arguments other than pointers (decode.decode_params); use_*: whether cache_batch_idx and
    cache_leftpad were given (else their pointers are dummies the kernel does not read)."""
    slope_b, slope_h = (0, 0) if alibi is None else (
        (alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0)))
    seqlen_fixed = _seqlen_fixed(cache_seqlens, shapes)
    scale_log2, softcap_in = ((shapes.softcap / math.log(2.0), shapes.softmax_scale / shapes.softcap)
                              if shapes.softcap > 0 else (shapes.softmax_scale / math.log(2.0), 0.0))
    left, right = shapes.window
    args = {}
    for name, key in (("q", "Q"), ("k", "K"), ("v", "V"), ("o", "O")):
        args |= _rows_strides(name, tensors[key])
    return args | {
        "stride_ab": slope_b, "stride_ah": slope_h,
        "stride_bt": tensors["BLOCK_TABLE"].stride(0) if shapes.paged else 0,
        "batch": shapes.batch, "nheads": shapes.nheads, "head_ratio": shapes.nheads // shapes.nheads_k,
        "seqlen_q": shapes.seqlen_q, "seqlen_fixed": seqlen_fixed, "seqlen_new": shapes.seqlen_new,
        "capacity": shapes.capacity, "cache_rows": shapes.cache_rows, "page_size": max(shapes.page_size, 1),
        "num_splits": splits, "use_batch_idx": int(use_batch_idx), "use_leftpad": int(use_leftpad),
        "use_softcap": int(shapes.softcap > 0), "use_alibi": int(alibi is not None),
        "head_dim_8": shapes.head_dim // _C.HEAD_DIM_MULTIPLE,
        "window_left": _window_bound(left, shapes), "window_right": _window_bound(right, shapes),
        "qk_scale_log2": scale_log2, "softcap_in": softcap_in,
    }


# attn_append's pointer arguments in order (decode.append_params).
APPEND_POINTERS = ("K", "V", "K_NEW", "V_NEW", "SEQLENS", "BATCH_IDX", "BLOCK_TABLE")


def kernel_append(shapes: KVShapes) -> bool:
    """Whether the append kernel writes the call's new keys and values: plain copies. Rotated keys take the torch
    ops, whose float32 arithmetic the fallback shares, so both paths write the same bits."""
    return shapes.seqlen_new > 0 and not shapes.rotary_dim


def append_tensors(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table) -> dict:
    """attn_append's pointer arguments by name, in APPEND_POINTERS order."""
    seqlens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    no_ints = _dummies_on(k.device)[1]
    return dict(zip(APPEND_POINTERS, (k_cache, v_cache, k, v, _index_or(seqlens, no_ints),
                                      _index_or(cache_batch_idx, no_ints), _index_or(block_table, no_ints)),
                    strict=True))


def append_constants(tensors: dict, cache_seqlens, shapes: KVShapes, use_batch_idx: bool) -> dict:
    """attn_append's arguments other than pointers (decode.append_params)."""
    k_new, v_new = tensors["K_NEW"], tensors["V_NEW"]
    return _rows_strides("k", tensors["K"]) | _rows_strides("v", tensors["V"]) | {
        "stride_knb": k_new.stride(0), "stride_knh": k_new.stride(2), "stride_knm": k_new.stride(1),
        "stride_vnb": v_new.stride(0), "stride_vnh": v_new.stride(2), "stride_vnm": v_new.stride(1),
        "stride_bt": tensors["BLOCK_TABLE"].stride(0) if shapes.paged else 0,
        "nheads_k": shapes.nheads_k, "seqlen_new": shapes.seqlen_new,
        "seqlen_fixed": _seqlen_fixed(cache_seqlens, shapes), "capacity": shapes.capacity,
        "cache_rows": shapes.cache_rows, "page_size": max(shapes.page_size, 1), "use_batch_idx": int(use_batch_idx),
        "head_dim_8": shapes.head_dim // _C.HEAD_DIM_MULTIPLE,
    }


def combine_tensors(out, lse, o_part, lse_part) -> dict:
    return dict(zip(COMBINE_POINTERS, (out, lse, o_part, lse_part), strict=True))


def combine_constants(out, shapes: KVShapes, splits: int) -> dict:
    unit = _C.STRIDE_MULTIPLE
    return {"stride_ob": out.stride(0) // unit, "stride_oh": out.stride(2) // unit, "stride_om": out.stride(1) // unit,
            "batch": shapes.batch, "nheads": shapes.nheads, "seqlen_q": shapes.seqlen_q, "num_splits": splits,
            "head_dim_8": shapes.head_dim // _C.HEAD_DIM_MULTIPLE}


SCRATCH_ALIGN = 64  # floats: each part of the float32 scratch starts 256-byte aligned, as kernels' pointers expect


def _aligned_floats(n: int) -> int:
    return -(-n // SCRATCH_ALIGN) * SCRATCH_ALIGN


def scratch_layout(shapes: KVShapes, splits: int) -> tuple[int, int, int]:
    """(floats, start of the partial outputs, start of their LSEs) of the float32 scratch that holds the LSE first,
    then with more than one split the partials; with one split they are the LSE itself (the kernel writes out)."""
    n = shapes.batch * shapes.nheads * shapes.seqlen_q
    if splits == 1:
        return n, 0, 0
    start_o = _aligned_floats(n)
    start_l = start_o + _aligned_floats(splits * n * shapes.head_dim)
    return start_l + splits * n, start_o, start_l


def lse_view(scratch: torch.Tensor, shapes: KVShapes) -> torch.Tensor:
    """The (batch, nheads, seqlen_q) LSE at the start of the scratch (as_strided: one view op, a slice and a view
    are two)."""
    return scratch.as_strided((shapes.batch, shapes.nheads, shapes.seqlen_q), (shapes.nheads * shapes.seqlen_q,
                                                                               shapes.seqlen_q, 1))


def buffers(q, shapes: KVShapes, splits: int):
    """(out, lse, o_part, lse_part): the output, its LSE and the split partials (the LSE again for one split); sizes
    from shapes and the split count only. The float32 ones share one allocation (host time per decode step)."""
    out = empty_contiguous(q)
    floats, start_o, start_l = scratch_layout(shapes, splits)
    scratch = empty_floats(q, floats)
    lse = lse_view(scratch, shapes)
    if splits == 1:
        return out, lse, lse, lse
    rows, d = lse.shape, shapes.head_dim
    n = lse.numel()
    return (out, lse, scratch.as_strided((splits, *rows, d), (n * d, *(x * d for x in lse.stride()), 1), start_o),
            scratch.as_strided((splits, *rows), (n, *lse.stride()), start_l))


# --- selection and launch -----------------------------------------------------------------------------------------

def _aligned(t) -> bool:
    return t.data_ptr() % _C.ALIGN_BYTES == 0


def _strides8(t) -> bool:
    return all(t.shape[i] <= 1 or t.stride(i) % _C.STRIDE_MULTIPLE == 0 for i in (0, 1, 2))


def problem(op: str, shapes: KVShapes, tensors, splits: int) -> "_C.Problem":
    """The dispatcher's view of a decode, combine or append launch; tensors: the (rows, seqlen, nheads, headdim)
    tensors it reads or writes with hinted alignment and strides in units of 8 (the append's: the caches; its
    seqlen_q is the new tokens)."""
    p = _C.Problem()
    p.op = op
    p.layout = COMBINE_LAYOUT if op == COMBINE_OP else shapes.layout
    p.dtype = policy.KERNEL_DTYPES.get(shapes.dtype, str(shapes.dtype))
    p.batch, p.seqlen_k = shapes.batch, shapes.capacity
    p.seqlen_q = shapes.seqlen_new if op == APPEND_OP else shapes.seqlen_q
    p.nheads, p.nheads_k, p.head_dim = shapes.nheads, shapes.nheads_k, shapes.head_dim
    p.features = ([name for name, on in (("softcap", shapes.softcap > 0), ("alibi", shapes.has_alibi)) if on]
                  if op == DECODE_OP else [])
    p.full_band = shapes.window == (-1, -1)
    p.aligned16 = all(_aligned(t) for t in tensors)
    p.strides8 = all(_strides8(t) for t in tensors)
    # Only q's and out's row offsets are int32 products in the kernels (cache offsets are int64, and all of the
    # append's).
    p.max_head_extent = 0 if op == APPEND_OP else max(
        (t.shape[1] - 1) * t.stride(1) + t.shape[3] for t in tensors[:1] + tensors[-1:])
    p.page_size = 0 if op == COMBINE_OP else shapes.page_size
    p.splits = splits
    return p


@dataclass(frozen=True)
class Plan:
    """The images chosen for one call geometry and their launch plans (combine only with more than one split)."""

    splits: int
    decode: tuple  # (image, mode)
    combine: tuple | None
    decode_plan: object = None
    combine_plan: object = None
    append: tuple | str | None = None  # (image, mode) of the append kernel, or why the torch ops append instead
    append_plan: object = None


def select(shapes: KVShapes, tensors: dict, info, splits: int):
    """((decode image, mode), (combine image, mode) or None) or a fallback Decision with the dispatcher's reasons."""
    build = builds.current_build()
    cache_tensors = [tensors[name] for name in ("Q", "K", "V", "O")]
    chosen = []
    for op, ts in ((DECODE_OP, cache_tensors), (COMBINE_OP, [tensors["O"], tensors["O"]])):
        if op == COMBINE_OP and splits == 1:
            chosen.append(None)
            continue
        sel = _C.select(problem(op, shapes, ts, splits), info, build.registry, config.force_arch())
        if sel["image"] is None:
            rejections = tuple((r.image, r.code, r.message) for r in sel["rejections"])
            why = build.error or "; ".join(sorted({m for _, _, m in rejections})[:4]) or "no image"
            return policy.Decision("fallback", "no_kernel", f"{op}: {why}", device=policy._device_dict(info),
                                   rejections=rejections)
        chosen.append((sel["image"], sel["mode"]))
    return tuple(chosen)


def select_append(shapes: KVShapes, caches: list, info) -> tuple | str | None:
    """The append kernel's (image, mode) for a call that appends into `caches` (k_cache, v_cache), else why the
    torch ops append (None: nothing to append). A rejected append image never sends the call to the fallback: the
    torch ops write the same cache."""
    if not shapes.seqlen_new:
        return None
    if not kernel_append(shapes):
        return "rotary keys"
    build = builds.current_build()
    sel = _C.select(problem(APPEND_OP, shapes, caches, 1), info, build.registry, config.force_arch())
    if sel["image"] is None:
        return "; ".join(sorted({r.message for r in sel["rejections"]})[:2]) or "no image"
    return sel["image"], sel["mode"]


def make_plan(shapes: KVShapes, tensors: dict, new: dict | None, alibi, cache_seqlens, use_batch_idx: bool,
              use_leftpad: bool, info, splits: int):
    """A Plan for this call's geometry, or a fallback Decision. new: append_tensors(...) of a call that appends."""
    chosen = select(shapes, tensors, info, splits)
    if isinstance(chosen, policy.Decision):
        return chosen
    (decode_image, decode_mode), combine = chosen
    registry = builds.current_build().registry
    cache_tensors = [tensors[name] for name in ("Q", "K", "V", "O")]
    constants = decode_constants(tensors, alibi, cache_seqlens, shapes, splits, use_batch_idx, use_leftpad)
    decode_plan = _C.LaunchPlan(registry, decode_image, decode_mode, problem(DECODE_OP, shapes, cache_tensors, splits),
                                constants, list(tensors))
    combine_plan = None
    if combine is not None:
        out = tensors["O"]
        combine_plan = _C.LaunchPlan(registry, combine[0], combine[1], problem(COMBINE_OP, shapes, [out, out], splits),
                                     combine_constants(out, shapes, splits), list(COMBINE_POINTERS),
                                     dependent=config.dependent_launch())
    append, append_plan = (None, None) if new is None else (select_append(shapes, [new["K"], new["V"]], info), None)
    if isinstance(append, tuple):
        append_plan = _C.LaunchPlan(registry, append[0], append[1], problem(APPEND_OP, shapes, [new["K"], new["V"]], 1),
                                    append_constants(new, cache_seqlens, shapes, use_batch_idx), list(APPEND_POINTERS))
    return Plan(splits, (decode_image, decode_mode), combine, decode_plan, combine_plan, append, append_plan)


# Plans by everything they are built from: the call's KVShapes and split count, every pointer tensor's shape, strides
# and alignment, the slopes' strides, whether cache_seqlens is an int (and which), the optional indices given, and
# the selection context (fa2rt's environment variables, the device, the build). Bounded as the dispatcher's caches.
_PLANS: dict = {}


def _plan_key(shapes, tensors, new, alibi, cache_seqlens, use_batch_idx, use_leftpad, info, splits) -> tuple:
    layout = tuple((t.shape, t.stride(), _aligned(t)) for t in (*tensors.values(), *(new or {}).values()))
    seqlens = None if isinstance(cache_seqlens, torch.Tensor) else cache_seqlens
    return (shapes, splits, layout, None if alibi is None else alibi.stride(), seqlens, use_batch_idx, use_leftpad,
            config.raw_values(), info.vendor, info.index, info.arch, id(builds.current_build()))


def decide(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi,
           shapes: KVShapes, info) -> policy.Decision:
    """What run() would do, without touching the caches: the kernel Decision (image: the decode image; backward:
    the combine's (image, mode) when the call splits) or the fallback one."""
    splits = device_splits(shapes, info)
    if shapes.rotary_dim or not (_aligned(q) and _strides8(q)):
        q = torch.empty_like(q, memory_format=torch.contiguous_format)  # run() rotates or copies into a fresh one
    out, lse, o_part, lse_part = buffers(q, shapes, splits)
    tensors = decode_tensors(q, k_cache, v_cache, out, lse, o_part, lse_part, alibi, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table)
    chosen = select(shapes, tensors, info, splits)
    if isinstance(chosen, policy.Decision):
        return chosen
    (image, mode), combine = chosen
    message = f"{splits} split(s)"
    if shapes.seqlen_new:
        append = select_append(shapes, [k_cache, v_cache], info)
        message += f"; append: {append[0] if isinstance(append, tuple) else 'torch ops (' + append + ')'}"
    return policy.Decision("kernel", image=image, mode=mode, device=policy._device_dict(info), message=message,
                           backward=(combine,) if combine else ())


@dataclass(frozen=True)
class KVCall:
    """A call resolved on the kernel path: its KVShapes and Plan, so a repeated call (calls.find_kvcache) only
    prepares q, allocates its outputs, appends and launches."""

    shapes: KVShapes
    plan: Plan
    plans_source: dict  # the plan cache it was resolved against (tests replace it to record launches)
    q_strides8: bool  # q's strides (part of the key) are the kernels'; the key also holds that its base is aligned
    scratch: tuple  # scratch_layout(shapes, plan.splits)

    def current(self) -> bool:
        return self.plans_source is _PLANS


def _prepared_q(q, rotary_cos, rotary_sin, cache_seqlens, shapes: KVShapes):
    """(q as the kernel reads it, seqlens as a (batch,) tensor or None): rotated when rotary is on, copied when its
    layout is not the kernels' (q is small)."""
    seqlens = seqlens_tensor(cache_seqlens, shapes, q.device) if shapes.seqlen_new or shapes.rotary_dim else None
    if shapes.rotary_dim:
        seqlens = seqlens.long()  # rotary table rows (reference.rotary takes int64 positions)
        q = rotate_q(q, rotary_cos, rotary_sin, seqlens, shapes)
    elif not (_aligned(q) and _strides8(q)):
        q = q.clone(memory_format=torch.contiguous_format)
    return q, seqlens


def run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, alibi, shapes: KVShapes, info):
    """The call on the kernels: (out, lse, its KVCall), or the fallback Decision (the caches untouched) when no
    image fits."""
    splits = device_splits(shapes, info)
    q_given = q
    q, seqlens = _prepared_q(q, rotary_cos, rotary_sin, cache_seqlens, shapes)
    out, lse, o_part, lse_part = buffers(q, shapes, splits)
    tensors = decode_tensors(q, k_cache, v_cache, out, lse, o_part, lse_part, alibi, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table)
    new = (append_tensors(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
           if shapes.seqlen_new else None)
    flags = (cache_batch_idx is not None, cache_leftpad is not None)
    key = _plan_key(shapes, tensors, new, alibi, cache_seqlens, *flags, info, splits)
    plan = policy.remember(_PLANS, key, lambda: make_plan(shapes, tensors, new, alibi, cache_seqlens, *flags, info,
                                                          splits))
    if isinstance(plan, policy.Decision):
        return plan
    if plan.append_plan is not None:
        launch_append(plan, [t.data_ptr() for t in new.values()], q.device)
    elif shapes.seqlen_new:
        append(k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, block_table, shapes)
    launch(plan, [t.data_ptr() for t in tensors.values()], q.device)
    return out, lse, KVCall(shapes, plan, _PLANS, _strides8(q_given), scratch_layout(shapes, splits))


def run_call(call: KVCall, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
             cache_leftpad, block_table, alibi, return_lse: bool):
    """A repeated call (same key as the validated call that resolved `call`): (out, lse or None) with no validation
    or selection, launched from raw pointers (no views of the scratch unless the LSE is returned). Grad mode is off
    only around the torch ops that write the caches or rotate q."""
    shapes, plan = call.shapes, call.plan
    if plan.append_plan is None and (shapes.seqlen_new or shapes.rotary_dim):
        with torch.no_grad():
            q, seqlens = _prepared_q(q, rotary_cos, rotary_sin, cache_seqlens, shapes)
            if shapes.seqlen_new:
                append(k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, block_table, shapes)
    else:
        if not call.q_strides8:  # q's base is aligned: the key holds that (calls._kvcache_key)
            q = q.clone(memory_format=torch.contiguous_format)
        if plan.append_plan is not None:
            new = append_tensors(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
            launch_append(plan, [t.data_ptr() for t in new.values()], q.device)
    out = empty_contiguous(q)
    floats, start_o, start_l = call.scratch
    scratch = empty_floats(q, floats)
    base = scratch.data_ptr()
    inputs = _inputs(alibi, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, q.device)
    launch(plan, [q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), base, base + 4 * start_o,
                  base + 4 * start_l, *(t.data_ptr() for t in inputs)], q.device)
    return out, (lse_view(scratch, shapes) if return_lse else None)


def launch_append(plan: Plan, pointers: list, device) -> None:
    """The append kernel on torch's current stream (before the decode kernels); pointers in APPEND_POINTERS order."""
    plan.append_plan.launch(*device_and_stream(device), pointers)


def launch(plan: Plan, pointers: list, device) -> None:
    """Both kernels of a call on torch's current stream; pointers: addresses in DECODE_POINTERS order."""
    index, stream = device_and_stream(device)
    plan.decode_plan.launch(index, stream, pointers)
    if plan.combine_plan is not None:
        plan.combine_plan.launch(index, stream, pointers[_COMBINE_RUN])
