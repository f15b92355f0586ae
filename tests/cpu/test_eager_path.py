"""The eager kernel path on CPU tensors described as an sm90 GPU: fa2rt.attention -> ops.run_eager -> launch plans,
with the plans' launches recorded instead of run (no GPU here). What each launch would pass is compared with the
named arguments (ops.kernel_args, ops.bwd_kernel_args) packed by the dispatcher's packer and with its grid, for the
image the decision names; and the caches are checked to be reused only where their keys prove they still hold.
"""

import os
import random
import warnings

import pytest
import torch
from conftest import DEVICES

import fa2rt
from fa2rt import _C, api, builds, calls, config, devices, ops, policy
from fa2rt.fallback import sdpa_attention
from fa2rt.validate import check_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STREAM = 0x5EED


class Recorder:
    """Stands in for _C.LaunchPlan: builds the real plan and records its launches instead of running them."""

    def __init__(self, launch_plan):
        self.launch_plan, self.built, self.launches = launch_plan, [], []

    def __call__(self, *args):
        plan = self.launch_plan(*args)
        self.built.append(plan)
        return RecordingPlan(plan, self.launches)


class RecordingPlan:
    def __init__(self, plan, launches):
        self.plan, self.launches = plan, launches

    def launch(self, device, stream, addresses):
        self.launches.append((self.plan, device, stream, list(addresses)))


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(devices, "describe", lambda device: (DEVICES["sm90"], "", ""))
    monkeypatch.setattr(ops, "device_and_stream", lambda device: (0, STREAM))
    monkeypatch.setattr(_C, "LaunchPlan", Recorder(_C.LaunchPlan))
    monkeypatch.setattr(ops, "_PLANS", {})
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    monkeypatch.delenv(config.FORCE_ARCH, raising=False)
    return _C.LaunchPlan


def make(b=2, nq=37, nk=45, h=4, hk=2, d=64, dtype=torch.bfloat16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=g).to(dtype).requires_grad_(requires_grad)
            for n, heads in ((nq, h), (nk, hk), (nk, hk))]


def expect_launch(launch, image, args, problem):
    """The recorded launch passes `args` (by name, as pack_params packs them) on `image`'s grid for `problem`."""
    plan, device, stream, addresses = launch
    registry = builds.current_build().registry
    assert plan.image == image and (device, stream) == (0, STREAM)
    assert plan.packed(addresses) == _C.pack_params(registry, image, args)
    assert (plan.grid, plan.block, plan.shared_bytes) == _C.launch_config(registry, image, problem)


CASES = {
    "causal": dict(causal=True),
    "window+alibi": dict(window_size=(8, 3), alibi_slopes="batch"),
    "softcap+alibi": dict(softcap=5.0, alibi_slopes="heads", softmax_scale=0.3),
}


def options(name, b=2, h=4):
    opts = {"causal": False, "softmax_scale": None} | CASES[name]
    kind = opts.pop("alibi_slopes", None)
    if kind:
        opts["alibi_slopes"] = torch.rand((h,) if kind == "heads" else (b, h)) + 0.05
    return opts


@pytest.mark.parametrize("case", CASES)
def test_forward_launches_the_decided_image_with_the_named_arguments(recorded, case):
    """A Triton image's launch (head dim 48: the masked d64 bucket, which the Gluon images do not take)."""
    q, k, v = make(d=48)
    opts = options(case)
    decision = fa2rt.explain(q, k, v, **opts)
    assert decision.path == "kernel" and decision.image.startswith("fwd-sm90-bf16-d64"), decision
    out, lse = fa2rt.attention(q, k, v, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    (launch,) = recorded.launches
    shapes = check_inputs(q, k, v, **opts)
    alibi = opts.get("alibi_slopes")
    expect_launch(launch, decision.image, ops.kernel_args(q, k, v, out, lse, alibi, shapes),
                  policy.problem_for(shapes, (q, k, v, out)))


@pytest.mark.parametrize("head_dim, nk, short", [(64, 1000, ""), (64, 512, "-k512"), (128, 1025, ""),
                                                  (128, 1000, "-k1024")])
@pytest.mark.parametrize("opts, band", [(dict(causal=True), ""), (dict(window_size=(64, -1)), ""),
                                        (dict(), "-fullband")], ids=["causal", "window", "full-band"])
def test_d64_and_d128_calls_launch_the_warp_specialised_images(recorded, opts, band, head_dim, nk, short):
    """sm90 d64 and d128 dense calls without score terms run the Gluon images: Q, K, V, O as TMA maps (the address,
    then each dim's size and stride in elements), one program per SM walking the tiles; calls without a band take
    the full-band image, banded calls of at most 512 keys (d64) or 1024 (d128) the short one (tiles.json)."""
    d = head_dim
    q, k, v = make(b=2, nq=1200, nk=nk, h=16, hk=4, d=d)
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))  # (batch, heads, seqlen, dim) underneath
    opts = {"causal": False, "softmax_scale": None} | opts
    decision = fa2rt.explain(q, k, v, **opts)
    name = f"fwd-sm90-bf16-d{d}-plain{band or short}-ws-persistent-m128n128w4s2"
    assert decision.path == "kernel" and decision.image == name
    out, lse = fa2rt.attention(q, k, v, return_lse=True, **opts)
    (launch,) = recorded.launches
    shapes = check_inputs(q, k, v, **opts)
    tensors = {"q": q, "k": k, "v": v, "o": out}
    args = ({name.upper(): t.data_ptr() for name, t in tensors.items()} | {"LSE": lse.data_ptr()}
            | ops._fwd_ws_constants(tensors, None, shapes))
    expect_launch(launch, decision.image, args, policy.problem_for(shapes, (q, k, v, out)))
    assert [args[f"K.shape{i}"] for i in range(4)] == [2, nk, 4, d]
    assert [args[f"K.stride{i}"] for i in range(4)] == [4 * nk * d, d, nk * d, 1]
    assert (args["batch"], args["nheads"], args["head_ratio"]) == (2, 16, 4)
    tiles = 10 * 2 * 16  # ceil(1200 / 128) row blocks x batch x heads
    assert tuple(launch[0].grid) == (min(tiles, DEVICES["sm90"].multiprocessors), 1, 1)
    assert launch[0].block == 384  # two consumer warpgroups and the loader's


def test_functorch_wrappers_left_by_a_finished_transform_run_on_the_tensors_they_wrap(recorded):
    """A tensor leaked out of a finished torch.func transform is a dead wrapper without storage: the eager path
    unwraps it, as autograd.Function.apply does, with or without grad (the repeated-call key, which reads every
    address, never holds one)."""
    q, k, v = make(requires_grad=True)
    leaked = []
    torch.func.grad(lambda x: leaked.append(x) or x.float().sum())(q)
    (dead,) = leaked
    for _ in range(2):
        out = fa2rt.attention(dead, k, v, causal=True)
        out.backward(torch.ones_like(out))
    assert q.grad is not None and q.grad.shape == q.shape
    with torch.no_grad():
        fa2rt.attention(dead, k, v, causal=True)
    forwards = [launch for launch in recorded.launches if launch[0].image.startswith("fwd-")]
    assert len(forwards) == 3 and len(recorded.launches) > 3
    for plan, _, _, addresses in forwards:
        assert dict(zip(plan.pointers, addresses, strict=True))["Q"] == q.data_ptr()


def test_tma_strides_replace_only_the_unchecked_stride_of_a_size_one_dim():
    t = torch.empty(1, 5, 3, 128).as_strided((1, 5, 3, 128), (7, 384, 128, 1))
    assert ops._tma_strides(t) == [8, 384, 128, 1]  # batch 1: its stride never moves, 7 would fail the driver
    assert ops._tma_strides(torch.empty(2, 5, 3, 128)) == [1920, 384, 128, 1]


def test_out_is_written_in_place(recorded):
    q, k, v = make()
    buf = torch.empty(2, 37, 4, 128, dtype=q.dtype)[..., :64]  # strided: every row 128 wide
    with torch.no_grad():
        res = fa2rt.attention(q, k, v, causal=True, out=buf)
    assert res is buf
    (launch,) = recorded.launches
    plan, _, _, addresses = launch
    assert dict(zip(plan.pointers, addresses, strict=True))["O"] == buf.data_ptr()


def test_plans_are_reused_only_for_the_same_geometry(recorded):
    alive = []
    for seed in range(3):  # new tensors of the same layout: new addresses, one plan
        q, k, v = make(seed=seed)
        alive.append((q, k, v, fa2rt.attention(q, k, v, causal=True)))
    assert len(recorded.built) == 1 and len(recorded.launches) == 3
    assert len({tuple(addresses) for *_, addresses in recorded.launches}) == 3
    # A strided view of other strides, another window, another scale: each its own plan.
    packed = torch.randn(2, 37, 3, 4, 64).to(torch.bfloat16)
    fa2rt.attention(packed[:, :, 0], k, v, causal=True)
    fa2rt.attention(q, k, v, window_size=(4, 4))
    fa2rt.attention(q, k, v, causal=True, softmax_scale=0.5)
    assert len(recorded.built) == 4


def test_decisions_follow_alignment_and_the_environment(recorded, monkeypatch, fresh_announcements):
    q, k, v = make()
    assert fa2rt.explain(q, k, v).path == "kernel"
    # Same shape and strides, a base address off by one element: the cached decision must not be reused.
    q_odd = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view_as(q).copy_(q)
    d = fa2rt.explain(q_odd, k, v)
    assert d.reason == "no_kernel" and "aligned" in d.message
    with pytest.warns(fa2rt.FallbackWarning, match="no_kernel"):
        fa2rt.attention(q_odd, k, v)
    assert recorded.launches == []  # the fallback ran, no kernel
    assert fa2rt.explain(q, k, v).path == "kernel"
    monkeypatch.setenv(config.FORCE_ARCH, "sm80")
    d = fa2rt.explain(q, k, v)
    assert "-sm80-" in d.image and d.mode == "ptx-jit"
    monkeypatch.setenv(config.DISABLE, "1")
    assert fa2rt.explain(q, k, v).reason == "disabled"
    monkeypatch.delenv(config.DISABLE)
    monkeypatch.setenv(config.MIN_SEQLEN, "100")
    assert fa2rt.explain(q, k, v).reason == "short_sequence"


@pytest.mark.parametrize("deterministic, plan", [(False, "ws"), (True, "fa2")], ids=["ws", "deterministic"])
@pytest.mark.parametrize("which", [("q", "k", "v"), ("k",)])
def test_backward_launches_every_backward_op_with_the_named_arguments(recorded, which, deterministic, plan):
    """sm90 d64: the warp-specialised plan (prep, bwd_ws adding dQ into an fp32 accumulator, convert), or with
    deterministic=True the two FA2 kernels; each launch with its named arguments and grid."""
    q, k, v = make()
    for name, t in zip("qkv", (q, k, v), strict=True):
        t.requires_grad_(name in which)
    decision = fa2rt.explain(q, k, v, causal=True, deterministic=deterministic)
    assert [image.split("-")[0] for image, _ in decision.backward] == list(policy.BACKWARD_PLANS[plan])
    out, lse = fa2rt.attention(q, k, v, causal=True, return_lse=True, deterministic=deterministic)
    assert out.requires_grad and not lse.requires_grad
    dout = torch.randn(2, 4, 37, 64).to(q.dtype).transpose(1, 2)  # a transposed view: kernel-ready as it is
    out.backward(dout)
    for name, t in zip("qkv", (q, k, v), strict=True):
        assert (t.grad is not None) == (name in which)
        if t.grad is not None:
            assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
    fwd_launch, *bwd_launches = recorded.launches
    assert fwd_launch[0].image == decision.image
    assert [launch[0].image for launch in bwd_launches] == [image for image, _ in decision.backward]
    shapes = check_inputs(q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=None)
    named = [dict(zip(launch[0].pointers, launch[3], strict=True)) for launch in bwd_launches]
    first = named[0] | named[1]
    assert first["DO"] == dout.data_ptr() and first["O"] == out.data_ptr()
    assert first["Q"] == q.data_ptr() and first["LSE"] == lse.data_ptr()
    # The gradient buffers: contiguous, of the inputs' shapes (their addresses are the plans' own to check).
    grads = {f"d{name}": torch.empty_like(t, memory_format=torch.contiguous_format)
             for name, t in (("q", q), ("k", k), ("v", v))}
    tensors = {"q": q, "k": k, "v": v, "o": out, "do": dout} | grads
    for op, launch, pointers in zip(policy.BACKWARD_PLANS[plan], bwd_launches, named, strict=True):
        names, _, constants, _ = ops.BACKWARD_ARGS[op]
        mine = {name: tensors[name] for name in names}
        expect_launch(launch, launch[0].image, constants(mine, None, shapes) | pointers,
                      policy.problem_for(shapes, mine.values(), op))
    if plan == "ws":
        prep, ws, convert = named
        # One delta and one accumulator through the three kernels; dQ^T per (batch, head): rows padded to 40 floats.
        assert prep["DELTA"] == ws["DELTA"] == convert["DELTA"] and prep["DQACC"] == ws["DQACC"] == convert["DQACC"]
        # Both in one fp32 scratch: the accumulator after delta's 2 * 4 * 37 floats, rounded up to 64 (256 bytes).
        assert ws["DQACC"] - ws["DELTA"] == 320 * 4
        args = ops._bwd_ws_constants({}, None, shapes)
        assert [args[f"DQACC.shape{i}"] for i in range(4)] == [2, 4, 64, 37]
        assert [args[f"DQACC.stride{i}"] for i in range(4)] == [4 * 64 * 40, 64 * 40, 40, 1]
        assert tuple(bwd_launches[1][0].grid) == (1, 2 * 2, 1)  # 128 keys per program, (batch, KV head)
        assert tuple(bwd_launches[0][0].grid) == (1, 2 * 4, 1)  # 64 rows per program, (batch, head)


def test_global_deterministic_mode_takes_the_fa2_plan(recorded):
    """torch.use_deterministic_algorithms(True) counts as deterministic=True: the backward launches the FA2 kernels,
    also when the mode is switched on between the forward and the backward."""
    q, k, v = make(requires_grad=True)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = fa2rt.attention(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        torch.use_deterministic_algorithms(False)
        out = fa2rt.attention(q, k, v, causal=True)
        torch.use_deterministic_algorithms(True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(old)
    ops_run = [launch[0].image.split("-")[0] for launch in recorded.launches]
    fa2 = list(policy.BACKWARD_PLANS["fa2"])
    assert ops_run == ["fwd", *fa2, "fwd", *fa2], ops_run


def test_backward_copies_a_grad_out_that_breaks_the_layout_rules(recorded):
    q, k, v = make(requires_grad=True)
    out = fa2rt.attention(q, k, v)
    dout = torch.empty(out.numel() + 1, dtype=out.dtype)[1:].view_as(out).normal_()  # misaligned base
    out.backward(dout)
    plan, _, _, addresses = recorded.launches[1]
    do = dict(zip(plan.pointers, addresses, strict=True))["DO"]
    assert do != dout.data_ptr() and do % _C.ALIGN_BYTES == 0


def test_backward_without_a_kernel_recomputes_through_the_fallback(recorded, monkeypatch, fresh_announcements):
    # The images chosen at forward time no longer fit at backward time (FA2RT_FORCE_ARCH changed in between): the
    # backward says so and recomputes the gradients through SDPA (here on the CPU), deterministic as asked.
    q, k, v = make(d=16, requires_grad=True)
    out = fa2rt.attention(q, k, v, causal=True, deterministic=True)
    monkeypatch.setenv(config.FORCE_ARCH, "sm75")
    with pytest.warns(fa2rt.FallbackWarning, match="no_backward_kernel"):
        got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = sdpa_attention(*leaves, causal=True)[0]
    want = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)
    assert len(recorded.launches) == 1  # the forward only


def test_lse_carries_no_gradient_and_double_backward_is_refused(recorded):
    q, k, v = make(requires_grad=True)
    out, lse = fa2rt.attention(q, k, v, return_lse=True)
    assert lse.grad_fn is None
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_eager_launches_only_plain_tensors_outside_modes_and_transforms():
    q, k, v = make()
    assert ops.can_run_eager(q, k, v, None, None)
    assert ops.can_run_eager(torch.nn.Parameter(q), k, v, None, None)

    class Sub(torch.Tensor):
        pass

    assert not ops.can_run_eager(q.as_subclass(Sub), k, v, None, None)
    with torch._subclasses.FakeTensorMode():
        assert not ops.can_run_eager(q, k, v, None, None)
    seen = []

    def f(x):
        seen.append(ops.can_run_eager(x, k, v, None, None))
        return x.float().sum()

    torch.func.grad(f)(q.float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated, not gone
        torch.jit.trace(f, q.float(), check_trace=False)
    assert seen == [False, False]


def test_no_warning_on_the_kernel_path(recorded):
    q, k, v = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa2rt.attention(q, k, v)


def _masked(launch):
    """A recorded launch's image and parameter bytes with every address zeroed (they differ between calls)."""
    plan = launch[0]
    return plan.image, plan.packed([0] * len(plan.pointers))


@pytest.mark.parametrize("selected", [True, False], ids=["image", "selected-at-run-time"])
def test_custom_ops_launch_what_eager_calls_launch(recorded, selected):
    # The custom ops (what torch.compile runs) are registered for CUDA only; here they get the same implementations
    # for the CPU for the test's scope, so both paths run on the synthetic sm90 device.
    q, k, v = make(requires_grad=True)
    dout = torch.randn(q.shape).to(q.dtype)
    out = fa2rt.attention(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), dout)
    eager = [_masked(launch) for launch in recorded.launches]
    recorded.launches.clear()
    decision = fa2rt.explain(q, k, v, causal=True)
    image, mode = (decision.image, decision.mode) if selected else ("", "")
    with torch.library._scoped_library("fa2rt", "IMPL") as lib:
        _cpu_custom_ops(lib)
        out, _ = ops.fwd(q, k, v, None, 64**-0.5, -1, 0, 0.0, image, mode, False)
        torch.autograd.grad(out, (q, k, v), dout)
    assert [_masked(launch) for launch in recorded.launches] == eager and len(eager) == 1 + len(decision.backward)


def _cpu_custom_ops(lib):
    """The dense custom ops' bodies registered for the CPU in `lib`'s scope (they are CUDA-only)."""
    lib.impl("fwd", lambda q, k, v, a, scale, left, right, cap, img, md, det: ops.run_forward(
        q, k, v, a, None, scale, left, right, cap, img, md), "CPU")
    lib.impl("bwd", ops.run_backward, "CPU")
    lib.impl("fwd_out", lambda q, k, v, a, out, scale, left, right, cap, img, md: ops.run_forward(
        q, k, v, a, out, scale, left, right, cap, img, md)[1], "CPU")


def _op_step(seed, dout):
    """One training step through the custom ops, as a torch.compile graph runs them (the image chosen at run time)."""
    q, k, v = make(seed=seed, requires_grad=True)
    out, _ = ops.fwd(q, k, v, None, 64**-0.5, -1, 0, 0.0, "", "", False)
    torch.autograd.grad(out, (q, k, v), dout)


def test_repeated_custom_op_calls_neither_decide_nor_build_plans_again(recorded, no_slow_path, monkeypatch):
    dout = torch.randn(make()[0].shape).to(torch.bfloat16)
    with torch.library._scoped_library("fa2rt", "IMPL") as lib:
        _cpu_custom_ops(lib)
        _op_step(0, dout)
        first, built = [_masked(launch) for launch in recorded.launches], len(recorded.built)
        recorded.launches.clear()
        no_slow_path()
        monkeypatch.setattr(policy, "select_backward", lambda *a, **k: pytest.fail("selected again"))
        _op_step(1, dout)
    assert [_masked(launch) for launch in recorded.launches] == first and len(recorded.built) == built


def test_a_remembered_custom_op_call_sees_the_environment_change(recorded, monkeypatch, fresh_announcements):
    dout = torch.randn(make()[0].shape).to(torch.bfloat16)
    with torch.library._scoped_library("fa2rt", "IMPL") as lib:
        _cpu_custom_ops(lib)
        _op_step(0, dout)
        launched = len(recorded.launches)
        monkeypatch.setenv(config.DISABLE, "1")
        with pytest.warns(fa2rt.FallbackWarning, match=r"\[disabled\]"):
            _op_step(1, dout)
    assert len(recorded.launches) == launched


def test_fa2rt_disabled_before_the_backward_recomputes_through_sdpa(recorded, monkeypatch, fresh_announcements):
    q, k, v = make(requires_grad=True)
    out = fa2rt.attention(q, k, v, causal=True)
    launched = len(recorded.launches)
    monkeypatch.setenv(config.DISABLE, "1")
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[disabled\]"):
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert len(recorded.launches) == launched
    want = torch.autograd.grad(sdpa_attention(q, k, v, causal=True)[0], (q, k, v), torch.ones_like(out))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_no_grad_mode_records_no_graph(recorded):
    q, k, v = make(requires_grad=True)
    with torch.no_grad():
        out = fa2rt.attention(q, k, v, causal=True)
    assert out.grad_fn is None and not out.requires_grad and len(recorded.launches) == 1


def _lse_address(launch) -> int:
    return dict(zip(launch[0].pointers, launch[3], strict=True))["LSE"]


def test_an_lse_nobody_takes_goes_to_the_device_sink(recorded, monkeypatch):
    """An inference call without return_lse writes its LSE into the device's sink (one allocation less per call);
    return_lse, a differentiable call and an LSE larger than the sink get their own."""
    q, k, v = make()
    for _ in range(2):  # validated, then repeated
        fa2rt.attention(q, k, v, causal=True)
    sink = ops._lse_sinks[q.device]
    assert sink.dtype == torch.float32 and sink.numel() == ops.LSE_SINK_FLOATS
    assert [_lse_address(launch) for launch in recorded.launches] == [sink.data_ptr()] * 2
    _, lse = fa2rt.attention(q, k, v, causal=True, return_lse=True)
    assert _lse_address(recorded.launches[-1]) == lse.data_ptr() != sink.data_ptr()
    qg, kg, vg = make(requires_grad=True)
    fa2rt.attention(qg, kg, vg, causal=True)
    assert _lse_address(recorded.launches[-1]) != sink.data_ptr()
    monkeypatch.setattr(ops, "LSE_SINK_FLOATS", 2 * 4 * 37 - 1)  # this call's LSE no longer fits
    fa2rt.attention(q, k, v)
    assert _lse_address(recorded.launches[-1]) != sink.data_ptr()


# --- the call cache (fa2rt.calls): a repeated call skips validation and the decision, only where they would agree ----

@pytest.fixture
def no_slow_path(monkeypatch):
    """After calling it, validation and the decision fail the test when they run."""
    def forbid():
        monkeypatch.setattr(api, "check_inputs", lambda *a, **k: pytest.fail("validated again"))
        monkeypatch.setattr(policy, "decide", lambda *a, **k: pytest.fail("decided again"))
    return forbid


def test_a_repeated_call_launches_without_validating_or_deciding_again(recorded, no_slow_path):
    q, k, v = make(requires_grad=True)
    first = fa2rt.attention(q, k, v, causal=True)
    torch.autograd.grad(first, (q, k, v), torch.ones_like(first))
    no_slow_path()
    q2, k2, v2 = make(seed=1, requires_grad=True)  # other tensors of the same layout
    out = fa2rt.attention(q2, k2, v2, causal=True)
    torch.autograd.grad(out, (q2, k2, v2), torch.ones_like(out))
    with torch.no_grad():  # grad mode is part of the key: this one is validated again
        with pytest.raises(pytest.fail.Exception, match="validated again"):
            fa2rt.attention(q2, k2, v2, causal=True)
    kernels = 1 + len(policy.BACKWARD_PLANS["ws"])  # sm90 d64: the forward and the warp-specialised backward
    assert len(recorded.built) == kernels
    fwd2 = recorded.launches[kernels]
    assert dict(zip(fwd2[0].pointers, fwd2[3], strict=True))["Q"] == q2.data_ptr()
    assert [_masked(launch) for launch in recorded.launches[:kernels]] == [_masked(launch) for launch in
                                                                              recorded.launches[kernels:]]


@pytest.mark.parametrize("again, error", [
    (dict(causal=1), (TypeError, "causal: expected a bool")),
    (dict(causal=True, softmax_scale=True), (TypeError, "softmax_scale: expected None or a finite real number")),
    (dict(causal=True, softmax_scale=float("nan")), (ValueError, "softmax_scale: expected")),
    (dict(window_size=(True, 0)), (TypeError, r"window_size\[0\]: expected an int")),
    (dict(causal=True, softcap=False), (TypeError, "softcap: expected")),
], ids=["causal-int", "scale-bool", "scale-nan", "window-bool", "softcap-bool"])
def test_options_equal_as_keys_but_invalid_are_still_refused(recorded, again, error):
    q, k, v = make()
    fa2rt.attention(q, k, v, causal=True, softmax_scale=1.0, softcap=0.0)
    fa2rt.attention(q, k, v, window_size=(1, 0), causal=True)
    exc, match = error
    with pytest.raises(exc, match=match):
        fa2rt.attention(q, k, v, **({"softmax_scale": 1.0} | again))


def test_out_with_grad_is_refused_after_the_same_call_without_grad(recorded):
    q, k, v = make()
    buf = torch.empty_like(q)
    fa2rt.attention(q, k, v, out=buf)
    q.requires_grad_()
    with pytest.raises(ValueError, match="out: expected None when q, k or v requires grad"):
        fa2rt.attention(q, k, v, out=buf)


def test_out_with_grad_is_refused_in_grad_mode_after_the_same_call_in_no_grad_mode(recorded):
    q, k, v = make(requires_grad=True)
    buf = torch.empty_like(q)
    with torch.no_grad():
        fa2rt.attention(q, k, v, out=buf)
    with pytest.raises(ValueError, match="out: expected None when q, k or v requires grad"):
        fa2rt.attention(q, k, v, out=buf)


def test_a_repeated_call_sees_a_misaligned_base_and_the_environment(recorded, monkeypatch, fresh_announcements):
    q, k, v = make()
    fa2rt.attention(q, k, v)
    q_odd = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view_as(q).copy_(q)  # same shape and strides
    with pytest.warns(fa2rt.FallbackWarning, match="no_kernel"):
        fa2rt.attention(q_odd, k, v)
    monkeypatch.setenv(config.DISABLE, "1")
    with pytest.warns(fa2rt.FallbackWarning, match="disabled"):
        fa2rt.attention(q, k, v)
    monkeypatch.delenv(config.DISABLE)
    monkeypatch.setenv(config.MIN_SEQLEN, "100")
    with pytest.warns(fa2rt.FallbackWarning, match="short_sequence"):
        fa2rt.attention(q, k, v)
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    monkeypatch.setenv(config.FORCE_ARCH, "sm80")
    fa2rt.attention(q, k, v)
    assert [launch[0].image.split("-")[1] for launch in recorded.launches] == ["sm90", "sm80"]


def test_a_repeated_call_follows_the_device_description(recorded, monkeypatch):
    q, k, v = make()
    fa2rt.attention(q, k, v)
    monkeypatch.setattr(devices, "describe", lambda device: (DEVICES["sm80"], "", ""))
    fa2rt.attention(q, k, v)
    assert [launch[0].image.split("-")[1] for launch in recorded.launches] == ["sm90", "sm80"]


def test_tensors_a_key_cannot_describe_take_the_validated_path(recorded):
    q, k, v = make()
    fa2rt.attention(q, k, v)
    with pytest.raises(ValueError, match="q: expected a dense"):
        fa2rt.attention(q.to_sparse(), k, v)
    with pytest.raises(TypeError, match="window_size: expected"):
        fa2rt.attention(q, k, v, window_size={1: 2})


# --- every cache against a cold start: a seeded sequence of nearly equal calls --------------------------------------

def laid_out(t: torch.Tensor, how: str) -> torch.Tensor:
    """t with the same values laid out another way: at a misaligned base, in rows wider than its last dim, or (for
    (batch, seqlen, heads, dim) tensors) stored as (batch, heads, seqlen, dim)."""
    if how == "offset":  # a misaligned base, strides unchanged
        return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view_as(t).copy_(t)
    if how == "sliced":
        return torch.cat([t, t[..., :8]], dim=-1)[..., : t.shape[-1]]
    if how == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


# Each respect a call can differ in, with the values drawn from: mostly valid ones, a few equal as keys to valid ones
# but refused (1 for True, False for 0.0, ...).
_RESPECTS = {
    "dtype": [torch.bfloat16, torch.float16], "k_dtype": ["same", "other"], "head_dim": [64, 128, 48],
    "seed": [0, 1], "grad": [False, True, "q", "v"], "layout_q": ["contig", "offset", "sliced", "transposed"],
    "layout_k": ["contig", "offset", "sliced"], "layout_v": ["contig", "transposed"], "causal": [True, False, 1],
    "window_size": [(-1, -1), (8, -1), [8, -1], (8, 0), (True, 0)], "softcap": [0.0, 0, 20.0, False],
    "softmax_scale": [None, 0.125, -0.5, True], "alibi": [None, "heads", "batch"],
    "out": [None, "like", "contiguous"], "return_lse": [False, True], "deterministic": [False, True],
    "no_grad": [False, True], "force_arch": [None, "sm80"],
}


def sample_specs(rng, respects: dict, bases=4, per_base=14, changed=(3, 6)) -> list[dict]:
    """Base calls (each respect at its first value, a few changed), and per base calls that differ from it in one
    or two respects (a respect's first value is its common one)."""
    specs = []
    for _ in range(bases):
        base = {name: values[0] for name, values in respects.items()}
        for name in rng.sample(sorted(respects), rng.randint(*changed)):
            base[name] = rng.choice(respects[name])
        specs.append(base)
        for _ in range(per_base):
            names = rng.sample(sorted(respects), rng.randint(1, 2))
            specs.append(base | {name: rng.choice(respects[name]) for name in names})
    return specs


def _cache_case(spec: dict):
    """A spec's call: its tensors, keyword arguments and context."""
    q, k, v = make(d=spec["head_dim"], dtype=spec["dtype"], seed=spec["seed"])
    if spec["k_dtype"] == "other":
        k = k.to(torch.float16 if k.dtype == torch.bfloat16 else torch.bfloat16)
    q, k, v = (laid_out(t, spec[f"layout_{name}"]).detach().requires_grad_(spec["grad"] in (True, name))
               for t, name in zip((q, k, v), "qkv", strict=True))
    kw = {name: spec[name] for name in ("causal", "window_size", "softcap", "softmax_scale", "return_lse",
                                         "deterministic")}
    if spec["alibi"]:
        kw["alibi_slopes"] = torch.rand(4 if spec["alibi"] == "heads" else (2, 4))
    if spec["out"]:  # q's strides (dense ones kept by empty_like), or contiguous
        kw["out"] = torch.empty_like(q) if spec["out"] == "like" else torch.empty(q.shape, dtype=q.dtype)
    return (q, k, v), kw, {"no_grad": spec["no_grad"], "force_arch": spec["force_arch"]}


def launch_roles(launches, tensors: dict) -> list:
    """Each recorded launch's image and parameter bytes with its addresses replaced by the name of the tensor there
    ('other' for scratch and the LSE sink): comparable between runs that allocate differently."""
    roles = {t.data_ptr(): name for name, t in reversed(tensors.items()) if isinstance(t, torch.Tensor)}
    return [(plan.image, plan.packed([0] * len(plan.pointers)), [roles.get(a, "other") for a in addresses])
            for plan, _, _, addresses in launches]


def call_outcome(attend, inputs, kw, context, launches, input_names=("q", "k", "v")) -> tuple:
    """What attend(*inputs, **kw) (fa2rt.attention, attention_varlen or attention_with_kvcache, whose positional
    inputs are named by input_names) did in `context` (grad mode, FA2RT_FORCE_ARCH), its gradients included,
    comparable across runs: its error, or its launches (launch_roles), what it returned, and the fallback warnings it
    issued."""
    policy._announced.clear()
    launches.clear()
    saved = os.environ.pop(config.FORCE_ARCH, None)
    if context["force_arch"]:
        os.environ[config.FORCE_ARCH] = context["force_arch"]
    try:
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(not context["no_grad"]):
            warnings.simplefilter("always")
            res = attend(*inputs, **kw)
            out, lse = res if kw["return_lse"] else (res, None)
            grads = ()
            if out.requires_grad:
                grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))
    except (TypeError, ValueError, RuntimeError) as exc:
        return "error", type(exc).__name__, str(exc).splitlines()[0]
    finally:
        os.environ.pop(config.FORCE_ARCH, None)
        if saved is not None:
            os.environ[config.FORCE_ARCH] = saved
    named = kw | dict(zip((*input_names, "out", "lse", "dq", "dk", "dv"), (*inputs, out, lse, *grads), strict=False))
    return (launch_roles(launches, named), (out.shape, out.stride(), out.dtype, out.requires_grad),
            None if lse is None else lse.shape,
            sorted(str(w.message).split(":")[0] for w in caught if issubclass(w.category, fa2rt.FallbackWarning)))


def assert_warm_equals_cold(sequence, outcome, cold_start) -> None:
    """Each call of `sequence` (outcome(case) runs one) does with every cache as the sequence builds it up what it
    does with all of them emptied first (cold_start()); enough of them launched kernels for that to mean something."""
    cold_start()
    warm = [outcome(case) for case in sequence]
    cold = []
    for case in sequence:
        cold_start()
        cold.append(outcome(case))
    for i, (w, c) in enumerate(zip(warm, cold, strict=True)):
        assert w == c, f"call {i} of the sequence: {sequence[i]}"
    assert sum(o[0] != "error" and bool(o[0]) for o in warm) >= 3  # some calls launched kernels


def cold_start(monkeypatch) -> None:
    """Every cache of the eager path emptied: remembered calls, decisions, selections, routes and launch plans."""
    monkeypatch.setattr(ops, "_PLANS", {})  # makes every remembered call stale too (EagerCall.current)
    calls._CALLS.clear()
    for cache in (policy._SELECTION_CACHE, policy._DECISION_CACHE, policy._BACKWARD_CACHE, policy._ROUTE_CACHE):
        cache.clear()


@pytest.mark.parametrize("seed", range(32))
def test_every_call_does_what_it_does_from_a_cold_start(recorded, monkeypatch, seed):
    """A seeded sequence of calls, most differing from an earlier one in a single respect (dtype, a layout, grad,
    out=, an option's value or type, the slopes, FA2RT_FORCE_ARCH) or in none: run with every cache (the repeated
    calls, decisions, selections, launch plans) as it builds up, each call does exactly what it does with all of
    them emptied first. A cache whose key misses something the call depends on shows up here."""
    rng = random.Random(seed)
    pool = [_cache_case(spec) for spec in sample_specs(rng, _RESPECTS)]
    assert_warm_equals_cold([rng.choice(pool) for _ in range(120)],
                            lambda case: call_outcome(fa2rt.attention, *case, recorded.launches),
                            lambda: cold_start(monkeypatch))


def _as_compiled(q, k, v, *, causal, window_size, softcap, softmax_scale, return_lse, deterministic,
                 alibi_slopes=None, out=None):
    """fa2rt.attention as a torch.compile graph runs it: validated as tracing validates, then the custom ops, which
    choose their image when they run (registered for the CPU by the caller)."""
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          softcap=softcap, alibi_slopes=alibi_slopes, out=out)
    args = (shapes.softmax_scale, *shapes.window, shapes.softcap, "", "")
    if out is None:
        out, lse = ops.fwd(q, k, v, alibi_slopes, *args, bool(deterministic))
    else:
        lse = ops.fwd_out(q, k, v, alibi_slopes, out, *args)
    return (out, lse) if return_lse else out


@pytest.mark.parametrize("seed", range(12))
def test_every_custom_op_call_does_what_it_does_from_a_cold_start(recorded, monkeypatch, seed):
    """The cold-start comparison for the custom ops' bodies (calls.find_op), forward and backward."""
    rng = random.Random(seed)
    pool = [_cache_case(spec) for spec in sample_specs(rng, _RESPECTS)]
    with torch.library._scoped_library("fa2rt", "IMPL") as lib:
        _cpu_custom_ops(lib)
        assert_warm_equals_cold([rng.choice(pool) for _ in range(60)],
                                lambda case: call_outcome(_as_compiled, *case, recorded.launches),
                                lambda: cold_start(monkeypatch))
