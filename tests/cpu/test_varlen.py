"""fa2rt.attention_varlen on a CPU machine: validation, the per-sequence SDPA fallback against the float64 reference
applied per sequence, gradients, out=, explain() with the varlen arguments."""

import re
import warnings

import pytest
import torch

import fa2rt
from fa2rt import config
from fa2rt.reference import attention_reference_varlen
from fa2rt.validate import check_varlen_inputs, should_check_values

# Lengths with empty and one-token sequences, and seqlen_q != seqlen_k per sequence.
LENS_Q = (5, 0, 1, 9, 3)
LENS_K = (7, 4, 1, 2, 0)


def cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def packed(lens_q=LENS_Q, lens_k=LENS_K, h=4, hk=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(n, hh, d, generator=g, dtype=torch.float64).to(dtype)
               for n, hh in ((tq, h), (tk, hk), (tk, hk)))
    return q, k, v, cu(lens_q), cu(lens_k), max(lens_q, default=0), max(lens_k, default=0)


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "causal_window": dict(causal=True, window_size=(1, -1)),
    "softcap": dict(softcap=2.5, softmax_scale=0.7),
    "alibi": dict(alibi=(4,)),
    "alibi_batch_causal": dict(alibi=(5, 4), causal=True),
    "negative_scale": dict(softmax_scale=-0.3),
}


def options(feature, seed=1):
    opts = dict(FEATURES[feature])
    shape = opts.pop("alibi", None)
    if shape is not None:
        opts["alibi_slopes"] = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.5
    return opts


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_fallback_matches_per_sequence_reference(feature, heads, fresh_announcements):
    q, k, v, cq, ck, mq, mk = packed(h=heads[0], hk=heads[1])
    opts = options(feature)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[not_gpu\]"):
        out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, **opts)
    ref, ref_lse = attention_reference_varlen(q, k, v, cq, ck, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (heads[0], q.shape[0]) and lse.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf) and (lse[inf] > 0).all()
    assert torch.allclose(lse[~inf].double(), ref_lse[~inf], atol=1e-4)
    # Rows that see no key (here the sequence with no keys, and more under causal/window) give exactly 0.
    assert torch.equal(out.transpose(0, 1)[inf], torch.zeros_like(out.transpose(0, 1)[inf]))


@pytest.mark.parametrize("feature", ["plain", "causal_window", "softcap", "alibi_batch_causal"])
def test_gradients_match_reference(feature, fresh_announcements):
    q, k, v, cq, ck, mq, mk = packed(dtype=torch.float64)
    opts = options(feature)
    grad_out = torch.randn_like(q)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out = fa2rt.attention_varlen(*inputs, cq, ck, mq, mk, **opts)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference_varlen(*ref_inputs, cq, ck, **opts)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.dtype == torch.float64 and not got.isnan().any(), name
        assert torch.allclose(got, want, atol=1e-8), (name, (got - want).abs().max())


def test_strided_packed_qkv_and_out(fresh_announcements):
    lens = (6, 1, 4)
    total, h, d = sum(lens), 2, 8
    qkv = torch.randn(total, 3, h, d)  # one packed tensor, read through views
    q, k, v = qkv.unbind(1)
    c = cu(lens)
    out = torch.full_like(q, float("nan"))
    with pytest.warns(fa2rt.FallbackWarning):
        res = fa2rt.attention_varlen(q, k, v, c, c, 6, 6, causal=True, out=out)
    assert res is out
    ref, _ = attention_reference_varlen(q, k, v, c, c, causal=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("lens_q,lens_k", [((0, 0), (3, 2)), ((3, 2), (0, 0)), ((), ())])
def test_empty_totals_are_trivial(lens_q, lens_k, fresh_announcements):
    q, k, v, cq, ck, mq, mk = packed(lens_q, lens_k)
    assert fa2rt.explain(q, k, v, cq, ck, mq, mk).path == "trivial"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to compute is no fallback
        out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and lse.shape == (4, q.shape[0]) and torch.isinf(lse).all()


def test_explain_takes_the_varlen_arguments():
    q, k, v, cq, ck, mq, mk = packed()
    d = fa2rt.explain(q, k, v, cq, ck, mq, mk, causal=True)
    assert d.path == "fallback" and d.reason == "not_gpu"
    with raises(TypeError, "max_seqlen_k: expected a value with cu_seqlens_q, cu_seqlens_k, max_seqlen_q"):
        fa2rt.explain(q, k, v, cq, ck, mq)
    with raises(ValueError, "max_seqlen_q: expected >= every sequence's length"):
        fa2rt.explain(q, k, v, cq, ck, 2, mk)


def check(q, k, v, cq, ck, mq, mk, **opts):
    return check_varlen_inputs(q, k, v, cq, ck, mq, mk, causal=opts.pop("causal", False), softmax_scale=None,
                               **opts)


def test_valid_shapes():
    q, k, v, cq, ck, mq, mk = packed()
    s = check(q, k, v, cq, ck, mq, mk)
    assert (s.layout, s.batch, s.seqlen_q, s.seqlen_k, s.total_q, s.total_k) == ("varlen", 5, 9, 7, 18, 14)
    assert (s.nheads, s.nheads_k, s.head_dim) == (4, 2, 16) and not s.trivial


BAD_CU = [
    (lambda c: c.long(), ValueError, "cu_seqlens_q: expected dtype torch.int32, got torch.int64"),
    (lambda c: c[None], ValueError, "cu_seqlens_q: expected a 1-D contiguous torch.int32 tensor"),
    (lambda c: c[:0], ValueError, "cu_seqlens_q: expected a 1-D contiguous torch.int32 tensor"),
    (lambda c: c.tolist(), TypeError, "cu_seqlens_q: expected a 1-D contiguous torch.int32 tensor (batch + 1,) on "
     "q's device, got list"),
    (lambda c: torch.stack([c, c], 1)[:, 0], ValueError, "cu_seqlens_q: expected a contiguous tensor (stride 1"),
    (lambda c: c + 1, ValueError, "cu_seqlens_q: expected first entry 0, got 1"),
    (lambda c: torch.tensor([0, 5, 3, 14, 16, 18], dtype=torch.int32), ValueError,
     "cu_seqlens_q: expected non-decreasing entries, got cu_seqlens_q[2]=3 < cu_seqlens_q[1]=5"),
    (lambda c: torch.tensor([0, 5, 5, 6, 15, 17], dtype=torch.int32), ValueError,
     "cu_seqlens_q: expected last entry 18 (the total number of tokens, dim 0 of the packed tensor), got 17"),
]


@pytest.mark.parametrize("bad", BAD_CU)
def test_bad_cu_seqlens(bad):
    mutate, exc, text = bad
    q, k, v, cq, ck, mq, mk = packed()
    with raises(exc, text):
        check(q, k, v, mutate(cq), ck, mq, mk)


def test_bad_lengths_and_heads():
    q, k, v, cq, ck, mq, mk = packed()
    with raises(ValueError, "cu_seqlens_k: expected shape (6,) (same as cu_seqlens_q"):
        check(q, k, v, cq, ck[:-1], mq, mk)
    with raises(ValueError, "max_seqlen_k: expected >= every sequence's length (cu_seqlens_k[1] - cu_seqlens_k[0] "
                "= 7), got 6"):
        check(q, k, v, cq, ck, mq, 6)
    with raises(TypeError, "max_seqlen_q: expected a Python int >= 0, got 9.0 (float)"):
        check(q, k, v, cq, ck, 9.0, mk)
    with raises(TypeError, "max_seqlen_q: expected a Python int >= 0, got True (bool)"):
        check(q, k, v, cq, ck, True, mk)
    with raises(ValueError, "max_seqlen_k: expected a Python int >= 0, got -1"):
        check(q, k, v, cq, ck, mq, -1)
    with raises(ValueError, "q: expected a 3-D tensor (total_tokens, nheads, headdim), got shape (1, 18, 4, 16)"):
        check(q[None], k, v, cq, ck, mq, mk)
    with raises(ValueError, "k: expected a number of heads that divides q's nheads=4 (MQA/GQA), got nheads_k=3"):
        check(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cq, ck, mq, mk)
    with raises(ValueError, "v: expected shape (14, 2, 16) (same as k), got shape (13, 2, 16)"):
        check(q, k, v[1:], cq, ck, mq, mk)
    with raises(ValueError, "alibi_slopes: expected shape (4,) or (5, 4) ((nheads,) or (batch, nheads)), got shape "
                "(2, 4)"):
        check(q, k, v, cq, ck, mq, mk, alibi_slopes=torch.zeros(2, 4))
    with raises(ValueError, "out: expected shape (18, 4, 16) (same as q), got shape (18, 4, 8)"):
        check(q, k, v, cq, ck, mq, mk, out=q[..., :8])
    with raises(TypeError, "causal: expected a bool, got 1 (int)"):
        check(q, k, v, cq, ck, mq, mk, causal=1)


def test_values_on_the_gpu_are_checked_only_when_asked(monkeypatch):
    on_device = torch.zeros(3, dtype=torch.int32, device="meta")  # stands for a GPU tensor: reading it would sync
    monkeypatch.delenv(config.CHECK_INDICES, raising=False)
    assert should_check_values(torch.zeros(3, dtype=torch.int32)) and not should_check_values(on_device)
    monkeypatch.setenv(config.CHECK_INDICES, "1")
    assert should_check_values(on_device)
    monkeypatch.setenv(config.CHECK_INDICES, "0")
    assert not should_check_values(on_device)


def test_the_fallback_checks_values_it_reads_anyway(fresh_announcements, monkeypatch):
    # The fallback reads the bounds to the host whatever the device, so it always checks them (monkeypatched here
    # so validation lets a malformed CPU tensor through, as it does a GPU one).
    monkeypatch.setattr("fa2rt.validate.should_check_values", lambda cu: False)
    q, k, v, cq, ck, mq, mk = packed()
    with raises(ValueError, "cu_seqlens_k: expected last entry 14"), warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        fa2rt.attention_varlen(q, k, v, cq, ck + torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.int32), mq, mk)


class PackedBlock(torch.nn.Module):
    """qkv projection -> fa2rt.attention_varlen over packed sequences -> output projection (GQA, strided views)."""

    def __init__(self, d_model=32, h=4, hk=2, **attn_kwargs):
        super().__init__()
        self.h, self.hk, self.d = h, hk, d_model // h
        self.qkv = torch.nn.Linear(d_model, (h + 2 * hk) * self.d)
        self.proj = torch.nn.Linear(h * self.d, d_model)
        self.attn_kwargs = attn_kwargs

    def forward(self, x, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).view(x.shape[0], -1, self.d).split([self.h, self.hk, self.hk], dim=1)
        out = fa2rt.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **self.attn_kwargs)
        return self.proj(out.reshape(x.shape[0], -1))


@pytest.mark.parametrize("attn_kwargs", [dict(causal=True), dict(window_size=(2, 0), softcap=2.0)],
                         ids=["causal", "features"])
def test_compile_fullgraph_matches_eager(attn_kwargs, fresh_announcements):
    # Under torch.compile the call runs as the fa2rt::varlen_fwd / varlen_bwd custom ops (fake implementations and
    # autograd registered), which fall back on the CPU when the graph runs: fullgraph tracing must not read
    # cu_seqlens' values.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PackedBlock(**attn_kwargs)
    lens = (5, 0, 1, 9)
    x = torch.randn(sum(lens), 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    c = cu(lens)

    def loss_and_grads(fn):
        out = fn(x, c, max(lens))
        return out, torch.autograd.grad(out.square().sum(), [x, *model.parameters()])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        want_out, want_grads = loss_and_grads(model)
        got_out, got_grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_calls_check_values_when_the_graph_runs(fresh_announcements):
    # Tracing cannot read cu_seqlens; the custom op checks them as an eager call would, on every run.
    q, k, v, cq, ck, mq, _ = packed()
    step = torch.compile(lambda q, k, v, cq, ck: fa2rt.attention_varlen(q, k, v, cq, ck, mq, 6), fullgraph=True,
                         backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        with raises(ValueError, "max_seqlen_k: expected >= every sequence's length (cu_seqlens_k[1] - "
                    "cu_seqlens_k[0] = 7), got 6"):
            step(q, k, v, cq, ck)
