"""The float64 reference on tiny cases that can be checked by hand: windows, softcap, alibi, rows with no key."""

import itertools
import math

import pytest
import torch

from fa2rt.reference import alibi_bias, allowed_mask, attention_reference, fold_causal, relative_position


def make(b, nq, nk, h, hk, d, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(b, n, heads, d, generator=g, dtype=torch.float64) for n, heads in ((nq, h), (nk, hk), (nk, hk))]
    return [t.requires_grad_(requires_grad) for t in ts]


def slopes(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) + 0.1


def naive(q, k, v, *, scale, window, softcap=0.0, slope=None):
    """Attention written as loops over Python floats, straight from the definition (window already effective)."""
    batch, nq, nheads, d = q.shape
    nk, group = k.shape[1], nheads // k.shape[2]
    left, right = window
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, nheads, nq), math.inf, dtype=torch.float64)
    for b, h, i in itertools.product(range(batch), range(nheads), range(nq)):
        diag = i + nk - nq
        keys = [j for j in range(nk) if (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right)]
        if not keys:
            continue
        scores = []
        for j in keys:
            s = scale * sum(q[b, i, h, c].item() * k[b, j, h // group, c].item() for c in range(d))
            s = softcap * math.tanh(s / softcap) if softcap > 0 else s
            scores.append(s - (slope(b, h) * abs(diag - j) if slope else 0.0))
        z = sum(math.exp(s) for s in scores)
        lse[b, h, i] = math.log(z)
        for c in range(d):
            out[b, i, h, c] = sum(math.exp(s) / z * v[b, j, h // group, c].item() for s, j in zip(scores, keys,
                                                                                                    strict=True))
    return out, lse


@pytest.mark.parametrize("window", [(-1, -1), (1, 0), (0, 2), (2, 1), (-1, 1), (0, 0)])
@pytest.mark.parametrize("nq,nk", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("softcap", [0.0, 0.8])
@pytest.mark.parametrize("alibi", [None, "heads", "batch"])
def test_matches_loops(window, nq, nk, softcap, alibi):
    # GQA (2 query heads on 1 kv head), every feature, rows with no key when nq > nk and right >= 0.
    q, k, v = make(2, nq, nk, 2, 1, 3, seed=nq * 10 + nk)
    s = {None: None, "heads": slopes(2), "batch": slopes(2, 2)}[alibi]
    slope = None if s is None else (lambda b, h: s[h].item()) if s.dim() == 1 else (lambda b, h: s[b, h].item())
    out, lse = attention_reference(q, k, v, softmax_scale=0.9, window_size=window, softcap=softcap,
                                   alibi_slopes=s)
    want_out, want_lse = naive(q, k, v, scale=0.9, window=window, softcap=softcap, slope=slope)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,hk", [(2, 2), (4, 2), (3, 1)])
def test_window_zero_is_value_of_diagonal_key(h, hk):
    # With window (0, 0) and seqlen_q == seqlen_k, row i sees key i alone: out is v's row, lse its score.
    q, k, v = make(2, 6, 6, h, hk, 4)
    out, lse = attention_reference(q, k, v, window_size=(0, 0), softmax_scale=0.5)
    kv_head = torch.arange(h) // (h // hk)
    torch.testing.assert_close(out, v[:, :, kv_head], rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, 0.5 * (q * k[:, :, kv_head]).sum(-1).transpose(1, 2), rtol=1e-14, atol=1e-14)


def test_causal_is_window_right_zero():
    q, k, v = make(1, 5, 8, 2, 2, 4)
    for left in (-1, 0, 3):
        for right in (-1, 0, 2, 9):
            got = attention_reference(q, k, v, causal=True, window_size=(left, right))
            want = attention_reference(q, k, v, window_size=(left, 0))
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
    plain = attention_reference(q, k, v, causal=True)
    assert all(torch.equal(g, w) for g, w in zip(plain, attention_reference(q, k, v, window_size=(-1, 0)),
                                                  strict=True))


def test_large_softcap_is_no_softcap():
    q, k, v = make(2, 4, 6, 2, 1, 8)
    capped = attention_reference(q, k, v, softcap=1e7)
    plain = attention_reference(q, k, v)
    for c, p in zip(capped, plain, strict=True):
        torch.testing.assert_close(c, p, rtol=1e-10, atol=1e-10)


def test_softcap_bounds_scores():
    # Huge scores saturate at +-softcap: the weights are those of scores in [-2, 2] whatever the scale.
    q, k, v = make(1, 3, 4, 1, 1, 4)
    _, lse = attention_reference(q, k, v, softmax_scale=1e6, softcap=2.0)
    assert (lse <= 2.0 + math.log(4)).all() and (lse >= -2.0).all()


def test_zero_slopes_are_no_alibi():
    q, k, v = make(2, 5, 7, 4, 2, 8)
    for zero in (torch.zeros(4), torch.zeros(2, 4)):
        got = attention_reference(q, k, v, causal=True, alibi_slopes=zero)
        want = attention_reference(q, k, v, causal=True)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_alibi_bias_by_hand():
    # seqlen_q 2, seqlen_k 3: rows are aligned to keys 1 and 2.
    s = torch.tensor([0.5, 2.0])
    bias = alibi_bias(s, 2, 3, torch.float64)
    dist = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    assert bias.shape == (1, 2, 2, 3)
    assert torch.equal(bias[0, 0], -0.5 * dist) and torch.equal(bias[0, 1], -2.0 * dist)
    per_batch = alibi_bias(torch.stack([s, 2 * s]), 2, 3, torch.float64)
    assert per_batch.shape == (2, 2, 2, 3) and torch.equal(per_batch[1], 2 * bias[0])
    assert torch.equal(alibi_bias(s, 2, 3, torch.float64, rows=range(1, 2)), bias[:, :, 1:])


def test_alibi_matches_hand_built_bias():
    # The same scores with the bias added by hand before a plain softmax.
    q, k, v = make(2, 3, 5, 2, 2, 4)
    s = slopes(2, 2)
    out, lse = attention_reference(q, k, v, alibi_slopes=s, softmax_scale=0.3)
    dist = (torch.arange(5)[None, :] - (torch.arange(3)[:, None] + 2)).abs().double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3 - s.double()[:, :, None, None] * dist
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-12, atol=1e-12)
    one_d = attention_reference(q, k, v, alibi_slopes=s[0], softmax_scale=0.3)
    two_d = attention_reference(q, k, v, alibi_slopes=s[0].expand(2, 2), softmax_scale=0.3)
    assert all(torch.equal(a, b) for a, b in zip(one_d, two_d, strict=True))


@pytest.mark.parametrize("kwargs,empty_rows", [
    (dict(causal=True), 3),  # seqlen_q 6 > seqlen_k 3: rows 0..2 are above the first key
    (dict(window_size=(-1, 1)), 2),
    (dict(window_size=(4, 0), softcap=3.0, alibi_slopes=slopes(2)), 3),
    (dict(window_size=(0, 2)), 1),
])
def test_rows_with_no_key(kwargs, empty_rows):
    q, k, v = make(2, 6, 3, 2, 1, 4, requires_grad=True)
    out, lse = attention_reference(q, k, v, **kwargs)
    assert out[:, :empty_rows].eq(0).all() and lse[..., :empty_rows].eq(math.inf).all()
    assert out[:, empty_rows:].ne(0).all() and lse[..., empty_rows:].isfinite().all()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][:, :empty_rows].eq(0).all()


def test_no_keys_at_all():
    q, k, v = make(1, 3, 0, 2, 2, 4)
    out, lse = attention_reference(q, k, v, window_size=(1, 1), alibi_slopes=slopes(2))
    assert out.eq(0).all() and lse.eq(math.inf).all()


def test_allowed_mask_by_hand():
    # seqlen_q 3, seqlen_k 4 (shift 1): row i is aligned to key i + 1.
    got = allowed_mask(3, 4, (1, 0), "cpu")
    assert got.tolist() == [[True, True, False, False], [False, True, True, False], [False, False, True, True]]
    assert allowed_mask(3, 4, (-1, -1), "cpu").all()
    assert allowed_mask(3, 4, (0, 0), "cpu").sum(-1).tolist() == [1, 1, 1]
    assert relative_position(3, 4, "cpu")[0].tolist() == [-1, 0, 1, 2]


@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (2, 1), (-1, 3), (5, -1)])
def test_allowed_mask_rows_and_huge_windows(window):
    full = allowed_mask(7, 5, window, "cpu")
    assert torch.equal(allowed_mask(7, 5, window, "cpu", rows=range(2, 6)), full[2:6])
    # A bound far beyond any distance is the same as unlimited, even past int64.
    huge = tuple(2**70 if side >= 0 else side for side in window)
    assert allowed_mask(7, 5, huge, "cpu").all()


def test_fold_causal():
    assert fold_causal((3, 5), True) == (3, 0) and fold_causal((3, 5), False) == (3, 5)
    assert fold_causal([-1, -1], True) == (-1, 0)
