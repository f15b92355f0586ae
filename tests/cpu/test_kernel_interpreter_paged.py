"""The paged layout of the forward kernel (fwd.py with PAGED: paged prefill) in the Triton interpreter, against the
float64 reference applied per sequence to the same keys packed end to end.

K/V sit in a pool (num_blocks, page_size, nheads_k, headdim) whose pages are handed out to the sequences in a
shuffled order; every pool row no sequence owns (spare pages, the tail of each sequence's last page) holds NaN, and
the block table's unused entries point far outside the pool, so a key read from the wrong page, row or table entry
turns the output into NaN. The arguments are the library's own (validate.check_paged_inputs, ops.kernel_args with
the block table), packed by the dispatcher's packer against the paged image's parameter list, on its grid. Page
sizes 16 and 64 (below, equal to and above the tiles' BLOCK_N), lengths 0 and 1, GQA, causal, a window, softcap and
ALiBi, on every forward tile the paged images are built on (both vendors' tiles.json at the paged buckets).

Malformed block tables and cu_seqlens_k (blocks outside the pool, negative, sequences longer than the table) must keep
every access inside the tensors (DESIGN point 10; ci/memcheck_varlen.py checks the same on a GPU).
"""

import json
import zlib
from dataclasses import dataclass

import pytest
import torch
import triton
from test_kernel_interpreter import GUARD, O_ABS_TOL, TILES, TL_DTYPE, _interpret_mode, fwd, variants
from test_kernel_interpreter_bwd import _single_threaded_blas
from test_kernel_interpreter_varlen import (
    ALIBI,
    LSE_TOL,
    PLAIN,
    SOFTCAP,
    _cu,
    _guarded,
    _guards_intact,
    _packed_qkv,
    launch_arguments,
)

from fa2rt import _C, ops, policy
from fa2rt.reference import attention_reference_varlen
from fa2rt.validate import check_paged_inputs

LAYOUT = "varlen_paged"
OUTSIDE = 1 << 20  # block-table entries no sequence reads: far outside the pool
_DEVICE = _C.DeviceInfo("cuda", "sm90", 232448, 132, 32, "H100")


@dataclass(frozen=True)
class Case:
    name: str
    page_size: int
    lens_q: tuple = (5, 3, 1, 70, 0, 4)
    lens_k: tuple = (7, 0, 1, 90, 33, 4)  # no keys at all for sequence 1: its rows give 0 and LSE +inf
    heads: tuple = (2, 1)
    head_dim: int = 64
    kind: tuple = PLAIN
    dtype: torch.dtype = torch.float32
    options: tuple = ()
    alibi: bool = False
    spare_pages: int = 3


def _cases():
    out = []
    for ps in (16, 64):
        out += [
            Case("plain", ps),
            Case("causal_gqa", ps, heads=(4, 2), options=(("causal", True),)),
            Case("window", ps, options=(("window_size", (20, 3)),)),
            Case("softcap", ps, head_dim=56, kind=SOFTCAP, options=(("softcap", 3.0), ("softmax_scale", 0.4))),
            Case("alibi_causal", ps, heads=(3, 1), head_dim=56, kind=ALIBI, options=(("causal", True),),
                 alibi=True),
            Case("fp16_causal", ps, dtype=torch.float16, options=(("causal", True),)),
        ]
    return out


def _paged_tiles():
    """{(block_m, block_n): [arch, ...]} of the forward tiles at the buckets paged images are built for."""
    buckets = variants.PAGED_PREFILL_BUCKETS
    tiles = {}
    for path in TILES.values():
        for arch, entry in json.loads(path.read_text())["archs"].items():
            for bucket in buckets:
                cfg = entry["fwd"][str(bucket)]
                cfg = cfg.get(variants.PAGED_TILE, cfg)
                tiles.setdefault((cfg["block_m"], cfg["block_n"]), []).append(arch)
    return tiles


CASES = [(tile, case) for tile in sorted(_paged_tiles()) for case in _cases()]


def _id(tile, case):
    return f"{case.name}-p{case.page_size}-m{tile[0]}n{tile[1]}-{TL_DTYPE[case.dtype]}-d{case.head_dim}"


# --- a paged pool holding packed keys --------------------------------------------------------------------------------

def _pages(lengths, page_size):
    return [-(-n // page_size) for n in lengths]


def _paged(packed, lengths, page_size, order, fill=float("nan"), gen=None):
    """packed (total, heads, d) rows moved into a guarded pool (num_blocks, page_size, heads, d): sequence b's page j
    is pool block order[first page of b + j]. Rows no sequence owns hold `fill` (random normal with gen)."""
    num_blocks = len(order)
    body, buf = _guarded(num_blocks * page_size, packed.shape[1], packed.shape[2], packed.dtype, gen, fill)
    pool = body.view(num_blocks, page_size, packed.shape[1], packed.shape[2])
    page, row = 0, 0
    for n in lengths:
        for j in range(n):
            pool[order[page + j // page_size], j % page_size] = packed[row + j]
        page, row = page + -(-n // page_size), row + n
    return pool, buf


def _block_table(lengths, page_size, order, width):
    table = torch.full((len(lengths), width), OUTSIDE, dtype=torch.int32)
    page = 0
    for b, count in enumerate(_pages(lengths, page_size)):
        table[b, :count] = torch.tensor(order[page:page + count], dtype=torch.int32)
        page += count
    return table


def _inputs(case, seed_key):
    q, k, v, gen = _packed_qkv(case, seed_key)
    num_blocks = sum(_pages(case.lens_k, case.page_size)) + case.spare_pages
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_pool, _ = _paged(k, case.lens_k, case.page_size, order)
    v_pool, _ = _paged(v, case.lens_k, case.page_size, order)
    width = max(_pages(case.lens_k, case.page_size)) + 1  # one entry more than the longest sequence needs
    table = _block_table(case.lens_k, case.page_size, order, width)
    alibi = torch.rand(len(case.lens_q), case.heads[0], generator=gen) * 0.3 if case.alibi else None
    return q, k, v, k_pool, v_pool, table, alibi


def _shapes(case, q, k_pool, v_pool, cu_q, cu_k, table, alibi, max_q=None, max_k=None):
    opts = dict(case.options)
    api = check_paged_inputs(q, k_pool, v_pool, cu_q, cu_k, max(case.lens_q) if max_q is None else max_q,
                             max(case.lens_k) if max_k is None else max_k, table, causal=opts.get("causal", False),
                             softmax_scale=opts.get("softmax_scale"), window_size=opts.get("window_size", (-1, -1)),
                             softcap=opts.get("softcap", 0.0), alibi_slopes=alibi)
    left, right = api.window
    # What ops.varlen_paged_fwd rebuilds from the custom op's arguments.
    shapes = ops._paged_shapes(q, k_pool, cu_q, table, api.seqlen_q, api.seqlen_k, api.softmax_scale, left, right,
                               api.softcap, alibi)
    assert shapes == api, "the custom op's Shapes differ from validation's"
    return shapes


# --- launching through the dispatcher's packer and grid ---------------------------------------------------------------

def _image(tile, case, params):
    d_mask, features = case.kind
    img = _C.ImageInfo()
    img.name = "fwd-interp-paged"
    img.op, img.arch, img.dtype, img.head_dim, img.vendor = "fwd", "sm90", TL_DTYPE[case.dtype], 64, "cuda"
    img.d_mask, img.features, img.layouts, img.page_multiple = d_mask, list(features), [LAYOUT], 16
    img.block_m, img.block_n, img.num_warps, img.warp_size, img.shared_bytes, img.align16 = (
        tile[0], tile[1], 4, 32, 0, True)
    img.kernel_name = "attn_fwd"
    img.params = params
    return img


def _forward(tile, case, q, k_pool, v_pool, cu_q, cu_k, table, alibi, shapes):
    o, o_buf = _guarded(q.shape[0], q.shape[1], q.shape[2], q.dtype)
    lse_buf = torch.full((q.shape[1] * q.shape[0] + 2 * GUARD,), float("nan"))
    lse = lse_buf[GUARD:GUARD + q.shape[1] * q.shape[0]].view(q.shape[1], q.shape[0])
    index = (cu_q, cu_k, table)
    args = ops.kernel_args(q, k_pool, v_pool, o, lse, alibi, shapes, index)
    params = fwd.fwd_params(TL_DTYPE[case.dtype], LAYOUT)
    assert set(args) == {name for name, _ in params}, "the library's arguments and the params disagree"
    problem = policy.problem_for(shapes, (q, k_pool, v_pool, o))
    assert (problem.layout, problem.page_size, problem.aligned16, problem.strides8) == (
        LAYOUT, case.page_size, True, True)
    registry = _C.Registry()
    image = _image(tile, case, params)
    image.dtype = problem.dtype  # fp32 runs in the interpreter only; the dispatcher's other checks still apply
    registry.add(image)
    assert _C.select(problem, _DEVICE, registry, "")["image"] == image.name, "the dispatcher refuses this call"
    _C.pack_params(registry, image.name, args)
    grid, _block, _shared = _C.launch_config(registry, image.name, problem)
    assert tuple(grid) == (triton.cdiv(shapes.seqlen_q, tile[0]), shapes.batch * shapes.nheads, 1)
    pointers = {"Q": q, "K": k_pool, "V": v_pool, "O": o, "LSE": lse, "CU_Q": cu_q, "CU_K": cu_k,
                "BLOCK_TABLE": table, "ALIBI": alibi if alibi is not None else ops._no_slopes(q.device)}
    launch = launch_arguments(params, args, pointers)
    d_mask, features = case.kind
    constexprs = fwd.fwd_constexprs(tile[0], tile[1], 64, d_mask, features, LAYOUT)
    with _interpret_mode(), _single_threaded_blas():
        fwd.attn_fwd[tuple(grid)](**launch, **constexprs)
    _guards_intact("O", o_buf)
    _guards_intact("LSE", lse_buf)
    return o, lse


@pytest.mark.parametrize("tile, case", CASES, ids=[_id(t, c) for t, c in CASES])
def test_paged_fwd_matches_reference(tile, case, request):
    q, k, v, k_pool, v_pool, table, alibi = _inputs(case, request.node.callspec.id)
    cu_q, cu_k = _cu(case.lens_q), _cu(case.lens_k)
    shapes = _shapes(case, q, k_pool, v_pool, cu_q, cu_k, table, alibi)
    o, lse = _forward(tile, case, q, k_pool, v_pool, cu_q, cu_k, table, alibi, shapes)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "NaN: a key read from outside its pages"

    ref_o, ref_lse = attention_reference_varlen(q, k, v, cu_q, cu_k, alibi_slopes=alibi, **dict(case.options))
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isposinf(lse), empty), "LSE +inf exactly on the rows that see no key"
    assert (o.transpose(0, 1)[empty] == 0).all(), "rows that see no key must be exactly 0"
    lse_err = (lse.double()[~empty] - ref_lse[~empty]).abs().max().item()
    assert lse_err < LSE_TOL[case.dtype], f"LSE max abs err {lse_err:.3g}"
    err = (o.double() - ref_o).abs().max().item()
    assert err < O_ABS_TOL[case.dtype], f"O max abs err {err:.3g}"


# --- malformed tables: wrong numbers at worst, never an access outside the tensors ------------------------------------

# (cu_seqlens_k, block table rows, max_seqlen_k) over a pool of 4 pages of 16 and a table 3 entries wide
MALFORMED = {
    "outside_pool": ([0, 20, 40], [[0, 4, 1], [1 << 30, 2, 3]], 20),
    "negative": ([0, 20, 40], [[-1, -(1 << 30), 0], [2, -5, 3]], 20),
    "longer_than_table": ([0, 500, 1 << 30], [[0, 1, 2], [3, 2, 1]], 48),
    "decreasing": ([0, 30, 5], [[0, 1, 2], [3, 2, 1]], 30),
}


@pytest.mark.parametrize("which", MALFORMED)
def test_malformed_block_table_stays_inside_the_tensors(which, monkeypatch):
    monkeypatch.setattr("fa2rt.validate.should_check_values", lambda t: False)  # as on a GPU without the debug sync
    cu_k_list, rows, max_k = MALFORMED[which]
    case = Case("malformed", 16, lens_q=(20, 20), lens_k=(20, 20), options=(("causal", True),))
    gen = torch.Generator().manual_seed(zlib.crc32(which.encode()))
    q, _ = _guarded(40, 2, 64, torch.float32, gen)
    # A pool of finite values between NaN guards: any NaN in the output was read from outside it.
    body, _ = _guarded(4 * 16, 1, 64, torch.float32, gen)
    k_pool = body.view(4, 16, 1, 64)
    body, _ = _guarded(4 * 16, 1, 64, torch.float32, gen)
    v_pool = body.view(4, 16, 1, 64)
    table = torch.tensor(rows, dtype=torch.int32)
    cu_q, cu_k = _cu(case.lens_q), torch.tensor(cu_k_list, dtype=torch.int32)
    shapes = _shapes(case, q, k_pool, v_pool, cu_q, cu_k, table, None, max_k=max_k)
    for tile in sorted(_paged_tiles()):
        o, lse = _forward(tile, case, q, k_pool, v_pool, cu_q, cu_k, table, None, shapes)
        assert torch.isfinite(o).all() and not torch.isnan(lse).any(), "a value read from outside the pool"


def test_cases_cover_both_vendors_page_sizes_and_kinds():
    archs = {arch for arch_list in _paged_tiles().values() for arch in arch_list}
    assert {"sm80", "sm89", "sm90", "gfx90a", "gfx942"} <= archs
    assert {c.page_size for _, c in CASES} == {16, 64}
    assert {c.kind for _, c in CASES} == {PLAIN, ALIBI, SOFTCAP}
