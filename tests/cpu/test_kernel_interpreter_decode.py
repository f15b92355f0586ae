"""The decode kernels (backends/kernels/decode.py: split-KV attn_decode and attn_decode_combine, and attn_append) run
in the Triton interpreter against the float64 KV-cache reference (attn_append: against the caches the torch append
writes).

Each distinct decode tile of backends/cuda/tiles.json and backends/rocm/tiles.json (block_m, block_n, bucket; the
interpreter ignores warps and stages) runs contiguous and paged caches, GQA packing, one and several splits, with
the arguments the library computes itself (fa2rt.kvcache.check_kvcache_inputs, and fa2rt.kvcache_ops: the append and
rotary, the buffers, decode_tensors/decode_constants, the dispatcher's packer and grid); only the pointers are handed
to the interpreter as tensors. Outputs and partials are poisoned with NaN and followed by NaN guards, the caches sit
between NaN guards: an element never written, a write outside out/LSE, or a read outside the caches shows up as NaN.
Malformed index values (past the cache, negative, rows and blocks outside the pool) must keep every access inside the
given tensors (the numbers are then wrong, not faulted). fp32 and fp16; bf16 misbehaves in the interpreter.
"""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from test_kernel_interpreter import _interpret_mode, exec_interpreted
from test_kvcache import make_case
from triton.runtime.interpreter import InterpretedFunction

from fa2rt import _C, kvcache_ops
from fa2rt.kvcache import check_kvcache_inputs
from fa2rt.reference import kvcache_reference

ROOT = Path(__file__).resolve().parents[2]
DECODE_SRC = ROOT / "backends" / "kernels" / "decode.py"
TL_DTYPE = {torch.float16: "fp16", torch.float32: "fp32"}
sys.path.insert(0, str(ROOT / "backends" / "kernels"))
import variants  # noqa: E402


def _load():
    spec = importlib.util.spec_from_file_location("fa2rt_kernels_decode_interp", DECODE_SRC)
    mod = importlib.util.module_from_spec(spec)
    exec_interpreted(spec, mod, "fa2rt_kernels_decode_interp")
    for name in ("attn_decode", "attn_decode_combine", "attn_append", "_page_blocks"):
        assert isinstance(getattr(mod, name), InterpretedFunction), f"{name} would not run in the interpreter"
    return mod


decode = _load()


def _tiles(op):
    """(block_m, block_n, bucket) -> archs, over every image of the op that variants.py builds for both vendors: each
    tiles.json entry's own tile and its page-aligned and one-split tiles."""
    out = {}
    for v in variants.variants(list(variants.ARCHS)):
        if v.op != op:
            continue
        archs = out.setdefault((v.block_m, v.block_n, v.head_dim), [])
        if v.arch not in archs:
            archs.append(v.arch)
    return out


DECODE_TILES = _tiles("decode")
COMBINE_TILES = _tiles("decode_combine")
APPEND_TILES = _tiles("append")
# Every decode image compiles softcap and ALiBi in, applied only when a call asks (variants.OPTIONAL_FEATURES).
FEATURES_COMPILED = ("softcap", "alibi")
# The merge at each decode bucket (masked: it takes head dims up to its bucket); the largest takes every head dim.
COMBINE_BY_BUCKET = {tile[2]: tile for tile in COMBINE_TILES}
COMBINE_TILE = COMBINE_BY_BUCKET[max(COMBINE_BY_BUCKET)]
ALL_ARCHS = ("sm80", "sm89", "sm90", "gfx90a", "gfx942")


def test_every_arch_has_decode_tiles():
    for tiles in (DECODE_TILES, COMBINE_TILES, APPEND_TILES):
        covered = {arch for archs in tiles.values() for arch in archs}
        assert covered == set(ALL_ARCHS)


def _image(op, block_m, block_n, bucket, dtype, features, layout, page_aligned=False):
    img = _C.ImageInfo()
    img.name = f"{op}-interp-{dtype}-d{bucket}-{layout}{'-aligned' if page_aligned else ''}"
    img.op, img.arch, img.dtype, img.head_dim, img.vendor = op, "sm80", dtype, bucket, "cuda"
    img.d_mask, img.features, img.layouts, img.optional_features = True, list(features), [layout], list(features)
    img.page_multiple = block_n if page_aligned else 16 if layout == "paged" else 0
    img.block_m, img.block_n, img.num_warps, img.warp_size, img.shared_bytes, img.align16 = (
        block_m, block_n, 4, 32, 0, True)
    img.kernel_name = "attn_" + op
    img.params = {"decode": decode.decode_params, "decode_combine": decode.combine_params,
                  "append": decode.append_params}[op](dtype)
    return img


def _guarded(t):
    """t's values in a fresh tensor between NaN guards (the tensor, the whole buffer)."""
    n = t.numel()
    buf = torch.full((3 * n + 64,), float("nan"), dtype=t.dtype)
    view = buf[n + 32: 2 * n + 32].view(t.shape)
    view.copy_(t)
    return view, buf


def _poisoned(t):
    view, buf = _guarded(torch.full_like(t, float("nan")))
    return view, buf


def _launch_args(params, tensors, constants):
    launch = {}
    for name, ty in params:
        if ty.startswith("*"):
            launch[name] = tensors[name]
        else:
            value = constants[name]
            if ty in ("i32", "i64"):
                bits = int(ty[1:])
                assert isinstance(value, int) and -(2 ** (bits - 1)) <= value < 2 ** (bits - 1), (name, value)
            launch[name] = value
    assert set(launch) == {name for name, _ in params}
    return launch


def run_kernels(args, tile, splits, options, malformed=None, combine_tile=None, page_aligned=False):
    """The library's kernel path for one call, kernels in the interpreter. args: make_case's dict (caches are
    replaced by guarded copies); malformed: index tensors to swap in after validation; page_aligned: the paged
    image whose tiles lie in one page each (pages a multiple of the tile's block_n). Returns (out, lse, k_cache,
    v_cache, guard buffers)."""
    args = dict(args)
    shapes = check_kvcache_inputs(**args, **options)
    args.update(malformed or {})
    features = FEATURES_COMPILED
    k_cache, k_buf = _guarded(args["k_cache"])
    v_cache, v_buf = _guarded(args["v_cache"])
    q = args["q"]
    seqlens = kvcache_ops.seqlens_tensor(args.get("cache_seqlens"), shapes, q.device)
    if shapes.rotary_dim:
        q = kvcache_ops.rotate_q(q, args["rotary_cos"], args["rotary_sin"], seqlens, shapes)
    if shapes.seqlen_new:
        kvcache_ops.append(k_cache, v_cache, args["k"], args["v"], args.get("rotary_cos"), args.get("rotary_sin"),
                           seqlens, args.get("cache_batch_idx"), args.get("block_table"), shapes)
    out, lse, o_part, lse_part = kvcache_ops.buffers(q, shapes, splits)
    out, out_buf = _poisoned(out)
    lse, lse_buf = _poisoned(lse)
    if splits > 1:
        o_part, _ = _poisoned(o_part)
        lse_part, _ = _poisoned(lse_part)
    else:
        o_part = lse_part = lse
    tensors = kvcache_ops.decode_tensors(q, k_cache, v_cache, out, lse, o_part, lse_part, options.get("alibi_slopes"),
                                         args.get("cache_seqlens"), args.get("cache_batch_idx"),
                                         args.get("cache_leftpad"), args.get("block_table"))
    constants = kvcache_ops.decode_constants(tensors, options.get("alibi_slopes"), args.get("cache_seqlens"), shapes,
                                             splits, "cache_batch_idx" in args, "cache_leftpad" in args)
    dtype = TL_DTYPE[q.dtype]
    registry = _C.Registry()
    block_m, block_n, bucket = tile
    image = _image("decode", block_m, block_n, bucket, dtype, features, shapes.layout, page_aligned)
    registry.add(image)
    _C.pack_params(registry, image.name, {**constants, **{n: 0 for n in tensors}})
    problem = kvcache_ops.problem("decode", shapes, [tensors[n] for n in ("Q", "K", "V", "O")], splits)
    grid, _, _ = _C.launch_config(registry, image.name, problem)
    assert tuple(grid) == decode.decode_grid(splits, shapes.seqlen_q, shapes.nheads // shapes.nheads_k, shapes.batch,
                                             shapes.nheads_k, block_m)
    with _interpret_mode():
        decode.attn_decode[tuple(grid)](**_launch_args(image.params, tensors, constants),
                                        **decode.decode_constexprs(block_m, block_n, bucket, True, features,
                                                                   shapes.layout, page_aligned))
        if splits > 1:
            cm, cn, cbucket = combine_tile or COMBINE_BY_BUCKET.get(bucket, COMBINE_TILE)  # as the dispatcher picks
            comb = _image("decode_combine", cm, cn, cbucket, dtype, (), "partials")
            registry.add(comb)
            ctensors = kvcache_ops.combine_tensors(out, lse, o_part, lse_part)
            cconst = kvcache_ops.combine_constants(out, shapes, splits)
            cproblem = kvcache_ops.problem("decode_combine", shapes, [out, out], splits)
            cgrid, _, _ = _C.launch_config(registry, comb.name, cproblem)
            assert tuple(cgrid) == decode.combine_grid(shapes.seqlen_q, shapes.batch, shapes.nheads, cm)
            decode.attn_decode_combine[tuple(cgrid)](**_launch_args(comb.params, ctensors, cconst),
                                                     **decode.combine_constexprs(cm, cn, cbucket, True, ()))
    return out, lse, k_cache, v_cache, (out_buf, lse_buf, k_buf, v_buf)


def _caches_guarded(k_buf, v_buf):
    for name, buf in (("k_cache", k_buf), ("v_cache", v_buf)):
        n = (buf.numel() - 64) // 3
        assert torch.isnan(buf[: n + 32]).all() and torch.isnan(buf[2 * n + 32:]).all(), f"a write outside {name}"


def _check_guards(out, lse, bufs):
    out_buf, lse_buf, k_buf, v_buf = bufs
    assert not torch.isnan(out).any(), "out has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    for name, buf, t in (("out", out_buf, out), ("lse", lse_buf, lse)):
        assert int(torch.isnan(buf).sum()) == buf.numel() - t.numel(), f"a write outside {name}"
    _caches_guarded(k_buf, v_buf)


def _compare(args, options, got, atol):
    out, lse, k_cache, v_cache, bufs = got
    _check_guards(out, lse, bufs)
    ref_out, ref_lse, ref_k, ref_v = kvcache_reference(**args, **options)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=atol, rtol=atol)
    torch.testing.assert_close(k_cache.double(), ref_k, atol=atol, rtol=atol)
    torch.testing.assert_close(v_cache.double(), ref_v, atol=atol, rtol=atol)


def _head_dim(bucket):
    return bucket - 8  # a masked head dim (every decode image is D_MASK) crossing 8-element groups


TILE_IDS = [f"m{m}n{n}d{d}-" + "+".join(archs) for (m, n, d), archs in DECODE_TILES.items()]


# Paged caches: 16-token pages through the per-key images; pages of 2 * block_n through the page-aligned images, with
# sequences starting mid-page (cache_leftpad), so a split's first tile begins before its keys.
PAGED_CASES = {"contiguous": {}, "paged": dict(paged=True), "paged_aligned": dict(paged=True, leftpad=True)}


@pytest.mark.parametrize("tile", list(DECODE_TILES), ids=TILE_IDS)
@pytest.mark.parametrize("layout", PAGED_CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_tiles_match_reference(tile, layout, splits):
    # GQA 6/2 with two query rows: 6 packed rows per KV head; keys cross several BLOCK_N blocks and splits.
    aligned = layout == "paged_aligned"
    page = 2 * tile[1] if aligned else 16
    args = make_case(batch=2, seqlen_q=2, h=6, hk=2, d=_head_dim(tile[2]), seqlen_cache=3 * tile[1] + 5,
                     max_blocks=max(2, -(-(3 * tile[1] + 5) // page)), new=2, seed=tile[1] + tile[2], page=page,
                     **PAGED_CASES[layout])
    options = dict(causal=True)
    _compare(args, options, run_kernels(args, tile, splits, options, page_aligned=aligned), atol=2e-4)


SMALL_TILE = min(DECODE_TILES, key=lambda t: (t[2], t[1]))

FEATURES = {
    "plain": {},
    "window": dict(window_size=(9, 0)),
    "softcap": dict(softcap=1.5, softmax_scale=0.4),
    "alibi": dict(alibi=(3, 4)),
    "negative_scale": dict(softmax_scale=-0.2),
}


def _options(feature):
    options = dict(FEATURES[feature])
    shape = options.pop("alibi", None)
    if shape is not None:
        options["alibi_slopes"] = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 0.3
    return options


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("layout", ["batch_idx_leftpad", "paged_leftpad_rotary", "paged_aligned_leftpad", "mha_fp16"])
def test_decode_features(feature, layout):
    d = _head_dim(SMALL_TILE[2])
    cases = {
        "batch_idx_leftpad": dict(batch_idx=True, leftpad=True),
        "paged_leftpad_rotary": dict(paged=True, leftpad=True, rotary_dim=16, seqlen_q=3, new=3),
        "paged_aligned_leftpad": dict(paged=True, leftpad=True, page=SMALL_TILE[1], max_blocks=3, seqlen_q=3, new=3),
        "mha_fp16": dict(hk=4, dtype=torch.float16, seqlen_q=1, new=1),
    }
    args = make_case(**{"batch": 3, "h": 4, "hk": 2, "d": d, "seqlen_cache": 70, "seqlen_q": 2, **cases[layout]},
                     seed=17)
    options = _options(feature)
    atol = 3e-3 if args["q"].dtype == torch.float16 else 2e-4
    _compare(args, options, run_kernels(args, SMALL_TILE, 2, options, page_aligned="aligned" in layout), atol=atol)


@pytest.mark.parametrize("window", [(-1, -1), (3, 1), (2 * SMALL_TILE[1] + 40, 0), (-1, 0)],
                         ids=["full", "narrow", "wide", "causal"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("alibi", [False, True])
def test_bands_across_whole_tiles(window, splits, alibi):
    # Rows with different bands (3 query rows; windows narrower and wider than a tile, ending at the diagonal;
    # sequences starting mid-tile), each split with tiles inside and across the bands, with ALiBi switched on
    # (use_alibi) and off, against the reference.
    bn = SMALL_TILE[1]
    args = make_case(batch=2, h=4, hk=2, d=_head_dim(SMALL_TILE[2]), seqlen_cache=8 * bn + 3, seqlen_q=3, new=0,
                     leftpad=True, seed=23)
    # Whole tiles of keys (8 and 5), starting 3 and 1 positions into the cache: the last tile of the last split is
    # full, and its last keys are seen by some rows only (windows ending at the diagonal).
    args["cache_seqlens"] = torch.tensor([8 * bn + 3, 5 * bn + 1], dtype=torch.int32)
    args["cache_leftpad"] = torch.tensor([3, 1], dtype=torch.int32)
    options = dict(window_size=window)
    if alibi:
        options["alibi_slopes"] = torch.rand(4, generator=torch.Generator().manual_seed(4)) * 0.3
    _compare(args, options, run_kernels(args, SMALL_TILE, splits, options), atol=2e-4)


def test_split_count_beyond_keys_and_empty_sequences():
    # More splits than key blocks (empty splits write -inf partials) and sequences with no key at all.
    args = make_case(batch=3, h=4, hk=1, d=_head_dim(SMALL_TILE[2]), seqlen_cache=40, new=0, leftpad=True, seed=8)
    args["cache_seqlens"] = torch.tensor([0, 3, 40], dtype=torch.int32)
    args["cache_leftpad"] = torch.tensor([0, 3, 1], dtype=torch.int32)
    _compare(args, {}, run_kernels(args, SMALL_TILE, 7, {}), atol=2e-4)
    # The combine reading its 7 partials 4 splits at a time (two steps, the second part masked).
    _compare(args, {}, run_kernels(args, SMALL_TILE, 7, {}, combine_tile=(1, 4, COMBINE_TILE[2])), atol=2e-4)
    out, lse = run_kernels(args, SMALL_TILE, 1, {})[:2]
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == math.inf)


@pytest.mark.parametrize("tile", list(COMBINE_TILES), ids=[f"d{t[2]}" for t in COMBINE_TILES])
@pytest.mark.parametrize("block_s", [None, 4])
def test_combine_merges_partials_online(tile, block_s):
    # Partials made up directly: 9 splits read block_s at a time, the largest LSE in the last step (the running
    # maximum must rescale what came before), -inf partials (splits that saw no key) and a row no split saw.
    batch, nheads, seqlen_q, splits, d = 2, 3, 2, 9, _head_dim(tile[2])
    gen = torch.Generator().manual_seed(5)
    lse_part = torch.randn(splits, batch, nheads, seqlen_q, generator=gen) + torch.arange(splits)[:, None, None, None]
    lse_part[:3, 0, 0, 0] = -math.inf
    lse_part[:, 1, 2, 1] = -math.inf
    o_part = torch.randn(splits, batch, nheads, seqlen_q, d, generator=gen)
    out = torch.full((batch, seqlen_q, nheads, d), math.nan)
    lse = torch.full((batch, nheads, seqlen_q), math.nan)
    shapes = dataclasses.replace(check_kvcache_inputs(**make_case(batch=batch, h=nheads, hk=nheads, d=d,
                                                                  seqlen_q=seqlen_q, new=0)), head_dim=d)
    tensors = kvcache_ops.combine_tensors(out, lse, o_part, lse_part)
    constants = kvcache_ops.combine_constants(out, shapes, splits)
    launch = _launch_args(decode.combine_params("fp32"), tensors, constants)
    with _interpret_mode():
        decode.attn_decode_combine[decode.combine_grid(seqlen_q, batch, nheads, 1)](
            **launch, **decode.combine_constexprs(1, block_s or tile[1], tile[2], True, ()))
    w = torch.softmax(lse_part.double(), 0).nan_to_num(0.0)
    want = (w[..., None] * o_part.double()).sum(0).transpose(1, 2)
    want_lse = torch.logsumexp(lse_part.double(), 0).masked_fill(lse_part.isinf().all(0), math.inf)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 1, 2] == 0)


MALFORMED = {
    "seqlens_past_cache": lambda a: {"cache_seqlens": torch.tensor([10**6, -5, 2**30], dtype=torch.int32)},
    "leftpad_past_end": lambda a: {"cache_leftpad": torch.tensor([10**6, -3, 7], dtype=torch.int32)},
    "batch_idx_outside": lambda a: {"cache_batch_idx": torch.tensor([-1, 99, 2**31 - 1], dtype=torch.int32)},
    "blocks_outside_pool": lambda a: {"block_table": torch.full_like(a["block_table"], -7).index_fill_(
        1, torch.tensor([1]), 10**6)},
}


@pytest.mark.parametrize("kind", [*MALFORMED, "blocks_outside_pool_aligned"])
@pytest.mark.parametrize("splits", [1, 2])
def test_malformed_indices_stay_inside_the_tensors(kind, splits):
    aligned = kind.endswith("_aligned")
    kind = kind.removesuffix("_aligned")
    paged = kind == "blocks_outside_pool"
    page = dict(page=SMALL_TILE[1], max_blocks=2) if aligned else {}
    args = make_case(batch=3, h=4, hk=2, d=_head_dim(SMALL_TILE[2]), seqlen_cache=48, new=2, paged=paged,
                     batch_idx=kind == "batch_idx_outside", leftpad=kind == "leftpad_past_end", seed=21, **page)
    got = run_kernels(args, SMALL_TILE, splits, {}, malformed=MALFORMED[kind](args), page_aligned=aligned)
    out, lse = got[:2]
    _check_guards(out, lse, got[4])
    assert torch.isfinite(out).all(), "a read outside the caches (NaN guards) reached the output"


def run_append(args, tile, malformed=None):
    """attn_append in the interpreter with the library's arguments (kvcache_ops.append_tensors/append_constants, the
    dispatcher's packer and grid) on copies of the caches between NaN guards. Returns (k_cache, v_cache, buffers)."""
    shapes = check_kvcache_inputs(**args)
    args = {**args, **(malformed or {})}
    k_cache, k_buf = _guarded(args["k_cache"])
    v_cache, v_buf = _guarded(args["v_cache"])
    tensors = kvcache_ops.append_tensors(k_cache, v_cache, args["k"], args["v"], args["cache_seqlens"],
                                         args.get("cache_batch_idx"), args.get("block_table"))
    constants = kvcache_ops.append_constants(tensors, args["cache_seqlens"], shapes, "cache_batch_idx" in args)
    block_m, _, bucket = tile
    registry = _C.Registry()
    image = _image("append", block_m, block_m, bucket, TL_DTYPE[k_cache.dtype], (), shapes.layout)
    registry.add(image)
    _C.pack_params(registry, image.name, {**constants, **{n: 0 for n in tensors}})
    grid, _, _ = _C.launch_config(registry, image.name, kvcache_ops.problem("append", shapes, [k_cache, v_cache], 1))
    assert tuple(grid) == decode.append_grid(shapes.seqlen_new, shapes.batch, shapes.nheads_k, block_m)
    with _interpret_mode():
        decode.attn_append[tuple(grid)](**_launch_args(image.params, tensors, constants),
                                        **decode.append_constexprs(block_m, block_m, bucket, True, (), shapes.layout))
    return k_cache, v_cache, (k_buf, v_buf)


APPEND_CASES = {
    "contiguous": dict(),
    "batch_idx": dict(batch_idx=True),
    "paged": dict(paged=True, max_blocks=4),
    "int_seqlens": dict(),
    "fp16_many_tokens": dict(dtype=torch.float16, new=37, seqlen_cache=90),
}


@pytest.mark.parametrize("tile", list(APPEND_TILES), ids=[f"m{m}d{d}" for m, _, d in APPEND_TILES])
@pytest.mark.parametrize("case", APPEND_CASES)
def test_append_writes_what_the_torch_append_writes(tile, case):
    # New tokens crossing pages and the tile's token blocks; the caches must equal the torch append's to the bit.
    options = {"batch": 3, "hk": 2, "d": _head_dim(tile[2]), "seqlen_cache": 60, "new": 5, **APPEND_CASES[case]}
    args = make_case(**options, seed=31)
    if case == "int_seqlens":
        args["cache_seqlens"] = 17
    shapes = check_kvcache_inputs(**args)
    want_k, want_v = args["k_cache"].clone(), args["v_cache"].clone()
    seqlens = kvcache_ops.seqlens_tensor(args["cache_seqlens"], shapes, want_k.device)
    kvcache_ops.append(want_k, want_v, args["k"], args["v"], None, None, seqlens, args.get("cache_batch_idx"),
                       args.get("block_table"), shapes)
    k_cache, v_cache, bufs = run_append(args, tile)
    _caches_guarded(*bufs)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("kind", ["seqlens_past_cache", "batch_idx_outside", "blocks_outside_pool"])
def test_append_with_malformed_indices_writes_inside_the_caches(kind):
    paged = kind == "blocks_outside_pool"
    args = make_case(batch=3, hk=2, d=_head_dim(SMALL_TILE[2]), seqlen_cache=48, new=2, paged=paged,
                     batch_idx=kind == "batch_idx_outside", seed=22)
    _caches_guarded(*run_append(args, min(APPEND_TILES), malformed=MALFORMED[kind](args))[2])


def test_module_is_interpreted():
    assert "fa2rt_kernels_decode_interp" in sys.modules
