"""fa2rt.flash_attn as a user switching `from flash_attn import ...` would notice it: the same signatures, results
(against fa2rt's own calls and the float64 reference), LSE shapes, and errors for the same misuse."""

import inspect
import warnings

import pytest
import torch

import fa2rt
from fa2rt import flash_attn as fa
from fa2rt.reference import attention_reference

# flash-attn 2.8's documented signatures (flash_attn/flash_attn_interface.py): (name, default) in order; REQUIRED
# marks a parameter without a default. Written from the documentation, so a drift on either side fails here.
REQUIRED = object()
COMMON_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
               ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)] + COMMON_TAIL,
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED)] + COMMON_TAIL,
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED)] + COMMON_TAIL,
    "flash_attn_varlen_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), ("cu_seqlens_q", REQUIRED),
                               ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED), ("max_seqlen_k", REQUIRED)]
    + COMMON_TAIL + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", REQUIRED), ("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED)]
    + COMMON_TAIL,
    "flash_attn_varlen_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED), ("cu_seqlens_q", REQUIRED),
                                        ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED),
                                        ("max_seqlen_k", REQUIRED)] + COMMON_TAIL,
    "flash_attn_with_kvcache": [("q", REQUIRED), ("k_cache", REQUIRED), ("v_cache", REQUIRED), ("k", None),
                                ("v", None), ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                                ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                                ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                                ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
                                ("num_splits", 0), ("return_softmax_lse", False)],
}


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # Every call here runs the CPU fallback; its one-time announcement is tested in test_api.py.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        yield


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_flash_attn_2_8(name):
    params = inspect.signature(getattr(fa, name)).parameters.values()
    got = [(p.name, REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == SIGNATURES[name]
    # Every parameter can be passed by position, as flash-attn's can.
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_module_exports_the_seven_functions():
    assert set(SIGNATURES) == set(fa.__all__) - {"CompatError"}


def test_with_kvcache_appends_and_equals_fa2rt():
    # A decode step of two tokens appended in place, GQA, causal, rotary: the same as fa2rt's own call on copies.
    q, k_new, v_new = rand(2, 2, 4, 16, seed=4), rand(2, 2, 2, 16, seed=5), rand(2, 2, 2, 16, seed=6)
    k_cache, v_cache = rand(2, 12, 2, 16, seed=7), rand(2, 12, 2, 16, seed=8)
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    cos, sin = rand(12, 4, seed=9).cos(), rand(12, 4, seed=9).sin()
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cos, sin, seqlens, causal=True,
                                          return_softmax_lse=True)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    ref, ref_lse = fa2rt.attention_with_kvcache(q, kc2, vc2, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                                cache_seqlens=seqlens, causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and lse.shape == (2, 4, 2)
    assert torch.equal(kc, kc2) and torch.equal(vc[1, 9:11], v_new[1]) and not torch.equal(kc, k_cache)
    with pytest.raises(RuntimeError, match="cache_seqlens") as info:
        fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 9], dtype=torch.int64))
    assert isinstance(info.value, ValueError)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dense(b=2, nq=9, nk=13, h=4, hk=2, d=16):
    return rand(b, nq, h, d, seed=1), rand(b, nk, hk, d, seed=2), rand(b, nk, hk, d, seed=3)


FEATURES = [dict(), dict(causal=True), dict(window_size=(3, 1)), dict(softcap=2.5, softmax_scale=0.3),
            dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]), causal=True)]


@pytest.mark.parametrize("kw", FEATURES, ids=lambda kw: "+".join(kw) or "plain")
def test_flash_attn_func_equals_fa2rt_and_reference(kw):
    q, k, v = dense()
    out = fa.flash_attn_func(q, k, v, **kw)
    assert torch.equal(out, fa2rt.attention(q, k, v, **kw))
    ref, _ = attention_reference(q, k, v, **kw)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_positional_arguments_land_where_flash_attn_puts_them():
    q, k, v = dense()
    slopes = torch.full((4,), 0.3)
    # q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    out, lse, probs = fa.flash_attn_func(q, k, v, 0.0, 0.2, True, (5, 0), 1.5, slopes, True, True)
    ref_out, ref_lse = fa2rt.attention(q, k, v, softmax_scale=0.2, causal=True, window_size=(5, 0), softcap=1.5,
                                       alibi_slopes=slopes, deterministic=True, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse) and probs is None


def test_return_attn_probs_gives_out_lse_none_with_flash_attn_lse_shape():
    q, k, v = dense()
    result = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3 and result[2] is None
    out, lse, _ = result
    assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    _, ref_lse = attention_reference(q, k, v, causal=True)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    assert isinstance(fa.flash_attn_func(q, k, v), torch.Tensor)  # without it: out alone


def test_qkvpacked_reads_views_and_matches_unpacked():
    qkv = rand(2, 11, 3, 4, 16, seed=5).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    assert torch.equal(out, fa2rt.attention(q, k, v, causal=True))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0


def test_kvpacked_matches_unpacked_with_gqa():
    q, kv = rand(2, 7, 4, 16, seed=6), rand(2, 12, 2, 2, 16, seed=7)
    out, lse, _ = fa.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
    ref, ref_lse = fa2rt.attention(q, kv[:, :, 0], kv[:, :, 1], causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_strided_last_dim_is_copied_as_flash_attn_does():
    q, k, v = dense()
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    assert torch.equal(fa.flash_attn_func(qt, k, v), fa.flash_attn_func(q, k, v))


@pytest.mark.parametrize("kw", [{}, {"causal": True, "window_size": (3, 0)}, {"softcap": 5.0}],
                         ids=["plain", "window", "softcap"])
def test_dropout_runs_the_announced_fallback_with_dropout(kw, fresh_announcements):
    # flash-attn's dropout zeroes each probability with chance dropout_p and scales the rest by 1 / (1 - p): so the
    # output is random, reproducible from torch's seed, and its mean over many draws is the output without dropout.
    q, k, v = dense()
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[dropout\]"):
        torch.manual_seed(0)
        first = fa.flash_attn_func(q, k, v, 0.3, **kw)
    torch.manual_seed(0)
    assert torch.equal(first, fa.flash_attn_func(q, k, v, 0.3, **kw))
    exact = fa.flash_attn_func(q, k, v, 0.0, **kw)
    assert not torch.equal(first, exact)
    mean = torch.stack([fa.flash_attn_func(q, k, v, 0.3, **kw) for _ in range(400)]).mean(0)
    assert ((mean - exact).norm() / exact.norm()).item() < 0.06
    assert fa2rt.explain(q, k, v, dropout_p=0.3, **kw).reason == "dropout"


def test_dropout_gradients_and_varlen():
    q, k, v = (t.requires_grad_() for t in dense())
    fa.flash_attn_func(q, k, v, dropout_p=0.2, causal=True).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    qkv = torch.randn(2, 9, 3, 4, 16, requires_grad=True)
    fa.flash_attn_qkvpacked_func(qkv, dropout_p=0.2).sum().backward()
    assert torch.isfinite(qkv.grad).all()
    qv, kv, vv, cu_q, cu_k, max_q, max_k = packed([3, 5], [4, 5])
    torch.manual_seed(1)
    out = fa.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, max_q, max_k, 0.5)
    assert out.shape == qv.shape and (out == 0).any()  # with p=0.5 some rows lose every key they kept
    with pytest.raises(ValueError, match="dropout_p: expected a real number in"):
        fa.flash_attn_func(q, k, v, 1.0)


def test_misuse_raises_runtime_error_like_flash_attn_and_names_the_argument():
    q, k, v = dense()
    cases = [((q, k[..., :8], v), "k: expected head dim"),
             ((q, rand(2, 13, 3, 16), rand(2, 13, 3, 16)), "k: expected a number of heads"),
             ((q, k, v.half()), "v: expected dtype"),
             ((q[0], k, v), "q: expected a 4-D tensor")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message) as info:
            fa.flash_attn_func(*args)
        assert isinstance(info.value, ValueError)
    with pytest.raises(RuntimeError, match="kv: expected size 2 in dim 2"):
        fa.flash_attn_kvpacked_func(q, rand(2, 13, 3, 2, 16))
    with pytest.raises(TypeError, match="dropout_p"):
        fa.flash_attn_func(q, k, v, "0.1")


def packed(lengths_q, lengths_k, h=4, hk=2, d=16):
    cu = [torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lengths_q, lengths_k)]
    q = rand(sum(lengths_q), h, d, seed=8)
    k, v = rand(sum(lengths_k), hk, d, seed=9), rand(sum(lengths_k), hk, d, seed=10)
    return q, k, v, cu[0], cu[1], max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("kw", FEATURES[:4], ids=lambda kw: "+".join(kw) or "plain")
def test_varlen_func_equals_fa2rt_and_per_sequence_reference(kw):
    q, k, v, cu_q, cu_k, max_q, max_k = packed([3, 0, 6], [5, 2, 4])
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kw)
    ref, ref_lse = fa2rt.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and probs is None
    assert lse.shape == (4, 9) and lse.dtype == torch.float32  # flash-attn's varlen LSE: (nheads, total_q)
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.start == rows.stop:
            continue
        expected, _ = attention_reference(q[None, rows], k[None, keys], v[None, keys], **kw)
        assert torch.allclose(out[rows].double(), expected[0], atol=1e-5)


def test_varlen_packed_variants_read_views_of_the_packed_tensor():
    q, k, v, cu_q, cu_k, max_q, max_k = packed([4, 5], [4, 5], hk=4)
    qkv = torch.stack([q, k, v], 1)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu_q, max_q, causal=True)
    assert torch.equal(out, fa2rt.attention_varlen(q, k, v, cu_q, cu_q, max_q, max_q, causal=True))
    kv = torch.stack([k, v], 1)
    out = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max_q, max_k, 0.0, 0.5)
    assert torch.equal(out, fa2rt.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=0.5))


def test_varlen_refuses_a_block_table_with_packed_kv_and_bad_cu_seqlens():
    # block_table takes paged k/v (tests/cpu/test_varlen_paged.py); with packed ones it is misuse, named.
    q, k, v, cu_q, cu_k, max_q, max_k = packed([3, 4], [3, 4])
    with pytest.raises(RuntimeError, match="k: expected a 4-D tensor"):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_q") as info:
        fa.flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k, max_q, max_k)
    assert isinstance(info.value, ValueError)
