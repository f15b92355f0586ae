"""The forward kernels on a real NVIDIA GPU, through the dispatcher, against a float64 reference.

Every image family runs: the device's native images, and the older archs' images forced through their PTX
(FA2RT_FORCE_ARCH), as a newer GPU would run them.
"""

import threading

import pytest
import torch
from gpu_helpers import DEVICE, PATH_IDS, PATHS, check_attention, make, poison_allocator, rel_err, seed_of, use_path

import fa2rt
from fa2rt import _C, ops
from fa2rt.reference import attention_reference

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

SHAPES = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k
    (2, 1024, 1024, 8, 8),
    (1, 257, 300, 4, 2),
    (1, 300, 257, 4, 1),
    (3, 1, 77, 2, 2),
    (1, 129, 1, 2, 1),
]


@pytest.mark.parametrize("forced, arch, mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_matches_reference(monkeypatch, forced, arch, mode, dtype, head_dim, causal, shape):
    use_path(monkeypatch, forced)
    q, k, v = make(shape, head_dim, dtype, seed=seed_of(shape, head_dim, causal))
    decision = fa2rt.explain(q, k, v, causal=causal)
    assert decision.path == "kernel", decision
    assert f"-{arch}-" in decision.image and decision.mode == mode
    poison_allocator()
    out, lse = fa2rt.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    # Same order as PyTorch's own half-precision attention against the same reference (see gpu_helpers).
    check_attention(out, lse, q, k, v, causal=causal)


def test_strided_views_of_packed_qkv():
    qkv = torch.randn(2, 513, 3, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert fa2rt.explain(q, k, v, causal=True).path == "kernel"
    out = fa2rt.attention(q, k, v, causal=True)
    ref, _ = attention_reference(q, k, v, causal=True)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_keys_broadcast_along_the_sequence(head_dim, causal):
    """K expanded from one row per head (sequence stride 0; the native images read it through TMA), V not: the
    output and dV against the float64 reference. (Every score of a row is then equal, so dQ and dK vanish exactly
    and are only checked to be finite.)"""
    q, k, v = make((2, 300, 513, 4, 2), head_dim, torch.bfloat16, 8)
    q, k_row, v = (t.requires_grad_() for t in (q, k[:, :1].clone(), v))
    k_all = k_row.expand(-1, 513, -1, -1)
    assert k_all.stride(1) == 0 and fa2rt.explain(q, k_all, v, causal=causal).path == "kernel"
    out, lse = fa2rt.attention(q, k_all, v, causal=causal, return_lse=True)
    check_attention(out.detach(), lse, q.detach(), k_all.detach(), v.detach(), causal=causal)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k_row, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k_row, v))
    ref = attention_reference(q64, k64.expand(-1, 513, -1, -1), v64, causal=causal)[0]
    (dv_ref,) = torch.autograd.grad(ref, (v64,), dout.double())
    assert rel_err(dv, dv_ref) < 2e-2 and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_misaligned_input_falls_back_with_reason(fresh_announcements):
    q, k, v = make((1, 128, 128, 2, 2), 64, torch.float16, 1)
    q_odd = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)[1:].view_as(q).copy_(q)
    d = fa2rt.explain(q_odd, k, v)
    assert d.reason == "no_kernel" and "aligned" in d.message
    with pytest.warns(fa2rt.FallbackWarning, match="no_kernel"):
        out = fa2rt.attention(q_odd, k, v)
    assert rel_err(out, attention_reference(q, k, v)[0]) < 5e-3


@pytest.mark.parametrize("dtype, reason", [(torch.float32, "dtype")])
def test_fp32_falls_back(fresh_announcements, dtype, reason):
    q, k, v = make((1, 64, 64, 2, 2), 64, dtype, 2)
    with pytest.warns(fa2rt.FallbackWarning, match=reason):
        fa2rt.attention(q, k, v)


def test_runs_on_the_current_stream():
    q, k, v = make((4, 2048, 2048, 8, 8), 128, torch.bfloat16, 3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fa2rt.attention(q, k, v)
    side.synchronize()
    assert rel_err(out, attention_reference(q, k, v)[0]) < 2e-2


def test_calls_on_two_streams_share_the_lse_sink():
    """Inference calls without return_lse write their LSE into one per-device sink (ops.LSE_SINK_FLOATS), on any
    stream at once: their outputs are those of the same calls returning their own LSE, bit for bit."""
    q, k, v = make((2, 1024, 1024, 8, 8), 128, torch.bfloat16, 6)
    q2, k2, v2 = make((2, 1024, 1024, 8, 8), 128, torch.bfloat16, 7)
    expected = [fa2rt.attention(*t, causal=True, return_lse=True)[0] for t in ((q, k, v), (q2, k2, v2))]
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [[], []]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(10):
        for i, (stream, inputs) in enumerate(zip(streams, ((q, k, v), (q2, k2, v2)), strict=True)):
            with torch.cuda.stream(stream):
                outs[i].append(fa2rt.attention(*inputs, causal=True))
    torch.cuda.synchronize()
    assert q.device in ops._lse_sinks  # the calls took the sink
    for out, ref in zip(outs, expected, strict=True):
        assert all(torch.equal(o, ref) for o in out)


def test_module_cache_loads_each_image_once():
    q, k, v = make((1, 256, 256, 2, 2), 64, torch.float16, 4)
    fa2rt.attention(q, k, v)
    before = _C.cached_kernel_count()
    for _ in range(3):
        fa2rt.attention(q, k, v)
    assert _C.cached_kernel_count() == before


def test_threads_share_the_dispatcher():
    q, k, v = make((2, 512, 512, 4, 4), 128, torch.float16, 5)
    ref = attention_reference(q, k, v, causal=True)[0]
    errors = []

    def worker():
        try:
            for _ in range(5):
                errors.append(rel_err(fa2rt.attention(q, k, v, causal=True), ref))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert len(errors) == 20 and all(isinstance(e, float) and e < 5e-3 for e in errors), errors


def test_torch_compile_traces_the_custom_op():
    q, k, v = make((2, 256, 256, 4, 4), 64, torch.bfloat16, 6)
    compiled = torch.compile(lambda q, k, v: fa2rt.attention(q, k, v, causal=True), fullgraph=True)
    assert rel_err(compiled(q, k, v), attention_reference(q, k, v, causal=True)[0]) < 2e-2


# Tile counts (row blocks of 128 x batch x heads) around the persistent walk's edges on a 132-SM H200: fewer tiles
# than programs, just under twice as many (units of one tile), and an odd count at least twice as many (units of
# two tiles, the last one short); with a causal band, a window, and seqlen_q != seqlen_k either way. Calls of at most
# 512 keys (1024 at d128) with a band take the short images (tiles.json "short"): the first three rows below.
WALKS = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, options
    (3, 300, 300, 5, 5, {"causal": True}),
    (33, 512, 512, 8, 8, {"causal": True}),  # 1056 tiles: 8 per SM exactly
    (4, 700, 450, 6, 2, {"causal": True}),  # rows that see no key
    (5, 1000, 1024, 9, 3, {"window_size": (300, 0)}),  # d128's short image, d64's banded one
    (1, 128 * 37, 128 * 37, 7, 1, {"causal": True}),
    (1, 128 * 39, 128 * 39, 7, 7, {"causal": True}),
    (1, 128 * 39 - 5, 4000, 7, 7, {"causal": True}),
    (2, 2500, 3000, 3, 1, {"window_size": (300, 0)}),
    (1, 128 * 39, 128 * 39, 7, 7, {}),
]


WALK_CASES = [(d, case) for d in (128, 64) for case in WALKS] + [(64, (2, 333, 517, 4, 2, {}))]


@pytest.mark.parametrize("head_dim, case", WALK_CASES, ids=[f"d{d}-{b}x{nq}x{nk}x{h}x{hk}-{'+'.join(o) or 'full'}"
                                                            for d, (b, nq, nk, h, hk, o) in WALK_CASES])
def test_warp_specialised_walks_match_reference(head_dim, case):
    """The sm90 Gluon images' tile walks cover every tile once (as the reference sees them)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialised images are sm90's")
    b, nq, nk, h, hk, opts = case
    q, k, v = make((b, nq, nk, h, hk), head_dim, torch.bfloat16,
                   seed=seed_of((b, nq, nk, h, hk), head_dim, bool(opts)))
    decision = fa2rt.explain(q, k, v, **opts)
    assert decision.path == "kernel" and "-ws-persistent-" in decision.image, decision
    poison_allocator()
    out, lse = fa2rt.attention(q, k, v, return_lse=True, **opts)
    torch.cuda.synchronize()
    check_attention(out, lse, q, k, v, **opts)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_signed_and_zero_scales_match_reference(head_dim, scale, causal):
    """Any finite softmax_scale: the kernels scale unmasked scores after the row max, which only holds for scales
    >= 0 (> 0 where masked scores are -inf), so the others scale every score first (the Triton kernels on their
    masked path, the Gluon one in a branch of its own)."""
    shape = (2, 300, 700, 4, 2)
    q, k, v = make(shape, head_dim, torch.bfloat16, seed=seed_of(shape, head_dim, causal))
    assert fa2rt.explain(q, k, v, causal=causal, softmax_scale=scale).path == "kernel"
    poison_allocator()
    out, lse = fa2rt.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    torch.cuda.synchronize()
    check_attention(out, lse, q, k, v, causal=causal, softmax_scale=scale)
