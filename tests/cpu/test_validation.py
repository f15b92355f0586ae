import math
import re

import pytest
import torch

from fa2rt.validate import SUPPORTED_DTYPES, Shapes, check_inputs


def qkv(b=2, nq=5, nk=7, h=4, hk=2, d=16, dtype=torch.float16):
    return (torch.randn(b, nq, h, d, dtype=dtype), torch.randn(b, nk, hk, d, dtype=dtype),
            torch.randn(b, nk, hk, d, dtype=dtype))


def check(q, k, v, causal=False, softmax_scale=None, out=None):
    return check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, out=out)


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


@pytest.mark.parametrize("h,hk", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_valid_shapes(h, hk):
    q, k, v = qkv(h=h, hk=hk)
    s = check(q, k, v)
    assert s == Shapes(batch=2, seqlen_q=5, seqlen_k=7, nheads=h, nheads_k=hk, head_dim=16,
                       dtype=torch.float16, device=torch.device("cpu"), softmax_scale=16**-0.5)
    assert not s.trivial


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_supported_dtypes(dtype):
    assert check(*qkv(dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dims", [dict(b=0), dict(nq=0), dict(nk=0), dict(h=0, hk=0), dict(h=0, hk=2)])
def test_empty_dims_are_valid(dims):
    s = check(*qkv(**dims))
    assert s.trivial


def test_not_a_tensor():
    q, k, v = qkv()
    with raises(TypeError, "k: expected a torch.Tensor, got list"):
        check(q, [[1.0]], v)
    with raises(TypeError, "out: expected None or a torch.Tensor, got ndarray"):
        check(q, k, v, out=q.numpy())


def test_rank():
    q, k, v = qkv()
    with raises(ValueError, "q: expected a 4-D tensor (batch, seqlen, nheads, headdim), got shape (5, 4, 16)"):
        check(q[0], k, v)
    with raises(ValueError, "v: expected a 4-D tensor (batch, seqlen, nheads, headdim), got shape (2, 7, 2, 16, 1)"):
        check(q, k, v[..., None])


def test_unsupported_dtype():
    q, k, v = qkv()
    with raises(ValueError, "q: expected dtype in (float16, bfloat16, float32, float64), got torch.int32"):
        check(q.to(torch.int32), k, v)
    with raises(ValueError, "k: expected dtype in (float16, bfloat16, float32, float64), got torch.complex64"):
        check(q, torch.randn(2, 7, 2, 16, dtype=torch.complex64), v)


def test_dtype_mismatch():
    q, k, v = qkv()
    with raises(ValueError, "v: expected dtype torch.float16 (same as q), got torch.bfloat16"):
        check(q, k, v.bfloat16())


def test_device_mismatch():
    q, k, v = qkv()
    with raises(ValueError, "k: expected device cpu (same as q), got meta"):
        check(q, k.to("meta"), v)


def test_batch_mismatch():
    q, k, v = qkv()
    with raises(ValueError, "k: expected batch size 2 (same as q), got 3 (shape (3, 7, 2, 16))"):
        check(q, torch.randn(3, 7, 2, 16, dtype=q.dtype), torch.randn(3, 7, 2, 16, dtype=q.dtype))


def test_kv_shape_mismatch():
    q, k, v = qkv()
    with raises(ValueError, "v: expected shape (2, 7, 2, 16) (same as k), got shape (2, 6, 2, 16)"):
        check(q, k, v[:, :6])


def test_head_dim_mismatch():
    q, k, v = qkv()
    with raises(ValueError, "k: expected head dim 16 (same as q), got 8 (shape (2, 7, 2, 8))"):
        check(q, k[..., :8], v[..., :8])


def test_head_dim_zero():
    q, k, v = qkv(d=0)
    with raises(ValueError, "q: expected head dim >= 1, got 0"):
        check(q, k, v)


@pytest.mark.parametrize("h,hk", [(4, 3), (4, 8), (4, 0)])
def test_heads_not_divisible(h, hk):
    q, k, v = qkv(h=h, hk=hk)
    with raises(ValueError, f"k: expected a number of heads that divides q's nheads={h} (MQA/GQA), got nheads_k={hk}"):
        check(q, k, v)


def test_last_dim_not_contiguous():
    q, k, v = qkv()
    with raises(ValueError, "q: expected a contiguous last dimension (stride(-1) == 1; call .contiguous()), "
                            "got stride (320, 1, 5, 20) for shape (2, 5, 4, 16)"):
        check(q.transpose(1, 3).contiguous().transpose(1, 3), k, v)
    with raises(ValueError, "v: expected a contiguous last dimension"):
        check(q, k, torch.empty(2, 7, 16, 2, dtype=q.dtype).transpose(2, 3))


def test_non_contiguous_but_last_dim_dense_is_valid():
    qkv_packed = torch.randn(2, 5, 3, 4, 16, dtype=torch.float16)
    q, k, v = qkv_packed.unbind(2)
    assert check(q, k, v).nheads_k == 4


def test_sparse_rejected():
    q, k, v = qkv(dtype=torch.float32)
    with raises(ValueError, "q: expected a dense (strided) tensor, got layout torch.sparse_coo"):
        check(q.to_sparse(), k, v)


@pytest.mark.parametrize("scale", [0.125, 1, -0.5, 0.0])
def test_softmax_scale_accepted(scale):
    assert check(*qkv(), softmax_scale=scale).softmax_scale == float(scale)


@pytest.mark.parametrize("scale,exc,text", [
    (math.nan, ValueError, "softmax_scale: expected None or a finite real number, got nan"),
    (math.inf, ValueError, "softmax_scale: expected None or a finite real number, got inf"),
    ("0.1", TypeError, "softmax_scale: expected None or a finite real number, got '0.1' (str)"),
    (True, TypeError, "softmax_scale: expected None or a finite real number, got True (bool)"),
    (torch.tensor(0.1), TypeError, "softmax_scale: expected None or a finite real number, got tensor(0.1000) (Tensor)"),
])
def test_softmax_scale_rejected(scale, exc, text):
    with raises(exc, text):
        check(*qkv(), softmax_scale=scale)


def test_causal_not_bool():
    with raises(TypeError, "causal: expected a bool, got 1 (int)"):
        check(*qkv(), causal=1)
    with raises(TypeError, "causal: expected a bool, got None (NoneType)"):
        check(*qkv(), causal=None)


def test_out():
    q, k, v = qkv()
    assert check(q, k, v, out=torch.empty_like(q)).batch == 2
    with raises(ValueError, "out: expected shape (2, 5, 4, 16) (same as q), got shape (2, 5, 4, 8)"):
        check(q, k, v, out=q[..., :8])
    with raises(ValueError, "out: expected dtype torch.float16 (same as q), got torch.float32"):
        check(q, k, v, out=q.float())
    with raises(ValueError, "out: expected device cpu (same as q), got meta"):
        check(q, k, v, out=q.to("meta"))
    with raises(ValueError, "out: expected a contiguous last dimension"):
        check(q, k, v, out=torch.empty(2, 5, 16, 4, dtype=q.dtype).transpose(2, 3))


def check_with(q=None, k=None, v=None, **kwargs):
    q0, k0, v0 = qkv()
    kwargs = {"causal": False, "softmax_scale": None, **kwargs}
    return check_inputs(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, **kwargs)


def test_new_fields_default_off():
    s = check(*qkv())
    assert (s.causal, s.window, s.softcap, s.has_alibi) == (False, (-1, -1), 0.0, False)
    assert check(*qkv(), causal=True).window == (-1, 0)


@pytest.mark.parametrize("window,causal,effective", [
    ((-1, -1), False, (-1, -1)), ((-1, -1), True, (-1, 0)), ((3, 0), False, (3, 0)), ([0, 5], False, (0, 5)),
    ((2, 7), True, (2, 0)), ((-1, 4), True, (-1, 0)), ((0, 0), False, (0, 0)), ((10**12, -1), False, (10**12, -1)),
])
def test_window_accepted(window, causal, effective):
    s = check_with(window_size=window, causal=causal)
    assert s.window == effective and s.causal is causal
    assert all(type(side) is int for side in s.window)


@pytest.mark.parametrize("window,exc,text", [
    (3, TypeError, "window_size: expected a (left, right) tuple or list of two ints, -1 meaning unlimited, "
                   "got 3 (int)"),
    (None, TypeError, "window_size: expected a (left, right) tuple or list of two ints, -1 meaning unlimited, "
                      "got None (NoneType)"),
    ("ab", TypeError, "window_size: expected a (left, right) tuple or list of two ints, -1 meaning unlimited, "
                      "got 'ab' (str)"),
    (torch.tensor([1, 1]), TypeError, "window_size: expected a (left, right) tuple or list"),
    ((1, 2, 3), ValueError, "window_size: expected a (left, right) tuple or list of two ints, -1 meaning unlimited, "
                            "got (1, 2, 3) (length 3)"),
    ([1], ValueError, "window_size: expected a (left, right) tuple or list of two ints, -1 meaning unlimited, "
                      "got [1] (length 1)"),
    ((True, 0), TypeError, "window_size[0]: expected an int >= -1 (-1 = unlimited), got True (bool)"),
    ((0, 1.0), TypeError, "window_size[1]: expected an int >= -1 (-1 = unlimited), got 1.0 (float)"),
    ((0, None), TypeError, "window_size[1]: expected an int >= -1 (-1 = unlimited), got None (NoneType)"),
    ((-2, 0), ValueError, "window_size[0]: expected an int >= -1 (-1 = unlimited), got -2"),
    ((4, -5), ValueError, "window_size[1]: expected an int >= -1 (-1 = unlimited), got -5"),
])
def test_window_rejected(window, exc, text):
    with raises(exc, text):
        check_with(window_size=window)
    with raises(exc, text):  # causal replaces the right side, but the argument is still checked
        check_with(window_size=window, causal=True)


@pytest.mark.parametrize("softcap", [0, 0.0, 5, 30.5, 1e-3])
def test_softcap_accepted(softcap):
    s = check_with(softcap=softcap)
    assert s.softcap == float(softcap) and type(s.softcap) is float


@pytest.mark.parametrize("softcap,exc,text", [
    (-1.0, ValueError, "softcap: expected a finite real number >= 0 (0 disables it), got -1.0"),
    (math.nan, ValueError, "softcap: expected a finite real number >= 0 (0 disables it), got nan"),
    (math.inf, ValueError, "softcap: expected a finite real number >= 0 (0 disables it), got inf"),
    (None, TypeError, "softcap: expected a finite real number >= 0 (0 disables it), got None (NoneType)"),
    (True, TypeError, "softcap: expected a finite real number >= 0 (0 disables it), got True (bool)"),
    ("5", TypeError, "softcap: expected a finite real number >= 0 (0 disables it), got '5' (str)"),
])
def test_softcap_rejected(softcap, exc, text):
    with raises(exc, text):
        check_with(softcap=softcap)


@pytest.mark.parametrize("slopes", [
    torch.ones(4), torch.ones(2, 4), torch.ones(4, 2)[:, 1], torch.ones(4).expand(2, 4), torch.ones(4, 2).t(),
])
def test_alibi_accepted(slopes):
    assert check_with(alibi_slopes=slopes).has_alibi
    assert not check_with(alibi_slopes=None).has_alibi


def test_alibi_accepted_for_empty_batch():
    q, k, v = qkv(b=0)
    assert check(q, k, v).trivial
    assert check_inputs(q, k, v, causal=False, softmax_scale=None, alibi_slopes=torch.ones(0, 4)).has_alibi


@pytest.mark.parametrize("slopes,exc,text", [
    ([0.5] * 4, TypeError, "alibi_slopes: expected None or a torch.Tensor, got list"),
    (0.5, TypeError, "alibi_slopes: expected None or a torch.Tensor, got float"),
    (torch.ones(4, dtype=torch.float16), ValueError, "alibi_slopes: expected dtype torch.float32, got torch.float16"),
    (torch.ones(4, dtype=torch.float64), ValueError, "alibi_slopes: expected dtype torch.float32, got torch.float64"),
    (torch.ones(3), ValueError, "alibi_slopes: expected shape (4,) or (2, 4) ((nheads,) or (batch, nheads)), "
                                "got shape (3,)"),
    (torch.ones(2), ValueError, "alibi_slopes: expected shape (4,) or (2, 4)"),  # nheads_k is not enough
    (torch.ones(4, 2), ValueError, "alibi_slopes: expected shape (4,) or (2, 4) ((nheads,) or (batch, nheads)), "
                                   "got shape (4, 2)"),
    (torch.ones(1, 4), ValueError, "alibi_slopes: expected shape (4,) or (2, 4)"),  # no broadcasting
    (torch.ones(2, 4, 1), ValueError, "alibi_slopes: expected shape (4,) or (2, 4)"),
    (torch.tensor(1.0), ValueError, "alibi_slopes: expected shape (4,) or (2, 4) ((nheads,) or (batch, nheads)), "
                                    "got shape ()"),
    (torch.ones(4, device="meta"), ValueError, "alibi_slopes: expected device cpu (same as q), got meta"),
    (torch.ones(2, 4).to_sparse(), ValueError, "alibi_slopes: expected a dense (strided) tensor, "
                                               "got layout torch.sparse_coo"),
])
def test_alibi_rejected(slopes, exc, text):
    with raises(exc, text):
        check_with(alibi_slopes=slopes)


def test_out_with_autograd_rejected():
    q, k, v = qkv(dtype=torch.float32)
    out = torch.empty_like(q)
    for needs_grad in (q, k, v):
        needs_grad.requires_grad_(True)
        with raises(ValueError, "out: expected None when q, k or v requires grad (out= does not support autograd), "
                                "got a tensor"):
            check(q, k, v, out=out)
        with torch.no_grad():  # nothing will be recorded: out= is fine
            assert check(q, k, v, out=out).batch == 2
        assert check(q, k, v).batch == 2  # and without out, gradients are fine
        needs_grad.requires_grad_(False)
    assert check(q, k, v, out=out).batch == 2
