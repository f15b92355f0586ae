"""The varlen kernel path on CPU tensors described as an sm90 GPU: fa2rt.attention_varlen -> ops.run_eager (and the
fa2rt::varlen_fwd / varlen_bwd custom ops) -> launch plans, with the launches recorded instead of run (as
test_eager_path.py does for dense calls). Each launch is compared with the named arguments the library computes
(ops.kernel_args, ops.bwd_kernel_args with the cu_seqlens) packed by the dispatcher's packer, on the image explain()
names, which must be a varlen image."""

import pytest
import torch
from test_eager_path import (
    assert_warm_equals_cold,
    call_outcome,
    cold_start,
    expect_launch,
    laid_out,
    recorded,  # noqa: F401 - the fixture
    sample_specs,
)

import fa2rt
from fa2rt import ops, policy
from fa2rt.validate import check_varlen_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENS_Q, LENS_K = (5, 0, 1, 40), (7, 3, 1, 30)


def cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def make(h=4, hk=2, d=64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), heads, d, generator=g).to(torch.bfloat16).requires_grad_(requires_grad)
               for lens, heads in ((LENS_Q, h), (LENS_K, hk), (LENS_K, hk)))
    return q, k, v, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K)


OPTIONS = {"causal": dict(causal=True), "alibi_window": dict(window_size=(5, 2), alibi_slopes=(4, 4)),
           "softcap": dict(softcap=4.0, softmax_scale=0.2)}


def options(name):
    opts = dict(OPTIONS[name])
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = torch.rand(opts["alibi_slopes"]) + 0.05  # (batch, nheads)
    return opts


@pytest.mark.parametrize("name", OPTIONS)
def test_forward_launches_a_varlen_image_with_the_named_arguments(recorded, name):  # noqa: F811
    q, k, v, cq, ck, mq, mk = make()
    opts = options(name)
    decision = fa2rt.explain(q, k, v, cq, ck, mq, mk, **opts)
    assert decision.path == "kernel" and decision.image.startswith("fwd-sm90-bf16-d64"), decision
    assert "-varlen-" in decision.image
    assert any(code == "layout" for _, code, _ in decision.rejections)  # the dense images, turned down by layout
    out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (4, sum(LENS_Q))
    (launch,) = recorded.launches
    named = dict(zip(launch[0].pointers, launch[3], strict=True))
    assert (named["CU_Q"], named["CU_K"], named["LSE"]) == (cq.data_ptr(), ck.data_ptr(), lse.data_ptr())
    shapes = check_varlen_inputs(q, k, v, cq, ck, mq, mk, softmax_scale=opts.pop("softmax_scale", None),
                                 causal=opts.pop("causal", False), **opts)
    args = ops.kernel_args(q, k, v, out, lse, opts.get("alibi_slopes"), shapes, (cq, ck))
    expect_launch(launch, decision.image, args, policy.problem_for(shapes, (q, k, v, out)))


def test_out_is_written_in_place(recorded):  # noqa: F811
    q, k, v, cq, ck, mq, mk = make()
    out = torch.empty_like(q)
    assert fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, out=out) is out
    (launch,) = recorded.launches
    assert dict(zip(launch[0].pointers, launch[3], strict=True))["O"] == out.data_ptr()


def test_backward_launches_both_varlen_backward_images(recorded):  # noqa: F811
    q, k, v, cq, ck, mq, mk = make(requires_grad=True)
    decision = fa2rt.explain(q, k, v, cq, ck, mq, mk, causal=True)
    assert [img.split("-")[0] for img, _ in decision.backward] == list(policy.BACKWARD_PLANS["fa2"])
    assert all("-varlen-" in img for img, _ in decision.backward)
    out, lse = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, return_lse=True)
    dout = torch.randn(q.shape).to(q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]
    fwd_launch, *bwd_launches = recorded.launches
    assert [launch[0].image for launch in bwd_launches] == [image for image, _ in decision.backward]
    shapes = check_varlen_inputs(q.detach(), k.detach(), v.detach(), cq, ck, mq, mk, causal=True, softmax_scale=None)
    tensors = {"q": q, "k": k, "v": v, "o": out, "do": dout} | dict(zip(("dq", "dk", "dv"), grads, strict=True))
    for op, launch in zip(policy.BACKWARD_PLANS["fa2"], bwd_launches, strict=True):
        plan, _, _, addr = launch
        named = dict(zip(plan.pointers, addr, strict=True))
        assert named["CU_Q"] == cq.data_ptr() and named["CU_K"] == ck.data_ptr() and named["LSE"] == lse.data_ptr()
        args = ops.bwd_kernel_args(tensors, lse, lse, None, shapes, (cq, ck)) | named
        expect_launch(launch, plan.image, args, policy.problem_for(shapes, tensors.values(), op))


def _masked(launch):
    plan = launch[0]
    return plan.image, plan.packed([0] * len(plan.pointers))


@pytest.mark.parametrize("selected", [True, False], ids=["image", "selected-at-run-time"])
def test_custom_ops_launch_what_eager_calls_launch(recorded, selected):  # noqa: F811
    # The varlen ops are registered for every device, so they run here on the synthetic sm90 device as they are.
    q, k, v, cq, ck, mq, mk = make(requires_grad=True)
    dout = torch.randn(q.shape).to(q.dtype)
    out = fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    torch.autograd.grad(out, (q, k, v), dout)
    eager = [_masked(launch) for launch in recorded.launches]
    recorded.launches.clear()
    decision = fa2rt.explain(q, k, v, cq, ck, mq, mk, causal=True)
    image, mode = (decision.image, decision.mode) if selected else ("", "")
    out, lse = ops.varlen_fwd(q, k, v, cq, ck, mq, mk, None, 64**-0.5, -1, 0, 0.0, image, mode, False)
    assert lse.shape == (4, q.shape[0])
    torch.autograd.grad(out, (q, k, v), dout)
    assert [_masked(launch) for launch in recorded.launches] == eager and len(eager) == 1 + len(decision.backward)


def test_fake_implementations_give_flash_attn_shapes():
    q, k, v, cq, ck, mq, mk = (t.to("meta") if isinstance(t, torch.Tensor) else t for t in make())
    out, lse = ops.varlen_fwd(q, k, v, cq, ck, mq, mk, None, 0.125, -1, -1, 0.0, "", "", False)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    grads = ops.varlen_bwd(out, q, k, v, out, lse, cq, ck, mq, mk, None, 0.125, -1, -1, 0.0, False)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_repeated_calls_skip_validation_only_when_indices_are_not_read(recorded, monkeypatch):  # noqa: F811
    """A repeated varlen call is validated once when its cu_seqlens' values are not read on the host (a GPU's, shown
    here by should_check_values); CPU cu_seqlens are checked at every call. Another max_seqlen is a new key."""
    from fa2rt import api, calls

    monkeypatch.setattr(calls, "_CALLS", {})
    validated = []
    real = api.check_varlen_inputs
    monkeypatch.setattr(api, "check_varlen_inputs", lambda *a, **kw: validated.append(1) or real(*a, **kw))
    q, k, v, cq, ck, mq, mk = make()
    for _ in range(2):
        fa2rt.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    assert len(validated) == 2
    monkeypatch.setattr(calls, "should_check_values", lambda t: False)
    queries = [q.clone() for _ in range(3)]  # alive together: three addresses
    outs = [fa2rt.attention_varlen(query, k, v, cq, ck, mq, mk, causal=True) for query in queries]
    assert len(validated) == 3 and len(recorded.launches) == 5
    assert recorded.launches[4][3][0] != recorded.launches[3][3][0]  # a new q's address, the same plan
    assert recorded.launches[4][0] is recorded.launches[3][0] and outs[2].shape == q.shape
    fa2rt.attention_varlen(q, k, v, cq, ck, mq + 1, mk, causal=True)
    assert len(validated) == 4


def make_paged(page_size=16, hk=2, d=64):
    """q, packed k/v and the same keys in a pool of pages (sequence b's pages in reverse order), its block table."""
    q, k, v, cq, ck, mq, mk = make(hk=hk, d=d)
    pages = [-(-n // page_size) for n in LENS_K]
    num_blocks = sum(pages)
    order = list(range(num_blocks))[::-1]
    table = torch.zeros(len(LENS_K), max(pages), dtype=torch.int32)
    pools = [torch.zeros(num_blocks, page_size, hk, d, dtype=k.dtype) for _ in range(2)]
    page, row = 0, 0
    for b, n in enumerate(LENS_K):
        table[b, :pages[b]] = torch.tensor(order[page:page + pages[b]])
        for j in range(n):
            for pool, src in zip(pools, (k, v), strict=True):
                pool[order[page + j // page_size], j % page_size] = src[row + j]
        page, row = page + pages[b], row + n
    return q, pools[0], pools[1], table, cq, ck, mq, mk


@pytest.mark.parametrize("name", OPTIONS)
def test_paged_forward_launches_a_paged_image_with_the_named_arguments(recorded, name):  # noqa: F811
    q, kp, vp, table, cq, ck, mq, mk = make_paged()
    opts = options(name)
    decision = fa2rt.explain(q, kp, vp, cq, ck, mq, mk, block_table=table, **opts)
    assert decision.path == "kernel" and decision.image.startswith("fwd-sm90-bf16-d64"), decision
    assert "-varlen_paged-" in decision.image and not decision.backward
    assert any(code == "layout" for _, code, _ in decision.rejections)  # dense and varlen images
    out, lse = fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, block_table=table, return_lse=True, **opts)
    assert out.shape == q.shape and lse.shape == (4, sum(LENS_Q))
    (launch,) = recorded.launches
    named = dict(zip(launch[0].pointers, launch[3], strict=True))
    assert (named["K"], named["BLOCK_TABLE"], named["CU_K"]) == (kp.data_ptr(), table.data_ptr(), ck.data_ptr())
    shapes = check_varlen_inputs(q, kp, vp, cq, ck, mq, mk, softmax_scale=opts.pop("softmax_scale", None),
                                 causal=opts.pop("causal", False), block_table=table, **opts)
    args = ops.kernel_args(q, kp, vp, out, lse, opts.get("alibi_slopes"), shapes, (cq, ck, table))
    assert (args["page_size"], args["pool_blocks"], args["max_blocks"], args["stride_bt"]) == (
        16, kp.shape[0], table.shape[1], table.stride(0))
    expect_launch(launch, decision.image, args, policy.problem_for(shapes, (q, kp, vp, out)))


@pytest.mark.parametrize("selected", [True, False], ids=["image", "selected-at-run-time"])
def test_paged_custom_op_launches_what_eager_calls_launch(recorded, selected):  # noqa: F811
    q, kp, vp, table, cq, ck, mq, mk = make_paged()
    fa2rt.attention_varlen(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table)
    eager = [_masked(launch) for launch in recorded.launches]
    recorded.launches.clear()
    decision = fa2rt.explain(q, kp, vp, cq, ck, mq, mk, causal=True, block_table=table)
    image, mode = (decision.image, decision.mode) if selected else ("", "")
    out, lse = ops.varlen_paged_fwd(q, kp, vp, cq, ck, table, mq, mk, None, 64**-0.5, -1, 0, 0.0, image, mode)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert [_masked(launch) for launch in recorded.launches] == eager and len(eager) == 1


# Same total lengths split otherwise (same tensor shapes, other cu_seqlens values and longest sequences).
_SPLITS = {"a": (LENS_Q, LENS_K), "b": ((20, 0, 1, 25), (10, 1, 0, 30))}
_VARLEN_RESPECTS = {  # each respect a varlen call can differ in, the first value the common one
    "dtype": [torch.bfloat16, torch.float16], "head_dim": [64, 128, 48], "grad": [False, True, "q"],
    "split": ["a", "b"], "max_seqlen": ["exact", "longer", "shorter"], "cu_q": [torch.int32, torch.int64],
    "cu_k": [torch.int32, torch.int64],
    "layout_q": ["contig", "offset", "sliced"], "layout_v": ["contig", "sliced"], "causal": [True, False, 1],
    "window_size": [(-1, -1), (4, -1), [4, -1], (4, 0)], "softcap": [0.0, 0, 8.0], "softmax_scale": [None, 0.2],
    "alibi": [None, "heads", "batch"], "out": [None, "like"], "return_lse": [False, True],
    "deterministic": [False, True], "no_grad": [False, True], "force_arch": [None, "sm80"],
}


def _varlen_case(spec: dict) -> tuple:
    """A spec's call: (q, k, v), the keyword arguments of attention_varlen, the context."""
    lens_q, lens_k = _SPLITS[spec["split"]]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), heads, spec["head_dim"], generator=g).to(spec["dtype"])
               for lens, heads in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    q, v = laid_out(q, spec["layout_q"]), laid_out(v, spec["layout_v"])
    q, k, v = (t.requires_grad_(spec["grad"] in (True, name)) for t, name in zip((q, k, v), "qkv", strict=True))
    extra = {"exact": 0, "longer": 3, "shorter": -1}[spec["max_seqlen"]]  # shorter: refused
    kw = {"cu_seqlens_q": cu(lens_q).to(spec["cu_q"]), "cu_seqlens_k": cu(lens_k).to(spec["cu_k"]),
          "max_seqlen_q": max(lens_q) + extra, "max_seqlen_k": max(lens_k) + extra}
    kw |= {name: spec[name] for name in ("causal", "window_size", "softcap", "softmax_scale", "return_lse",
                                         "deterministic")}
    if spec["alibi"]:
        kw["alibi_slopes"] = torch.rand(4 if spec["alibi"] == "heads" else (4, 4))
    if spec["out"]:
        kw["out"] = torch.empty_like(q)
    return (q, k, v), kw, {"no_grad": spec["no_grad"], "force_arch": spec["force_arch"]}


@pytest.mark.parametrize("seed", range(16))
def test_every_varlen_call_does_what_it_does_from_a_cold_start(recorded, monkeypatch, seed):  # noqa: F811
    """test_eager_path's cold-start comparison for varlen calls: a seeded sequence of nearly equal calls (other
    cu_seqlens values of the same shapes, longest sequences, index dtypes, layouts, grad, every option) does with
    every cache warm what it does from a cold start. cu_seqlens are remembered here as on a GPU (their values are
    read on the host only on the CPU)."""
    import random

    from fa2rt import calls

    monkeypatch.setattr(calls, "should_check_values", lambda t: False)
    rng = random.Random(seed)
    pool = [_varlen_case(spec) for spec in sample_specs(rng, _VARLEN_RESPECTS)]
    assert_warm_equals_cold([rng.choice(pool) for _ in range(100)],
                            lambda case: call_outcome(fa2rt.attention_varlen, *case, recorded.launches),
                            lambda: cold_start(monkeypatch))
