"""fa2rt.attention_with_kvcache on a CPU machine: validation (arguments and index values), and the exact fallback
(append in place, rotary, paged caches, cache_batch_idx, cache_leftpad, every attention option) against the float64
reference fa2rt.reference.kvcache_reference."""

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_eager_path import assert_warm_equals_cold, call_outcome, laid_out, sample_specs

import fa2rt
from fa2rt.reference import kvcache_reference

PAGE = 16
ROOT = Path(__file__).resolve().parents[2]


def make_case(batch=3, seqlen_q=1, h=4, hk=2, d=16, seqlen_cache=40, new=2, paged=False, max_blocks=3,
              dtype=torch.float32, rotary_dim=0, batch_idx=False, leftpad=False, seed=0, page=PAGE):
    """Inputs of one call: a dict of attention_with_kvcache's arguments (cache_seqlens an int32 tensor of lengths
    that leave room for the new tokens)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if paged:
        num_blocks = batch * max_blocks + 3
        k_cache, v_cache = randn(num_blocks, page, hk, d), randn(num_blocks, page, hk, d)
        table = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].reshape(batch, max_blocks)
        capacity = max_blocks * page
    else:
        rows = batch + 2 if batch_idx else batch
        k_cache, v_cache = randn(rows, seqlen_cache, hk, d), randn(rows, seqlen_cache, hk, d)
        capacity = seqlen_cache
    seqlens = torch.randint(0, capacity - new + 1, (batch,), generator=g, dtype=torch.int32)
    args = dict(q=randn(batch, seqlen_q, h, d), k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens)
    if new:
        args.update(k=randn(batch, new, hk, d), v=randn(batch, new, hk, d))
    if paged:
        args["block_table"] = table.to(torch.int32)
    if batch_idx:
        args["cache_batch_idx"] = torch.randperm(batch + 2, generator=g)[:batch].to(torch.int32)
    if leftpad:
        args["cache_leftpad"] = (torch.rand(batch, generator=g) * (seqlens + 1)).to(torch.int32).clamp(max=seqlens)
    if rotary_dim:
        angles = torch.rand(capacity, rotary_dim // 2, generator=g, dtype=torch.float64) * 6.3
        args.update(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype))
    return args


def split(args):
    positional = [args[name] for name in ("q", "k_cache", "v_cache")]
    return positional, {name: value for name, value in args.items() if name not in ("q", "k_cache", "v_cache")}


def check_against_reference(args, atol=2e-5, **options):
    """Runs the call on copies of the caches and compares out, lse and both caches with the reference."""
    expected_out, expected_lse, expected_k, expected_v = kvcache_reference(**args, **options)
    args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    positional, named = split(args)
    out, lse = fa2rt.attention_with_kvcache(*positional, **named, **options, return_lse=True)
    assert out.dtype == args["q"].dtype and out.shape == args["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == (out.shape[0], out.shape[2], out.shape[1])
    torch.testing.assert_close(out.double(), expected_out, atol=atol, rtol=atol)
    finite = expected_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse.double()[finite], expected_lse[finite], atol=atol, rtol=atol)
    torch.testing.assert_close(args["k_cache"].double(), expected_k, atol=atol, rtol=atol)
    torch.testing.assert_close(args["v_cache"].double(), expected_v, atol=atol, rtol=atol)


LAYOUTS = {
    "contiguous": {},
    "paged": dict(paged=True),
    "batch_idx": dict(batch_idx=True),
    "leftpad": dict(leftpad=True),
    "paged_leftpad": dict(paged=True, leftpad=True),
}

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(5, 0)),
    "softcap": dict(softcap=1.5, softmax_scale=0.6),
    "alibi": dict(alibi=(4,)),
    "alibi_batch_causal": dict(alibi=(3, 4), causal=True),
}


def resolve(options, seed=3):
    options = dict(options)
    shape = options.pop("alibi", None)
    if shape is not None:
        options["alibi_slopes"] = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.3
    return options


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("option", OPTIONS)
def test_fallback_matches_reference(layout, option, fresh_announcements):
    check_against_reference(make_case(seqlen_q=2, **LAYOUTS[layout]), **resolve(OPTIONS[option]))


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [True, False])
def test_rotary_both_styles(interleaved, causal, paged, fresh_announcements):
    # seqlen_q 3: q rows rotate at cache_seqlens + i when causal, all at cache_seqlens otherwise.
    args = make_case(seqlen_q=3, new=3, rotary_dim=8, paged=paged, seed=5)
    check_against_reference(args, rotary_interleaved=interleaved, causal=causal)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)])
def test_gqa_mqa_and_decode_step(heads, fresh_announcements):
    check_against_reference(make_case(seqlen_q=1, h=heads[0], hk=heads[1], new=1, seed=7))


def test_larger_cache_without_batch_idx_uses_row_b(fresh_announcements):
    args = make_case(batch_idx=True, seed=6)  # a cache of batch + 2 rows
    args.pop("cache_batch_idx")
    check_against_reference(args)


def test_no_new_tokens_int_seqlens_and_whole_cache(fresh_announcements):
    args = make_case(new=0, seed=2)
    check_against_reference(dict(args, cache_seqlens=17))
    args.pop("cache_seqlens")  # None: every position of the cache
    check_against_reference(args)


def test_fp16_within_rounding(fresh_announcements):
    check_against_reference(make_case(dtype=torch.float16, rotary_dim=16, paged=True, seed=9), atol=3e-3,
                            causal=True)


def test_empty_sequences_give_zero_and_inf_lse(fresh_announcements):
    args = make_case(new=0, leftpad=True, seed=4)
    args["cache_seqlens"] = torch.tensor([0, 5, 7], dtype=torch.int32)
    args["cache_leftpad"] = torch.tensor([0, 5, 2], dtype=torch.int32)
    positional, named = split(args)
    out, lse = fa2rt.attention_with_kvcache(*positional, **named, return_lse=True)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == float("inf"))
    check_against_reference(args)


def test_appends_in_place_and_returns_no_graph(fresh_announcements):
    args = make_case(seed=11)
    before = args["k_cache"].clone()
    q = args["q"].requires_grad_()
    positional, named = split(args)
    out = fa2rt.attention_with_kvcache(*positional, **named)
    assert out.grad_fn is None and not out.requires_grad
    changed = (args["k_cache"] != before).any(dim=(2, 3))
    for b, start in enumerate(args["cache_seqlens"].tolist()):
        assert changed[b].nonzero().flatten().tolist() == [start, start + 1]
        torch.testing.assert_close(args["k_cache"][b, start:start + 2], args["k"][b])
    assert q.grad is None


COMPILED = {
    "rotary_speculative": dict(seqlen_q=2, new=2, rotary_dim=8),
    "paged": dict(paged=True),
    "batch_idx_leftpad_no_append": dict(new=0, batch_idx=True, leftpad=True),
}


def compiled_step(names, backend="aot_eager", **options):
    """A decode step over the tensors of a make_case dict (in `names` order), compiled with fullgraph."""

    def step(*tensors):
        positional, named = split(dict(zip(names, tensors, strict=True)))
        out, lse = fa2rt.attention_with_kvcache(*positional, **named, **options, return_lse=True)
        return out * 2, lse

    return step, torch.compile(step, fullgraph=True, backend=backend)


@pytest.mark.parametrize("case", COMPILED)
def test_compile_fullgraph_runs_the_custom_op(case, fresh_announcements):
    # Under torch.compile a KV-cache call is the fa2rt::kvcache_fwd custom op: tracing reads no index value, and the
    # graph appends in place and returns what the eager call returns.
    args = make_case(seed=5, **COMPILED[case])
    eager_args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    step, compiled = compiled_step(list(args), causal=True, window_size=(6, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        want, got = step(*eager_args.values()), compiled(*args.values())
    for name in ("k_cache", "v_cache"):
        assert torch.equal(args[name], eager_args[name]), name
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_step_takes_new_lengths_and_checks_them_when_it_runs(fresh_announcements):
    args = make_case(seed=6, new=1)
    names = list(args)
    _, compiled = compiled_step(names, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        for lengths in ([3, 0, 38], [39, 17, 1]):
            args["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32)
            step_args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
            compiled(*step_args.values())
            for b, n in enumerate(lengths):
                torch.testing.assert_close(step_args["k_cache"][b, n], args["k"][b, 0], rtol=0, atol=0)
        args["cache_seqlens"] = torch.tensor([3, 40, 0], dtype=torch.int32)  # no room for the new token
        with raises(ValueError, "cache_seqlens[1]: expected a value in [0, 39]"):
            compiled(*args.values())


def test_inductor_appends_into_the_callers_caches_without_copies(fresh_announcements):
    from torch._inductor.utils import run_and_get_code

    args = make_case(seed=7, seqlen_cache=1024, new=1)
    _, compiled = compiled_step(list(args), backend="inductor", causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        _, (code,) = run_and_get_code(compiled, *args.values())
    call = next(line for line in code.splitlines() if "torch.ops.fa2rt.kvcache_fwd.default(" in line)
    # The graph's own inputs, not buffers: a functionalised mutation left as such would copy each cache (1024 tokens
    # here) on every step and pass the copies.
    assert re.search(r"kvcache_fwd\.default\(\w+, arg\d+_1, arg\d+_1, ", call), call


class _DecodeStep(torch.nn.Module):
    """A decode step over KV caches held as the module's buffers (as a model holds them for torch.export)."""

    def __init__(self, k_cache, v_cache):
        super().__init__()
        self.register_buffer("k_cache", k_cache.clone())
        self.register_buffer("v_cache", v_cache.clone())

    def forward(self, q, k, v, cache_seqlens):
        return fa2rt.attention_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=cache_seqlens,
                                           causal=True)


def test_torch_export_keeps_the_op_and_its_cache_writes(fresh_announcements):
    args = make_case(seed=8, new=1)
    inputs = (args["q"], args["k"], args["v"], args["cache_seqlens"])
    eager = _DecodeStep(args["k_cache"], args["v_cache"])
    # The inference IR (functional): the op, and both caches written back as mutated buffers.
    exported = torch.export.export(_DecodeStep(args["k_cache"], args["v_cache"]), inputs).run_decompositions()
    assert "fa2rt.kvcache_fwd" in str(exported.graph)
    assert set(exported.graph_signature.buffers_to_mutate.values()) == {"k_cache", "v_cache"}
    module = exported.module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        torch.testing.assert_close(module(*inputs), eager(*inputs), rtol=0, atol=0)
    for name in ("k_cache", "v_cache"):
        assert torch.equal(getattr(module, name), getattr(eager, name)), name
        assert not torch.equal(getattr(eager, name), args[name]), name  # the step appended


def test_fake_kvcache_op_gives_flash_attn_shapes():
    from fa2rt import api

    args = {n: t.to("meta") for n, t in make_case(seqlen_q=3, h=4, d=16).items()}
    out, lse = api.kvcache_fwd(args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], None, None,
                               args["cache_seqlens"], None, None, None, None, None, None, True, -1, -1, 0.0, True, 0)
    assert out.shape == args["q"].shape and out.is_contiguous()
    assert lse.shape == (3, 4, 3) and lse.dtype == torch.float32


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def call(args, **overrides):
    positional, named = split(dict(args, **overrides))
    return fa2rt.attention_with_kvcache(*positional, **named)


def test_malformed_index_values_are_named():
    args = make_case(seed=1)
    with raises(ValueError, "cache_seqlens[1]: expected a value in [0, 38] (cache length 40, 2 new tokens"):
        call(args, cache_seqlens=torch.tensor([0, 39, 3], dtype=torch.int32))
    with raises(ValueError, "cache_seqlens[0]: expected a value in [0, 38]"):
        call(args, cache_seqlens=torch.tensor([-1, 3, 3], dtype=torch.int32))
    with raises(ValueError, "cache_seqlens: expected an int in [0, 38]"):
        call(args, cache_seqlens=39)
    with raises(ValueError, "cache_leftpad[2]: expected a value in [0, cache_seqlens[2]=3]"):
        call(args, cache_seqlens=torch.tensor([3, 3, 3], dtype=torch.int32),
             cache_leftpad=torch.tensor([0, 0, 4], dtype=torch.int32))
    wide = make_case(batch_idx=True, seed=1)
    with raises(ValueError, "cache_batch_idx[0]: expected a row of k_cache in [0, 5)"):
        call(wide, cache_batch_idx=torch.tensor([5, 0, 1], dtype=torch.int32))
    paged = make_case(paged=True, new=0, seed=1)
    table = paged["block_table"].clone()
    table[1, 0] = paged["k_cache"].shape[0]
    with raises(ValueError, "block_table[1, 0]: expected a block of the pool in [0, 12)"):
        call(paged, block_table=table, cache_seqlens=5)
    table[1, 0], table[2, 2] = 0, -1
    with raises(ValueError, "block_table[2, 2]: expected a block of the pool in [0, 12)"):
        call(paged, block_table=table, cache_seqlens=40)
    # Entries past a sequence's last page are never read, so they may hold anything (vLLM pads tables).
    call(paged, block_table=table, cache_seqlens=16)


MISUSE = [
    (dict(k_cache=torch.zeros(3, 40, 2)), ValueError, "k_cache: expected a 4-D tensor"),
    (dict(v_cache=torch.zeros(3, 41, 2, 16)), ValueError, "v_cache: expected shape (3, 40, 2, 16) (same as k_cache)"),
    (dict(k_cache=torch.zeros(3, 40, 2, 8), v_cache=torch.zeros(3, 40, 2, 8)), ValueError,
     "k_cache: expected head dim 16 (same as q)"),
    (dict(k_cache=torch.zeros(3, 40, 3, 16), v_cache=torch.zeros(3, 40, 3, 16)), ValueError,
     "k_cache: expected a number of heads that divides q's nheads=4"),
    (dict(k_cache=torch.zeros(2, 40, 2, 16), v_cache=torch.zeros(2, 40, 2, 16)), ValueError,
     "k_cache: expected at least 3 rows (q's batch; sequence b uses row b without cache_batch_idx), got 2"),
    (dict(k_cache=torch.zeros(3, 40, 2, 16, dtype=torch.float16)), ValueError, "k_cache: expected dtype torch.float32"),
    (dict(v=None), ValueError, "v: expected a tensor when k is given"),
    (dict(k=torch.zeros(3, 2, 4, 16)), ValueError, "k: expected shape (batch=3, seqlen_new, nheads_k=2, headdim=16)"),
    (dict(v=torch.zeros(3, 1, 2, 16)), ValueError, "v: expected shape (3, 2, 2, 16) (same as k)"),
    (dict(k=torch.zeros(3, 41, 2, 16), v=torch.zeros(3, 41, 2, 16)), ValueError, "k: expected at most 40 new tokens"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens: expected an int or a tensor when k and v are given"),
    (dict(cache_seqlens=torch.zeros(3, dtype=torch.int64)), ValueError, "cache_seqlens: expected dtype torch.int32"),
    (dict(cache_seqlens=torch.zeros(2, dtype=torch.int32)), ValueError, "cache_seqlens: expected shape (3,)"),
    (dict(cache_seqlens=2.0), TypeError, "cache_seqlens: expected None, an int or an int32 tensor"),
    (dict(cache_batch_idx=[0, 1, 2]), TypeError, "cache_batch_idx: expected None or a torch.int32 tensor"),
    (dict(cache_leftpad=torch.zeros(3, 1, dtype=torch.int32)), ValueError, "cache_leftpad: expected shape (3,)"),
    (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     "k_cache: expected a page size (dim 1 of a paged cache) that is a positive multiple of 16, got 40"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "block_table: expected shape (3, 2)"),
    (dict(block_table=torch.zeros(3, dtype=torch.int32)), ValueError, "block_table: expected a 2-D torch.int32"),
    (dict(rotary_cos=torch.zeros(40, 4)), ValueError, "rotary_sin: expected a tensor when rotary_cos is given"),
    (dict(rotary_cos=torch.zeros(40, 9), rotary_sin=torch.zeros(40, 9)), ValueError,
     "rotary_cos: expected shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= headdim=16"),
    (dict(rotary_cos=torch.zeros(39, 4), rotary_sin=torch.zeros(39, 4)), ValueError,
     "rotary_cos: expected at least 40 rows"),
    (dict(rotary_cos=torch.zeros(40, 4), rotary_sin=torch.zeros(40, 2)), ValueError,
     "rotary_sin: expected shape (40, 4) (same as rotary_cos)"),
    (dict(rotary_cos=torch.zeros(40, 4, dtype=torch.float16), rotary_sin=torch.zeros(40, 4)), ValueError,
     "rotary_cos: expected dtype torch.float32 (same as q)"),
    (dict(rotary_interleaved=1), TypeError, "rotary_interleaved: expected a bool"),
    (dict(num_splits=-1), ValueError, "num_splits: expected an int >= 0"),
    (dict(num_splits=1.5), TypeError, "num_splits: expected an int >= 0"),
    (dict(causal=1), TypeError, "causal: expected a bool"),
    (dict(window_size=(-2, 0)), ValueError, "window_size[0]: expected an int >= -1"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a finite real number >= 0"),
    (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes: expected shape (4,) or (3, 4)"),
]


@pytest.mark.parametrize("overrides, exc, text", MISUSE, ids=[text.split(":")[0] + str(i)
                                                             for i, (_, _, text) in enumerate(MISUSE)])
def test_bad_arguments_are_named(overrides, exc, text):
    with raises(exc, text):
        call(make_case(seed=1), **overrides)


def test_rotary_needs_new_tokens_and_paged_refuses_batch_idx():
    args = make_case(new=0, seed=1)
    with raises(ValueError, "rotary_cos: expected None when k and v are not given"):
        call(args, rotary_cos=torch.zeros(40, 4), rotary_sin=torch.zeros(40, 4))
    paged = make_case(paged=True, seed=1)
    with raises(ValueError, "cache_batch_idx: expected None with block_table"):
        call(paged, cache_batch_idx=torch.zeros(3, dtype=torch.int32))


# --- the dispatcher's view of decode calls (synthetic images; the real ones are tested by test_selection) ------------

def decode_image(layout, features=("softcap", "alibi"), optional=("softcap", "alibi"), op="decode", head_dim=128):
    from fa2rt import _C

    img = _C.ImageInfo()
    img.name = f"{op}-sm90-bf16-d{head_dim}m-{'+'.join(features) or 'plain'}-{layout}"
    img.op, img.arch, img.dtype, img.head_dim, img.vendor = op, "sm90", "bf16", head_dim, "cuda"
    img.d_mask, img.features, img.optional_features, img.layouts = True, list(features), list(optional), [layout]
    img.page_multiple = 16 if layout == "paged" else 0
    img.block_m, img.block_n, img.num_warps, img.warp_size, img.align16 = 16, 64, 4, 32, True
    img.has_ptx = False
    return img


def decode_problem(layout="kvcache", page_size=0, features=(), splits=1, seqlen_q=1, nheads=32, nheads_k=8):
    from conftest import problem

    p = problem(head_dim=128, features=features, batch=4, seqlen_q=seqlen_q, seqlen_k=4096, nheads=nheads,
                nheads_k=nheads_k, layout=layout)
    p.op, p.page_size, p.splits = "decode", page_size, splits
    return p


def test_dispatcher_checks_layout_page_size_and_optional_features():
    from conftest import DEVICES

    from fa2rt import _C

    registry = _C.Registry()
    for img in (decode_image("kvcache"), decode_image("paged"),
                decode_image("kvcache", features=("softcap", "alibi"), optional=("alibi",), op="decode_strict")):
        registry.add(img)
    device = DEVICES["sm90"]

    def select(p):
        sel = _C.select(p, device, registry, "")
        return sel["image"], {r.image: (r.code, r.message) for r in sel["rejections"]}

    chosen, rejected = select(decode_problem("paged", page_size=32))
    assert chosen.endswith("-paged")
    assert rejected["decode-sm90-bf16-d128m-softcap+alibi-kvcache"][0] == "layout"
    chosen, rejected = select(decode_problem("paged", page_size=24))
    assert chosen is None
    assert rejected["decode-sm90-bf16-d128m-softcap+alibi-paged"] == (
        "page_size", "page_size: image takes pages that are multiples of 16, problem has 24")
    # softcap compiled in as a run-time switch: the image serves calls without it (and with it).
    for features in ((), ("softcap",), ("softcap", "alibi")):
        assert select(decode_problem(features=features))[0] == "decode-sm90-bf16-d128m-softcap+alibi-kvcache"
    strict = decode_problem()
    strict.op = "decode_strict"
    assert select(strict)[1]["decode_strict-sm90-bf16-d128m-softcap+alibi-kvcache"] == (
        "features", "features: image always applies softcap, problem has none")


@pytest.mark.parametrize("splits, seqlen_q, heads, grid_x", [(1, 1, (32, 8), 1), (5, 1, (32, 8), 5),
                                                              (3, 5, (32, 8), 6), (2, 1, (8, 8), 2)])
def test_decode_grid_packs_query_heads_per_split(splits, seqlen_q, heads, grid_x):
    from fa2rt import _C

    registry = _C.Registry()
    img = decode_image("kvcache")
    registry.add(img)
    p = decode_problem(splits=splits, seqlen_q=seqlen_q, nheads=heads[0], nheads_k=heads[1])
    grid, block, _ = _C.launch_config(registry, img.name, p)
    # rows = seqlen_q * (nheads / nheads_k) packed per KV head, 16 per program, once per split; y over KV heads.
    assert tuple(grid) == (grid_x, 4 * heads[1], 1) and block == 128
    p.splits = 0
    with pytest.raises(ValueError, match="splits >= 1"):
        _C.launch_config(registry, img.name, p)


def test_split_heuristic():
    from fa2rt.kvcache import check_kvcache_inputs
    from fa2rt.kvcache_ops import MAX_SPLITS, choose_splits

    args = make_case(batch=1, h=32, hk=8, d=16, seqlen_cache=32768, new=0)
    shapes = check_kvcache_inputs(**args)
    # batch 1, 8 KV heads: 8 programs per split; 132 SMs x 3 resident = 396 slots -> one wave of 49 splits, to a
    # power of two: 32 (each >= 128 keys of 32768).
    assert choose_splits(shapes, 132) == 32
    assert choose_splits(dataclasses.replace(shapes, capacity=1024), 132) == 8  # no split under 128 keys
    assert choose_splits(dataclasses.replace(shapes, batch=8), 132) == 4  # 64 programs: 6 fit in a wave
    assert choose_splits(dataclasses.replace(shapes, batch=32), 132) == 1  # 256 programs: one wave already
    assert choose_splits(dataclasses.replace(shapes, batch=64), 132) == 1  # 512 programs: more than a wave
    # Paged caches take the same rule.
    paged = dataclasses.replace(shapes, paged=True, page_size=64)
    assert [choose_splits(dataclasses.replace(paged, batch=b), 132) for b in (1, 8, 32, 64)] == [32, 4, 1, 1]
    # An H100 fills a wave with half as many programs (batch 1 takes 16 splits, batch 8 two), except on pages that
    # are not whole 64-key tiles; devices not measured take the H200's rule.
    from fa2rt.kvcache_ops import device_splits, resident

    h100 = resident("NVIDIA H100 80GB HBM3", shapes)
    assert [choose_splits(dataclasses.replace(shapes, batch=b), 132, h100) for b in (1, 8, 32)] == [16, 2, 1]
    assert resident("an unmeasured GPU", shapes) == resident("NVIDIA H200", shapes) == 3
    device = fa2rt._C.DeviceInfo("cuda", "sm90", multiprocessors=132, name="NVIDIA H100 80GB HBM3")
    pages = {page: dataclasses.replace(shapes, paged=True, page_size=page) for page in (16, 64, 256)}
    assert [device_splits(s, device) for s in (shapes, pages[16], pages[64], pages[256])] == [16, 32, 16, 16]
    assert choose_splits(dataclasses.replace(shapes, num_splits=7), 132) == 7
    assert choose_splits(dataclasses.replace(shapes, num_splits=1000), 132) == MAX_SPLITS


# The sweeps (132 SMs, d128) and which of their rows measured, at the rule's choice, the images that run it. On the
# H200: the sweeps of the entry's own 16 x 64 tile for contiguous calls the rule splits (split calls still run it);
# the sweep with 16 x 128 at every count for contiguous calls of one split (the one-split images run that tile) and for
# 64-token pages at any count (the page-aligned images, the same in both). On an H100: the shipped images throughout
# (contiguous caches and 64-token pages; 16-token pages, whose images gather each key's page).
SPLIT_SWEEPS = {
    "decode-splits-h200.json": "own tile", "decode-splits-fill-h200.json": "own tile",
    "decode-splits-b1-4k-h200.json": "own tile", "decode-splits-n128-h200.json": "one-split tile",
    "decode-splits-s50-h100.json": "shipped", "decode-splits-paged16-s51-h100.json": "shipped",
}
SHIPPED_AT = {"own tile": lambda layout, splits: layout == "contiguous" and splits > 1,
              "one-split tile": lambda layout, splits: layout != "contiguous" or splits == 1,
              "shipped": lambda layout, splits: True}


@pytest.mark.parametrize("sweep", SPLIT_SWEEPS)
def test_split_heuristic_against_the_measured_sweeps(sweep):
    # At every point whose shipped configuration the sweep measured at the rule's choice for the sweep's device, that
    # choice reads at least 97% of the best split's rate.
    from fa2rt.kvcache import check_kvcache_inputs
    from fa2rt.kvcache_ops import choose_splits, resident

    measured = json.loads((ROOT / "docs" / "bench" / sweep).read_text())
    shipped = SHIPPED_AT[SPLIT_SWEEPS[sweep]]
    checked = 0
    for r in measured["rows"]:
        page = 0 if r["layout"] == "contiguous" else int(r["layout"].removeprefix("paged"))
        args = make_case(batch=1, h=r["nheads"], hk=r["nheads_k"], d=16, seqlen_cache=64, new=0)
        shapes = dataclasses.replace(check_kvcache_inputs(**args), batch=r["batch"], capacity=r["cache"],
                                     paged=page > 0, page_size=page)
        splits = choose_splits(shapes, 132, resident(measured["environment"]["device"], shapes))
        rate = r["rates"].get(str(splits))
        if shipped(r["layout"], splits) and rate is not None:
            checked += 1
            assert rate >= 0.97 * max(r["rates"].values()), (r, splits)
    assert checked >= 2


def test_explain_names_the_fallback_reason(on_device):
    args = make_case(seed=1)
    positional, named = split(args)
    before = args["k_cache"].clone()
    assert fa2rt.explain_with_kvcache(*positional, **named).reason == "not_gpu"
    on_device("sm90")
    decision = fa2rt.explain_with_kvcache(*positional, **named)
    assert decision.path == "fallback" and decision.reason == "dtype"  # float32 on a (synthetic) GPU
    assert torch.equal(args["k_cache"], before)  # explain touches nothing


@pytest.mark.parametrize("arch", ["sm80", "sm89", "sm90", "gfx90a", "gfx942"])
def test_installed_decode_images_take_kvcache_calls(on_device, arch):
    """The real build, on a synthetic device of each arch: contiguous and paged bf16 calls get a decode image of the
    arch for their layout (and a combine image when they split, an append image for their new token); a head dim over
    every bucket falls back, named."""
    from fa2rt import builds

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device(arch)
    # (paged, page size, the image's layout tag): pages of whole 64-key tiles take the page-aligned images.
    for paged, page, tag in ((False, 16, "kvcache"), (True, 16, "paged"), (True, 64, "aligned")):
        args = make_case(batch=1, h=8, hk=2, d=128, seqlen_cache=4096, max_blocks=4096 // page, new=1, paged=paged,
                         dtype=torch.bfloat16, page=page)
        positional, named = split(args)
        decision = fa2rt.explain_with_kvcache(*positional, **named, causal=True, softcap=5.0)
        assert decision.path == "kernel", decision
        assert decision.image.startswith(f"decode-{arch}-bf16-d128m-") and decision.image.split("-")[-2] == tag
        splits = int(decision.message.split()[0])
        # The combine at the call's head-dim bucket (d128), not the d256 one that also takes it.
        assert splits > 1 and decision.backward[0][0].startswith(f"decode_combine-{arch}-bf16-d128m-")
        layout = "paged" if paged else "kvcache"
        assert f"append: append-{arch}-bf16-d256m-plain-{layout}-" in decision.message  # the one new token
        single = fa2rt.explain_with_kvcache(*positional, **named, num_splits=1)
        assert single.path == "kernel" and single.backward == ()
        # sm90's d128 entry has a one-split tile (contiguous caches): a call of one split runs it.
        assert ("-onesplit-" in single.image) == (arch == "sm90" and not paged), single.image
    args = make_case(batch=1, h=2, hk=2, d=264, seqlen_cache=64, new=0, dtype=torch.bfloat16)
    positional, named = split(args)
    decision = fa2rt.explain_with_kvcache(*positional, **named)
    assert decision.reason == "no_kernel" and "head_dim" in decision.message, decision


@pytest.mark.parametrize("paged", [False, True])
def test_kernel_path_on_a_synthetic_gpu(on_device, monkeypatch, paged):
    """attention_with_kvcache's kernel path up to the launch, on CPU tensors described as an sm90 device with the
    installed build: the append and rotary write what the reference writes, the plans hold the chosen images, the
    dispatcher's grid and every pointer of the image; the launch is recorded instead of run."""
    from fa2rt import builds, kvcache_ops

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device("sm90")
    launched = []
    monkeypatch.setattr(kvcache_ops, "launch", lambda plan, pointers, device: launched.append((plan, pointers)))
    args = make_case(batch=2, h=8, hk=2, d=64, seqlen_cache=2048, max_blocks=128, new=2, seqlen_q=2, paged=paged,
                     dtype=torch.float16, rotary_dim=16)
    _, _, ref_k, ref_v = kvcache_reference(**args, causal=True)
    positional, named = split(args)
    out, lse = fa2rt.attention_with_kvcache(*positional, **named, causal=True, return_lse=True)
    (plan, pointers), = launched
    named_pointers = dict(zip(kvcache_ops.DECODE_POINTERS, pointers, strict=True))
    assert named_pointers["O"] == out.data_ptr() and named_pointers["LSE"] == lse.data_ptr()
    assert named_pointers["K"] == args["k_cache"].data_ptr() and named_pointers["V"] == args["v_cache"].data_ptr()
    torch.testing.assert_close(args["k_cache"].double(), ref_k, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(args["v_cache"].double(), ref_v, atol=0, rtol=0)
    layout = "paged" if paged else "kvcache"
    assert plan.decode_plan.image.startswith(f"decode-sm90-fp16-d64m-softcap+alibi-{layout}-")
    assert plan.decode_plan.pointers == list(kvcache_ops.DECODE_POINTERS)
    # 2 query rows x 4 query heads per KV head = 8 packed rows: one row block per split; y: batch x KV heads.
    assert plan.decode_plan.grid == (plan.splits, 2 * 2, 1) and plan.splits > 1
    assert plan.combine_plan.image.startswith("decode_combine-sm90-fp16-d64m-")
    # The combine takes one query row per program: x: 2 query rows; y: batch x query heads.
    assert plan.combine_plan.grid == (2, 2 * 8, 1)
    # sm90's combine is launched as a programmatic dependent of the decode kernel (variants.PDL_ARCHS), the decode
    # plainly.
    assert plan.combine_plan.dependent and not plan.decode_plan.dependent
    with monkeypatch.context() as env:  # FA2RT_PDL=0: a new plan, the merge launched plainly; other values refused
        env.setenv("FA2RT_PDL", "0")
        fa2rt.attention_with_kvcache(*positional, **named, causal=True)
        assert launched[-1][0].combine_plan.image == plan.combine_plan.image
        assert not launched[-1][0].combine_plan.dependent
        env.setenv("FA2RT_PDL", "yes")
        with pytest.raises(ValueError, match="FA2RT_PDL: expected 0 .off. or 1 .on, the default., got 'yes'"):
            fa2rt.attention_with_kvcache(*positional, **named, causal=True)
    del launched[1:]
    # A second call of the same geometry (a remembered call: pointers built without views) reuses the plan, with
    # the scratch laid out as the first call's: the LSE first, the partials at the same offsets from it.
    out2, lse2 = fa2rt.attention_with_kvcache(*positional, **named, causal=True, return_lse=True)
    plan2, pointers2 = launched[1]
    assert plan2 is plan and pointers2[3:5] == [out2.data_ptr(), lse2.data_ptr()]
    assert [p - pointers[4] for p in pointers[4:7]] == [p - pointers2[4] for p in pointers2[4:7]]
    assert pointers2[7:] == pointers[7:]  # the same slopes dummy and index tensors


@pytest.mark.parametrize("paged", [False, True])
def test_append_kernel_unless_rotary(on_device, paged):
    """A call that appends plain keys has them written by the build's append image (one launch); rotated keys by the
    torch ops, which the fallback shares (explain says which)."""
    from fa2rt import builds

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device("sm90")
    layout = "paged" if paged else "kvcache"
    cases = ((0, f"append: append-sm90-fp16-d256m-plain-{layout}-"), (16, "append: torch ops (rotary keys)"))
    for rotary_dim, expected in cases:
        args = make_case(batch=2, h=8, hk=2, d=64, seqlen_cache=256, max_blocks=16, new=3, paged=paged,
                         dtype=torch.float16, rotary_dim=rotary_dim)
        positional, named = split(args)
        decision = fa2rt.explain_with_kvcache(*positional, **named, causal=True)
        assert decision.path == "kernel" and expected in decision.message, decision.message


def test_repeated_calls_skip_validation_and_reuse_the_plan(on_device, monkeypatch):
    """A decode step repeated with new tensors of the same layout is validated and selected once: the remembered
    call (calls.find_kvcache) appends and launches with the new tensors. Another cache length or option, or index
    tensors whose values are read on the host (CPU here), go through validation again."""
    from fa2rt import api, builds, calls, kvcache, kvcache_ops

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device("sm90")
    monkeypatch.setattr(calls, "_CALLS", {})
    launched, appended, validated = [], [], []
    monkeypatch.setattr(kvcache_ops, "launch", lambda plan, pointers, device: launched.append((plan, pointers)))
    monkeypatch.setattr(kvcache_ops, "launch_append", lambda plan, pointers, device: appended.append(pointers))
    real = kvcache.check_kvcache_inputs
    monkeypatch.setattr(api.kvcache, "check_kvcache_inputs", lambda *a, **kw: validated.append(1) or real(*a, **kw))
    args = make_case(batch=2, h=8, hk=2, d=64, seqlen_cache=512, new=1, dtype=torch.float16)

    def step(seed, cache_seqlens=100, **options):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(args[name].shape, generator=g).to(torch.float16) for name in ("q", "k", "v"))
        out = fa2rt.attention_with_kvcache(q, args["k_cache"], args["v_cache"], k, v, cache_seqlens=cache_seqlens,
                                           causal=True, **options)
        return q, k, v, out

    step(0)
    q, k, v, out = step(1)
    assert len(validated) == 1 and len(launched) == 2 and launched[1][0] is launched[0][0]
    assert launched[1][1][:4] == [q.data_ptr(), args["k_cache"].data_ptr(), args["v_cache"].data_ptr(), out.data_ptr()]
    # The new token goes through the installed build's append image, on the hit too (recorded here, not run).
    assert launched[1][0].append_plan is not None and len(appended) == 2
    assert appended[1][:4] == [args["k_cache"].data_ptr(), args["v_cache"].data_ptr(), k.data_ptr(), v.data_ptr()]
    step(2, cache_seqlens=101)
    step(3, softcap=2.0)
    assert len(validated) == 3
    seqlens = torch.full((2,), 50, dtype=torch.int32)  # on the CPU: its values are checked at every call
    step(4, cache_seqlens=seqlens)
    step(5, cache_seqlens=seqlens)
    assert len(validated) == 5 and len(launched) == 6


def test_compiled_step_runs_the_kernels_and_repeats_without_validation(on_device, monkeypatch):
    """On a (synthetic) GPU the graph's op is the eager call: the first run validates and selects, later runs of the
    same step take the remembered call."""
    from fa2rt import api, builds, calls, kvcache, kvcache_ops

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device("sm90")
    monkeypatch.setattr(calls, "_CALLS", {})
    launched, validated = [], []
    monkeypatch.setattr(kvcache_ops, "launch", lambda plan, pointers, device: launched.append((plan, pointers)))
    monkeypatch.setattr(kvcache_ops, "launch_append", lambda plan, pointers, device: None)
    real = kvcache.check_kvcache_inputs

    def check(*a, **kw):
        if not torch.compiler.is_compiling():  # Dynamo would replay a traced append on every run
            validated.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(api.kvcache, "check_kvcache_inputs", check)
    args = make_case(batch=2, h=8, hk=2, d=64, seqlen_cache=512, new=1, dtype=torch.float16)

    def step(q, k_cache, v_cache, k, v):
        return fa2rt.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=100, causal=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = [compiled(*(args[n] for n in ("q", "k_cache", "v_cache", "k", "v"))) for _ in range(3)]
    assert len(validated) == 1 and len(launched) == 3
    assert launched[2][0] is launched[0][0] and launched[2][1][3] == outs[2].data_ptr()


@pytest.mark.parametrize("sliced", [False, True])
def test_kernel_path_append_writes_what_the_reference_writes(sliced):
    """kvcache_ops.append (the kernel path's in-place write): through one index_copy_ per cache when its rows and
    positions merge into one dim, else (a cache sliced along its length) through indexed assignment."""
    from fa2rt import kvcache_ops
    from fa2rt.kvcache import check_kvcache_inputs

    args = make_case(batch=3, seqlen_cache=40, new=3, batch_idx=True, dtype=torch.float64)
    if sliced:
        for name in ("k_cache", "v_cache"):
            wide = torch.zeros(args[name].shape[0], 50, *args[name].shape[2:], dtype=torch.float64)
            wide[:, :40] = args[name]
            args[name] = wide[:, :40]
    assert (kvcache_ops._slots(args["k_cache"]) is None) == sliced
    _, _, ref_k, ref_v = kvcache_reference(**args)
    shapes = check_kvcache_inputs(**args)
    kvcache_ops.append(args["k_cache"], args["v_cache"], args["k"], args["v"], None, None,
                       args["cache_seqlens"].long(), args["cache_batch_idx"], None, shapes)
    assert torch.equal(args["k_cache"], ref_k) and torch.equal(args["v_cache"], ref_v)


# --- every cache against a cold start: a seeded sequence of nearly equal decode calls -------------------------------

_KV_RESPECTS = {  # each respect a decode call can differ in, the first value the common one
    "dtype": [torch.float16, torch.bfloat16], "head_dim": [64, 128, 48], "seqlen_q": [1, 2], "new": [1, 0, 2],
    "paged": [False, True], "seqlens": ["tensor", "int", "none", "int64"], "batch_idx": [False, True],
    "leftpad": [False, True], "table_dtype": [torch.int32, torch.int64], "rotary": [0, 16, "neox"],
    "q_layout": ["contig", "sliced"], "q_batch": [2, 1], "k_cache_layout": ["contig", "sliced"],
    "v_cache_layout": ["contig", "sliced"], "k_layout": ["contig", "sliced"], "causal": [True, False, 1],
    "window_size": [(-1, -1), (32, -1), (32, 0)], "softcap": [0.0, 5.0], "softmax_scale": [None, 0.2],
    "alibi": [None, "heads"], "num_splits": [0, 1, 3], "return_lse": [False, True], "seed": [0, 1],
}


def _kv_case(spec: dict) -> tuple:
    """A spec's call: attention_with_kvcache's positional and keyword arguments."""
    args = make_case(batch=2, seqlen_q=spec["seqlen_q"], h=8, hk=2, d=spec["head_dim"], seqlen_cache=256,
                     new=spec["new"], paged=spec["paged"], max_blocks=16, dtype=spec["dtype"],
                     rotary_dim=16 if spec["rotary"] else 0, batch_idx=spec["batch_idx"], leftpad=spec["leftpad"],
                     seed=spec["seed"])
    if spec["q_layout"] == "sliced":
        args["q"] = laid_out(args["q"], "sliced")
    args["q"] = args["q"][: spec["q_batch"]]  # one sequence less than the caches and lengths: refused
    for name in ("k_cache", "v_cache", "k"):
        if spec[f"{name}_layout"] == "sliced" and name in args:
            args[name] = laid_out(args[name], "sliced")
    if "block_table" in args:
        args["block_table"] = args["block_table"].to(spec["table_dtype"])
    if spec["seqlens"] == "int64":  # refused: int32 only
        args["cache_seqlens"] = args["cache_seqlens"].long()
    elif spec["seqlens"] != "tensor":
        lengths = args.pop("cache_seqlens")
        if spec["seqlens"] == "int":  # one length for every sequence, with room for the new tokens
            args["cache_seqlens"] = int(lengths.min())
            args.pop("cache_leftpad", None)  # (its values were drawn against the per-sequence lengths)
        elif spec["new"]:
            args["cache_seqlens"] = None  # the whole cache: no room to append, refused
    positional, named = split(args)
    named |= {name: spec[name] for name in ("causal", "window_size", "softcap", "softmax_scale", "num_splits",
                                             "return_lse")}
    named["rotary_interleaved"] = spec["rotary"] != "neox"
    if spec["alibi"]:
        named["alibi_slopes"] = torch.rand(8)
    return positional, named


@pytest.mark.parametrize("seed", range(16))
def test_every_decode_call_does_what_it_does_from_a_cold_start(on_device, monkeypatch, seed):
    """A seeded sequence of decode calls, most differing from an earlier one in one or two respects (dtype, head
    dim, query rows, appended tokens, paged or not, how cache_seqlens is given, cache_batch_idx, cache_leftpad,
    rotary, layouts, every option) or in none: with every cache (the repeated calls, selections, plans) as it builds
    up, each call launches exactly what it launches with all of them emptied first. Index tensors are remembered
    here as on a GPU (their values are read on the host only on the CPU)."""
    import random

    from fa2rt import builds, calls, config, kvcache_ops, policy

    if builds.current_build().manifest is None:
        pytest.fail(f"no installed kernel build: {builds.current_build().error}")
    on_device("sm90")
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    monkeypatch.setattr(calls, "should_check_values", lambda t: False)
    launched = []

    def record(plan, pointers, device):  # as test_eager_path's Recorder records: (plan, device, stream, addresses)
        launched.append((plan.decode_plan, device, None, list(pointers)))
        if plan.combine_plan is not None:
            launched.append((plan.combine_plan, device, None, list(pointers[kvcache_ops._COMBINE_RUN])))

    monkeypatch.setattr(kvcache_ops, "launch", record)
    monkeypatch.setattr(kvcache_ops, "launch_append", lambda plan, pointers, device: launched.append(
        (plan.append_plan, device, None, list(pointers))))

    def cold_start():
        monkeypatch.setattr(kvcache_ops, "_PLANS", {})  # makes every remembered call stale too (KVCall.current)
        monkeypatch.setattr(calls, "_CALLS", {})
        for cache in (policy._SELECTION_CACHE, policy._DECISION_CACHE, policy._BACKWARD_CACHE, policy._ROUTE_CACHE):
            cache.clear()

    rng = random.Random(seed)
    pool = [_kv_case(spec) for spec in sample_specs(rng, _KV_RESPECTS, per_base=12, changed=(2, 5))]
    context = {"no_grad": False, "force_arch": None}  # no autograd: grad mode changes nothing
    assert_warm_equals_cold([rng.choice(pool) for _ in range(100)],
                            lambda case: call_outcome(fa2rt.attention_with_kvcache, *case, context, launched,
                                                      ("q", "k_cache", "v_cache")), cold_start)
