"""Gradients on a real AMD GPU (the gfx90a/gfx942 bwd_dq and bwd_dkdv images), through the dispatcher, against
float64 autograd of fa2rt.reference. Not yet run: no AMD GPU has been available.

Bound per gradient (relative Frobenius error against float64): twice the error of PyTorch's own SDPA in the same
dtype on the same inputs, plus a small floor; softcap adds the tanh's error. Also: gradients bitwise repeatable.
"""

import pytest
import torch

import fa2rt
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

DEVICE = torch.device("cuda", 0)  # torch's ROCm build exposes HIP devices as "cuda"
ABS_FLOOR = 1e-4
TANH_REL_ERR = 2.0**-11
# (batch, seqlen_q, seqlen_k, nheads, nheads_k): ragged, GQA/MQA, both seqlen orders (rows that see no key under
# causal when seqlen_q > seqlen_k).
SHAPES = [(2, 257, 257, 4, 4), (1, 300, 257, 4, 2), (1, 200, 333, 4, 1)]
# Head dims: each backward bucket exactly (64, 128, 256) and one below the smallest (the d64 masked-tail images).
HEAD_DIMS = [32, 64, 128, 256]
FEATURES = {
    "window": {"window_size": (37, 5)},
    "softcap": {"softcap": 2.5},
    "alibi": {"alibi_slopes": "heads"},
}


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _grads(fn, q, k, v, dout, **opts):
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(*leaves, **opts)
    return torch.autograd.grad(out, leaves, dout)


def _reference(q, k, v, **opts):
    return attention_reference(q.double(), k.double(), v.double(), **opts)[0]


def _sdpa(q, k, v, **opts):
    opts = dict(opts)
    return sdpa_attention(q, k, v, causal=opts.pop("causal", False), **opts)[0]


def _inputs(shape, head_dim, dtype, seed):
    b, nq, nk, h, hk = shape
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randn(b, nq, h, head_dim, device=DEVICE, dtype=dtype, generator=g)
    k, v = (torch.randn(b, nk, hk, head_dim, device=DEVICE, dtype=dtype, generator=g) for _ in range(2))
    dout = torch.randn(b, nq, h, head_dim, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, dout


def check_grads(q, k, v, dout, **opts):
    decision = fa2rt.explain(*(t.detach().requires_grad_() for t in (q, k, v)), **opts)
    assert decision.path == "kernel" and decision.mode == "native", decision
    assert len(decision.backward) == 2 and all(mode == "native" for _, mode in decision.backward), decision
    got = _grads(fa2rt.attention, q, k, v, dout, **opts)
    ref = _grads(_reference, q.double(), k.double(), v.double(), dout.double(), **opts)
    yard = _grads(_sdpa, q, k, v, dout, **opts)
    softcap = float(opts.get("softcap") or 0.0)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == q.dtype and got[i].shape == (q, k, v)[i].shape, name
        assert torch.isfinite(got[i]).all(), f"{name}: non-finite gradient"
        bound = 2 * rel_err(yard[i], ref[i]) + ABS_FLOOR + 2 * TANH_REL_ERR * softcap
        err = rel_err(got[i], ref[i])
        assert err <= bound, {"grad": name, "err": err, "bound": bound}
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_backward_matches_reference(dtype, head_dim, causal, shape):
    q, k, v, dout = _inputs(shape, head_dim, dtype, seed=head_dim + 7 * causal)
    check_grads(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_features(feature, head_dim):
    q, k, v, dout = _inputs((2, 200, 260, 8, 2), head_dim, torch.bfloat16, seed=head_dim)
    opts = dict(FEATURES[feature], causal=True)
    if opts.get("alibi_slopes") == "heads":
        opts["alibi_slopes"] = torch.linspace(0.05, 0.5, q.shape[2], device=DEVICE, dtype=torch.float32)
    check_grads(q, k, v, dout, **opts)


def test_backward_is_bitwise_repeatable():
    q, k, v, dout = _inputs((2, 300, 300, 8, 2), 128, torch.bfloat16, seed=3)
    first = _grads(fa2rt.attention, q, k, v, dout, causal=True)
    again = _grads(fa2rt.attention, q, k, v, dout, causal=True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
