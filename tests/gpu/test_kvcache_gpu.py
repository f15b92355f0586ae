"""fa2rt.attention_with_kvcache on a real NVIDIA GPU: the decode kernels (backends/kernels/decode.py) against the
float64 reference (fa2rt.reference.kvcache_reference, computed on the CPU from copies of the inputs), sm90 natively and
the sm80/sm89 images through their PTX (FA2RT_FORCE_ARCH).

Error bound: the kernel's error against float64 at most twice that of the exact fallback in the same dtype (per sequence
gather + SDPA, run on copies of the same inputs) plus a small floor; the new keys written into the cache are compared
with the reference's (rotary in float32, stored in the cache dtype). Outputs come from a NaN-poisoned allocator, so an
element never written shows up. Also: paged equals contiguous for the same logical cache, split counts, CUDA graph
capture and replay with new cache lengths, the merge as a programmatic dependent launch (sm90) against a plain one,
torch.compile (Inductor, and its CUDA graphs), several streams, malformed indices (no fault, finite outputs;
ci/memcheck_kvcache.py runs them under compute-sanitizer).
"""

import pytest
import torch
from gpu_helpers import DEVICE, PATHS, poison_allocator, rel_err, seed_of, use_path

import fa2rt
from fa2rt import builds
from fa2rt.reference import kvcache_reference

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

BF16, FP16 = torch.bfloat16, torch.float16
ABS_FLOOR = 2e-3
LSE_TOL = 2e-3


def make_call(seed, batch=3, seqlen_q=1, h=8, hk=2, d=128, capacity=1024, new=1, paged=0, batch_idx=False,
              leftpad=False, rotary_dim=0, dtype=BF16, full=False):
    """Random inputs of one call on the GPU (a dict of attention_with_kvcache's arguments). paged: the page size (0:
    contiguous); the same logical cache either way (pages in a shuffled pool). full: every sequence fills its cache."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    lens = torch.randint(0, capacity - new + 1, (batch,), generator=g, dtype=torch.int32)
    if full:
        lens.fill_(capacity - new)
    args = {"q": randn(batch, seqlen_q, h, d), "cache_seqlens": lens.to(DEVICE)}
    if paged:
        blocks = capacity // paged
        pool = batch * blocks + 5
        args["k_cache"], args["v_cache"] = randn(pool, paged, hk, d), randn(pool, paged, hk, d)
        args["block_table"] = torch.randperm(pool, generator=g)[: batch * blocks].reshape(batch, blocks).to(
            torch.int32).to(DEVICE)
    else:
        rows = batch + 2 if batch_idx else batch
        args["k_cache"], args["v_cache"] = randn(rows, capacity, hk, d), randn(rows, capacity, hk, d)
        if batch_idx:
            args["cache_batch_idx"] = torch.randperm(rows, generator=g)[:batch].to(torch.int32).to(DEVICE)
    if new:
        args["k"], args["v"] = randn(batch, new, hk, d), randn(batch, new, hk, d)
    if leftpad:
        args["cache_leftpad"] = (torch.rand(batch, generator=g) * lens).to(torch.int32).to(DEVICE)
    if rotary_dim:
        angles = torch.rand(capacity, rotary_dim // 2, generator=g, dtype=torch.float64) * 6.3
        args["rotary_cos"], args["rotary_sin"] = (t.to(dtype).to(DEVICE) for t in (angles.cos(), angles.sin()))
    return args


def split(args):
    return [args[n] for n in ("q", "k_cache", "v_cache")], {n: t for n, t in args.items()
                                                             if n not in ("q", "k_cache", "v_cache")}


def copied(args):
    return {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


def run(args, **options):
    positional, named = split(args)
    return fa2rt.attention_with_kvcache(*positional, **named, **options, return_lse=True)


def expect_kernel(args, arch=None, mode=None, **options):
    positional, named = split(args)
    decision = fa2rt.explain_with_kvcache(*positional, **named, **options)
    assert decision.path == "kernel", decision
    if arch is not None:
        assert decision.image.startswith(f"decode-{arch}-"), decision
        assert decision.mode == mode, decision
    return decision


def check(args, options, atol_scale=1.0, path=PATHS[0]):
    """One call on the kernels and on the fallback (copies), both against float64."""
    expect_kernel(args, arch=path[1], mode=path[2], **options)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    cpu_options = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in options.items()}
    ref_out, ref_lse, ref_k, ref_v = kvcache_reference(**cpu, **cpu_options)
    fallback = copied(args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FA2RT_DISABLE", "1")
        fb_out, _ = run(fallback, **options)
    poison_allocator()
    out, lse = run(args, **options)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any()
    bound = 2 * rel_err(fb_out.cpu(), ref_out) + ABS_FLOOR * atol_scale
    assert rel_err(out.cpu(), ref_out) <= bound
    finite = ref_lse.isfinite()
    assert torch.equal(lse.cpu().isfinite(), finite)
    assert (lse.cpu().double()[finite] - ref_lse[finite]).abs().max().item() <= LSE_TOL * max(1.0, atol_scale)
    for got, ref, fb in ((args["k_cache"], ref_k, fallback["k_cache"]), (args["v_cache"], ref_v, fallback["v_cache"])):
        assert torch.equal(got, fb), "the kernel path and the fallback wrote different caches"
        assert rel_err(got.cpu(), ref) <= 1e-2
    return out, lse


FEATURES = {
    "decode": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(100, 0)),
    "softcap": dict(softcap=30.0),
    "alibi": dict(alibi=True),
    "scale": dict(softmax_scale=0.05),
}
LAYOUTS = {
    "contiguous": {},
    "paged16": dict(paged=16),
    "paged64": dict(paged=64),
    "paged256": dict(paged=256),
    "paged64_leftpad": dict(paged=64, leftpad=True),  # page-aligned tiles starting before a sequence's first key
    "batch_idx_leftpad": dict(batch_idx=True, leftpad=True),
}


def options_of(feature, h):
    options = dict(FEATURES[feature])
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(h, device=DEVICE) * 0.05
    return options


@pytest.mark.parametrize("path", PATHS, ids=[p[1] + "-" + p[2] for p in PATHS])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("feature", FEATURES)
def test_decode_matches_reference(monkeypatch, path, dtype, layout, feature):
    use_path(monkeypatch, path[0])
    args = make_call(seed_of("decode", path, dtype, layout, feature), dtype=dtype, **LAYOUTS[layout])
    check(args, options_of(feature, 8), path=path)


@pytest.mark.parametrize("seqlen_q, new", [(1, 1), (4, 4), (3, 0), (5, 2)])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("paged", [0, 16])
def test_rotary_and_speculative_steps(seqlen_q, new, interleaved, paged):
    args = make_call(seed_of("rotary", seqlen_q, new, interleaved, paged), seqlen_q=seqlen_q, new=max(new, 1),
                     rotary_dim=64, paged=paged)
    check(args, dict(causal=True, rotary_interleaved=interleaved))


@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (16, 1), (12, 4)])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_gqa_mqa_and_head_dims(heads, d):
    args = make_call(seed_of("heads", heads, d), h=heads[0], hk=heads[1], d=d, capacity=2048)
    check(args, dict(causal=True))


@pytest.mark.parametrize("splits", [1, 2, 7, 64, 0])
def test_split_counts(splits):
    args = make_call(seed_of("splits", splits), batch=2, capacity=4096, full=True)
    decision = expect_kernel(args, num_splits=splits)
    assert (decision.backward == ()) == (splits == 1)
    # sm90's d128 entry has a one-split tile: a call of one split runs it, a split call the entry's own.
    assert ("-onesplit-" in decision.image) == (splits == 1 and decision.image.startswith("decode-sm90-"))
    check(args, dict(num_splits=splits))


@pytest.mark.parametrize("page", [16, 32, 64, 128, 256])
def test_page_aligned_images_take_pages_of_whole_tiles(page):
    # d128's decode tile reads 64 keys per step: pages holding whole tiles get the page-aligned image.
    positional, named = split(make_call(seed_of("aligned", page), paged=page))
    decision = fa2rt.explain_with_kvcache(*positional, **named)
    assert decision.path == "kernel", decision
    assert ("-paged-aligned-" in decision.image) == (page % 64 == 0), decision.image


def test_paged_equals_contiguous_for_the_same_logical_cache():
    contiguous = make_call(seed_of("same"), batch=2, capacity=1024, new=2)
    paged = copied(contiguous)
    page = 64
    blocks = 1024 // page
    pool = torch.randperm(2 * blocks + 3, device=DEVICE)
    table = pool[: 2 * blocks].reshape(2, blocks).to(torch.int32)
    pk = torch.zeros(2 * blocks + 3, page, 2, 128, dtype=BF16, device=DEVICE)
    pv = torch.zeros_like(pk)
    pk[table.long()] = contiguous["k_cache"].reshape(2, blocks, page, 2, 128)
    pv[table.long()] = contiguous["v_cache"].reshape(2, blocks, page, 2, 128)
    paged.update(k_cache=pk, v_cache=pv, block_table=table)
    tiles = {img.name: (img.block_n, img.num_warps) for img in builds.current_build().registry.images()}
    for splits in (1, 5):
        a, b = copied(contiguous), copied(paged)
        images = [expect_kernel(x, causal=True, num_splits=splits).image for x in (a, b)]
        same_tile = tiles[images[0]] == tiles[images[1]]
        out_c, lse_c = run(a, causal=True, num_splits=splits)
        out_p, lse_p = run(b, causal=True, num_splits=splits)
        if same_tile:  # the same keys in the same order through the same arithmetic: equal to the bit
            assert torch.equal(out_c, out_p) and torch.equal(lse_c, lse_p)
        else:  # key blocks of other sizes sum in another order: equal within rounding (a bf16 step, fp32 LSE)
            torch.testing.assert_close(out_p, out_c, rtol=2**-7, atol=2**-9)
            torch.testing.assert_close(lse_p, lse_c, rtol=1e-5, atol=1e-5)
        assert torch.equal(b["k_cache"][table.long()].reshape_as(a["k_cache"]), a["k_cache"])


def test_cuda_graph_capture_and_replay_with_new_lengths():
    args = make_call(seed_of("graph"), batch=4, capacity=2048, new=1)
    static = copied(args)
    run(copied(args))  # warm up: selection, plans, module load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = run(static, causal=True)
    for step in range(3):
        lens = torch.randint(0, 2047, (4,), device=DEVICE, dtype=torch.int32)
        static["cache_seqlens"].copy_(lens)
        static["q"].copy_(torch.randn_like(static["q"]))
        static["k"].copy_(torch.randn_like(static["k"]))
        eager = copied(static)
        graph.replay()
        expected, expected_lse = run(eager, causal=True)
        torch.cuda.synchronize()
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse), step
        assert torch.equal(static["k_cache"], eager["k_cache"])


def _captured(args, **options):
    """(graph, out, lse): one call on args' tensors captured in a CUDA graph, after a warm-up call outside it."""
    run(args, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = run(args, **options)
    return graph, out, lse


@pytest.mark.parametrize("splits", [2, 32, 0])
def test_dependent_merge_equals_a_plain_one(monkeypatch, splits):
    # sm90's merge runs as a programmatic dependent of the decode kernel (PDL); FA2RT_PDL=0 launches it plainly. The
    # same kernels either way: equal to the bit, eagerly and replayed from a CUDA graph with new lengths.
    args = make_call(seed_of("pdl", splits), batch=2, capacity=4096, new=0)
    decision = expect_kernel(args, num_splits=splits)
    assert decision.backward, decision  # the call splits
    plain = copied(args)
    monkeypatch.setenv("FA2RT_PDL", "0")
    graph_plain, out_plain, lse_plain = _captured(plain, causal=True, num_splits=splits)
    monkeypatch.delenv("FA2RT_PDL")
    graph, out, lse = _captured(args, causal=True, num_splits=splits)
    for step in range(3):
        lens = torch.randint(0, 4096, (2,), device=DEVICE, dtype=torch.int32)
        q = torch.randn_like(args["q"])
        for static in (args, plain):
            static["cache_seqlens"].copy_(lens)
            static["q"].copy_(q)
        graph.replay()
        graph_plain.replay()
        eager_out, eager_lse = run(copied(args), causal=True, num_splits=splits)
        torch.cuda.synchronize()
        assert torch.equal(out, out_plain) and torch.equal(lse, lse_plain), step
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), step
    if decision.image.startswith("decode-sm90-"):
        from fa2rt import kvcache_ops
        plans = [p for p in kvcache_ops._PLANS.values() if getattr(p, "combine_plan", None) is not None]
        assert any(p.combine_plan.dependent for p in plans) and any(not p.combine_plan.dependent for p in plans)


def _compiled_steps(args, **compile_options):
    """(eager step, compiled step) over the tensors of a make_call dict, in its order."""
    names = list(args)

    def step(*tensors):
        positional, named = split(dict(zip(names, tensors, strict=True)))
        return fa2rt.attention_with_kvcache(*positional, **named, causal=True, return_lse=True)

    return step, torch.compile(step, fullgraph=True, **compile_options)


def _new_step(static, capacity):
    static["cache_seqlens"].copy_(torch.randint(0, capacity - 1, static["cache_seqlens"].shape, device=DEVICE,
                                                dtype=torch.int32))
    for name in ("q", "k", "v"):
        static[name].copy_(torch.randn_like(static[name]))


@pytest.mark.parametrize("paged", [0, 64])
def test_compiled_step_runs_the_kernels(paged):
    # fa2rt::kvcache_fwd in an Inductor graph: the same kernels as the eager call (bitwise), appending into the
    # caller's caches.
    args = make_call(seed_of("compiled", paged), batch=4, capacity=2048, new=1, paged=paged)
    expect_kernel(args, causal=True)
    step, compiled = _compiled_steps(args)
    for _ in range(3):
        _new_step(args, 2048)
        eager = copied(args)
        want, got = step(*eager.values()), compiled(*args.values())
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(args["k_cache"], eager["k_cache"]) and torch.equal(args["v_cache"], eager["v_cache"])


def test_compiled_step_replays_as_a_cuda_graph():
    # torch.compile's "reduce-overhead" mode: the step recorded once as a CUDA graph (caches at static addresses, as
    # a model's buffers are) and replayed with new lengths, equal to eager calls.
    from torch._dynamo.utils import counters

    args = make_call(seed_of("compiled-graph"), batch=4, capacity=2048, new=1)
    for name in ("k_cache", "v_cache"):
        torch._dynamo.mark_static_address(args[name])
    step, compiled = _compiled_steps(args, mode="reduce-overhead")
    counters.clear()
    for _ in range(4):
        _new_step(args, 2048)
        eager = copied(args)
        want = step(*eager.values())
        got = [t.clone() for t in compiled(*args.values())]
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(args["k_cache"], eager["k_cache"])
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_streams():
    calls = [make_call(seed_of("stream", i), batch=2, capacity=2048) for i in range(4)]
    expected = [run(copied(c), causal=True)[0] for c in calls]
    streams = [torch.cuda.Stream() for _ in calls]
    outs = []
    torch.cuda.synchronize()
    for s, c in zip(streams, calls, strict=True):
        with torch.cuda.stream(s):
            outs.append(run(c, causal=True)[0])
    torch.cuda.synchronize()
    for got, want in zip(outs, expected, strict=True):
        assert torch.equal(got, want)


MALFORMED = {
    "seqlens_past_cache": lambda a: {"cache_seqlens": torch.tensor([10**6, -5, 2**30], dtype=torch.int32,
                                                                   device=DEVICE)},
    "leftpad_past_end": lambda a: {"cache_leftpad": torch.tensor([10**6, -3, 7], dtype=torch.int32, device=DEVICE)},
    "batch_idx_outside": lambda a: {"cache_batch_idx": torch.tensor([-1, 99, 2**31 - 1], dtype=torch.int32,
                                                                    device=DEVICE)},
    "blocks_outside_pool": lambda a: {"block_table": torch.full_like(a["block_table"], -7).index_fill_(
        1, torch.tensor([1], device=DEVICE), 10**6)},
}
MALFORMED["blocks_outside_pool_aligned"] = MALFORMED["blocks_outside_pool"]
PAGES = {"blocks_outside_pool": 16, "blocks_outside_pool_aligned": 64}  # the per-key and the page-aligned images


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_indices_do_not_fault(monkeypatch, kind):
    monkeypatch.delenv("FA2RT_CHECK_INDICES", raising=False)
    args = make_call(seed_of("malformed", kind), batch=3, capacity=512, paged=PAGES.get(kind, 0),
                     batch_idx=kind == "batch_idx_outside")
    args.update(MALFORMED[kind](args))
    expect_kernel(args)
    out, lse = run(args)
    torch.cuda.synchronize()  # a fault would surface here
    assert torch.isfinite(out).all()
    # With the debug switch the same call is refused, naming the argument (one device sync).
    monkeypatch.setenv("FA2RT_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match=r"cache_seqlens\[|cache_leftpad\[|cache_batch_idx\[|block_table\["):
        run(args)
