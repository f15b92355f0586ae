"""The routing table on a real NVIDIA GPU: every SDPA backend a call can be routed to computes fa2rt's semantics
(output and gradients against float64, with a gradient laid out unlike the output as callers hand it), a routed call
runs exactly that backend, and the installed table's routed classes are routed.

Error bound: a routed backend's relative error against the float64 reference is at most twice fa2rt's own kernel's
on the same inputs, plus a small floor (both are FA2-style half-precision attention)."""

import pytest
import torch
from gpu_helpers import DEVICE, make, rel_err, seed_of

import fa2rt
from fa2rt import config, devices, policy, routing
from fa2rt.reference import attention_reference

ABS_FLOOR = 2e-3
ARCH = devices.probe("cuda", 0).arch
# (batch, seqlen, nheads, nheads_k, head_dim, causal)
CASES = [(2, 256, 8, 8, 64, False), (2, 256, 8, 8, 128, True), (1, 512, 8, 2, 128, True), (2, 192, 4, 4, 256, True)]


def _leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def _dout(shape, seed):
    # (batch, nheads, seqlen, headdim) memory seen as (batch, seqlen, nheads, headdim): strides unlike the output's.
    b, s, h, d = shape
    g = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(b, h, s, d, device=DEVICE, generator=g).to(torch.bfloat16).transpose(1, 2)


def _run(fn, q, k, v, dout):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("provider", routing.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}s{}h{}-{}d{}{}".format(*c[:5], "c" if c[5] else ""))
def test_backend_matches_reference(provider, case, monkeypatch):
    monkeypatch.setenv(config.ROUTING, "0")
    b, s, h, hk, d, causal = case
    q, k, v = make((b, s, s, h, hk), d, torch.bfloat16, seed_of(provider, case))
    if not routing._takes(provider, q, k, v):
        pytest.skip(f"torch {torch.__version__} does not run {provider} on this case")
    dout = _dout(q.shape, seed_of(provider, case, "dout"))
    scale = d**-0.5
    routed = _run(lambda q, k, v: routing.run(provider, q, k, v, causal=causal, softmax_scale=scale), q, k, v, dout)
    own = _run(lambda q, k, v: fa2rt.attention(q, k, v, causal=causal), q, k, v, dout)
    q64, k64, v64 = _leaves(*(t.double() for t in (q, k, v)))
    ref = attention_reference(q64, k64, v64, causal=causal)[0]
    refs = (ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double()))
    assert routed[0].is_contiguous() and routed[0].shape == q.shape
    for name, x, mine, r in zip(("out", "dq", "dk", "dv"), routed, own, refs, strict=True):
        bound = 2 * rel_err(mine, r) + ABS_FLOOR
        assert rel_err(x, r) <= bound, (provider, name, rel_err(x, r), bound)


def test_routed_call_runs_the_tabled_backend(monkeypatch):
    """A class put in the table is routed: explain names the backend, and the call's result is that backend's."""
    monkeypatch.delenv(config.ROUTING, raising=False)
    q, k, v = make((2, 512, 512, 8, 8), 128, torch.bfloat16, seed_of("routed"))
    provider = next((p for p in routing.PROVIDERS if routing._takes(p, q, k, v)), None)
    assert provider, "no SDPA backend takes a plain bf16 d128 problem"
    entry = {"class": {"pass": "fwd", "dtype": "bf16", "head_dim": 128, "causal": True, "group": 1, "seqlen_lo": 512},
             "winner": provider, "lead": 1.5, "noise": 0.01, "ms": {"fa2rt": 1.5, provider: 1.0},
             "shape": {"batch": 2, "nheads": 8, "nheads_k": 8, "seqlen": 512}}
    index = routing._index({"measured": {"device": torch.cuda.get_device_name()}, "classes": [entry]})
    monkeypatch.setattr(routing, "table", lambda arch: index)
    policy._ROUTE_CACHE.clear()
    try:
        d = fa2rt.explain(q, k, v, causal=True)
        assert d.path == "routed" and d.provider == provider, str(d)
        got = fa2rt.attention(q, k, v, causal=True)
        assert torch.equal(got, routing.run(provider, q, k, v, causal=True, softmax_scale=128**-0.5))
        assert fa2rt.explain(q, k, v, causal=True, return_lse=True).path == "kernel"
        monkeypatch.setenv(config.ROUTING, "0")
        assert fa2rt.explain(q, k, v, causal=True).path == "kernel"
    finally:
        policy._ROUTE_CACHE.clear()


def test_installed_table_routes_its_classes(monkeypatch):
    """Every class the committed table routes for this arch is routed when called at its measured shape."""
    monkeypatch.delenv(config.ROUTING, raising=False)
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    data = routing.table(ARCH)
    if data is None:
        pytest.skip(f"the routing table has no entry for {ARCH}")
    routed = [(key, e) for key, e in data["classes"].items() if routing.leads(e)]
    for (pass_name, dtype, head_dim, causal, _group, _lo), e in routed:
        shape = e["shape"]
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        q = torch.empty(1, shape["seqlen"], shape["nheads"], head_dim, device=DEVICE, dtype=dt)
        k = torch.empty(1, shape["seqlen"], shape["nheads_k"], head_dim, device=DEVICE, dtype=dt)
        q.requires_grad_(pass_name == "fwd+bwd")
        d = fa2rt.explain(q, k, k, causal=causal)
        assert d.path == "routed" and d.provider == e["winner"], (pass_name, dtype, head_dim, causal, str(d))
