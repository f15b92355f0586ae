"""fa2rt.attention_backward and attention_varlen_backward: the backward kernels from a forward's out and lse, without
autograd (what torch's SDPA registry integration calls). On the CPU: their fallback against autograd through
fa2rt.attention / attention_varlen in float64, the misuse they name, and on a synthetic sm90 (launches recorded, as
test_eager_path.py) the same backward launches that autograd makes."""

import warnings

import pytest
import torch
from test_eager_path import make, recorded  # noqa: F401 - the fixture

import fa2rt
from fa2rt import policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = {
    "causal": dict(causal=True),
    "window_softcap": dict(window_size=(7, 2), softcap=3.0, softmax_scale=0.3),
    "alibi": dict(alibi_slopes=(2, 4)),
}


def leaves(seed, nq=19, nk=23, h=4, hk=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, heads, d, generator=g, dtype=torch.float64).requires_grad_()
            for n, heads in ((nq, h), (nk, hk), (nk, hk))]


@pytest.mark.parametrize("name", OPTIONS)
def test_fallback_equals_autograd(name):
    options = dict(OPTIONS[name])
    if "alibi_slopes" in options:
        options["alibi_slopes"] = torch.rand(options["alibi_slopes"], dtype=torch.float32) + 0.1
    q, k, v = leaves(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out, lse = fa2rt.attention(q, k, v, return_lse=True, **options)
        dout = torch.randn_like(out)
        expected = torch.autograd.grad(out, (q, k, v), dout)
        got = fa2rt.attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, **options)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype and not g.requires_grad
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_empty_keys_give_zero_gradients():
    q, k, v = (t.detach() for t in leaves(2, nk=0))
    out, lse = fa2rt.attention(q, k, v, return_lse=True)
    dq, dk, dv = fa2rt.attention_backward(torch.ones_like(out), q, k, v, out, lse)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(dout=a["dout"][:, :-1]), "dout: expected shape"),
    (lambda a: a.update(out=a["out"].float()), "out: expected dtype"),
    (lambda a: a.update(lse=a["lse"][..., :-1]), "lse: expected a dense float32 tensor of shape"),
    (lambda a: a.update(lse=a["lse"].double()), "lse: expected a dense float32"),
    (lambda a: a.update(lse=None), "lse: expected a float32 tensor"),
    (lambda a: a.update(dout=a["dout"].transpose(2, 3)), "dout: expected"),
])
def test_misuse_is_named(change, match):
    q, k, v = (t.detach().half() for t in leaves(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out, lse = fa2rt.attention(q, k, v, return_lse=True)
    args = dict(dout=torch.ones_like(out), q=q, k=k, v=v, out=out, lse=lse)
    change(args)
    with pytest.raises((TypeError, ValueError), match=match):
        fa2rt.attention_backward(args.pop("dout"), args.pop("q"), args.pop("k"), args.pop("v"), args.pop("out"),
                                 args.pop("lse"))


def expect_autograd_launches(recorded, forward, backward, leaves, index=(), index_pointers=()):  # noqa: F811
    """backward(dout, q, k, v, out, lse, *index, causal=True) after forward(q, k, v, *index, causal=True,
    return_lse=True) launches the images autograd's backward launches, with the same input pointers (and index
    pointers); returns its launches."""
    q, k, v = leaves
    out, lse = forward(q, k, v, *index, causal=True, return_lse=True)
    dout = torch.randn(out.shape).to(out.dtype)
    out.backward(dout)
    _, *autograd_launches = recorded.launches
    assert len(autograd_launches) in {len(plan) for plan in policy.BACKWARD_PLANS.values()}
    recorded.launches.clear()
    dq, dk, dv = backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *index, causal=True)
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, v.shape]
    assert [launch[0].image for launch in recorded.launches] == [launch[0].image for launch in autograd_launches]
    for mine, theirs in zip(recorded.launches, autograd_launches, strict=True):
        named, expected = (dict(zip(launch[0].pointers, launch[3], strict=True)) for launch in (mine, theirs))
        assert named.keys() == expected.keys()
        for pointer in {"Q", "K", "V", "O", "DO", "LSE", *index_pointers} & named.keys():
            assert named[pointer] == expected[pointer], pointer
        assert named.get("DQ", dq.data_ptr()) == dq.data_ptr()
    return recorded.launches


def test_kernel_path_launches_what_autograd_launches(recorded):  # noqa: F811
    expect_autograd_launches(recorded, fa2rt.attention, fa2rt.attention_backward, make(requires_grad=True))


# --- attention_varlen_backward --------------------------------------------------------------------------------------

LENS_Q, LENS_K = (5, 0, 1, 9), (7, 3, 1, 6)


def packed(seed, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), heads, d, generator=g, dtype=dtype).requires_grad_()
               for lens, heads in ((LENS_Q, 4), (LENS_K, 2), (LENS_K, 2)))
    cu = [torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32) for lens in (LENS_Q, LENS_K)]
    return q, k, v, (*cu, max(LENS_Q), max(LENS_K))


@pytest.mark.parametrize("name", OPTIONS)
def test_varlen_fallback_equals_autograd(name):
    options = dict(OPTIONS[name])
    if "alibi_slopes" in options:
        options["alibi_slopes"] = torch.rand(len(LENS_Q), 4, dtype=torch.float32) + 0.1  # (batch, nheads)
    q, k, v, varlen = packed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out, lse = fa2rt.attention_varlen(q, k, v, *varlen, return_lse=True, **options)
        dout = torch.randn_like(out)
        expected = torch.autograd.grad(out, (q, k, v), dout)
        got = fa2rt.attention_varlen_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *varlen,
                                              **options)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype and not g.requires_grad
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(lse=a["lse"].transpose(0, 1).contiguous()), r"lse: expected .* shape \(4, 15\)"),
    (lambda a: a.update(dout=a["dout"][None]), r"dout: expected a 3-D tensor \(total_tokens"),
    (lambda a: a.update(out=a["out"][:-1]), "out: expected shape"),
])
def test_varlen_misuse_is_named(change, match):
    q, k, v, varlen = (*(t.detach().half() for t in packed(5)[:3]), packed(5)[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        out, lse = fa2rt.attention_varlen(q, k, v, *varlen, return_lse=True)
    args = dict(dout=torch.ones_like(out), out=out, lse=lse)
    change(args)
    with pytest.raises((TypeError, ValueError), match=match):
        fa2rt.attention_varlen_backward(args["dout"], q, k, v, args["out"], args["lse"], *varlen)


def test_varlen_kernel_path_launches_what_autograd_launches(recorded):  # noqa: F811
    q, k, v, varlen = packed(6, d=64, dtype=torch.bfloat16)
    launches = expect_autograd_launches(recorded, fa2rt.attention_varlen, fa2rt.attention_varlen_backward, (q, k, v),
                                        varlen, ("CU_Q", "CU_K"))
    assert all("-varlen-" in launch[0].image for launch in launches)
