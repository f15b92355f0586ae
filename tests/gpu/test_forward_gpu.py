"""The forward kernels on a real NVIDIA GPU, through the dispatcher, against a float64 reference.

Every image family runs: the device's native images, and the older archs' images forced through their PTX
(FA2RT_FORCE_ARCH), as a newer GPU would run them.
"""

import threading

import pytest
import torch

import fa2rt
from fa2rt import _C, config, devices
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

DEVICE = torch.device("cuda", 0)
NATIVE = devices.probe("cuda", 0).arch
# (forced arch or "" for the native choice, expected arch, expected mode)
PATHS = [("", NATIVE, "native"), ("sm89", "sm89", "ptx-jit"), ("sm80", "sm80", "ptx-jit")]
SHAPES = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k
    (2, 1024, 1024, 8, 8),
    (1, 257, 300, 4, 2),
    (1, 300, 257, 4, 1),
    (3, 1, 77, 2, 2),
    (1, 129, 1, 2, 1),
]


def poison_allocator():
    """Fill freed cached memory with NaN so an output element the kernel never writes shows up."""
    junk = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del junk


def make(shape, head_dim, dtype, seed):
    b, nq, nk, h, hk = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda n, heads: torch.randn(b, n, heads, head_dim, device=DEVICE, generator=g).to(dtype)  # noqa: E731
    return mk(nq, h), mk(nk, hk), mk(nk, hk)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("forced, arch, mode", PATHS, ids=[p[1] + "-" + p[2] for p in PATHS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_matches_reference(monkeypatch, forced, arch, mode, dtype, head_dim, causal, shape):
    monkeypatch.setenv(config.FORCE_ARCH, forced)
    q, k, v = make(shape, head_dim, dtype, seed=hash((shape, head_dim, causal)) % 2**31)
    decision = fa2rt.explain(q, k, v, causal=causal)
    assert decision.path == "kernel", decision
    assert f"-{arch}-" in decision.image and decision.mode == mode
    poison_allocator()
    out, lse = fa2rt.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    sdpa, _ = sdpa_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    err, sdpa_err = rel_err(out, ref), rel_err(sdpa, ref)
    # Same order as PyTorch's own half-precision attention against the same reference.
    assert err <= 2 * sdpa_err + 1e-4, (err, sdpa_err)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~seen)
    assert (lse.double() - ref_lse)[seen].abs().max().item() < 1e-3
    assert torch.equal(out[~seen.transpose(1, 2).unsqueeze(-1).expand_as(out)].float().abs().sum().view(1),
                       torch.zeros(1, device=DEVICE))


def test_strided_views_of_packed_qkv():
    qkv = torch.randn(2, 513, 3, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert fa2rt.explain(q, k, v, causal=True).path == "kernel"
    out = fa2rt.attention(q, k, v, causal=True)
    ref, _ = attention_reference(q, k, v, causal=True)
    assert rel_err(out, ref) < 2e-2


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
