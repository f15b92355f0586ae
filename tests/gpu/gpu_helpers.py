"""Shared helpers of the NVIDIA GPU suite: inputs, the float64 check with its error bound, image paths.

The error bound. fa2rt's error against the float64 reference (fa2rt.reference.attention_reference) must be at most
twice the error of a yardstick computed in the same low precision, plus a small absolute floor:
- SDPA in the same dtype (torch's own half-precision attention, as in the first GPU tests), where SDPA expresses the
  problem directly (no window beyond causal, no softcap, no ALiBi);
- always, `emulate(..., lowp=True)`: the float64 math with the two roundings an FA2 kernel cannot avoid, the
  probabilities P rounded to q's dtype before P @ V and the output rounded to q's dtype. It is the yardstick for the
  features SDPA cannot express (softcap) or expresses only with a bias rounded to q's dtype (ALiBi), and its error is
  of the order of SDPA's where both apply (test_emulated_precision_matches_sdpa checks that on the GPU).
The larger yardstick counts. Softcap gets a documented allowance on top: a kernel may use the hardware tanh
(tanh.approx.f32, relative error up to 2**-11, as flash-attn does), which moves a score s = softcap * tanh(.) by up to
softcap * 2**-11; TANH_REL_ERR below turns that into slack on the output's relative error and on the LSE.

`emulate` is written here from the semantics as stated (flash-attn 2), independently of fa2rt.reference: every check
also asserts that the two float64 results agree, so a misreading in the reference cannot hide a wrong kernel.
"""

import math
import zlib
from dataclasses import dataclass

import torch

import fa2rt
from fa2rt import config, devices
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

DEVICE = torch.device("cuda", 0)
NATIVE = devices.probe("cuda", 0).arch
# (forced arch or "" for the native choice, expected arch, expected mode)
PATHS = [("", NATIVE, "native"), ("sm89", "sm89", "ptx-jit"), ("sm80", "sm80", "ptx-jit")]
PATH_IDS = [p[1] + "-" + p[2] for p in PATHS]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}

ABS_FLOOR = 1e-4  # absolute floor on the relative error: cases whose yardstick error is ~0 (one key per row)
LSE_TOL = 1e-3  # LSE is float32 of a float32 softmax: absolute error against float64
TANH_REL_ERR = 2.0**-11  # hardware tanh (tanh.approx.f32) relative error bound
SEMANTICS_TOL = 1e-9  # emulate() in float64 against attention_reference in float64


def seed_of(*parts) -> int:
    """A stable per-test seed (Python's hash() of strings changes between processes)."""
    return zlib.crc32(repr(parts).encode())


def poison_allocator(device=DEVICE):
    """Fill freed cached memory with NaN so an output element the kernel never writes shows up."""
    junk = torch.full((64 << 20,), float("nan"), device=device)
    del junk


def make(shape, head_dim, dtype, seed, device=DEVICE):
    """Fresh standard-normal q, k, v: shape (batch, seqlen_q, seqlen_k, nheads, nheads_k)."""
    b, nq, nk, h, hk = shape
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda n, heads: torch.randn(b, n, heads, head_dim, device=device, generator=g).to(dtype)  # noqa: E731
    return mk(nq, h), mk(nk, hk), mk(nk, hk)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def geometric_slopes(n):
    """ALiBi's slopes for n heads (Press et al.): 2**(-8 (i + 1) / n), i = 0..n-1, for n a power of two; for other
    n the n' = largest power of two below n, plus every other slope of 2 n' (the paper's rule)."""
    def powers(m):
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]
    p = 2 ** int(math.floor(math.log2(n)))
    return (powers(p) + powers(2 * p)[0::2])[:n]


def alibi_slopes(kind, batch, nheads, device=DEVICE):
    """float32 slopes: kind "h" -> (nheads,) the standard ones; "bh" -> (batch, nheads), row b the geometric series
    of a model with nheads + 3 b heads (row 0 standard, later rows different and not powers of two)."""
    if kind is None:
        return None
    if kind == "h":
        return torch.tensor(geometric_slopes(nheads), dtype=torch.float32, device=device)
    rows = [[2.0 ** (-8.0 * (i + 1) / (nheads + 3 * b)) for i in range(nheads)] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def effective_window(window_size, causal):
    left, right = window_size
    return left, 0 if causal else right


def emulate(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
            rows=None, lowp=False, bias_dtype=None):
    """Attention by the stated semantics, in float64, for query rows `rows` (LongTensor, default all).

    Row i is aligned with key column diag = i + seqlen_k - seqlen_q. score = scale q.k; softcap * tanh(score /
    softcap) when softcap > 0; minus slope[b, h] * |diag - j| with ALiBi; key j allowed iff (left < 0 or j >= diag -
    left) and (right < 0 or j <= diag + right), right = 0 when causal. lowp: round P = exp(score - rowmax) and the
    output to q's dtype (an FA2 kernel's unavoidable roundings); bias_dtype: round the ALiBi bias to it first (what an
    SDPA call with a bias of q's dtype does).
    Returns out (batch, len(rows), nheads, headdim) float64, lse (batch, nheads, len(rows)) float64 (+inf for a row
    with no allowed key, whose out is 0) and has_key (len(rows),) bool.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    rows = torch.arange(seqlen_q, device=q.device) if rows is None else rows.to(q.device)
    group = nheads // nheads_k
    qd = q[:, rows].double()
    kd = k.double().repeat_interleave(group, dim=2)
    vd = v.double().repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    diag = rows[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(-1, nheads, 1, 1)  # (1 or batch, nheads, 1, 1)
        bias = -slopes * (diag - j).abs().double()
        if bias_dtype is not None:
            bias = bias.to(bias_dtype).double()
        s = s + bias
    left, right = effective_window(window_size, causal)
    allowed = torch.ones(len(rows), seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= diag - left
    if right >= 0:
        allowed &= j <= diag + right
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1)
    m = torch.where(has_key, s.amax(dim=-1), 0.0)
    p = torch.exp(s - m[..., None])
    denom = torch.where(has_key, p.sum(dim=-1), 1.0)
    if lowp:
        p = p.to(q.dtype).double()
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd) / denom.transpose(1, 2)[..., None]
    if lowp:
        out = out.to(q.dtype).double()
    lse = torch.where(has_key, m + torch.log(denom), float("inf"))
    return out, lse, has_key


def is_plain(opts) -> bool:
    """SDPA (fa2rt's plain fallback path) expresses the problem directly: no window beyond causal, no softcap or
    ALiBi."""
    return (tuple(opts.get("window_size", (-1, -1))) == (-1, -1) and not opts.get("softcap")
            and opts.get("alibi_slopes") is None)


def check_attention(out, lse, q, k, v, *, rows=None, fallback=False, **opts):
    """Assert fa2rt's (out, lse) for q, k, v and the attention options `opts` is right; returns (err, bound, info).

    rows: check only these query rows (LongTensor), against emulate() in float64 (for sequences whose full float64
    reference would not fit); else the whole output against attention_reference, which emulate() must agree with.
    fallback: the call ran the SDPA fallback, whose ALiBi bias is rounded to q's dtype (SDPA takes a bias of q's
    dtype only): the yardstick includes that rounding.
    Rows with no allowed key must be exactly 0 with lse +inf; nothing may be NaN/inf elsewhere.
    """
    batch, seqlen_q, nheads, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, (out.shape, out.dtype, out.device)
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    own, own_lse, has_key = emulate(q, k, v, rows=rows, **opts)
    if rows is None:
        ref, ref_lse = attention_reference(q, k, v, **opts)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(own_lse)) and rel_err(own, ref) < SEMANTICS_TOL and (
            (own_lse - ref_lse)[finite].abs().max().item() if finite.any() else 0.0) < SEMANTICS_TOL, (
            "fa2rt.reference and this suite's reading of the semantics (emulate) disagree")
        out_sel, lse_sel = out, lse
    else:
        ref, ref_lse = own, own_lse
        out_sel, lse_sel = out[:, rows.to(out.device)], lse[..., rows.to(out.device)]

    yardsticks = {"emulated": rel_err(emulate(q, k, v, rows=rows, lowp=True, **opts)[0], ref)}
    if fallback and opts.get("alibi_slopes") is not None:
        low_bias = emulate(q, k, v, rows=rows, lowp=True, bias_dtype=q.dtype, **opts)[0]
        yardsticks["emulated, bias in q's dtype"] = rel_err(low_bias, ref)
    if rows is None and is_plain(opts):
        sdpa, _ = sdpa_attention(q, k, v, causal=opts.get("causal", False), softmax_scale=opts.get("softmax_scale"))
        yardsticks["sdpa"] = rel_err(sdpa, ref)
    softcap = float(opts.get("softcap") or 0.0)
    bound = 2 * max(yardsticks.values()) + ABS_FLOOR + 0.5 * TANH_REL_ERR * softcap
    info = {"yardsticks": yardsticks, "bound": bound}

    assert torch.isfinite(out_sel).all(), "non-finite output (unwritten or NaN)"
    err = rel_err(out_sel, ref)
    info["err"] = err
    assert err <= bound, info

    empty = ~has_key
    assert (out_sel[:, empty] == 0).all(), "rows with no allowed key must be 0"
    assert torch.equal(torch.isposinf(lse_sel), empty.expand_as(lse_sel)), "lse must be +inf exactly where no key"
    if has_key.any():
        lse_err = (lse_sel.double() - ref_lse)[..., has_key].abs().max().item()
        info["lse_err"] = lse_err
        assert lse_err < LSE_TOL + TANH_REL_ERR * softcap, info
    return err, bound, info


@dataclass(frozen=True)
class Case:
    """One attention call: inputs, options and where its output goes."""

    shape: tuple  # batch, seqlen_q, seqlen_k, nheads, nheads_k
    head_dim: int = 64
    dtype: torch.dtype = torch.bfloat16
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h": (nheads,) slopes, "bh": (batch, nheads) slopes
    amp: float | None = None  # softmax_scale = amp / sqrt(head_dim) (scores of std ~amp); None: the default
    out: str | None = None  # None, "contig": a fresh contiguous tensor, "strided": a slice of a bigger tensor

    @property
    def id(self) -> str:
        parts = ["x".join(map(str, self.shape)), f"d{self.head_dim}", DTYPE_IDS[self.dtype]]
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += [f"alibi-{self.alibi}"] if self.alibi else []
        parts += [f"amp{self.amp:g}"] if self.amp else []
        parts += [f"out-{self.out}"] if self.out else []
        return "-".join(parts)

    def inputs(self, seed, device=DEVICE):
        q, k, v = make(self.shape, self.head_dim, self.dtype, seed, device)
        slopes = alibi_slopes(self.alibi, self.shape[0], self.shape[3], device)
        return q, k, v, self.options(slopes)

    def options(self, slopes=None) -> dict:
        """Only the options that differ from the defaults, so a plain case is a plain call."""
        opts = {}
        if self.causal:
            opts["causal"] = True
        if self.amp is not None:
            opts["softmax_scale"] = self.amp / math.sqrt(self.head_dim)
        if self.window != (-1, -1):
            opts["window_size"] = self.window
        if self.softcap:
            opts["softcap"] = self.softcap
        if slopes is not None:
            opts["alibi_slopes"] = slopes
        return opts


def make_out(kind, q):
    """(out, big): the tensor to pass as out= (NaN-filled) and the tensor whose memory it is (None if contiguous).

    "strided": a (batch, nheads, seqlen_q, width) buffer seen as (batch, seqlen_q, nheads, width) and sliced to
    headdim: last dim contiguous, every other stride differs from a contiguous tensor's and stays a multiple of 16
    elements (what the kernel images assume), and the columns past headdim must stay untouched.
    """
    if kind is None:
        return None, None
    if kind == "contig":
        return torch.full_like(q, float("nan")), None
    batch, seqlen_q, nheads, head_dim = q.shape
    width = (head_dim + 63) // 64 * 64 + 64
    big = torch.full((batch, nheads, seqlen_q, width), float("nan"), dtype=q.dtype, device=q.device)
    return big.permute(0, 2, 1, 3)[..., :head_dim], big


def expect_path(decision, path="kernel", arch=None, mode=None, reason=None):
    assert decision.path == path, decision
    if arch is not None:
        assert f"-{arch}-" in (decision.image or ""), decision
    if mode is not None:
        assert decision.mode == mode, decision
    if reason is not None:
        assert decision.reason == reason, decision


@dataclass
class Result:
    out: torch.Tensor
    lse: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    opts: dict
    err: float
    bound: float


def run_case(case: Case, seed, *, path="kernel", arch=None, mode=None, reason=None, device=DEVICE) -> Result:
    """Inputs for `case`, the decision asserted, the call on poisoned memory, out= handling and the float64 check."""
    q, k, v, opts = case.inputs(seed, device)
    out_arg, big = make_out(case.out, q)
    out_kw = {} if out_arg is None else {"out": out_arg}
    expect_path(fa2rt.explain(q, k, v, **opts, **out_kw), path, arch, mode, reason)
    poison_allocator(device)
    result = fa2rt.attention(q, k, v, **opts, **out_kw, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2, type(result)
    out, lse = result
    torch.cuda.synchronize(device)
    if out_arg is not None:
        assert out is out_arg, "attention(out=t) must return t itself"
    if big is not None:
        assert torch.isnan(big[..., case.head_dim:]).all(), "columns of out's buffer past headdim were written"
    err, bound, _ = check_attention(out, lse, q, k, v, fallback=path == "fallback", **opts)
    return Result(out, lse, q, k, v, opts, err, bound)


def use_path(monkeypatch, forced):
    """Select images of `forced` arch through their PTX ("" = the device's own choice)."""
    if forced:
        monkeypatch.setenv(config.FORCE_ARCH, forced)
    else:
        monkeypatch.delenv(config.FORCE_ARCH, raising=False)
