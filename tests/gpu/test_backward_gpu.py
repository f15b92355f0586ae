"""Gradients on a real NVIDIA GPU: the backward kernels against float64 autograd of fa2rt.reference.

Error bound per case (dq, dk and dv each, relative Frobenius error against float64): twice the error of PyTorch's own
low-precision SDPA on the same inputs (the fallback's SDPA path for the case when it has one, and plain SDPA on the
same shape, as the issue's yardstick), plus a small floor; softcap adds the hardware tanh's error. The native images
run every case; sm80 and sm89 images through their PTX a subset. Also: autograd only for inputs that require grad,
deterministic gradients, torch.compile with backward, memory of forward+backward linear in seqlen. On sm90 the dense
calls at head dims 64 and 128 without softcap or ALiBi run the warp-specialised backward (policy.BACKWARD_PLANS "ws"),
the others and every deterministic call the FA2 kernels.
"""

import warnings

import pytest
import torch
from gpu_helpers import DEVICE, PATHS, Case, make, poison_allocator, rel_err, seed_of, use_path

import fa2rt
from fa2rt import builds, policy
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

BF16, FP16 = torch.bfloat16, torch.float16
ABS_FLOOR = 1e-4
TANH_REL_ERR = 2.0**-11
NATIVE_PATH, SM89_PATH, SM80_PATH = PATHS


def _leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def grads(fn, q, k, v, dout, **opts):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v, **opts)
    return torch.autograd.grad(out, (q, k, v), dout)


def _reference(q, k, v, **opts):
    return attention_reference(q.double(), k.double(), v.double(), **opts)[0]


def _sdpa(q, k, v, **opts):
    opts = dict(opts)
    return sdpa_attention(q, k, v, causal=opts.pop("causal", False), **opts)[0]


def check_grads(case: Case, seed, arch=None, deterministic=False):
    q, k, v, opts = case.inputs(seed)
    dout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed + 1)).to(q.dtype)
    qkv = _leaves(q, k, v)
    decision = fa2rt.explain(*qkv, **opts, deterministic=deterministic)
    assert decision.path == "kernel" and [img.split("-")[0] for img, _ in decision.backward] in (
        list(plan) for plan in policy.BACKWARD_PLANS.values()), decision
    if arch:
        assert all(f"-{arch}-" in image for image, _ in decision.backward), decision
    poison_allocator()
    got = grads(fa2rt.attention, q, k, v, dout, **opts, deterministic=deterministic)
    ref = grads(_reference, q.double(), k.double(), v.double(), dout.double(), **opts)
    yard = {"sdpa(case)": grads(_sdpa, q, k, v, dout, **opts),
            "sdpa(plain)": grads(_sdpa, q, k, v, dout, causal=opts.get("causal", False))}
    ref_plain = grads(_reference, q.double(), k.double(), v.double(), dout.double(), causal=opts.get("causal", False))
    softcap = float(opts.get("softcap") or 0.0)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == q.dtype and got[i].shape == (q, k, v)[i].shape, (name, got[i].dtype, got[i].shape)
        assert torch.isfinite(got[i]).all(), f"{name}: non-finite gradient"
        yardsticks = {"sdpa(case)": rel_err(yard["sdpa(case)"][i], ref[i]),
                      "sdpa(plain)": rel_err(yard["sdpa(plain)"][i], ref_plain[i])}
        bound = 2 * max(yardsticks.values()) + ABS_FLOOR + 2 * TANH_REL_ERR * softcap
        err = rel_err(got[i], ref[i])
        assert err <= bound, {"grad": name, "err": err, "bound": bound, "yardsticks": yardsticks}


CASES = [
    Case((2, 257, 257, 4, 4), 64, BF16),
    Case((2, 257, 257, 4, 4), 64, BF16, causal=True),
    Case((2, 300, 300, 4, 4), 128, BF16, causal=True),
    Case((2, 300, 300, 4, 4), 128, FP16),
    Case((1, 100, 333, 4, 4), 64, BF16, causal=True),
    Case((1, 333, 100, 4, 4), 64, BF16, causal=True),  # the first rows see no key: zero gradient, no NaN
    Case((2, 200, 200, 8, 2), 64, BF16, causal=True),  # GQA: dk/dv summed over 4 query heads
    Case((2, 200, 260, 8, 1), 128, BF16),  # MQA
    Case((2, 150, 150, 2, 2), 8, BF16, causal=True),
    Case((2, 150, 150, 2, 2), 40, FP16),
    Case((2, 150, 150, 2, 2), 96, BF16, causal=True),
    Case((2, 150, 150, 2, 2), 160, BF16),
    Case((2, 150, 150, 2, 2), 256, BF16, causal=True),
    Case((2, 150, 150, 2, 2), 256, FP16),
    Case((2, 300, 300, 4, 2), 64, BF16, window=(32, 0)),
    Case((2, 300, 280, 4, 4), 128, BF16, window=(16, 16)),
    Case((2, 200, 200, 4, 4), 64, BF16, window=(0, 0)),
    Case((2, 200, 200, 4, 4), 64, BF16, causal=True, window=(48, -1)),
    Case((2, 256, 256, 4, 4), 64, BF16, softcap=30.0, amp=8.0),
    Case((2, 256, 256, 4, 2), 128, BF16, causal=True, softcap=5.0, amp=4.0),
    Case((2, 256, 256, 4, 4), 64, BF16, alibi="h"),
    Case((2, 256, 300, 4, 2), 64, FP16, causal=True, alibi="bh"),
    Case((2, 256, 256, 4, 4), 96, BF16, softcap=20.0, alibi="h", amp=4.0),
    Case((2, 256, 256, 4, 4), 64, BF16, amp=-1.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradients_native(case):
    check_grads(case, seed_of("bwd", case.id))


# Calls without causal or window, at a head dim whose dK/dV entry has a full_band tile (tiles.json): plain, GQA with
# ragged lengths, softcap, ALiBi, a masked head dim; deterministic, so that the FA2 kernels run (on sm90 the
# warp-specialised backward takes the plain d64 calls otherwise).
FULL_BAND_CASES = [CASES[0], Case((2, 200, 230, 8, 2), 64, BF16), CASES[18], CASES[20], CASES[9]]


@pytest.mark.parametrize("case", FULL_BAND_CASES, ids=lambda c: c.id)
def test_full_band_images_run_and_match(case):
    q, k, v, opts = case.inputs(seed_of("fullband", case.id))
    decision = fa2rt.explain(*_leaves(q, k, v), **opts, deterministic=True)
    arch = NATIVE_PATH[1]
    built = [img.name for img in builds.current_build().registry.images()
             if img.full_band_only and img.arch == arch and img.op == "bwd_dkdv"]
    if not built:
        pytest.skip(f"no full-band dK/dV image for {arch} in this build")
    assert any("-fullband-" in image for image, _ in decision.backward), decision
    check_grads(case, seed_of("fullband", case.id), deterministic=True)


PTX_CASES = [CASES[i] for i in (1, 2, 6, 10, 12, 14, 19, 21)]


@pytest.mark.parametrize("path", [SM89_PATH, SM80_PATH], ids=lambda p: p[1])
@pytest.mark.parametrize("case", PTX_CASES, ids=lambda c: c.id)
def test_gradients_ptx(monkeypatch, path, case):
    use_path(monkeypatch, path[0])
    check_grads(case, seed_of("bwd-ptx", path[1], case.id), arch=path[1])


# fa2rt.attention_backward runs the backward kernels from a forward's out and lse: the gradients autograd gives
# through fa2rt.attention (same images), which test_gradients_native checks against float64. Bitwise where the plan
# has no atomics (deterministic, and dK, dV of the warp-specialised plan); its dQ, added in no fixed order, within
# one rounding of the dtype.
BACKWARD_CALL_CASES = [CASES[i] for i in (0, 2, 6, 7, 14, 19, 20, 21)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["any", "deterministic"])
@pytest.mark.parametrize("case", BACKWARD_CALL_CASES, ids=lambda c: c.id)
def test_attention_backward_equals_autograd(case, deterministic):
    q, k, v, opts = case.inputs(seed_of("bwd-call", case.id))
    opts["deterministic"] = deterministic
    dout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(7)).to(q.dtype)
    leaves = _leaves(q, k, v)
    out, lse = fa2rt.attention(*leaves, return_lse=True, **opts)
    expected = torch.autograd.grad(out, leaves, dout)
    poison_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa2rt.FallbackWarning)  # the kernels must take it
        got = fa2rt.attention_backward(dout, q, k, v, out.detach(), lse, **opts)
    atomic_dq = not deterministic and "bwd_ws" in str(fa2rt.explain(*leaves, **opts))
    for name, g, e in zip(("dq", "dk", "dv"), got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        if name == "dq" and atomic_dq:
            assert rel_err(g, e.double()) <= 2.0**-8, name
        else:
            assert torch.equal(g, e), name


def test_the_warp_specialised_backward_serves_sm90_d64_d128():
    """Where the build has bwd_ws images for the device, dense d64/d128 calls without score terms take that plan
    (deterministic ones the FA2 kernels); its dK and dV are bitwise repeatable, dQ within one rounding."""
    arch = NATIVE_PATH[1]
    if not any(img.op == "bwd_ws" and img.arch == arch for img in builds.current_build().registry.images()):
        pytest.skip(f"no warp-specialised backward images for {arch} in this build")
    q, k, v = make((2, 1000, 1000, 8, 2), 128, BF16, 11)
    plans = {det: [img.split("-")[0] for img, _ in fa2rt.explain(*_leaves(q, k, v), causal=True,
                                                                 deterministic=det).backward] for det in (False, True)}
    assert plans == {False: list(policy.BACKWARD_PLANS["ws"]), True: list(policy.BACKWARD_PLANS["fa2"])}
    dout = torch.randn_like(q)
    runs = [grads(fa2rt.attention, q, k, v, dout, causal=True) for _ in range(3)]
    for run in runs[1:]:
        assert rel_err(run[0], runs[0][0].double()) <= 2.0**-8
        assert torch.equal(run[1], runs[0][1]) and torch.equal(run[2], runs[0][2])


def test_calls_on_other_and_reused_buffers_read_their_own_data():
    """Launch plans keep the TMA descriptors they encoded, by address (the Gluon images' Q, K, V, O, dO, dK, dV and
    dQ accumulator maps): calls alternating between two sets of inputs of one shape, and inputs freed and
    reallocated with new values (the allocator hands the addresses back), each match their own reference."""
    shape, dout_seed = (2, 300, 300, 4, 2), 31

    def check(q, k, v):
        dout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(dout_seed)).to(BF16)
        got = grads(fa2rt.attention, q, k, v, dout, causal=True)
        ref = grads(_reference, q.double(), k.double(), v.double(), dout.double(), causal=True)
        sdpa = grads(_sdpa, q, k, v, dout, causal=True)
        for g, r, y in zip(got, ref, sdpa, strict=True):
            assert rel_err(g, r) <= 2 * rel_err(y, r) + ABS_FLOOR
        with torch.no_grad():
            out = fa2rt.attention(q, k, v, causal=True)
        ref_out = _reference(q, k, v, causal=True)
        assert rel_err(out, ref_out) <= 2 * rel_err(_sdpa(q, k, v, causal=True), ref_out) + ABS_FLOOR

    inputs = [make(shape, 128, BF16, seed) for seed in (21, 22)]
    for q, k, v in inputs + inputs:
        check(q, k, v)
    del inputs
    for seed in (23, 24):  # fresh tensors, mostly at the addresses just freed
        check(*make(shape, 128, BF16, seed))


def test_strided_inputs_and_grad_out():
    """q, k, v slices of one packed tensor; a non-contiguous incoming gradient."""
    b, n, h, d = 2, 190, 4, 64
    packed = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=BF16)
    q, k, v = packed.unbind(2)
    dout = torch.randn(b, h, n, d, device=DEVICE, dtype=BF16).transpose(1, 2)
    got = grads(fa2rt.attention, q, k, v, dout, causal=True)
    ref = grads(_reference, q.double(), k.double(), v.double(), dout.double(), causal=True)
    sdpa = grads(_sdpa, q, k, v, dout, causal=True)
    for g, r, s in zip(got, ref, sdpa, strict=True):
        assert rel_err(g, r) <= 2 * rel_err(s, r) + ABS_FLOOR


def test_only_inputs_that_require_grad():
    q, k, v = make((2, 128, 128, 4, 4), 64, BF16, 7)
    q.requires_grad_()
    fa2rt.attention(q, k, v, causal=True).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


@pytest.mark.parametrize("how", ["argument", "global"])
def test_deterministic(how):
    q, k, v = make((2, 1000, 1000, 8, 2), 128, BF16, 11)
    dout = torch.randn_like(q)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        if how == "global":
            torch.use_deterministic_algorithms(True)
        opts = {"causal": True} | ({"deterministic": True} if how == "argument" else {})
        runs = [grads(fa2rt.attention, q, k, v, dout, **opts) for _ in range(4)]
    finally:
        torch.use_deterministic_algorithms(old)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_alibi_slopes_that_require_grad_fall_back(fresh_announcements):
    q, k, v = make((1, 64, 64, 4, 4), 64, BF16, 3)
    slopes = torch.rand(4, device=DEVICE, requires_grad=True)
    assert fa2rt.explain(q, k, v, alibi_slopes=slopes).reason == "alibi_grad"
    with pytest.warns(fa2rt.policy.FallbackWarning, match="alibi_grad"):
        fa2rt.attention(q, k, v, alibi_slopes=slopes).float().sum().backward()
    assert slopes.grad is not None and torch.isfinite(slopes.grad).all()


@pytest.mark.parametrize("selected", [True, False], ids=["image", "selected-at-run-time"])
def test_eager_calls_and_the_custom_ops_agree_bitwise(selected):
    """Eager calls launch directly (ops.run_eager); torch.compile runs the custom ops fa2rt::fwd and fa2rt::bwd, with
    the image chosen at trace time or (empty name) when the graph runs. Same kernels, so the same bits
    (deterministic gradients)."""
    q, k, v = make((2, 300, 300, 8, 2), 128, BF16, 21)
    dout = torch.randn_like(q)
    eager = _leaves(q, k, v)
    out, lse = fa2rt.attention(*eager, causal=True, return_lse=True, deterministic=True)
    want = (out, lse, *torch.autograd.grad(out, eager, dout))
    decision = fa2rt.explain(*eager, causal=True)
    image, mode = (decision.image, decision.mode) if selected else ("", "")
    leaves = _leaves(q, k, v)
    out, lse = fa2rt.ops.fwd(*leaves, None, q.shape[-1] ** -0.5, -1, 0, 0.0, image, mode, True)
    got = (out, lse, *torch.autograd.grad(out, leaves, dout))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class _Block(torch.nn.Module):
    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).unbind(2)
        return self.proj(fa2rt.attention(q, k, v, causal=True).reshape(b, n, dim))


def test_torch_compile_fullgraph_with_backward():
    torch.manual_seed(0)
    model = _Block().to(DEVICE, BF16)
    x = torch.randn(2, 300, 256, device=DEVICE, dtype=BF16, requires_grad=True)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.float().square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    got = torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])
    assert rel_err(out, eager_out.double()) < 1e-2
    for g, e in zip(got, eager_grads, strict=True):
        assert rel_err(g, e.double()) < 2e-2


def _fwd_bwd_peak(seqlen, head_dim=64, nheads=4):
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device=DEVICE, dtype=BF16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fa2rt.attention(q, k, v, causal=True)
    out.backward(dout)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_forward_backward_memory_is_linear_in_seqlen():
    peaks = {n: _fwd_bwd_peak(n) for n in (8192, 32768, 65536)}
    per_token = {n: p / n for n, p in peaks.items()}
    # out, lse, delta, dq/dk/dv and a copy at most: a constant number of bytes per token, never seqlen^2.
    assert max(per_token.values()) <= 1.1 * min(per_token.values()), peaks
    assert per_token[65536] <= 8 * 4 * 64 * 2, peaks  # at most 8 (seqlen, nheads, headdim) bf16 tensors
