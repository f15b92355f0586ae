"""The project's own seeded fuzz generator, shared by tests/cpu/test_fuzz.py and the GPU fuzz (tests/gpu).

A case is a random attention call: shapes (lengths 0, 1, near tile edges, random), head dims (multiples of 8 and
not), GQA/MQA ratios, dtypes, every feature alone and combined (causal, windows, softcap, ALiBi, softmax_scale),
return_lse, out=, gradients, and how each of q, k, v is laid out in memory (see LAYOUTS): contiguous, a sliced last
dim (odd row strides), a storage offset (misaligned base), a batch dim expanded with stride 0, transposed-and-back,
packed qkv / kv. Inputs are drawn on the CPU from the case's own seed, then moved, so a case is the same call on
every device. The generator never looks at which path will run: the dispatcher and the fallback must cope.

BAD_INPUTS are misuse cases: each must raise, naming the argument.
"""

import random
import zlib
from dataclasses import dataclass

import torch

import fa2rt
from fa2rt.reference import attention_reference

SEED = 20261202
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TILE_EDGES = (16, 32, 64, 128)
# Head dims: every kernel bucket, masked-tail ones (multiples of 8 below a bucket) and ones no kernel takes.
HEAD_DIMS = (8, 16, 24, 32, 40, 64, 72, 96, 128, 160, 256, 5, 12, 33)
HEAD_RATIOS = ((1, 1), (2, 2), (4, 4), (2, 1), (4, 1), (4, 2), (6, 3), (3, 1))
LAYOUTS = ("contig", "sliced", "offset", "expanded", "transposed", "packed")


@dataclass(frozen=True)
class FuzzCase:
    index: int
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    layout: str  # one of LAYOUTS, for q, k and v together ("packed": q, k, v, or k and v, views of one tensor)
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" (nheads,), "bh" (batch, nheads)
    scale: float | None = None
    grad: bool = False
    grad_layout: str = "contig"  # grad_out: "contig" or "sliced"
    return_lse: bool = False
    out: str | None = None  # None, "contig", "sliced"

    @property
    def id(self) -> str:
        parts = [f"{self.index:03d}", f"b{self.batch}q{self.seqlen_q}k{self.seqlen_k}h{self.nheads}kv{self.nheads_k}",
                 f"d{self.head_dim}", self.dtype, self.layout]
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += [f"alibi-{self.alibi}"] if self.alibi else []
        parts += [f"scale{self.scale:g}"] if self.scale is not None else []
        parts += [f"grad-{self.grad_layout}"] if self.grad else []
        parts += ["lse"] if self.return_lse else []
        parts += [f"out-{self.out}"] if self.out else []
        return "-".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def options(self, slopes) -> dict:
        opts = {"causal": self.causal, "window_size": self.window, "softcap": self.softcap,
                "softmax_scale": self.scale}
        if slopes is not None:
            opts["alibi_slopes"] = slopes
        return opts


def _length(rng) -> int:
    return rng.choice([0, 1, 2, rng.randint(3, 40), rng.randint(3, 129)]
                      + [edge + rng.choice((-1, 0, 1)) for edge in TILE_EDGES])


def _side(rng) -> int:
    return rng.choice([-1, -1, 0, rng.randint(1, 8), rng.randint(9, 70)])


def generate(count: int = 240, seed: int = SEED) -> list[FuzzCase]:
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        h, hk = rng.choice(HEAD_RATIOS)
        seqlen_q = _length(rng)
        # Packed qkv needs one length for all three: half the time seqlen_k follows seqlen_q.
        seqlen_k = seqlen_q if rng.random() < 0.3 else _length(rng)
        grad = rng.random() < 0.35
        cases.append(FuzzCase(
            index=index, batch=rng.choice([1, 1, 2, 3]), seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=h, nheads_k=hk,
            head_dim=rng.choice(HEAD_DIMS), dtype=rng.choice(["fp16", "bf16", "bf16", "fp32"]),
            layout=rng.choice(LAYOUTS), causal=rng.random() < 0.4,
            window=(_side(rng), _side(rng)) if rng.random() < 0.3 else (-1, -1),
            softcap=rng.choice([0.0, 0.0, 0.0, 5.0, 30.0]), alibi=rng.choice([None, None, None, "h", "bh"]),
            scale=rng.choice([None, None, None, 0.3, -0.2, 0.0]), grad=grad,
            grad_layout=rng.choice(["contig", "sliced"]), return_lse=rng.random() < 0.5,
            out=None if grad else rng.choice([None, None, "contig", "sliced"]),
        ))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Building a case's tensors: leaves ("bases") and the views of them the call gets.

def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _view(gen, layout, b, n, heads, d, pad):
    """(base, fn): a float32 CPU base tensor and the function that turns it (or its copy on another device / in
    another dtype) into the (b, n, heads, d) view of `layout`."""
    if layout == "sliced":
        return _randn(gen, b, n, heads, d + pad), lambda t: t[..., :d]
    if layout == "offset":
        size = b * n * heads * d
        return _randn(gen, size + pad), lambda t: t[pad:pad + size].view(b, n, heads, d)
    if layout == "expanded":
        return _randn(gen, 1, n, heads, d), lambda t: t.expand(b, n, heads, d)
    if layout == "transposed":
        return _randn(gen, b, heads, n, d), lambda t: t.transpose(1, 2)
    return _randn(gen, b, n, heads, d), lambda t: t


def _pieces(case: FuzzCase, gen):
    """[(base, [(name, fn)])]: each base with the tensors that are views of it."""
    b, nq, nk, h, hk, d = (case.batch, case.seqlen_q, case.seqlen_k, case.nheads, case.nheads_k, case.head_dim)
    pad = 1 + case.index % 7
    if case.layout == "packed" and nq == nk and h == hk:
        base = _randn(gen, b, nq, 3, h, d)
        return [(base, [(name, lambda t, i=i: t[:, :, i]) for i, name in enumerate("qkv")])]
    if case.layout == "packed":
        q_base = _randn(gen, b, nq, h, d)
        kv = _randn(gen, b, nk, 2, hk, d)
        return [(q_base, [("q", lambda t: t)]), (kv, [("k", lambda t: t[:, :, 0]), ("v", lambda t: t[:, :, 1])])]
    pieces = []
    for name, n, heads in (("q", nq, h), ("k", nk, hk), ("v", nk, hk)):
        base, fn = _view(gen, case.layout, b, n, heads, d, pad)
        pieces.append((base, [(name, fn)]))
    return pieces


def _slopes(case: FuzzCase, gen):
    if case.alibi is None:
        return None
    shape = (case.nheads,) if case.alibi == "h" else (case.batch, case.nheads)
    return torch.rand(*shape, generator=gen) * 0.3 + 0.01


@dataclass
class Built:
    """A case's inputs on a device: the leaves, the views the call takes, slopes, out= and grad_out."""

    bases: list  # leaves (require grad when the case does)
    views: dict  # name -> view of a leaf
    slopes: torch.Tensor | None
    out: torch.Tensor | None
    out_buffer: torch.Tensor | None  # the tensor whose memory out is (columns past headdim must stay untouched)
    grad_out: torch.Tensor | None
    recipe: list  # [(base index, name, fn)] to rebuild the views from other bases (the float64 reference)


def build(case: FuzzCase, device="cpu", dtype=None) -> Built:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = case.torch_dtype if dtype is None else dtype
    pieces = _pieces(case, gen)
    bases = [base.to(device=device, dtype=dtype).requires_grad_(case.grad) for base, _ in pieces]
    recipe = [(i, name, fn) for i, (_, named) in enumerate(pieces) for name, fn in named]
    views = {name: fn(bases[i]) for i, name, fn in recipe}
    slopes = _slopes(case, gen)
    slopes = None if slopes is None else slopes.to(device)
    out = out_buffer = grad_out = None
    shape = (case.batch, case.seqlen_q, case.nheads, case.head_dim)
    if case.out == "contig":
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    elif case.out == "sliced":
        out_buffer = torch.full(shape[:-1] + (case.head_dim + 3,), float("nan"), dtype=dtype, device=device)
        out = out_buffer[..., :case.head_dim]
    if case.grad:
        g = _randn(gen, *shape[:-1], case.head_dim + 5).to(device=device, dtype=dtype)
        grad_out = g[..., :case.head_dim] if case.grad_layout == "sliced" else g[..., :case.head_dim].contiguous()
    return Built(bases, views, slopes, out, out_buffer, grad_out, recipe)


def call(case: FuzzCase, built: Built):
    """fa2rt.attention on the built views; returns (out, lse or None) and runs backward when the case has grad."""
    q, k, v = (built.views[name] for name in "qkv")
    kwargs = case.options(built.slopes)
    if built.out is not None:
        kwargs["out"] = built.out
    res = fa2rt.attention(q, k, v, return_lse=case.return_lse, **kwargs)
    out, lse = res if case.return_lse else (res, None)
    if case.grad:
        out.backward(built.grad_out)
    return out, lse


def explain(case: FuzzCase, built: Built):
    q, k, v = (built.views[name] for name in "qkv")
    kwargs = case.options(built.slopes)
    if built.out is not None:
        kwargs["out"] = built.out
    return fa2rt.explain(q, k, v, **kwargs)


def reference(case: FuzzCase, built: Built):
    """float64 (out, lse, base grads or None) computed from the same leaves, through the same views."""
    bases = [b.detach().double().requires_grad_(case.grad) for b in built.bases]
    views = {name: fn(bases[i]) for i, name, fn in built.recipe}
    slopes = built.slopes
    out, lse = attention_reference(views["q"], views["k"], views["v"], **case.options(slopes))
    grads = None
    if case.grad:
        grads = torch.autograd.grad(out, bases, built.grad_out.double(), allow_unused=True)
        grads = [torch.zeros_like(b) if g is None else g for g, b in zip(grads, bases, strict=True)]
    return out, lse, grads


def rel_err(x, ref) -> float:
    """Relative norm error; for a reference of norm 0 (empty, or all rows without keys) the largest |x|."""
    if ref.norm() == 0:
        return x.abs().max().item() if x.numel() else 0.0
    return ((x.double() - ref).norm() / ref.norm()).item()


# Relative (norm) error against float64 allowed for out and for gradients, per dtype: the inputs are exact in the
# dtype, so this is the arithmetic's error (probabilities and output rounded to the dtype; fp32 math elsewhere).
OUT_TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
GRAD_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
LSE_TOL = 2e-3
# A kernel may use the hardware tanh (tanh.approx.f32, relative error up to 2**-11, as flash-attn does): a softcapped
# score moves by up to softcap * 2**-11, allowed on top of the tolerances above.
TANH_REL_ERR = 2.0**-11


def check(case: FuzzCase, built: Built, out, lse) -> dict:
    """Assert the call's results match the float64 reference; returns the errors measured."""
    ref_out, ref_lse, ref_grads = reference(case, built)
    shape = (case.batch, case.seqlen_q, case.nheads, case.head_dim)
    assert tuple(out.shape) == shape and out.dtype == case_dtype(built), (tuple(out.shape), out.dtype)
    if built.out is not None:
        assert out is built.out, "attention(out=t) must return t itself"
    if built.out_buffer is not None:
        assert torch.isnan(built.out_buffer[..., case.head_dim:]).all(), "out's buffer written past headdim"
    assert torch.isfinite(out).all(), "non-finite output"
    tanh = case.softcap * TANH_REL_ERR
    errors = {"out": rel_err(out, ref_out)}
    assert errors["out"] <= OUT_TOL[case.dtype] + tanh, errors
    empty = torch.isinf(ref_lse)  # (b, h, sq): rows that see no key
    assert (out.transpose(1, 2)[empty] == 0).all(), "rows that see no key must be exactly 0"
    if case.return_lse:
        assert tuple(lse.shape) == (case.batch, case.nheads, case.seqlen_q) and lse.dtype == torch.float32
        assert torch.equal(torch.isposinf(lse), empty), "lse must be +inf exactly on the rows that see no key"
        finite = ~empty
        errors["lse"] = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
        assert errors["lse"] <= LSE_TOL + tanh, errors
    if case.grad:
        for i, (base, ref) in enumerate(zip(built.bases, ref_grads, strict=True)):
            assert base.grad is not None and base.grad.dtype == base.dtype, f"base {i}: gradient missing or wrong dtype"
            assert torch.isfinite(base.grad).all(), f"base {i}: non-finite gradient"
            errors[f"grad{i}"] = err = rel_err(base.grad, ref)
            assert err <= GRAD_TOL[case.dtype] + 2 * tanh, errors
    return errors


def case_dtype(built: Built) -> torch.dtype:
    return built.bases[0].dtype


# ---------------------------------------------------------------------------------------------------------------------
# Misuse: (id, make kwargs for fa2rt.attention from a device, exception type, argument the message must name)

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _qkv(device, d=16, **over):
    q, k, v = (_t(2, 9, 4, d, device=device) for _ in range(3))
    return {"q": q, "k": k, "v": v, **over}


BAD_INPUTS = [
    ("q-3d", lambda dev: _qkv(dev, q=_t(2, 9, 64, device=dev)), ValueError, "q"),
    ("q-list", lambda dev: _qkv(dev, q=[[1.0]]), TypeError, "q"),
    ("q-int", lambda dev: _qkv(dev, q=torch.ones(2, 9, 4, 16, dtype=torch.int32, device=dev)), ValueError, "q"),
    ("q-last-dim-strided", lambda dev: _qkv(dev, q=_t(2, 9, 4, 32, device=dev)[..., ::2]), ValueError, "q"),
    ("k-dtype", lambda dev: _qkv(dev, k=_t(2, 9, 4, 16, dtype=torch.float64, device=dev)), ValueError, "k"),
    ("k-batch", lambda dev: _qkv(dev, k=_t(3, 9, 4, 16, device=dev)), ValueError, "k"),
    ("k-head-dim", lambda dev: _qkv(dev, k=_t(2, 9, 4, 8, device=dev)), ValueError, "k"),
    ("k-heads-not-dividing", lambda dev: _qkv(dev, k=_t(2, 9, 3, 16, device=dev), v=_t(2, 9, 3, 16, device=dev)),
     ValueError, "k"),
    ("v-shape", lambda dev: _qkv(dev, v=_t(2, 8, 4, 16, device=dev)), ValueError, "v"),
    ("causal-int", lambda dev: _qkv(dev, causal=1), TypeError, "causal"),
    ("window-negative", lambda dev: _qkv(dev, window_size=(-2, 0)), ValueError, "window_size[0]"),
    ("window-length", lambda dev: _qkv(dev, window_size=(1, 2, 3)), ValueError, "window_size"),
    ("window-float", lambda dev: _qkv(dev, window_size=(1.5, 0)), TypeError, "window_size[0]"),
    ("window-str", lambda dev: _qkv(dev, window_size="full"), TypeError, "window_size"),
    ("softcap-negative", lambda dev: _qkv(dev, softcap=-1.0), ValueError, "softcap"),
    ("softcap-nan", lambda dev: _qkv(dev, softcap=float("nan")), ValueError, "softcap"),
    ("scale-inf", lambda dev: _qkv(dev, softmax_scale=float("inf")), ValueError, "softmax_scale"),
    ("scale-str", lambda dev: _qkv(dev, softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("alibi-dtype", lambda dev: _qkv(dev, alibi_slopes=torch.rand(4, dtype=torch.float16, device=dev)), ValueError,
     "alibi_slopes"),
    ("alibi-shape", lambda dev: _qkv(dev, alibi_slopes=torch.rand(3, device=dev)), ValueError, "alibi_slopes"),
    ("out-shape", lambda dev: _qkv(dev, out=_t(2, 9, 4, 8, device=dev)), ValueError, "out"),
    ("out-dtype", lambda dev: _qkv(dev, out=_t(2, 9, 4, 16, dtype=torch.float64, device=dev)), ValueError, "out"),
    ("out-with-grad", lambda dev: _qkv(dev, q=_t(2, 9, 4, 16, device=dev).requires_grad_(), out=_t(2, 9, 4, 16,
                                                                                               device=dev)),
     ValueError, "out"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Varlen (packed sequences): the same options and dtypes over several sequences laid end to end, each of its own
# lengths (0, 1, tile edges, random), through fa2rt.attention_varlen, checked per sequence against the float64
# reference. VARLEN_LAYOUTS: how q, k, v sit in memory; MALFORMED: cu_seqlens that break a rule.

VARLEN_LAYOUTS = ("contig", "sliced", "offset", "packed")
VARLEN_OFFSET = 1000  # varlen case indices follow the dense ones' in reports
MALFORMED = ("decreasing", "past_total", "short_total", "negative", "max_too_small")


@dataclass(frozen=True)
class VarlenCase:
    index: int
    lengths_q: tuple
    lengths_k: tuple
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    layout: str
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None
    scale: float | None = None
    grad: bool = False
    return_lse: bool = False
    malformed: str | None = None  # one of MALFORMED: the values break a rule (the call may raise, never fault)
    page_size: int = 0  # > 0: paged prefill, K/V read from a page pool through a block table (forward only)

    @property
    def id(self) -> str:
        lengths = ["q" + ".".join(map(str, self.lengths_q)), "k" + ".".join(map(str, self.lengths_k))]
        parts = [f"v{self.index:03d}", *lengths, f"h{self.nheads}kv{self.nheads_k}", f"d{self.head_dim}", self.dtype,
                 self.layout]
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += [f"alibi-{self.alibi}"] if self.alibi else []
        parts += [f"scale{self.scale:g}"] if self.scale is not None else []
        parts += ["grad"] if self.grad else []
        parts += ["lse"] if self.return_lse else []
        parts += [f"page{self.page_size}"] if self.page_size else []
        parts += [f"malformed-{self.malformed}"] if self.malformed else []
        return "-".join(parts)

    @property
    def batch(self) -> int:
        return len(self.lengths_q)

    @property
    def softcap_allowance(self) -> float:
        return self.softcap * TANH_REL_ERR


def generate_varlen(count: int = 72, seed: int = SEED + 1) -> list[VarlenCase]:
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        batch = rng.choice([1, 2, 3, 5])
        lengths_q = tuple(_length(rng) for _ in range(batch))
        lengths_k = lengths_q if rng.random() < 0.4 else tuple(_length(rng) for _ in range(batch))
        h, hk = rng.choice(HEAD_RATIOS)
        # Every sixth case breaks one rule of cu_seqlens / max_seqlen_q, each rule in turn.
        malformed = MALFORMED[index // 6 % len(MALFORMED)] if index % 6 == 5 else None
        if malformed:
            lengths_q = (3,) + lengths_q[1:]
        cases.append(VarlenCase(
            index=VARLEN_OFFSET + index, lengths_q=lengths_q, lengths_k=lengths_k, nheads=h, nheads_k=hk,
            **_varlen_draw(rng, VARLEN_LAYOUTS), grad=malformed is None and rng.random() < 0.35,
            return_lse=rng.random() < 0.5, malformed=malformed,
        ))
    return cases


def _varlen_draw(rng, layouts) -> dict:
    """A varlen case's head dim, dtype, layout and features, drawn in this order."""
    return dict(head_dim=rng.choice(HEAD_DIMS), dtype=rng.choice(["fp16", "bf16", "bf16", "fp32"]),
                layout=rng.choice(layouts), causal=rng.random() < 0.4,
                window=(_side(rng), _side(rng)) if rng.random() < 0.3 else (-1, -1),
                softcap=rng.choice([0.0, 0.0, 0.0, 5.0]), alibi=rng.choice([None, None, "h", "bh"]),
                scale=rng.choice([None, None, 0.3, -0.2]))


PAGED_OFFSET = 2000  # paged-prefill case indices follow the varlen ones'
PAGE_SIZES = (16, 32, 64, 256)
PAGED_LAYOUTS = ("contig", "sliced", "offset")  # of q; the K/V pool is built page by page


def generate_paged(count: int = 24, seed: int = SEED + 2) -> list[VarlenCase]:
    """Paged-prefill calls (attention_varlen with block_table): the varlen draw with a page size, forward only; every
    sixth names a block outside the pool in a page its first sequence reads."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        batch = rng.choice([1, 2, 3, 5])
        lengths_q = tuple(_length(rng) for _ in range(batch))
        lengths_k = tuple(_length(rng) for _ in range(batch))
        malformed = "table_outside" if index % 6 == 5 else None
        if malformed:
            lengths_k = (3,) + lengths_k[1:]
        h, hk = rng.choice(HEAD_RATIOS)
        cases.append(VarlenCase(
            index=PAGED_OFFSET + index, lengths_q=lengths_q, lengths_k=lengths_k, nheads=h, nheads_k=hk,
            **_varlen_draw(rng, PAGED_LAYOUTS), return_lse=rng.random() < 0.5, malformed=malformed,
            page_size=rng.choice(PAGE_SIZES),
        ))
    return cases


def _cu(lengths) -> list:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


def _malform(kind, bounds_q, lengths_q):
    """(cu_seqlens_q values, max_seqlen_q) broken as `kind` says."""
    bounds, max_q = list(bounds_q), max(lengths_q)
    if kind == "decreasing":
        bounds[1] = bounds[0] - 1
    elif kind == "past_total":
        bounds[-1] += 17
    elif kind == "short_total":
        bounds[-1] -= 1
    elif kind == "negative":
        bounds[0] = -5
    elif kind == "max_too_small":
        max_q = max(0, max_q - 1)
    return bounds, max_q


@dataclass
class BuiltVarlen:
    bases: list
    views: dict
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    slopes: torch.Tensor | None
    grad_out: torch.Tensor | None
    recipe: list
    pages: tuple | None = None  # paged cases: (k pool, v pool, block_table) the call reads; views keep the logical K/V


def _varlen_view(gen, layout, total, heads, d, pad):
    if layout == "sliced":
        return _randn(gen, total, heads, d + pad), lambda t: t[..., :d]
    if layout == "offset":
        size = total * heads * d
        return _randn(gen, size + pad), lambda t: t[pad:pad + size].view(total, heads, d)
    return _randn(gen, total, heads, d), lambda t: t


def build_varlen(case: VarlenCase, device="cpu") -> BuiltVarlen:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = DTYPES[case.dtype]
    tq, tk, d = sum(case.lengths_q), sum(case.lengths_k), case.head_dim
    pad = 1 + case.index % 7
    if case.layout == "packed" and case.lengths_q == case.lengths_k and case.nheads == case.nheads_k:
        pieces = [(_randn(gen, tq, 3, case.nheads, d), [(n, lambda t, i=i: t[:, i]) for i, n in enumerate("qkv")])]
    else:
        layout = "contig" if case.layout == "packed" else case.layout
        pieces = []
        for name, total, heads in (("q", tq, case.nheads), ("k", tk, case.nheads_k), ("v", tk, case.nheads_k)):
            base, fn = _varlen_view(gen, layout, total, heads, d, pad)
            pieces.append((base, [(name, fn)]))
    bases = [base.to(device=device, dtype=dtype).requires_grad_(case.grad) for base, _ in pieces]
    recipe = [(i, name, fn) for i, (_, named) in enumerate(pieces) for name, fn in named]
    views = {name: fn(bases[i]) for i, name, fn in recipe}
    bounds_q, bounds_k = _cu(case.lengths_q), _cu(case.lengths_k)
    max_q, max_k = max(case.lengths_q), max(case.lengths_k)
    if case.malformed:
        bounds_q, max_q = _malform(case.malformed, bounds_q, case.lengths_q)
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32, device=device) for b in (bounds_q, bounds_k))
    slopes = None
    if case.alibi:
        shape = (case.nheads,) if case.alibi == "h" else (case.batch, case.nheads)
        slopes = (torch.rand(*shape, generator=gen) * 0.3 + 0.01).to(device)
    grad_out = _randn(gen, tq, case.nheads, d).to(device=device, dtype=dtype) if case.grad else None
    pages = _pages(case, gen, views["k"], views["v"], device) if case.page_size else None
    return BuiltVarlen(bases, views, cu_q, cu_k, max_q, max_k, slopes, grad_out, recipe, pages)


def _pages(case: VarlenCase, gen, k, v, device) -> tuple:
    """The logical k, v laid into a pool of pages in a random order, plus spare pages of noise; table entries past a
    sequence's last page are -1 (never read). table_outside: sequence 0's first page names the block past the pool."""
    page, (_, hk, d) = case.page_size, k.shape
    blocks = [-(-n // page) for n in case.lengths_k]
    pool = sum(blocks) + 2
    order = iter(torch.randperm(pool, generator=gen).tolist())
    table = torch.full((case.batch, max(blocks + [1])), -1, dtype=torch.int32)
    k_pool, v_pool = (_randn(gen, pool, page, hk, d).to(k.dtype) for _ in range(2))
    start = 0
    for b, n in enumerate(case.lengths_k):
        for j in range(blocks[b]):
            table[b, j] = block = next(order)
            rows = slice(start + j * page, min(start + (j + 1) * page, start + n))
            k_pool[block, :rows.stop - rows.start] = k[rows].detach().cpu()
            v_pool[block, :rows.stop - rows.start] = v[rows].detach().cpu()
        start += n
    if case.malformed == "table_outside":
        table[0, 0] = pool
    return k_pool.to(device), v_pool.to(device), table.to(device)


def _varlen_options(case, built) -> dict:
    opts = {"causal": case.causal, "window_size": case.window, "softcap": case.softcap, "softmax_scale": case.scale}
    if built.slopes is not None:
        opts["alibi_slopes"] = built.slopes
    return opts


def varlen_args(built: BuiltVarlen) -> tuple:
    k, v = built.pages[:2] if built.pages else (built.views["k"], built.views["v"])
    return built.views["q"], k, v, built.cu_seqlens_q, built.cu_seqlens_k, built.max_seqlen_q, built.max_seqlen_k


def _paging(built: BuiltVarlen) -> dict:
    return {"block_table": built.pages[2]} if built.pages else {}


def call_varlen(case: VarlenCase, built: BuiltVarlen):
    res = fa2rt.attention_varlen(*varlen_args(built), return_lse=case.return_lse, **_varlen_options(case, built),
                                 **_paging(built))
    out, lse = res if case.return_lse else (res, None)
    if case.grad:
        out.backward(built.grad_out)
    return out, lse


def explain_varlen(case: VarlenCase, built: BuiltVarlen):
    return fa2rt.explain(*varlen_args(built), **_varlen_options(case, built), **_paging(built))


def check_varlen(case: VarlenCase, built: BuiltVarlen, out, lse) -> dict:
    """Per sequence against the float64 reference (gradients of the leaves through the same views)."""
    bases = [b.detach().double().requires_grad_(case.grad) for b in built.bases]
    views = {name: fn(bases[i]) for i, name, fn in built.recipe}
    bq, bk = _cu(case.lengths_q), _cu(case.lengths_k)
    outs, lses = [], []
    for b in range(case.batch):
        slopes = built.slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        opts = _varlen_options(case, built) | {"alibi_slopes": slopes}
        o, lse_b = attention_reference(views["q"][None, bq[b]:bq[b + 1]], views["k"][None, bk[b]:bk[b + 1]],
                                       views["v"][None, bk[b]:bk[b + 1]], **opts)
        outs.append(o[0])
        lses.append(lse_b[0])
    ref_out, ref_lse = torch.cat(outs), torch.cat(lses, dim=-1)
    tanh = case.softcap_allowance
    assert tuple(out.shape) == tuple(views["q"].shape) and out.dtype == DTYPES[case.dtype]
    assert torch.isfinite(out).all(), "non-finite output"
    errors = {"out": rel_err(out, ref_out)}
    assert errors["out"] <= OUT_TOL[case.dtype] + tanh, errors
    empty = torch.isinf(ref_lse)  # (nheads, total_q)
    assert (out.transpose(0, 1)[empty] == 0).all(), "rows that see no key must be exactly 0"
    if case.return_lse:
        assert tuple(lse.shape) == tuple(ref_lse.shape) and lse.dtype == torch.float32
        assert torch.equal(torch.isposinf(lse), empty), "lse must be +inf exactly on the rows that see no key"
        errors["lse"] = (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
        assert errors["lse"] <= LSE_TOL + tanh, errors
    if case.grad:
        ref_grads = torch.autograd.grad(ref_out, bases, built.grad_out.double(), allow_unused=True)
        for i, (base, ref) in enumerate(zip(built.bases, ref_grads, strict=True)):
            ref = torch.zeros_like(bases[i]) if ref is None else ref
            assert base.grad is not None and torch.isfinite(base.grad).all(), f"base {i}: gradient missing or NaN"
            errors[f"grad{i}"] = err = rel_err(base.grad, ref)
            assert err <= GRAD_TOL[case.dtype] + 2 * tanh, errors
    return errors


# The argument a malformed call's error may name: a last entry past the total also makes the last sequence longer than
# max_seqlen_q, and either rule may be checked first.
MALFORMED_ARGUMENT = {"decreasing": ("cu_seqlens_q",), "past_total": ("cu_seqlens_q", "max_seqlen_q"),
                      "short_total": ("cu_seqlens_q",), "negative": ("cu_seqlens_q",),
                      "max_too_small": ("max_seqlen_q",), "table_outside": ("block_table[0, 0]",)}


def all_cases() -> list:
    """Every fuzz case, dense, varlen, then paged prefill (indices unique across them)."""
    return [*generate(), *generate_varlen(), *generate_paged()]
