"""The varlen layout of the kernel sources (fwd.py, bwd.py with VARLEN) in the Triton interpreter, against the float64
reference applied per sequence (fa2rt.reference.attention_reference_varlen).

Packed (total, nheads, headdim) tensors with cu_seqlens: sequences of length 0 and 1, seqlen_q != seqlen_k per
sequence, sequences with no keys or no queries, GQA/MQA, causal, windows, softcap, ALiBi with (batch, nheads) slopes
indexed by sequence, negative scale, a head dim below the bucket, fp32 and fp16. The arguments are the library's own
(validate.check_varlen_inputs, ops.kernel_args / ops.bwd_kernel_args with the cu_seqlens), packed by the dispatcher's
packer against each image's parameter list (fwd_params / bwd_params of the varlen layout) on the dispatcher's grids.
Outputs are NaN-poisoned and followed by NaN guards, so an element never written or one written outside fails; the
inputs sit between NaN guards too, so a read outside them shows up as NaN.

Malformed cu_seqlens (decreasing, past the total, longer than max_seqlen) must keep every access inside the tensors:
the guards stay NaN and every value written is finite (DESIGN point 10; compute-sanitizer checks the same on a GPU,
ci/memcheck_varlen.py).

The forward runs on every distinct forward tile of tiles.json (its smallest bucket), the backward on every arch's
backward tiles at one bucket (the AMD ones too, once tiles.json has them), the feature crosses on one tile (pair) per
vendor.
"""

import json
import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import triton
from test_kernel_interpreter import (
    GUARD,
    O_ABS_TOL,
    TILES,
    TL_DTYPE,
    _interpret_mode,
    fwd,
)
from test_kernel_interpreter_bwd import GRAD_ABS_TOL, GRAD_RMS_TOL, _single_threaded_blas, bwd

from fa2rt import _C, ops, policy
from fa2rt.reference import attention_reference_varlen
from fa2rt.validate import check_varlen_inputs

LSE_TOL = {torch.float16: 1e-4, torch.float32: 1e-4}
KERNELS = {"fwd": "attn_fwd", "bwd_dq": "attn_bwd_dq", "bwd_dkdv": "attn_bwd_dkdv"}
# The varlen image kinds (variants.LAYOUT_KINDS["varlen"]).
PLAIN, ALIBI, SOFTCAP = (False, ()), (True, ("alibi",)), (True, ("softcap", "alibi"))


def launch_arguments(params, args, pointers) -> dict:
    """The kernel's arguments in the interpreter: the tensors for pointer parameters (each checked to be at the
    address the library passes), the library's values for the rest."""
    launch = {}
    for name, ty in params:
        if ty.startswith("*"):
            assert args[name] == pointers[name].data_ptr(), f"{name}: the library passes another pointer"
            launch[name] = pointers[name]
        else:
            launch[name] = args[name]
    return launch


def _arch_tiles(op):
    """{(block_m, block_n, bucket): [arch, ...]} of one op's own tiles over both vendors' tiles.json (the full-band
    tiles are backward-only: _bwd_tiles)."""
    tiles = {}
    for path in TILES.values():
        for arch, entry in json.loads(path.read_text())["archs"].items():
            for bucket, cfg in entry.get(op, {}).items():
                tiles.setdefault((cfg["block_m"], cfg["block_n"], int(bucket)), []).append(arch)
    return tiles


def _fwd_tiles():
    # One tile per distinct (block_m, block_n), at its smallest bucket (the cheapest to interpret).
    out = {}
    for tile in sorted(_arch_tiles("fwd"), key=lambda t: t[2]):
        out.setdefault(tile[:2], tile)
    return sorted(out.values())


def _bwd_tiles(bucket=64, full_band=True):
    """{(dq tile, dkdv tile, bucket): vendor} over the archs with backward tiles at `bucket`, distinct pairs once;
    with full_band, also the pairs of the full-band dK/dV tiles."""
    pairs = {}
    for vendor, path in TILES.items():
        for _arch, entry in json.loads(path.read_text())["archs"].items():
            if str(bucket) in entry.get("bwd_dq", {}) and str(bucket) in entry.get("bwd_dkdv", {}):
                dq, dkdv = entry["bwd_dq"][str(bucket)], entry["bwd_dkdv"][str(bucket)]
                # A full-band dK/dV tile runs with the bucket's dQ tile, on calls without causal or window (the
                # "tile" cases have neither).
                for tile in (dkdv, dkdv.get("full_band") if full_band else None):
                    if tile:
                        pairs[((dq["block_m"], dq["block_n"]), (tile["block_m"], tile["block_n"]), bucket)] = vendor
    return dict(sorted(pairs.items()))


def _bwd_feature_pairs():
    """One backward tile pair per vendor with backward tiles (its last arch's own tiles, which serve banded calls),
    for the feature crosses."""
    return sorted({vendor: pair for pair, vendor in _bwd_tiles(full_band=False).items()}.values())


@dataclass(frozen=True)
class Case:
    name: str
    lens_q: tuple
    lens_k: tuple
    heads: tuple = (2, 1)
    head_dim: int = 64
    kind: tuple = PLAIN
    dtype: torch.dtype = torch.float32
    options: tuple = ()  # (key, value) pairs for the call: causal, window_size, softcap, softmax_scale
    alibi: bool = False  # (batch, nheads) slopes
    bucket: int = 64


# Lengths: an empty sequence, a one-token one, keys-only and queries-only ones, seqlen_q <, >, == seqlen_k, several
# query and key blocks for the smaller tiles.
LENS_Q = (5, 0, 1, 70, 33, 4)
LENS_K = (7, 4, 1, 50, 0, 4)


def _feature_cases(bucket):
    dm = bucket - 8
    return [
        Case("causal_gqa", LENS_Q, LENS_K, (4, 2), bucket, options=(("causal", True),), bucket=bucket),
        Case("window", LENS_Q, LENS_K, (2, 2), bucket, options=(("window_size", (3, 2)),), bucket=bucket),
        Case("causal_window", LENS_Q, LENS_K, (2, 1), bucket, options=(("causal", True), ("window_size", (9, -1))),
             bucket=bucket),
        Case("softcap", LENS_Q, LENS_K, (2, 1), dm, SOFTCAP, options=(("softcap", 3.0), ("softmax_scale", 0.4)),
             bucket=bucket),
        Case("alibi_causal", LENS_Q, LENS_K, (3, 1), dm, ALIBI, options=(("causal", True),), alibi=True,
             bucket=bucket),
        Case("negative_scale", LENS_Q, LENS_K, (2, 1), bucket, options=(("softmax_scale", -0.5),), bucket=bucket),
        Case("fp16_causal", LENS_Q, LENS_K, (2, 1), bucket, dtype=torch.float16, options=(("causal", True),),
             bucket=bucket),
    ]


def _feature_bucket_tiles(op, bucket=64):
    """One tile per vendor at `bucket` (its last arch's), for the feature crosses."""
    chosen = {}
    for vendor, path in TILES.items():
        for _arch, entry in json.loads(path.read_text())["archs"].items():
            if str(bucket) in entry.get(op, {}):
                cfg = entry[op][str(bucket)]
                chosen[vendor] = (cfg["block_m"], cfg["block_n"], bucket)
    return sorted(set(chosen.values()))


FWD_CASES = ([(tile, Case("tile", LENS_Q, LENS_K, (2, 1), tile[2], bucket=tile[2])) for tile in _fwd_tiles()]
             + [(tile, case) for tile in _feature_bucket_tiles("fwd") for case in _feature_cases(64)])
BWD_CASES = ([(pair, Case("tile", LENS_Q, LENS_K, (2, 1), pair[2], bucket=pair[2])) for pair in _bwd_tiles()]
             + [(pair, case) for pair in _bwd_feature_pairs() for case in _feature_cases(64)])


def _id(tile, case):
    return f"{case.name}-{'x'.join(map(str, (v for t in tile for v in (t if isinstance(t, tuple) else (t,)))))}-" \
           f"{TL_DTYPE[case.dtype]}-d{case.head_dim}"


# --- inputs and outputs ---------------------------------------------------------------------------------------------

def _cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _guarded(rows, heads, head_dim, dtype, gen=None, fill=float("nan")):
    """A (rows, heads, head_dim) tensor inside a buffer with GUARD NaN elements on both sides: (tensor, buffer).
    Random normal when gen is given, else `fill`."""
    n = rows * heads * head_dim
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype)
    body = buf[GUARD:GUARD + n].view(rows, heads, head_dim)
    if gen is not None:
        body.copy_(torch.randn(rows, heads, head_dim, generator=gen, dtype=torch.float64))
    else:
        body.fill_(fill)
    return body, buf


def _guards_intact(name, buf):
    assert torch.isnan(buf[:GUARD]).all() and torch.isnan(buf[-GUARD:]).all(), f"the kernel wrote outside {name}"


def _packed_qkv(case, seed_key):
    """Guarded packed q, k, v of a case and the generator that drew them (seeded by seed_key), to draw on from."""
    gen = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    h, hk = case.heads
    q, _ = _guarded(sum(case.lens_q), h, case.head_dim, case.dtype, gen)
    k, _ = _guarded(sum(case.lens_k), hk, case.head_dim, case.dtype, gen)
    v, _ = _guarded(sum(case.lens_k), hk, case.head_dim, case.dtype, gen)
    return q, k, v, gen


def _inputs(case, seed_key):
    q, k, v, gen = _packed_qkv(case, seed_key)
    alibi = torch.rand(len(case.lens_q), case.heads[0], generator=gen) * 0.3 if case.alibi else None
    return q, k, v, alibi


def _shapes(case, q, k, v, cu_q, cu_k, alibi, max_q=None, max_k=None):
    opts = dict(case.options)
    api = check_varlen_inputs(q, k, v, cu_q, cu_k, max(case.lens_q) if max_q is None else max_q,
                              max(case.lens_k) if max_k is None else max_k, causal=opts.get("causal", False),
                              softmax_scale=opts.get("softmax_scale"), window_size=opts.get("window_size", (-1, -1)),
                              softcap=opts.get("softcap", 0.0), alibi_slopes=alibi)
    left, right = api.window
    # What ops.varlen_fwd / varlen_bwd rebuild from the custom ops' arguments.
    shapes = ops._varlen_shapes(q, k, cu_q, api.seqlen_q, api.seqlen_k, api.softmax_scale, left, right, api.softcap,
                                alibi)
    assert shapes == api, "the custom ops' Shapes differ from validation's"
    return shapes


# --- launching through the dispatcher's packer and grid ---------------------------------------------------------------

def _image(op, block_m, block_n, case, params):
    d_mask, features = case.kind
    img = _C.ImageInfo()
    img.name = f"{op}-interp-varlen"
    img.op, img.arch, img.dtype, img.head_dim, img.vendor = op, "sm80", TL_DTYPE[case.dtype], case.bucket, "cuda"
    img.d_mask, img.features, img.layouts = d_mask, list(features), ["varlen"]
    img.block_m, img.block_n, img.num_warps, img.warp_size, img.shared_bytes, img.align16 = (
        block_m, block_n, 4, 32, 0, True)
    img.kernel_name = KERNELS[op]
    img.params = params
    return img


def _launch(module, op, block_m, block_n, case, shapes, args, pointers, tensors):
    params = (fwd.fwd_params if op == "fwd" else bwd.bwd_params)(TL_DTYPE[case.dtype], "varlen")
    assert set(args) == {name for name, _ in params}, f"{op}: the library's arguments and the params disagree"
    problem = policy.problem_for(shapes, tensors, op)
    assert problem.layout == "varlen" and problem.aligned16 and problem.strides8
    registry = _C.Registry()
    image = _image(op, block_m, block_n, case, params)
    image.dtype = problem.dtype  # fp32 runs in the interpreter only; the dispatcher's other checks still apply
    registry.add(image)
    assert _C.select(problem, _DEVICE, registry, "")["image"] == image.name, "the dispatcher refuses this call"
    _C.pack_params(registry, image.name, args)  # every argument by name and type
    grid, _block, _shared = _C.launch_config(registry, image.name, problem)
    launch = launch_arguments(params, args, pointers)
    d_mask, features = case.kind
    constexprs = (fwd.fwd_constexprs if op == "fwd" else bwd.bwd_constexprs)(block_m, block_n, case.bucket, d_mask,
                                                                             features, "varlen")
    with _interpret_mode(), _single_threaded_blas():
        getattr(module, KERNELS[op])[tuple(grid)](**launch, **constexprs)
    return grid


_DEVICE = _C.DeviceInfo("cuda", "sm80", 166912, 108, 32, "A100")


def _forward(tile, case, q, k, v, cu_q, cu_k, alibi, shapes):
    block_m, block_n, _ = tile
    o, o_buf = _guarded(q.shape[0], q.shape[1], q.shape[2], q.dtype)
    lse_buf = torch.full((q.shape[1] * q.shape[0] + 2 * GUARD,), float("nan"))
    lse = lse_buf[GUARD:GUARD + q.shape[1] * q.shape[0]].view(q.shape[1], q.shape[0])
    cu = (cu_q, cu_k)
    args = ops.kernel_args(q, k, v, o, lse, alibi, shapes, cu)
    pointers = {"Q": q, "K": k, "V": v, "O": o, "LSE": lse, "CU_Q": cu_q, "CU_K": cu_k,
                "ALIBI": alibi if alibi is not None else ops._no_slopes(q.device)}
    grid = _launch(fwd, "fwd", block_m, block_n, case, shapes, args, pointers, (q, k, v, o))
    assert tuple(grid) == (triton.cdiv(shapes.seqlen_q, block_m), shapes.batch * shapes.nheads, 1)
    _guards_intact("O", o_buf)
    _guards_intact("LSE", lse_buf)
    return o, lse


@pytest.mark.parametrize("tile, case", FWD_CASES, ids=[_id(t, c) for t, c in FWD_CASES])
def test_varlen_fwd_matches_reference(tile, case, request):
    q, k, v, alibi = _inputs(case, request.node.callspec.id)
    cu_q, cu_k = _cu(case.lens_q), _cu(case.lens_k)
    shapes = _shapes(case, q, k, v, cu_q, cu_k, alibi)
    o, lse = _forward(tile, case, q, k, v, cu_q, cu_k, alibi, shapes)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "an element of O or LSE was never written"

    ref_o, ref_lse = attention_reference_varlen(q, k, v, cu_q, cu_k, alibi_slopes=alibi, **dict(case.options))
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isposinf(lse), empty), "LSE +inf exactly on the rows that see no key"
    assert (o.transpose(0, 1)[empty] == 0).all(), "rows that see no key must be exactly 0"
    lse_err = (lse.double()[~empty] - ref_lse[~empty]).abs().max().item()
    assert lse_err < LSE_TOL[case.dtype], f"LSE max abs err {lse_err:.3g}"
    err = (o.double() - ref_o).abs().max().item()
    assert err < O_ABS_TOL[case.dtype], f"O max abs err {err:.3g}"


def _backward(pair, case, q, k, v, o, do, lse, cu_q, cu_k, alibi, shapes):
    (qm, qn), (km, kn), _ = pair
    grads = {name: _guarded(t.shape[0], t.shape[1], t.shape[2], t.dtype) for name, t in (("dq", q), ("dk", k),
                                                                                         ("dv", v))}
    delta_buf = torch.full((lse.numel() + 2 * GUARD,), float("nan"))
    delta = delta_buf[GUARD:GUARD + lse.numel()].view(lse.shape)
    tensors = {"q": q, "k": k, "v": v, "o": o, "do": do} | {name: g for name, (g, _) in grads.items()}
    args = ops.bwd_kernel_args(tensors, lse, delta, alibi, shapes, (cu_q, cu_k))
    pointers = {name.upper(): t for name, t in tensors.items()} | {
        "LSE": lse, "DELTA": delta, "CU_Q": cu_q, "CU_K": cu_k,
        "ALIBI": alibi if alibi is not None else ops._no_slopes(q.device)}
    for op, (bm, bn) in (("bwd_dq", (qm, qn)), ("bwd_dkdv", (km, kn))):
        grid = _launch(bwd, op, bm, bn, case, shapes, args, pointers, tuple(tensors.values()))
        heads = shapes.nheads if op == "bwd_dq" else shapes.nheads_k
        over = triton.cdiv(shapes.seqlen_q, bm) if op == "bwd_dq" else triton.cdiv(shapes.seqlen_k, bn)
        assert tuple(grid) == (over, shapes.batch * heads, 1)
    for name, (_, buf) in grads.items():
        _guards_intact(name, buf)
    _guards_intact("DELTA", delta_buf)
    return grads["dq"][0], grads["dk"][0], grads["dv"][0], delta


def _check_grad(name, got, ref, dtype):
    diff = got.double() - ref
    scale = max(1.0, ref.abs().max().item())
    err = diff.abs().max().item() / scale
    rms = diff.norm().item() / max(ref.norm().item(), got.numel() ** 0.5)
    assert err < GRAD_ABS_TOL[dtype], f"{name}: max abs err {err:.3g} (relative to {scale:.3g})"
    assert rms < GRAD_RMS_TOL[dtype], f"{name}: RMS err {rms:.3g}"


@pytest.mark.parametrize("pair, case", BWD_CASES, ids=[_id(p, c) for p, c in BWD_CASES])
def test_varlen_bwd_matches_reference(pair, case, request):
    seed_key = request.node.callspec.id
    q, k, v, alibi = _inputs(case, seed_key)
    cu_q, cu_k = _cu(case.lens_q), _cu(case.lens_k)
    shapes = _shapes(case, q, k, v, cu_q, cu_k, alibi)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_o, ref_lse = attention_reference_varlen(q64, k64, v64, cu_q, cu_k, alibi_slopes=alibi, **dict(case.options))
    gen = torch.Generator().manual_seed(zlib.crc32((seed_key + "-do").encode()))
    do, _ = _guarded(q.shape[0], q.shape[1], q.shape[2], case.dtype, gen)
    ref_grads = torch.autograd.grad(ref_o, (q64, k64, v64), do.double())
    o, _ = _guarded(q.shape[0], q.shape[1], q.shape[2], case.dtype, fill=0.0)
    o.copy_(ref_o.detach())
    lse = ref_lse.detach().float().contiguous()

    dq, dk, dv, delta = _backward(pair, case, q, k, v, o, do, lse, cu_q, cu_k, alibi, shapes)
    for name, t in (("dQ", dq), ("dK", dk), ("dV", dv), ("DELTA", delta)):
        assert not torch.isnan(t).any(), f"{int(torch.isnan(t).sum())} of {t.numel()} {name} elements never written"
    products = (o.double() * do.double()).sum(-1).t()  # (nheads, total_q)
    assert (delta.double() - products).abs().max().item() < 1e-4
    for name, got, ref in zip(("dQ", "dK", "dV"), (dq, dk, dv), ref_grads, strict=True):
        _check_grad(name, got, ref, case.dtype)


# --- malformed cu_seqlens: wrong numbers at worst, never an access outside the tensors --------------------------------

MALFORMED = {
    # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k over totals q 40, k 30
    "decreasing": ([0, 30, 10, 40], [0, 20, 5, 30], 30, 20),
    "past_total": ([0, 10, 500, 1 << 30], [0, 7, 300, 1 << 30], 40, 30),
    "negative": ([-100, 10, -5, 40], [-7, -1, 20, 30], 40, 30),
    "longer_than_max": ([0, 40, 40, 40], [0, 30, 30, 30], 7, 5),
}


def _malformed_case():
    return Case("malformed", (40,), (30,), (2, 1), 64, bucket=64, options=(("causal", True),))


@pytest.mark.parametrize("which", MALFORMED)
def test_malformed_cu_seqlens_stay_inside_the_tensors(which, monkeypatch):
    monkeypatch.setattr("fa2rt.validate.should_check_values", lambda cu: False)  # as on a GPU without the debug sync
    cu_q_list, cu_k_list, max_q, max_k = MALFORMED[which]
    case = _malformed_case()
    gen = torch.Generator().manual_seed(zlib.crc32(which.encode()))
    q, _ = _guarded(40, 2, 64, torch.float32, gen)
    k, _ = _guarded(30, 1, 64, torch.float32, gen)
    v, _ = _guarded(30, 1, 64, torch.float32, gen)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (cu_q_list, cu_k_list))
    shapes = _shapes(case, q, k, v, cu_q, cu_k, None, max_q, max_k)
    tile = _feature_bucket_tiles("fwd")[0]
    o, lse = _forward(tile, case, q, k, v, cu_q, cu_k, None, shapes)
    # Rows the kernels wrote hold finite numbers (or 0 / +inf for rows without keys): nothing read the NaN guards.
    written = ~torch.isnan(o)
    assert torch.isfinite(o[written]).all() and not torch.isnan(lse[~torch.isnan(lse)]).any()

    pair = _bwd_feature_pairs()[0]
    do, _ = _guarded(40, 2, 64, torch.float32, gen)
    o_in, _ = _guarded(40, 2, 64, torch.float32, gen)
    lse_in = torch.rand(2, 40, generator=gen) + 3.0
    dq, dk, dv, delta = _backward(pair, case, q, k, v, o_in, do, lse_in, cu_q, cu_k, None, shapes)
    for name, t in (("dQ", dq), ("dK", dk), ("dV", dv), ("DELTA", delta)):
        assert torch.isfinite(t[~torch.isnan(t)]).all(), f"{name}: a value written from outside the inputs"


def test_cases_cover_every_tile_and_feature():
    assert {t[:2] for t, _ in FWD_CASES} == {t[:2] for t in _arch_tiles("fwd")}
    assert len(BWD_CASES) > len(_feature_cases(64)) and all(math.isfinite(len(c.lens_q)) for _, c in BWD_CASES)
    kinds = {c.kind for _, c in FWD_CASES} | {c.kind for _, c in BWD_CASES}
    assert kinds == {PLAIN, ALIBI, SOFTCAP}
