"""fa2rt.attention_varlen(..., block_table=...) (paged prefill) on a CPU machine: validation naming the argument, the
exact fallback (pages gathered, then the varlen fallback) against the float64 reference on the same keys packed,
explain(), torch.compile, and flash_attn_varlen_func(block_table=...) against attention_varlen on the gathered
contiguous K/V.

Each sequence's keys sit in pages of a pool handed out in a shuffled order; pool rows no sequence owns hold NaN, so a
key read from the wrong page or row shows up in the output."""

import re
import warnings

import pytest
import torch

import fa2rt
import fa2rt.flash_attn as fa
from fa2rt import ops
from fa2rt.reference import attention_reference_varlen
from fa2rt.validate import check_paged_inputs, check_varlen_inputs

LENS_Q = (5, 0, 1, 9, 3, 2)
LENS_K = (7, 4, 1, 40, 0, 17)  # lengths 0 and 1, one over two pages of 16, one just over a page


def cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def paged_case(page_size=16, lens_q=LENS_Q, lens_k=LENS_K, h=4, hk=2, d=16, dtype=torch.float32, seed=0):
    """(q, k, v packed, k_pool, v_pool, block_table, cu_q, cu_k, max_q, max_k)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(sum(lens_k), hk, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    pages = [-(-n // page_size) for n in lens_k]
    num_blocks = sum(pages) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_pool, v_pool = (torch.full((num_blocks, page_size, hk, d), float("nan"), dtype=dtype) for _ in range(2))
    table = torch.full((len(lens_k), max(pages) + 1), -1, dtype=torch.int32)  # unused entries: outside the pool
    page, row = 0, 0
    for b, n in enumerate(lens_k):
        table[b, :pages[b]] = torch.tensor(order[page:page + pages[b]], dtype=torch.int32)
        for j in range(n):
            k_pool[order[page + j // page_size], j % page_size] = k[row + j]
            v_pool[order[page + j // page_size], j % page_size] = v[row + j]
        page, row = page + pages[b], row + n
    return q, k, v, k_pool, v_pool, table, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k)


FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 2)),
    "softcap": dict(softcap=2.5, softmax_scale=0.7),
    "alibi_batch_causal": dict(causal=True, alibi_slopes=(6, 4)),
}


def options(feature):
    opts = dict(FEATURES[feature])
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = torch.rand(opts["alibi_slopes"], generator=torch.Generator().manual_seed(3)) * 0.5
    return opts


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("page_size", [16, 64])
def test_fallback_matches_reference_on_the_packed_keys(feature, page_size, fresh_announcements):
    q, k, v, kp, vp, table, cq, ck, mq, mk = paged_case(page_size)
    opts = options(feature)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[not_gpu\]"):
        out, lse = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=table, return_lse=True, **opts)
    ref, ref_lse = attention_reference_varlen(q, k, v, cq, ck, **opts)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and not torch.isnan(out).any()
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    inf = torch.isinf(ref_lse)
    assert inf.any() and torch.equal(torch.isinf(lse), inf)
    assert torch.allclose(lse[~inf].double(), ref_lse[~inf], atol=1e-4)


def test_paged_equals_contiguous_varlen_and_out_is_written(fresh_announcements):
    q, k, v, kp, vp, table, cq, ck, mq, mk = paged_case(32, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        want = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
        out = torch.full_like(q, float("nan"))
        got = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table, out=out)
    assert got is out and torch.equal(got, want)


def test_valid_shapes():
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    s = check_varlen_inputs(q, kp, vp, cq, ck, mq, mk, causal=False, softmax_scale=None, block_table=table)
    assert (s.layout, s.batch, s.seqlen_k, s.total_q, s.total_k, s.page_size, s.max_blocks, s.block_stride) == (
        "varlen_paged", 6, 40, 20, kp.shape[0] * 16, 16, table.shape[1], table.shape[1])
    assert s == ops._paged_shapes(q, kp, cq, table, mq, mk, s.softmax_scale, -1, -1, 0.0, None)


def test_bad_paged_inputs_name_the_argument():
    q, k, v, kp, vp, table, cq, ck, mq, mk = paged_case(16)

    def check(q=q, kp=kp, vp=vp, cq=cq, ck=ck, mq=mq, mk=mk, table=table, **kw):
        return check_paged_inputs(q, kp, vp, cq, ck, mq, mk, table, causal=kw.pop("causal", False),
                                  softmax_scale=None, **kw)

    with raises(ValueError, "k: expected a 4-D tensor (num_blocks, page_size, nheads_k, headdim), got shape"):
        check(kp=k, vp=v)
    with raises(ValueError, "k: expected a page size (dim 1 of a paged k/v (num_blocks, page_size, nheads_k, "
                "headdim)) that is a positive multiple of 16, got 8"):
        check(kp=kp[:, :8], vp=vp[:, :8])
    with raises(ValueError, "v: expected shape"):
        check(vp=vp[:-1])
    with raises(ValueError, "k: expected head dim 16 (same as q)"):
        check(kp=kp[..., :8], vp=vp[..., :8])
    with raises(ValueError, "block_table: expected dtype torch.int32, got torch.int64"):
        check(table=table.long())
    with raises(TypeError, "block_table: expected None or a 2-D torch.int32 tensor"):
        check(table=table.tolist())
    with raises(ValueError, "block_table: expected a 2-D torch.int32 tensor (batch, max_blocks) with batch=6"):
        check(table=table[:5])
    with raises(ValueError, "block_table: expected a contiguous last dimension"):
        check(table=torch.zeros(6, 8, dtype=torch.int32)[:, ::2])
    with raises(ValueError, "block_table: expected max_blocks * page_size >= max_seqlen_k=40"):
        check(table=table[:, :2].contiguous())
    with raises(ValueError, "block_table[3, 1]: expected a block of the pool in [0, "):
        bad = table.clone()
        bad[3, 1] = kp.shape[0]
        check(table=bad)
    with raises(ValueError, "block_table[0, 0]: expected a block of the pool"):
        bad = table.clone()
        bad[0, 0] = -3
        check(table=bad)
    with raises(ValueError, "cu_seqlens_k: expected non-decreasing entries"):
        check(ck=torch.tensor([0, 7, 3, 12, 52, 52, 69], dtype=torch.int32))
    with raises(ValueError, "max_seqlen_k: expected >= every sequence's length"):
        check(mk=39)
    with raises(ValueError, "block_table: expected None when q, k, v or alibi_slopes requires grad"):
        check(q=q.clone().requires_grad_())


def test_unused_table_entries_and_the_last_cu_seqlens_k_entry_are_free():
    # Only the pages each sequence reads must lie in the pool, and no tensor's shape fixes cu_seqlens_k's total.
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    assert (table == -1).any()
    check_paged_inputs(q, kp, vp, cq, ck, mq, mk, table, causal=False, softmax_scale=None)


def test_grad_is_refused_naming_block_table():
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    with raises(ValueError, "block_table: expected None when q, k, v or alibi_slopes requires grad"):
        fa2rt.attention_varlen(q, kp.requires_grad_(), vp, cq, ck, mq, mk, block_table=table)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=table)


def test_the_fallback_checks_values_it_reads_anyway(fresh_announcements, monkeypatch):
    monkeypatch.setattr("fa2rt.validate.should_check_values", lambda t: False)  # as a GPU tensor without the sync
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    bad = table.clone()
    bad[5, 1] = 1 << 20
    with raises(ValueError, "block_table[5, 1]: expected a block of the pool"), warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=bad)


def test_explain_takes_block_table(fresh_announcements):
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    decision = fa2rt.explain(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table)
    assert decision.path == "fallback" and decision.reason == "not_gpu"
    with raises(TypeError, "block_table: expected None without cu_seqlens_q"):
        fa2rt.explain(q[None], kp, vp, block_table=table)
    with raises(ValueError, "block_table: expected dtype torch.int32"):
        fa2rt.explain(q, kp, vp, cq, ck, mq, mk, block_table=table.long())


def test_dropout_runs_the_announced_fallback(fresh_announcements):
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[dropout\]"):
        out = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=table, dropout_p=0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_compile_fullgraph_runs_the_custom_op(fresh_announcements):
    # Under torch.compile a paged call is the fa2rt::varlen_paged_fwd custom op (a fake implementation, no autograd),
    # which selects or falls back when the graph runs: tracing must not read the index values.
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)

    def prefill(q, kp, vp, table, cq, ck):
        return fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table) * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        want = prefill(q, kp, vp, table, cq, ck)
        got = torch.compile(prefill, fullgraph=True, backend="aot_eager")(q, kp, vp, table, cq, ck)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fake_implementation_gives_flash_attn_shapes():
    q, _, _, kp, vp, table, cq, ck, mq, mk = (t.to("meta") if isinstance(t, torch.Tensor) else t
                                              for t in paged_case(16))
    out, lse = ops.varlen_paged_fwd(q, kp, vp, cq, ck, table, mq, mk, None, 0.25, -1, -1, 0.0, "", "")
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32


@pytest.mark.parametrize("page_size", [16, 48])
def test_flash_attn_varlen_func_with_block_table_equals_the_gathered_call(page_size, fresh_announcements):
    q, k, v, kp, vp, table, cq, ck, mq, mk = paged_case(page_size, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out, lse, probs = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, mq, mk, 0.0, 0.3, True, (8, -1), 0.0, None,
                                                    False, True, block_table=table)
        want, want_lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, softmax_scale=0.3, causal=True,
                                                window_size=(8, -1), return_lse=True)
    assert probs is None and torch.equal(out, want) and torch.equal(lse, want_lse)


def test_flash_attn_varlen_func_block_table_misuse_is_a_runtime_error():
    q, _, _, kp, vp, table, cq, ck, mq, mk = paged_case(16)
    with pytest.raises(RuntimeError, match=re.escape("block_table: expected dtype torch.int32")) as info:
        fa.flash_attn_varlen_func(q, kp, vp, cq, ck, mq, mk, block_table=table.long())
    assert isinstance(info.value, ValueError)
