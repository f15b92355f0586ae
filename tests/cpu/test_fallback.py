import itertools
import math

import pytest
import torch

import fa2rt.fallback as fallback
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import allowed_mask, attention_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (rtol, atol) for out against the float64 reference computed from the same (rounded) inputs.
OUT_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
           torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}



def make(b, nq, nk, h, hk, d, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(b, n, heads, d, generator=g, dtype=torch.float64).to(dtype)
          for n, heads in ((nq, h), (nk, hk), (nk, hk))]
    return [t.requires_grad_(requires_grad) for t in ts]


def no_key_rows(nq, nk, causal):
    """Mask (nq,) of query rows that see no key."""
    i = torch.arange(nq)
    return (i + nk - nq < 0) if causal else torch.full((nq,), nk == 0)


def test_reference_matches_naive_softmax():
    # Hand-written loops: q rows 0 sees no key (nq > nk, causal), GQA with 2 query heads on 1 key head.
    q, k, v = make(1, 3, 2, 2, 1, 2, torch.float64, seed=1)
    scale = 0.7
    out, lse = attention_reference(q, k, v, causal=True, softmax_scale=scale)
    for h in range(2):
        for i in range(3):
            keys = [j for j in range(2) if j <= i + 2 - 3]
            if not keys:
                assert lse[0, h, i] == math.inf and out[0, i, h].eq(0).all()
                continue
            s = [scale * sum(q[0, i, h, c].item() * k[0, j, 0, c].item() for c in range(2)) for j in keys]
            z = sum(math.exp(x) for x in s)
            assert lse[0, h, i].item() == pytest.approx(math.log(z), rel=1e-12)
            for c in range(2):
                o = sum(math.exp(x) / z * v[0, j, 0, c].item() for x, j in zip(s, keys, strict=True))
                assert out[0, i, h, c].item() == pytest.approx(o, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("hk", [4, 2, 1])
@pytest.mark.parametrize("nk", [1, 5, 33, 64])
@pytest.mark.parametrize("nq", [1, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(causal, nq, nk, hk, d):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = make(2, nq, nk, 4, hk, d, dtype)
        out, lse = sdpa_attention(q, k, v, causal=causal, softmax_scale=None, return_lse=True)
        ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
        assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, nq)
        rtol, atol = OUT_TOL[dtype]
        torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
        # The LSE is computed in fp32 from the same inputs whatever their dtype, so it stays tight.
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
        empty = no_key_rows(nq, nk, causal)
        assert out[:, empty].eq(0).all() and lse[..., empty].eq(math.inf).all()
        assert torch.isfinite(out).all() and torch.isfinite(lse[..., ~empty]).all()


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.3])
@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 9), (9, 5), (1, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_float64_and_custom_scale(causal, nq, nk, scale):
    # scale <= 0 is accepted (as flash-attn does) and needs care: torch's causal kernel alone gives NaN for it.
    q, k, v = make(2, nq, nk, 6, 3, 16, torch.float64, requires_grad=True)
    out, lse = sdpa_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    got = grads(sdpa_out, q, k, v, causal, scale)
    want = grads(attention_reference, q, k, v, causal, scale)
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_return_lse_false():
    q, k, v = make(1, 3, 4, 2, 2, 8, torch.float32)
    out, lse = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=False)
    assert lse is None and out.shape == q.shape


def test_strided_inputs():
    packed = torch.randn(2, 9, 3, 4, 16)
    q, k, v = packed.unbind(2)
    out, lse = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_lse_chunking(monkeypatch):
    q, k, v = make(2, 37, 20, 4, 2, 8, torch.float32)
    _, whole = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=True)
    monkeypatch.setattr(fallback, "LSE_CHUNK_ROWS", 5)
    _, chunked = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=True)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims", [(0, 5, 5, 4, 2), (2, 0, 5, 4, 2), (2, 5, 0, 4, 2), (2, 5, 5, 0, 0)])
def test_empty(dims):
    b, nq, nk, h, hk = dims
    q, k, v = make(b, nq, nk, h, hk, 8, torch.float16, requires_grad=True)
    out, lse = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and out.eq(0).all()
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float32 and lse.eq(math.inf).all()
    out.float().sum().backward()
    assert q.grad is not None and q.grad.eq(0).all()


def grads(fn, q, k, v, causal, scale):
    out = fn(q, k, v, causal=causal, softmax_scale=scale)[0]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))


def sdpa_out(q, k, v, *, causal, softmax_scale):
    return sdpa_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=False)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 33), (33, 5), (1, 8), (8, 1)])
@pytest.mark.parametrize("hk", [4, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference(causal, hk, nq, nk, dtype, tol):
    q, k, v = make(2, nq, nk, 4, hk, 16, dtype, requires_grad=True)
    got = grads(sdpa_out, q, k, v, causal, 0.4)
    want = grads(attention_reference, q, k, v, causal, 0.4)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol, msg=f"d{name}")
    if causal and nq > nk:
        assert got[0][:, : nq - nk].eq(0).all()  # rows that see no key get no gradient


def test_no_nan_gradients_when_no_key_low_precision():
    q, k, v = make(2, 40, 3, 4, 2, 64, torch.bfloat16, requires_grad=True)
    out, _ = sdpa_attention(q, k, v, causal=True, softmax_scale=None, return_lse=True)
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


# --- window_size, softcap, alibi_slopes -------------------------------------------------------------------------

WINDOWS = [(-1, -1), (3, 0), (0, 5), (2, 2), (-1, 4)]
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def alibi(kind, b=2, h=4):
    shape = {"none": None, "heads": (h,), "batch": (b, h)}[kind]
    return None if shape is None else torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.05


def feature_grads(fn, q, k, v, **kwargs):
    out = fn(q, k, v, **kwargs)[0]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))


def check_against_reference(q, k, v, **kwargs):
    """out, lse and dq, dk, dv of the fallback against the float64 reference; rows with no key give 0 / +inf / 0."""
    dtype, kwargs = q.dtype, {"causal": False, **kwargs}
    out, lse = sdpa_attention(q, k, v, return_lse=True, **kwargs)
    ref_out, ref_lse = attention_reference(q, k, v, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    empty = ref_lse.isinf()  # (b, h, nq)
    assert torch.equal(lse.isinf(), empty) and out.transpose(1, 2)[empty].eq(0).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)
    got = feature_grads(sdpa_attention, q, k, v, **kwargs)
    assert all(torch.isfinite(g).all() for g in got)
    assert got[0].transpose(1, 2)[empty].eq(0).all()  # rows that see no key get no gradient
    if dtype in GRAD_TOL:
        want = feature_grads(attention_reference, q, k, v, **kwargs)
        for name, g, w in zip("qkv", got, want, strict=True):
            torch.testing.assert_close(g.double(), w.double(), rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype],
                                       msg=lambda m, name=name: f"d{name}: {m}")
    return empty


@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 11), (12, 4)])
@pytest.mark.parametrize("slopes", ["none", "heads", "batch"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_features_match_reference(causal, window, softcap, slopes, nq, nk):
    # GQA (4 query heads on 2 kv heads); scale 1 makes scores large enough for softcap to matter.
    kwargs = dict(causal=causal, softmax_scale=1.0, window_size=window, softcap=softcap, alibi_slopes=alibi(slopes))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k, v = make(2, nq, nk, 4, 2, 8, dtype, requires_grad=True)
        check_against_reference(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(window_size=(2, 1)),
    dict(window_size=(-1, 0), alibi_slopes=alibi("batch", h=6)),
    dict(causal=True, window_size=(4, -1), softcap=2.0),
    dict(window_size=(1, 3), softcap=2.0, alibi_slopes=alibi("heads", h=6)),
])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.3])
@pytest.mark.parametrize("hk", [3, 1])
def test_features_with_any_scale(kwargs, scale, hk):
    q, k, v = make(2, 9, 5, 6, hk, 16, torch.float64, requires_grad=True)
    check_against_reference(q, k, v, softmax_scale=scale, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, window_size=(2, 0), alibi_slopes=alibi("batch")),
    dict(window_size=(-1, 1), softcap=3.0),
    dict(alibi_slopes=alibi("heads"), softcap=3.0),
])
def test_feature_chunking(monkeypatch, kwargs):
    # Chunks of 1 to 4 rows, with autograd recomputing each chunk in backward.
    q, k, v = make(2, 13, 6, 4, 2, 8, torch.float64, requires_grad=True)
    kwargs = {"causal": False, **kwargs}
    whole = sdpa_attention(q, k, v, return_lse=True, **kwargs)
    monkeypatch.setattr(fallback, "ATTN_CHUNK_ROWS", 4)
    monkeypatch.setattr(fallback, "LSE_CHUNK_ROWS", 3)
    check_against_reference(q, k, v, **kwargs)
    monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", 1)  # budget forces one row per chunk
    chunked = sdpa_attention(q, k, v, return_lse=True, **kwargs)
    for w, c in zip(whole, chunked, strict=True):
        torch.testing.assert_close(c, w, rtol=1e-12, atol=1e-12)


def test_row_chunks():
    assert fallback._row_chunks(3, 10, 4, 1 << 20, 2, 2, 8) == [range(3, 7), range(7, 10)]
    assert fallback._row_chunks(0, 10, 1024, 100, 1, 2, 10) == [range(0, 5), range(5, 10)]
    assert fallback._row_chunks(0, 2, 1024, 1, 4, 4, 4) == [range(0, 1), range(1, 2)]


@pytest.mark.parametrize("window,softcap,with_alibi,path", [
    ((-1, -1), 0.0, False, "plain"),
    ((-1, 0), 0.0, False, "plain"),  # causal
    ((3, 0), 0.0, False, "masked"),
    ((-1, 4), 0.0, False, "masked"),
    ((0, -1), 0.0, False, "masked"),
    ((-1, -1), 0.0, True, "masked"),
    ((-1, -1), 1.0, False, "explicit"),
    ((2, 0), 1.0, True, "explicit"),
])
def test_choose_path(window, softcap, with_alibi, path):
    assert fallback.choose_path(window, softcap, torch.ones(2) if with_alibi else None) == path


def test_first_row_with_key_matches_mask():
    sides = (-1, 0, 1, 3, 10)
    for nq, nk, left, right in itertools.product(range(1, 9), range(1, 9), sides, sides):
        has_key = allowed_mask(nq, nk, (left, right), "cpu").any(dim=-1)
        first = fallback.first_row_with_key(nq, nk, (left, right))
        assert not has_key[:first].any() and has_key[first:].all(), (nq, nk, left, right)


def test_strided_slopes_and_half_inputs():
    q, k, v = make(2, 6, 9, 4, 4, 8, torch.float16)
    slopes = torch.rand(4, 2)[:, 0].expand(2, 4)  # stride (0, 2)
    out, lse = sdpa_attention(q, k, v, causal=True, window_size=(3, 1), alibi_slopes=slopes, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=True, window_size=(3, 1), alibi_slopes=slopes.contiguous())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [(0, 5, 5, 4, 2), (2, 0, 5, 4, 2), (2, 5, 0, 4, 2), (2, 5, 5, 0, 0)])
def test_empty_with_features(dims):
    b, nq, nk, h, hk = dims
    q, k, v = make(b, nq, nk, h, hk, 8, torch.float32, requires_grad=True)
    out, lse = sdpa_attention(q, k, v, causal=False, window_size=(1, 1), softcap=2.0,
                              alibi_slopes=torch.ones(b, h), return_lse=True)
    assert out.shape == q.shape and out.eq(0).all() and lse.shape == (b, h, nq) and lse.eq(math.inf).all()
    out.sum().backward()
    assert q.grad is not None and q.grad.eq(0).all()


@pytest.mark.parametrize("kwargs", [dict(window_size=(5, 0)), dict(window_size=(-1, 2), alibi_slopes=alibi("heads")),
                                    dict(causal=True, softcap=4.0)])
def test_no_nan_gradients_with_features_low_precision(kwargs):
    q, k, v = make(2, 40, 3, 4, 2, 64, torch.bfloat16, requires_grad=True)
    out, lse = sdpa_attention(q, k, v, return_lse=True, **{"causal": False, **kwargs})
    assert out[:, :37 - kwargs.get("window_size", (0, 0))[1]].eq(0).all()  # rows that see no key
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_half_precision_alibi_is_as_exact_as_rounding():
    # bf16 inputs: out is the float64 result rounded to bf16, within about a unit in the last place (2**-7 relative);
    # a bias rounded to bf16 (distances up to 1023, slopes 2**-4 and 2**-6) would put it several units off.
    q, k, v = make(1, 1024, 1024, 2, 2, 16, torch.bfloat16)
    slopes = torch.tensor([2**-4, 2**-6])
    out, _ = sdpa_attention(q, k, v, causal=False, softmax_scale=1.0, alibi_slopes=slopes)
    ref, _ = attention_reference(q, k, v, softmax_scale=1.0, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-3)
