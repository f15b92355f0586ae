"""fa2rt.attention_varlen on a real NVIDIA GPU: the varlen kernel images (sm90 natively, sm80/sm89 through their PTX)
against the float64 reference applied per sequence.

Forward: each sequence of the packed output is checked by gpu_helpers.check_attention on its own (the error bound of
the dense suite: twice a low-precision yardstick's error against float64, plus a floor), on NaN-poisoned memory.
Backward: dq, dk, dv against float64 autograd of the per-sequence reference, bound by twice the error of PyTorch's
own low-precision SDPA run per sequence (fa2rt's varlen fallback), plus a floor. Also: bitwise-repeatable gradients,
torch.compile(fullgraph=True) with backward, CUDA graph capture of a forward, malformed cu_seqlens (no fault; an
error with FA2RT_CHECK_INDICES=1), explain() naming the varlen images, a padded batch through
fa2rt.flash_attn.bert_padding and the kernels, and its helpers' unchecked indices clamped (no fault).
"""

import warnings

import pytest
import torch
from gpu_helpers import (
    DEVICE,
    PATH_IDS,
    PATHS,
    alibi_slopes,
    check_attention,
    poison_allocator,
    rel_err,
    seed_of,
    use_path,
)

import fa2rt
from fa2rt import config
from fa2rt.fallback import sdpa_varlen_attention
from fa2rt.reference import attention_reference, attention_reference_varlen

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

BF16, FP16 = torch.bfloat16, torch.float16
ABS_FLOOR = 1e-4
TANH_REL_ERR = 2.0**-11
MIXED = (300, 0, 1, 129, 64, 17)  # lengths with an empty and a one-token sequence, block edges +-1
MIXED_K = (257, 5, 1, 129, 0, 400)  # seqlen_k != seqlen_q per sequence, a sequence without keys


def cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32, device=DEVICE).cumsum(0, dtype=torch.int32)


def packed(lens_q, lens_k, h, hk, d, dtype, seed, strided=False):
    g = torch.Generator(DEVICE).manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    if strided and tq == tk and h == hk:
        # One packed (total, 3, nheads, headdim) qkv tensor, read through views (as flash-attn's qkvpacked call).
        qkv = torch.randn(tq, 3, h, d, device=DEVICE, generator=g).to(dtype)
        q, k, v = qkv.unbind(1)
    else:
        q = torch.randn(tq, h, d, device=DEVICE, generator=g).to(dtype)
        k, v = (torch.randn(tk, hk, d, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    return q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k)


CASES = {
    # name: (lens_q, lens_k, nheads, nheads_k, head_dim, dtype, options, alibi kind, strided)
    "plain": (MIXED, MIXED_K, 4, 4, 64, BF16, {}, None, False),
    "causal_gqa": (MIXED, MIXED_K, 8, 2, 128, BF16, {"causal": True}, None, False),
    "causal_mqa_fp16": (MIXED, MIXED, 4, 1, 64, FP16, {"causal": True}, None, False),
    "window": (MIXED, MIXED_K, 4, 2, 64, BF16, {"window_size": (33, 7)}, None, False),
    "softcap": (MIXED, MIXED_K, 4, 4, 96, BF16, {"softcap": 20.0}, None, False),
    "alibi_bh_causal": (MIXED, MIXED_K, 4, 2, 128, BF16, {"causal": True}, "bh", False),
    "alibi_h": (MIXED, MIXED, 4, 4, 40, FP16, {}, "h", False),
    "strided_qkv_causal": (MIXED, MIXED, 4, 4, 64, BF16, {"causal": True}, None, True),
    "d256": ((77, 200), (130, 33), 2, 1, 256, BF16, {"causal": True}, None, False),
}
SUBSET = ("plain", "causal_gqa", "alibi_bh_causal", "strided_qkv_causal")  # through sm80/sm89 PTX


def make_case(name, seed):
    lens_q, lens_k, h, hk, d, dtype, opts, alibi, strided = CASES[name]
    q, k, v, cq, ck, mq, mk = packed(lens_q, lens_k, h, hk, d, dtype, seed, strided)
    opts = dict(opts)
    if alibi:
        opts["alibi_slopes"] = alibi_slopes(alibi, len(lens_q), h)
    return q, k, v, cq, ck, mq, mk, opts


def per_sequence(cq, ck):
    bq, bk = cq.tolist(), ck.tolist()
    return [(b, slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])) for b in range(len(bq) - 1)]


def _cases_and_paths():
    out = []
    for path, path_id in zip(PATHS, PATH_IDS, strict=True):
        for name in CASES:
            if path[0] == "" or name in SUBSET:
                out.append(pytest.param(path, name, id=f"{path_id}-{name}"))
    return out


@pytest.mark.parametrize("path, name", _cases_and_paths())
def test_forward_matches_reference_per_sequence(path, name, monkeypatch):
    forced, arch, mode = path
    use_path(monkeypatch, forced)
    q, k, v, cq, ck, mq, mk, opts = make_case(name, seed_of("varlen-fwd", name))
    decision = fa2rt.explain(q, k, v, cq, ck, mq, mk, **opts)
    assert decision.path == "kernel" and "-varlen-" in decision.image and f"-{arch}-" in decision.image, decision
    assert decision.mode == mode, decision
    poison_allocator()
    out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, **opts)
    torch.cuda.synchronize()
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    slopes = opts.pop("alibi_slopes", None)
    for b, rows_q, rows_k in per_sequence(cq, ck):
        seq_opts = dict(opts)
        if slopes is not None:
            seq_opts["alibi_slopes"] = slopes[b] if slopes.dim() == 2 else slopes
        if rows_q.stop == rows_q.start:
            continue
        if rows_k.stop == rows_k.start:  # no keys: every row 0, LSE +inf
            assert (out[rows_q] == 0).all() and torch.isposinf(lse[:, rows_q]).all()
            continue
        check_attention(out[None, rows_q], lse[None, :, rows_q], q[None, rows_q], k[None, rows_k], v[None, rows_k],
                        **seq_opts)


def _grads(fn, q, k, v, dout, *args, **opts):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, *args, **opts)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, (q, k, v), dout)


def _sdpa_varlen(q, k, v, cq, ck, **opts):
    opts = dict(opts)
    return sdpa_varlen_attention(q, k, v, cq, ck, causal=opts.pop("causal", False), **opts)[0]


@pytest.mark.parametrize("path, name", _cases_and_paths())
def test_backward_matches_reference(path, name, monkeypatch):
    forced, arch, _ = path
    use_path(monkeypatch, forced)
    q, k, v, cq, ck, mq, mk, opts = make_case(name, seed_of("varlen-bwd", name))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    decision = fa2rt.explain(*leaves, cq, ck, mq, mk, **opts)
    assert len(decision.backward) == 2 and all(f"-{arch}-" in img and "-varlen-" in img
                                               for img, _ in decision.backward), decision
    dout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(7)).to(q.dtype)
    poison_allocator()
    got = _grads(fa2rt.attention_varlen, q, k, v, dout, cq, ck, mq, mk, **opts)
    ref = _grads(attention_reference_varlen, q.double(), k.double(), v.double(), dout.double(), cq, ck, **opts)
    # Yardsticks as in test_backward_gpu: SDPA per sequence on the case (written out in float32 for softcap and
    # ALiBi, hence nearly exact there) and on the plain causal-or-not problem (SDPA's own half-precision kernels).
    plain = {"causal": opts.get("causal", False)}
    yard = _grads(_sdpa_varlen, q, k, v, dout, cq, ck, **opts)
    yard_plain = _grads(_sdpa_varlen, q, k, v, dout, cq, ck, **plain)
    ref_plain = _grads(attention_reference_varlen, q.double(), k.double(), v.double(), dout.double(), cq, ck, **plain)
    softcap = float(opts.get("softcap") or 0.0)
    for i, name_ in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == q.dtype and got[i].shape == (q, k, v)[i].shape
        assert torch.isfinite(got[i]).all(), f"{name_}: non-finite gradient"
        yardstick = max(rel_err(yard[i], ref[i]), rel_err(yard_plain[i], ref_plain[i]))
        bound = 2 * yardstick + ABS_FLOOR + 2 * TANH_REL_ERR * softcap
        err = rel_err(got[i], ref[i])
        assert err <= bound, {"grad": name_, "err": err, "bound": bound}


@pytest.mark.parametrize("name", ["plain", "causal_gqa", "window", "softcap", "alibi_bh_causal", "strided_qkv_causal"])
def test_attention_varlen_backward_equals_autograd(name):
    # The backward kernels from the forward's out and lse (what the SDPA registry's varlen backward calls): the
    # gradients autograd gives through attention_varlen, bitwise, with no fallback.
    q, k, v, cq, ck, mq, mk, opts = make_case(name, seed_of("varlen-bwd-call", name))
    dout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(9)).to(q.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fa2rt.attention_varlen(*leaves, cq, ck, mq, mk, return_lse=True, **opts)
    expected = torch.autograd.grad(out, leaves, dout)
    poison_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa2rt.FallbackWarning)
        got = fa2rt.attention_varlen_backward(dout, q, k, v, out.detach(), lse, cq, ck, mq, mk, **opts)
    for grad, g, e in zip(("dq", "dk", "dv"), got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e), grad


def test_gradients_are_bitwise_repeatable():
    q, k, v, cq, ck, mq, mk, opts = make_case("causal_gqa", 11)
    dout = torch.randn_like(q)
    first = _grads(fa2rt.attention_varlen, q, k, v, dout, cq, ck, mq, mk, **opts)
    for _ in range(3):
        again = _grads(fa2rt.attention_varlen, q, k, v, dout, cq, ck, mq, mk, **opts)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_torch_compile_fullgraph_with_backward():
    q, k, v, cq, ck, mq, mk, opts = make_case("causal_gqa", 12)

    @torch.compile(fullgraph=True)
    def step(q, k, v):
        return fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True).float().square().sum()

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    step(*leaves).backward()
    eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fa2rt.attention_varlen(*eager, cq, ck, mq, mk, causal=True).float().square().sum().backward()
    for a, b in zip(leaves, eager, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_cuda_graph_capture_of_a_forward():
    q, k, v, cq, ck, mq, mk, opts = make_case("causal_gqa", 13)
    out = torch.empty_like(q)
    fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, out=out)  # warm-up: selection, module load
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, out=out)
    expected = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


MALFORMED = {
    "decreasing": ([0, 300, 100, 700], 300),
    "past_total": ([0, 100, 5000, 1 << 30], 700),
    "negative": ([-50, 100, -3, 700], 700),
    "longer_than_max": ([0, 700, 700, 700], 64),
}


@pytest.mark.parametrize("which", MALFORMED)
def test_malformed_cu_seqlens_do_not_fault(which, monkeypatch):
    monkeypatch.delenv(config.CHECK_INDICES, raising=False)
    bounds, max_len = MALFORMED[which]
    g = torch.Generator(DEVICE).manual_seed(3)
    q, k, v = (torch.randn(700, 4, 64, device=DEVICE, generator=g).to(BF16).requires_grad_() for _ in range(3))
    bad = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    assert fa2rt.explain(q, k, v, bad, bad, max_len, max_len, causal=True).path == "kernel"
    out = fa2rt.attention_varlen(q, k, v, bad, bad, max_len, max_len, causal=True)
    out.float().sum().backward()
    torch.cuda.synchronize()  # a fault would surface here (and fail every later test)
    monkeypatch.setenv(config.CHECK_INDICES, "1")
    with pytest.raises(ValueError, match="cu_seqlens_q: expected|max_seqlen_q: expected"):
        fa2rt.attention_varlen(q, k, v, bad, bad, max_len, max_len, causal=True)


def test_fp32_falls_back_with_the_same_semantics(fresh_announcements):
    q, k, v, cq, ck, mq, mk, opts = make_case("causal_gqa", 14)
    q, k, v = (t.float() for t in (q, k, v))
    assert fa2rt.explain(q, k, v, cq, ck, mq, mk, **opts).reason == "dtype"
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[dtype\]"):
        out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, **opts)
    ref, ref_lse = attention_reference_varlen(q, k, v, cq, ck, **opts)
    assert rel_err(out, ref) < 1e-4 and lse.shape == ref_lse.shape


def test_padded_batch_through_bert_padding_and_the_kernels():
    # flash-attn's BERT-style flow (fa2rt.flash_attn.bert_padding): unpad, varlen kernels, pad back; each sequence
    # against the float64 reference alone, padding rows zero, and gradients only where tokens are.
    from fa2rt.flash_attn import bert_padding as bp

    lengths, seqlen, h, d = [700, 0, 1, 1024, 333], 1024, 8, 128
    mask = (torch.arange(seqlen) < torch.tensor(lengths)[:, None]).to(DEVICE)
    g = torch.Generator(DEVICE).manual_seed(seed_of("bert_padding"))
    q, k, v = (torch.randn(len(lengths), seqlen, h, d, device=DEVICE, generator=g).to(BF16).requires_grad_()
               for _ in range(3))
    q_u, indices, cu_seqlens, longest, _ = bp.unpad_input(q, mask)
    k_u, v_u = (bp.unpad_input(t, mask)[0] for t in (k, v))
    assert fa2rt.explain(q_u, k_u, v_u, cu_seqlens, cu_seqlens, longest, longest, causal=True).path == "kernel"
    out = bp.pad_input(fa2rt.attention_varlen(q_u, k_u, v_u, cu_seqlens, cu_seqlens, longest, longest, causal=True),
                       indices, len(lengths), seqlen)
    out.float().sum().backward()
    for b, n in enumerate(lengths):
        assert out[b, n:].eq(0).all() and all(t.grad[b, n:].eq(0).all() for t in (q, k, v))
        if n:
            ref, _ = attention_reference(*(t[b:b + 1, :n].detach() for t in (q, k, v)), causal=True)
            assert rel_err(out[b:b + 1, :n], ref) < 2e-2


def test_unchecked_padding_indices_do_not_fault(monkeypatch):
    from fa2rt.flash_attn import bert_padding as bp

    monkeypatch.delenv(config.CHECK_INDICES, raising=False)
    rows = torch.randn(3, 8, 64, device=DEVICE)
    bad = torch.tensor([-5, 2, 10**9], device=DEVICE)
    picked = bp.index_first_axis(rows, bad)
    put = bp.pad_input(rows, bad, 2, 4)
    torch.cuda.synchronize()  # a fault would surface here
    assert torch.equal(picked, rows[[0, 2, 2]]) and put.shape == (2, 4, 8, 64)
    monkeypatch.setenv(config.CHECK_INDICES, "1")
    with pytest.raises(IndexError, match=r"indices\[0\]: expected a row in \[0, 3\), got -5"):
        bp.index_first_axis(rows, bad)
