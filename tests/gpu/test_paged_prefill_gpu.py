"""Paged prefill on a real NVIDIA GPU: fa2rt.attention_varlen(..., block_table=...) on the varlen_paged images (sm90
natively, sm80/sm89 through their PTX), against the contiguous varlen call on the same keys packed end to end and
against the float64 reference per sequence.

The pool's pages are handed out in a shuffled order, its spare pages and the tails of the last pages hold NaN and the
block table's unused entries point outside the pool, so a key read from the wrong page or row shows up as NaN. Page
sizes 16, 64 and 256. Also: torch.compile, CUDA graph capture, flash_attn_varlen_func(block_table=...), malformed
tables and cu_seqlens_k (no fault; an error with FA2RT_CHECK_INDICES=1), the refusal of inputs that require grad.

    python -m pytest tests/gpu/test_paged_prefill_gpu.py -q   (after building with FA2RT_ARCHS=sm80,sm89,sm90)
"""

import pytest
import torch
from gpu_helpers import DEVICE, PATH_IDS, PATHS, alibi_slopes, check_attention, poison_allocator, seed_of, use_path

import fa2rt
import fa2rt.flash_attn as fa
from fa2rt import config

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

BF16, FP16 = torch.bfloat16, torch.float16
MIXED_Q = (300, 0, 1, 129, 64, 17)  # an empty and a one-token sequence, block edges +-1
MIXED_K = (257, 5, 1, 129, 0, 400)  # seqlen_k != seqlen_q per sequence, a sequence without keys
# Within rounding of the contiguous varlen image: the same products in another order of pages cannot change a tile's
# sums, but the paged images may run another tile (tiles.json "paged"), which reorders the online softmax.
CONTIGUOUS_TOL = {BF16: 2e-2, FP16: 2e-3}


def cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32, device=DEVICE).cumsum(0, dtype=torch.int32)


def paged(k, v, lens_k, page_size, seed, spare=5):
    """(k_pool, v_pool, block_table) holding packed k, v: shuffled pages, NaN elsewhere, unused entries outside."""
    pages = [-(-n // page_size) for n in lens_k]
    num_blocks = sum(pages) + spare
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g)
    width = max(pages) + 2
    table = torch.full((len(lens_k), width), 1 << 30, dtype=torch.int32)
    pools = [torch.full((num_blocks, page_size) + k.shape[1:], float("nan"), dtype=k.dtype, device=DEVICE)
             for _ in range(2)]
    page, row = 0, 0
    for b, n in enumerate(lens_k):
        blocks = order[page:page + pages[b]]
        table[b, :pages[b]] = blocks.to(torch.int32)
        pos = torch.arange(n)
        where = (blocks[pos // page_size].to(DEVICE), (pos % page_size).to(DEVICE))
        for pool, src in zip(pools, (k, v), strict=True):
            pool[where] = src[row:row + n]
        page, row = page + pages[b], row + n
    return pools[0], pools[1], table.to(DEVICE)


CASES = {
    # name: (nheads, nheads_k, head_dim, dtype, options, alibi kind)
    "plain": (4, 4, 64, BF16, {}, None),
    "causal_gqa": (8, 2, 128, BF16, {"causal": True}, None),
    "causal_mqa_fp16": (4, 1, 64, FP16, {"causal": True}, None),
    "window": (4, 2, 64, BF16, {"window_size": (33, 7)}, None),
    "softcap": (4, 4, 96, BF16, {"softcap": 20.0}, None),
    "alibi_bh_causal": (4, 2, 128, BF16, {"causal": True}, "bh"),
    "d256_causal": (2, 1, 256, BF16, {"causal": True}, None),
}
SUBSET = ("plain", "causal_gqa", "alibi_bh_causal", "d256_causal")  # through sm80/sm89 PTX
PAGE_SIZES = (16, 64, 256)


def make_case(name, page_size, seed):
    h, hk, d, dtype, opts, alibi = CASES[name]
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randn(sum(MIXED_Q), h, d, device=DEVICE, generator=g).to(dtype)
    k, v = (torch.randn(sum(MIXED_K), hk, d, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    k_pool, v_pool, table = paged(k, v, MIXED_K, page_size, seed)
    opts = dict(opts)
    if alibi:
        opts["alibi_slopes"] = alibi_slopes(alibi, len(MIXED_Q), h)
    return q, k, v, k_pool, v_pool, table, cu(MIXED_Q), cu(MIXED_K), max(MIXED_Q), max(MIXED_K), opts


def _params():
    out = []
    for path, path_id in zip(PATHS, PATH_IDS, strict=True):
        for name in CASES:
            for ps in PAGE_SIZES:
                if path[0] == "" or (name in SUBSET and ps != 64):
                    out.append(pytest.param(path, name, ps, id=f"{path_id}-{name}-p{ps}"))
    return out


@pytest.mark.parametrize("path, name, page_size", _params())
def test_paged_equals_contiguous_and_reference(path, name, page_size, monkeypatch):
    forced, arch, mode = path
    use_path(monkeypatch, forced)
    q, k, v, kp, vp, table, cq, ck, mq, mk, opts = make_case(name, page_size, seed_of("paged", name, page_size))
    decision = fa2rt.explain(q, kp, vp, cq, ck, mq, mk, block_table=table, **opts)
    assert decision.path == "kernel" and "-varlen_paged-" in decision.image, decision
    assert f"-{arch}-" in decision.image and decision.mode == mode, decision
    poison_allocator()
    out, lse = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=table, return_lse=True, **opts)
    want, want_lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, **opts)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "a key read from outside its pages"
    err = (out.float() - want.float()).abs().max().item()
    assert err <= CONTIGUOUS_TOL[q.dtype], f"paged vs contiguous varlen: max abs diff {err:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (lse[finite] - want_lse[finite]).abs().max().item() < 1e-3
    slopes = opts.pop("alibi_slopes", None)
    bq, bk = cq.tolist(), ck.tolist()
    for b in range(len(bq) - 1):
        rows_q, rows_k = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
        if rows_q.stop == rows_q.start:
            continue
        if rows_k.stop == rows_k.start:  # no keys: every row 0, LSE +inf
            assert (out[rows_q] == 0).all() and torch.isposinf(lse[:, rows_q]).all()
            continue
        seq_opts = dict(opts)
        if slopes is not None:
            seq_opts["alibi_slopes"] = slopes[b] if slopes.dim() == 2 else slopes
        check_attention(out[None, rows_q], lse[None, :, rows_q], q[None, rows_q], k[None, rows_k], v[None, rows_k],
                        **seq_opts)


def test_flash_attn_varlen_func_with_block_table_equals_fa2rt():
    q, _, _, kp, vp, table, cq, ck, mq, mk, _ = make_case("causal_gqa", 16, 21)
    out, lse, probs = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, mq, mk, causal=True, return_attn_probs=True,
                                                block_table=table)
    want, want_lse = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table,
                                            return_lse=True)
    assert probs is None and torch.equal(out, want) and torch.equal(lse, want_lse)


def test_torch_compile_fullgraph():
    q, _, _, kp, vp, table, cq, ck, mq, mk, _ = make_case("causal_gqa", 64, 22)

    def prefill(q, kp, vp, table):
        return fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table) * 2

    want = prefill(q, kp, vp, table)
    got = torch.compile(prefill, fullgraph=True)(q, kp, vp, table)
    assert torch.equal(got, want)


def test_cuda_graph_capture_and_replay_with_a_new_table():
    q, _, _, kp, vp, table, cq, ck, mq, mk, _ = make_case("causal_gqa", 16, 23)
    out = torch.empty_like(q)
    call = dict(causal=True, block_table=table, out=out)
    fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, **call)  # warm-up: selection, module load
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, **call)
    # The pages moved elsewhere in the pool, the table rewritten in place: the replay reads the new pages.
    perm = torch.randperm(kp.shape[0], device=DEVICE)
    kp2, vp2 = torch.empty_like(kp), torch.empty_like(vp)
    kp2[perm], vp2[perm] = kp, vp
    table.copy_(torch.where((table >= 0) & (table < kp.shape[0]), perm[table.clamp(0, kp.shape[0] - 1).long()],
                            table).to(torch.int32))
    kp.copy_(kp2)
    vp.copy_(vp2)
    expected = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


MALFORMED = {
    # (cu_seqlens_k, table values, max_seqlen_k) over a pool of 8 pages of 16 and a table 4 entries wide
    "outside_pool": ([0, 40, 80], [[0, 9, 1, 2], [1 << 30, 3, 4, 5]], 40),
    "negative": ([0, 40, 80], [[-1, -(1 << 30), 0, 1], [2, -5, 3, 4]], 40),
    "longer_than_table": ([0, 5000, 1 << 30], [[0, 1, 2, 3], [4, 5, 6, 7]], 64),
    "decreasing": ([0, 60, 5], [[0, 1, 2, 3], [4, 5, 6, 7]], 60),
}


@pytest.mark.parametrize("which", MALFORMED)
def test_malformed_tables_do_not_fault(which, monkeypatch):
    monkeypatch.delenv(config.CHECK_INDICES, raising=False)
    bounds, rows, max_k = MALFORMED[which]
    g = torch.Generator(DEVICE).manual_seed(5)
    q = torch.randn(80, 4, 64, device=DEVICE, generator=g).to(BF16)
    kp, vp = (torch.randn(8, 16, 2, 64, device=DEVICE, generator=g).to(BF16) for _ in range(2))
    cq = cu((40, 40))
    ck = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    assert fa2rt.explain(q, kp, vp, cq, ck, 40, max_k, causal=True, block_table=table).path == "kernel"
    out = fa2rt.attention_varlen(q, kp, vp, cq, ck, 40, max_k, causal=True, block_table=table)
    torch.cuda.synchronize()  # a fault would surface here (and fail every later test)
    assert torch.isfinite(out).all()
    monkeypatch.setenv(config.CHECK_INDICES, "1")
    with pytest.raises(ValueError, match=r"block_table\[\d+, \d+\]: expected|cu_seqlens_k: expected|max_seqlen_k"):
        fa2rt.attention_varlen(q, kp, vp, cq, ck, 40, max_k, causal=True, block_table=table)


def test_inputs_that_require_grad_are_refused_naming_block_table():
    q, _, _, kp, vp, table, cq, ck, mq, mk, _ = make_case("plain", 16, 24)
    with pytest.raises(ValueError, match="block_table: expected None when q, k, v or alibi_slopes requires grad"):
        fa2rt.attention_varlen(q.requires_grad_(), kp, vp, cq, ck, mq, mk, block_table=table)
