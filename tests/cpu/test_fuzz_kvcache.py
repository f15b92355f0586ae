"""The seeded KV-cache fuzz (tests/fuzz_kvcache.py) on the CPU: every generated call through
fa2rt.attention_with_kvcache (the exact fallback here) against the float64 reference, caches included; every fifth
case also compiled (fullgraph) against the eager call, and the malformed ones compiled too; the cases the
decode kernels take (head dims multiples of 8) also through the kernel source in the Triton interpreter (and, for
plain appends, attn_append); and the malformed index values, each refused with an error naming the index entry, and
through the interpreted kernels without an access outside the given tensors."""

import re

import pytest
import test_kernel_interpreter_decode as decode_interp  # tests/cpu is on sys.path (pytest's prepend import mode)
import torch
from fuzz_kvcache import MALFORMED, build, errors, generate, malformed_case, options, reference

import fa2rt
from fa2rt import kvcache_ops
from fa2rt.kvcache import check_kvcache_inputs

CASES = generate()
INTERPRETED = [c for c in CASES if c.head_dim % 8 == 0][:12]


def _split(args):
    return [args[n] for n in ("q", "k_cache", "v_cache")], {n: t for n, t in args.items()
                                                             if n not in ("q", "k_cache", "v_cache")}


def _check(case, out, lse, k_cache, v_cache, ref):
    found = errors(case, out, lse, k_cache, v_cache, ref)
    assert found["ok"], found["errors"]


@pytest.mark.filterwarnings("ignore::fa2rt.FallbackWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_kvcache_case(case):
    args, opts = build(case), options(case)
    ref = reference(case, args, opts)
    positional, named = _split(args)
    out, lse = fa2rt.attention_with_kvcache(*positional, **named, **opts, return_lse=True)
    _check(case, out, lse, args["k_cache"], args["v_cache"], ref)


COMPILED = CASES[::5]


def _compiled(names, opts):
    """(the call over tensors named `names`, the same compiled with fullgraph) with options `opts`."""

    def step(*tensors):
        positional, named = _split(dict(zip(names, tensors, strict=True)))
        return fa2rt.attention_with_kvcache(*positional, **named, **opts, return_lse=True)

    torch._dynamo.reset()  # each case its own graph, whatever Dynamo kept from the last
    return step, torch.compile(step, fullgraph=True, backend="aot_eager")


@pytest.mark.filterwarnings("ignore::fa2rt.FallbackWarning")
@pytest.mark.parametrize("case", COMPILED, ids=[c.id for c in COMPILED])
def test_fuzz_kvcache_case_compiled(case):
    # torch.compile(fullgraph=True) of the same call (the fa2rt::kvcache_fwd custom op): what the eager call returns
    # and writes into its caches, bit for bit.
    args, opts = build(case), options(case)
    eager_args = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    step, compiled = _compiled(list(args), opts)
    got, want = compiled(*args.values()), step(*eager_args.values())
    for name, g, w in (("out", got[0], want[0]), ("lse", got[1], want[1]), ("k_cache", args["k_cache"],
                       eager_args["k_cache"]), ("v_cache", args["v_cache"], eager_args["v_cache"])):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("case", INTERPRETED, ids=[c.id for c in INTERPRETED])
def test_fuzz_kvcache_case_interpreted(case):
    args, opts = build(case), options(case)
    ref = reference(case, args, opts)
    shapes = check_kvcache_inputs(**args, **opts)
    splits = kvcache_ops.choose_splits(shapes, 4)  # a small synthetic device: splits show up at these lengths
    kernel_opts = {n: v for n, v in opts.items() if n != "num_splits"}
    # The smallest tile whose bucket takes the head dim, and its page-aligned image where the pages hold whole tiles,
    # as the dispatcher would choose.
    tile = min((t for t in decode_interp.DECODE_TILES if t[2] >= case.head_dim), key=lambda t: (t[2], t[1]))
    aligned = "block_table" in args and args["k_cache"].shape[1] % tile[1] == 0
    out, lse, k_cache, v_cache, bufs = decode_interp.run_kernels(args, tile, splits,
                                                                 kernel_opts | {"num_splits": case.splits},
                                                                 page_aligned=aligned)
    decode_interp._check_guards(out, lse, bufs)
    _check(case, out, lse, k_cache, v_cache, ref)
    if shapes.seqlen_new and not shapes.rotary_dim:  # the append kernel's case: its caches are the reference's
        k_cache, v_cache, bufs = decode_interp.run_append(args, min(decode_interp.APPEND_TILES))
        decode_interp._caches_guarded(*bufs)
        assert torch.equal(k_cache.double(), ref[2]) and torch.equal(v_cache.double(), ref[3])


@pytest.mark.parametrize("name, paged, replace, argument", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_indices(name, paged, replace, argument):
    case = malformed_case(paged)
    args = build(case)
    bad = replace(args)
    positional, named = _split(dict(args, **bad))
    with pytest.raises(ValueError, match="^" + re.escape(argument) + ": expected"):
        fa2rt.attention_with_kvcache(*positional, **named)
    # Compiled, the graph's op checks the values when it runs (tracing cannot read them).
    called = dict(args, **bad)
    with pytest.raises(ValueError, match="^" + re.escape(argument) + ": expected"):
        _compiled(list(called), {})[1](*called.values())
    # The kernels never see these values checked: they must keep every access inside the given tensors.
    got = decode_interp.run_kernels(args, decode_interp.SMALL_TILE, 2, {}, malformed=bad)
    decode_interp._check_guards(got[0], got[1], got[4])
    assert torch.isfinite(got[0]).all()
    if "k" in args and "rotary_cos" not in args:
        decode_interp._caches_guarded(*decode_interp.run_append(args, min(decode_interp.APPEND_TILES),
                                                                malformed=bad)[2])
