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
