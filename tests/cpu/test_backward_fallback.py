"""Gradients through fa2rt.attention on its fallback paths (the SDPA fallback is what runs on the CPU), against
float64 autograd gradients of fa2rt.reference.attention_reference; and the autograd rules of the public call:
which inputs get gradients, lse carries none, out= is refused with autograd, alibi slopes that require grad fall
back (reason alibi_grad), deterministic gradients, torch.compile.

tests/cpu/test_fallback.py checks fallback.sdpa_attention itself over many shapes; this file goes through
fa2rt.attention (validation, policy, argument passing) for each feature.
"""

import contextlib
import warnings

import pytest
import torch

import fa2rt
import fa2rt.fallback as fallback
from fa2rt import api
from fa2rt.reference import attention_reference

# On the CPU every call falls back (not_gpu), announced once per process; the tests that check announcements clear
# the record first (fresh_announcements) and catch the warning themselves.
pytestmark = [pytest.mark.filterwarnings("ignore::fa2rt.FallbackWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

# rtol = atol of the gradients against the float64 reference computed from the same inputs: float64 is the same math
# up to rounding; float32 is SDPA in float32 (as in test_fallback.GRAD_TOL).
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = [torch.float32, torch.float64]



def make(b=2, nq=7, nk=9, h=4, hk=2, d=16, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(b, n, heads, d, generator=g, dtype=torch.float64).to(dtype)
          for n, heads in ((nq, h), (nk, hk), (nk, hk))]
    return [t.requires_grad_(requires_grad) for t in ts]


def slopes_for(kind, b=2, h=4, requires_grad=False):
    shape = {"heads": (h,), "batch": (b, h)}[kind]
    s = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.05
    return s.requires_grad_(requires_grad)


def grad_out_like(out, seed=3):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)


def reference_grads(q, k, v, leaves, grad_out, **kwargs):
    """float64 gradients of the reference for `leaves` (tensors among q, k, v and the slopes, or views' bases)."""
    ref, ref_lse = attention_reference(q, k, v, **kwargs)
    return torch.autograd.grad(ref, leaves, grad_out.to(torch.float64)), ref_lse


def check_grads(q, k, v, leaves=None, **kwargs):
    """fa2rt.attention's gradients for `leaves` (default: those of q, k, v and alibi_slopes that require grad) against
    the reference's; every gradient finite, and exactly 0 for query rows that see no key. Returns the no-key mask
    (batch, nheads, seqlen_q)."""
    slopes = kwargs.get("alibi_slopes")
    leaves = leaves or [t for t in (q, k, v, slopes) if t is not None and t.requires_grad]
    out = fa2rt.attention(q, k, v, **kwargs)
    grad_out = grad_out_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want, ref_lse = reference_grads(q, k, v, leaves, grad_out, **kwargs)
    tol = GRAD_TOL[q.dtype]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        assert torch.isfinite(g).all(), f"gradient {i} has NaN/inf"
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol,
                                   msg=lambda m, i=i: f"gradient {i}: {m}")
    empty = ref_lse.isinf()
    if leaves[0] is q:
        assert got[0].transpose(1, 2)[empty].eq(0).all()  # rows that see no key: gradient exactly 0
    assert out.transpose(1, 2)[empty].eq(0).all()
    return empty


# (b, nq, nk, h, hk, d), kwargs
CASES = {
    "plain": ((2, 7, 7, 4, 4, 16), {}),
    "causal": ((2, 7, 7, 4, 4, 16), dict(causal=True)),
    "causal_q_shorter": ((2, 5, 11, 4, 4, 16), dict(causal=True)),
    "causal_q_longer": ((2, 11, 5, 4, 4, 16), dict(causal=True)),  # rows 0..5 see no key
    "window": ((2, 9, 9, 4, 2, 16), dict(window_size=(2, 1))),
    "window_causal": ((2, 9, 13, 4, 2, 16), dict(causal=True, window_size=(3, -1))),
    "window_no_key_rows": ((2, 12, 4, 4, 2, 16), dict(window_size=(1, 1))),  # rows 0..6 see no key
    "window_left_only": ((2, 6, 10, 4, 2, 16), dict(window_size=(0, -1))),
    "softcap": ((2, 7, 9, 4, 2, 16), dict(softmax_scale=1.0, softcap=2.0)),
    "softcap_causal_window": ((2, 11, 6, 4, 2, 16), dict(softmax_scale=1.0, softcap=2.0, causal=True,
                                                         window_size=(2, 0))),
    "alibi_heads": ((2, 7, 9, 4, 2, 16), dict(alibi="heads")),
    "alibi_batch_causal": ((2, 9, 7, 4, 2, 16), dict(alibi="batch", causal=True)),
    "alibi_softcap_window": ((2, 8, 8, 4, 2, 16), dict(alibi="heads", softcap=3.0, window_size=(2, 2))),
    "gqa": ((2, 7, 9, 6, 2, 16), dict(causal=True)),
    "mqa": ((2, 9, 7, 6, 1, 16), dict(causal=True)),
    "mqa_window_alibi": ((2, 9, 7, 6, 1, 16), dict(window_size=(1, 2), alibi="batch")),
    "negative_scale": ((2, 5, 9, 4, 2, 16), dict(causal=True, softmax_scale=-0.3)),
    "negative_scale_features": ((2, 9, 5, 4, 2, 16), dict(softmax_scale=-0.3, window_size=(1, 3), alibi="heads",
                                                          softcap=2.0)),
    "zero_scale_causal": ((2, 6, 6, 4, 4, 16), dict(causal=True, softmax_scale=0.0)),
}


def case_inputs(name, dtype, slopes_grad=False):
    (b, nq, nk, h, hk, d), kwargs = CASES[name]
    kwargs = dict(kwargs)
    if "alibi" in kwargs:
        kwargs["alibi_slopes"] = slopes_for(kwargs.pop("alibi"), b, h, requires_grad=slopes_grad)
    return make(b, nq, nk, h, hk, d, dtype), kwargs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(name, dtype):
    (q, k, v), kwargs = case_inputs(name, dtype)
    empty = check_grads(q, k, v, **kwargs)
    assert empty.any(dim=(0, 1)).sum() == NO_KEY_ROWS.get(name, 0)  # the rows without keys are there


# Query rows that see no key, counted by hand (row i sees key j iff i + nk - nq - left <= j <= i + nk - nq + right).
NO_KEY_ROWS = {"causal_q_longer": 6, "window_no_key_rows": 7, "softcap_causal_window": 5, "alibi_batch_causal": 2,
               "mqa": 2, "negative_scale_features": 1}


def test_keys_no_row_sees_get_zero_gradient():
    # Window (1, 1) with 4 queries on 12 keys: only keys 7..11 are seen, so dk and dv are exactly 0 for keys 0..6.
    q, k, v = make(nq=4, nk=12)
    out = fa2rt.attention(q, k, v, window_size=(1, 1))
    _, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out_like(out))
    assert dk[:, :7].eq(0).all() and dv[:, :7].eq(0).all() and dk[:, 7:].ne(0).any() and dv[:, 7:].ne(0).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hk", [4, 2], ids=["mha", "gqa"])
def test_strided_inputs_from_packed_qkv(hk, dtype):
    # q, k and v as slices of one (b, n, h + 2 hk, d) projection: non-contiguous views sharing one gradient buffer.
    h, d = 4, 16
    packed = torch.randn(2, 9, h + 2 * hk, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    packed.requires_grad_(True)
    q, k, v = packed.split([h, hk, hk], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    check_grads(q, k, v, leaves=[packed], causal=True, window_size=(4, -1))


@pytest.mark.parametrize("which", ["q", "k", "v", "kv"])
def test_only_inputs_that_require_grad_get_one(which):
    tensors = dict(zip("qkv", make(requires_grad=False), strict=True))
    for name in which:
        tensors[name].requires_grad_(True)
    slopes = slopes_for("heads")
    out = fa2rt.attention(*tensors.values(), causal=True, alibi_slopes=slopes)
    assert out.requires_grad
    out.backward(grad_out_like(out))
    for name, t in tensors.items():
        assert (t.grad is not None) == (name in which), name
    assert slopes.grad is None


def test_no_grad_mode_records_nothing():
    q, k, v = make()
    with torch.no_grad():
        out = fa2rt.attention(q, k, v, causal=True, softcap=2.0)
    assert not out.requires_grad and out.grad_fn is None


# --- alibi slopes that require grad -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qkv_grad", [True, False], ids=["qkv_grad", "slopes_only"])
@pytest.mark.parametrize("name", ["alibi_heads", "alibi_batch_causal", "alibi_softcap_window", "mqa_window_alibi"])
def test_alibi_slopes_gradient_matches_reference(name, qkv_grad, dtype):
    # The fallback builds the bias from the slopes with torch ops, so slopes get a gradient like any input.
    (q, k, v), kwargs = case_inputs(name, dtype, slopes_grad=True)
    for t in (q, k, v):
        t.requires_grad_(qkv_grad)
    check_grads(q, k, v, **kwargs)


def test_explain_alibi_grad_rule_order(on_device):
    # The device rule comes first: on the CPU the reason stays not_gpu whatever the slopes.
    q, k, v = make(dtype=torch.float32)
    assert fa2rt.explain(q, k, v, alibi_slopes=slopes_for("heads", requires_grad=True)).reason == "not_gpu"
    # On a GPU, with a kernel dtype, slopes that require grad decide before any image is looked at.
    on_device("sm90")
    q, k, v = make(d=64, dtype=torch.bfloat16, requires_grad=False)
    for kind in ("heads", "batch"):
        d = fa2rt.explain(q, k, v, alibi_slopes=slopes_for(kind, requires_grad=True))
        assert (d.path, d.reason) == ("fallback", "alibi_grad") and "alibi_slopes" in d.message, d
    # ... but after the dtype rule.
    q32, k32, v32 = make(d=64, dtype=torch.float32, requires_grad=False)
    assert fa2rt.explain(q32, k32, v32, alibi_slopes=slopes_for("heads", requires_grad=True)).reason == "dtype"
    # Slopes that require grad in no_grad mode, or slopes that do not, leave the decision to the later rules.
    with torch.no_grad():
        assert fa2rt.explain(q, k, v, alibi_slopes=slopes_for("heads", requires_grad=True)).reason != "alibi_grad"
    assert fa2rt.explain(q, k, v, alibi_slopes=slopes_for("heads")).reason != "alibi_grad"


def test_alibi_grad_fallback_runs_and_is_announced(on_device, fresh_announcements):
    # With a (synthetic) GPU description the decision is alibi_grad, so attention() runs the fallback, here on the
    # CPU tensors: announced with that reason, with a slopes gradient. bf16 inputs (a kernel dtype, else the dtype
    # rule decides first): the fallback computes alibi in float32, and the inputs and grad_out are exact in float32,
    # so the gradient is float32-accurate against the float64 reference from the same bf16 values.
    on_device("sm90")
    q, k, v = make(d=64, dtype=torch.bfloat16, requires_grad=False)
    slopes = slopes_for("batch", requires_grad=True)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[alibi_grad\]"):
        out = fa2rt.attention(q, k, v, causal=True, alibi_slopes=slopes)
    grad_out = grad_out_like(out)
    (got,) = torch.autograd.grad(out, slopes, grad_out)
    (want,), _ = reference_grads(q, k, v, [slopes], grad_out, causal=True, alibi_slopes=slopes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


# --- lse, out= ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(2, 0), alibi_slopes=slopes_for("heads")),
                                    dict(softcap=2.0, causal=True)], ids=["plain", "masked", "explicit"])
def test_lse_carries_no_gradient(kwargs):
    q, k, v = make(nq=9, nk=6)
    out, lse = fa2rt.attention(q, k, v, return_lse=True, **kwargs)
    assert out.requires_grad and not lse.requires_grad and lse.grad_fn is None
    grad_out = grad_out_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    # Using lse in a loss changes nothing: it is a constant as far as autograd is concerned.
    loss = (out * grad_out).sum() + lse.masked_fill(lse.isinf(), 0).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_out_with_grad_is_refused_and_works_without():
    q, k, v = make()
    out = torch.full_like(q, 7.0, requires_grad=False)
    with pytest.raises(ValueError, match=r"^out: .*requires grad"):
        fa2rt.attention(q, k, v, out=out)
    assert out.eq(7.0).all()  # nothing was written
    with torch.no_grad():
        res = fa2rt.attention(q, k, v, out=out, causal=True)
    assert res is out
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, causal=True)[0], rtol=1e-5, atol=1e-5)


# --- deterministic ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic_algorithms():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


@pytest.fixture
def sdpa_backends(monkeypatch):
    """The SDPA backend lists the fallback enables, one per sdpa_kernel context it enters."""
    seen, real = [], fallback.sdpa_kernel

    def spy(backends, *args, **kwargs):
        seen.append(list(backends))
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(fallback, "sdpa_kernel", spy)
    return seen


@pytest.mark.parametrize("how", ["flag", "global"])
@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(3, 1), alibi_slopes=slopes_for("batch", h=6))],
                         ids=["plain", "masked"])
def test_deterministic_gradients_are_bitwise_equal(kwargs, how, sdpa_backends):
    q, k, v = make(nq=17, nk=23, h=6, hk=2, d=32)
    runs = []
    for _ in range(3):
        with deterministic_algorithms() if how == "global" else contextlib.nullcontext():
            out = fa2rt.attention(q, k, v, deterministic=how == "flag", **kwargs)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), grad_out_like(out))))
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            assert torch.equal(a, b)
    # Deterministic means SDPA's math backend only (the others' GPU backwards accumulate with atomics).
    assert sdpa_backends and all(b == fallback.DETERMINISTIC_BACKENDS for b in sdpa_backends), sdpa_backends
    sdpa_backends.clear()
    fa2rt.attention(q, k, v, **kwargs)
    assert sdpa_backends and all(b == fallback.SDPA_BACKENDS for b in sdpa_backends), sdpa_backends


def test_deterministic_softcap_gradients_are_bitwise_equal():
    # The explicit (softcap) path uses no SDPA at all; its gradients are reproducible too.
    q, k, v = make(nq=9, nk=12)
    runs = []
    for _ in range(3):
        out = fa2rt.attention(q, k, v, softcap=2.0, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), grad_out_like(out)))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0], strict=True))


# --- torch.compile ------------------------------------------------------------------------------------------------

class AttnBlock(torch.nn.Module):
    """qkv projection -> fa2rt.attention -> output projection, as a model uses it (GQA, k/v strided views)."""

    def __init__(self, d_model=32, h=4, hk=2, **attn_kwargs):
        super().__init__()
        self.h, self.hk, self.d = h, hk, d_model // h
        self.qkv = torch.nn.Linear(d_model, (h + 2 * hk) * self.d)
        self.proj = torch.nn.Linear(h * self.d, d_model)
        self.attn_kwargs = attn_kwargs

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.h + 2 * self.hk, self.d).split([self.h, self.hk, self.hk], dim=2)
        return self.proj(fa2rt.attention(q, k, v, **self.attn_kwargs).reshape(b, n, -1))


@pytest.mark.parametrize("attn_kwargs", [dict(causal=True),
                                         dict(window_size=(3, 0), softcap=2.0, alibi_slopes=slopes_for("heads"))],
                         ids=["causal", "features"])
def test_compile_fullgraph_matches_eager(attn_kwargs, monkeypatch, fresh_announcements):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AttnBlock(**attn_kwargs)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def loss_and_grads(fn):
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        return out, grads

    want_out, want_grads = loss_and_grads(model)
    # Under tracing the decision must come from api._decide_traced (the dispatcher is native code Dynamo cannot
    # trace; fullgraph=True would fail on it anyway); the eager decision is made unreachable to be sure.
    monkeypatch.setattr(api, "_decide", lambda *a, **k: pytest.fail("eager decision while compiling"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        got_out, got_grads = loss_and_grads(compiled)
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
