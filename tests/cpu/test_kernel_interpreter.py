"""The Triton forward kernel source (backends/kernels/fwd.py) run in the Triton interpreter against a float64 reference.

Every (arch, head-dim bucket) tile config of backends/cuda/tiles.json and backends/rocm/tiles.json is launched with
its block_m/block_n on CPU tensors; O and LSE are poisoned with NaN first, so an element the kernel never writes
fails the test. Shapes are small and odd but cross several key blocks, so both the unmasked phase and the masked
boundary phase (causal diagonal, ragged seqlen_k) run, as do query rows that see no key (causal, seqlen_q >
seqlen_k). fp16 and fp32 only: bf16 misbehaves in the interpreter.

The interpreter executes each program with numpy, one program at a time. Every config runs the full shape list plus
two causal shapes derived from its block sizes that put the phase bounds one key off a block edge.
"""

import os

# Must be set before triton decorates the kernel: `triton.jit` reads the knob at decoration time and returns an
# InterpretedFunction instead of a JITFunction. Restored after loading (see _load_interpreted_kernel).
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime import interpreter as triton_interpreter  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FWD_SRC = ROOT / "backends" / "kernels" / "fwd.py"
TILES = {"cuda": ROOT / "backends" / "cuda" / "tiles.json", "rocm": ROOT / "backends" / "rocm" / "tiles.json"}
MODULE_NAME = "fa2rt_kernels_fwd_interp"


def _numpy_rejects_size1_int():
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def _patch_lang_tensor_np24(tensor, scope):
    # triton 3.6's interpreter gives tl.tensor `__index__ = int(handle.data)`, and a scalar's handle is a 1-element
    # 1-D array, which numpy >= 2.4 refuses to convert: any `range(start, stop)` over run-time bounds in a kernel
    # fails with "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed
    # upstream by #9172 with `.squeeze()`). Re-patch it the same way; the scope restores both on exit.
    _ORIG_PATCH_LANG_TENSOR(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


_ORIG_PATCH_LANG_TENSOR = triton_interpreter._patch_lang_tensor
NEEDS_NP24_SHIM = _numpy_rejects_size1_int()


_INTERPRETED_LIB = {}  # id(raw fn) -> InterpretedFunction, so each library function is rewritten once


def _lang_jit_overrides():
    """(owner, name, InterpretedFunction) for every triton.language function decorated as a JITFunction.

    triton.language's own `@jit` helpers (tl.zeros, tl.max, tl.sum and their reduce combine functions, ...) were
    decorated when triton was first imported. If that happened before TRITON_INTERPRET=1 was set (tests/cpu/conftest.py
    imports fa2rt, which imports triton, before this module runs), they are JITFunctions, and an interpreted kernel
    calling one fails with "Cannot call @triton.jit'd outside of the scope of a kernel". Swap in interpreted twins
    for the duration of a launch; the kernel and the library look them up through these module/class attributes.
    """
    owners = [m for n, m in list(sys.modules.items()) if m is not None and (n == "triton.language"
                                                                            or n.startswith("triton.language."))]
    owners.append(tl.core.tensor)  # tensor member functions: x.max(), x.sum(), ...
    out = []
    for owner in owners:
        for name, val in list(vars(owner).items()):
            if isinstance(val, JITFunction):
                twin = _INTERPRETED_LIB.get(id(val.fn))
                if twin is None:
                    twin = _INTERPRETED_LIB[id(val.fn)] = InterpretedFunction(val.fn)
                out.append((owner, name, twin))
    return out


@contextlib.contextmanager
def _interpret_mode():
    """Force the interpreter knob on, whatever the environment or another test module set, and restore it after.

    While in force, also: triton.language's JIT helpers are interpreted (see _lang_jit_overrides), and the numpy >= 2.4
    shim for the interpreter is on (see _patch_lang_tensor_np24).
    """
    saved = []
    with knobs.runtime.scope():
        knobs.runtime.interpret = True
        try:
            for owner, name, twin in _lang_jit_overrides():
                saved.append((owner, name, vars(owner)[name]))
                setattr(owner, name, twin)
            if NEEDS_NP24_SHIM:
                triton_interpreter._patch_lang_tensor = _patch_lang_tensor_np24
            yield
        finally:
            triton_interpreter._patch_lang_tensor = _ORIG_PATCH_LANG_TENSOR
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)


def _load_interpreted_kernel():
    # Another test module may have imported triton (or even fwd.py under its package name) earlier in this process,
    # so load a fresh copy under a private module name with the knob forced on; the env var alone is not enough if
    # someone assigned knobs.runtime.interpret explicitly, since an assigned value shadows the environment.
    spec = importlib.util.spec_from_file_location(MODULE_NAME, FWD_SRC)
    mod = importlib.util.module_from_spec(spec)
    try:
        with _interpret_mode():
            sys.modules[MODULE_NAME] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(MODULE_NAME, None)
                raise
    finally:
        # Leave the process as we found it, so modules collected after this one still get real JITFunctions.
        if _PREV_INTERPRET is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET
    for name in ("attn_fwd", "_fwd_block"):
        fn = getattr(mod, name)
        if not isinstance(fn, InterpretedFunction):
            raise RuntimeError(
                f"{FWD_SRC}: {name} is a {type(fn).__module__}.{type(fn).__name__}, not a triton InterpretedFunction; "
                f"the kernel would not run in the Triton interpreter (triton {triton.__version__})"
            )
    return mod


fwd = _load_interpreted_kernel()


# ---------------------------------------------------------------------------------------------------------------------
# Tile configs

def _tile_configs():
    configs = []
    for vendor, path in TILES.items():
        doc = json.loads(path.read_text())
        for arch, entry in doc["archs"].items():
            for bucket, cfg in entry["fwd"].items():
                configs.append((vendor, arch, int(bucket), cfg))
    return configs


CONFIGS = _tile_configs()

# (batch, seqlen_q, seqlen_k, nheads, nheads_k)
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 37, 37, 2, 1),  # MQA, one ragged block
    (1, 130, 200, 2, 2),  # causal: diagonal across 2-4 key blocks, unmasked phase for the second query block
    (1, 200, 130, 4, 2),  # GQA; causal: the first 70 query rows see no key
    (1, 3, 300, 1, 1),  # causal: unmasked multi-block phase then a ragged boundary block
]
DTYPES = [torch.float16, torch.float32]
# Relative Frobenius error of O, and absolute error of LSE (over rows that see a key).
O_TOL = {torch.float16: 2e-3, torch.float32: 1e-4}
LSE_TOL = {torch.float16: 1e-4, torch.float32: 1e-4}  # scores are exact fp32 products either way; seen ~1e-6
TL_DTYPE = {torch.float16: "fp16", torch.float32: "fp32"}


def _diagonal_edge_shapes(block_m, block_n):
    """Causal shapes that put the kernel's two phase bounds exactly one key short of a block edge.

    With causal shift c = seqlen_k - seqlen_q, the first row of query block p sees keys < p*block_m + 1 + c (the
    end of the unmasked phase, floored to block_n) and its last row keys < p*block_m + block_m + c (the end of the
    masked phase). Random shapes rarely land an off-by-one there, so:
    - c = 2*block_n - 2: row 0 sees 2*block_n - 1 keys, one short of the edge; a phase split one key late would
      run the block holding key 2*block_n - 1 unmasked for row 0;
    - c = block_m + 1: the last row of query block 0 sees keys up to 2*block_m, exactly one key of the block starting
      there; a masked-phase bound one key short would skip that block.
    """
    return [(1, 9, 9 + 2 * block_n - 2, 1, 1), (1, block_m + 2, 2 * block_m + 3, 1, 1)]


def _cases():
    cases = []
    for _vendor, arch, bucket, cfg in CONFIGS:
        pairs = [(shape, causal) for shape in SHAPES for causal in (False, True)]
        pairs += [(shape, True) for shape in _diagonal_edge_shapes(cfg["block_m"], cfg["block_n"])]
        for shape, causal in pairs:
            for dtype in DTYPES:
                b, sq, sk, h, hk = shape
                cid = (f"{arch}-d{bucket}-m{cfg['block_m']}n{cfg['block_n']}-b{b}q{sq}k{sk}h{h}kv{hk}"
                       f"-{TL_DTYPE[dtype]}-{'causal' if causal else 'full'}")
                cases.append(pytest.param(cfg, bucket, shape, dtype, causal, id=cid))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Float64 reference (flash-attn 2 semantics)

def _reference(q, k, v, causal, softmax_scale=None):
    """O (batch, seqlen_q, nheads, headdim) and LSE (batch, nheads, seqlen_q), in float64.

    Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q. A row that sees no key gets
    output 0 and LSE +inf. K/V heads are repeated for GQA/MQA. LSE is the natural log-sum-exp of the scaled scores.
    """
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    h, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)
    sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk).unsqueeze(0)
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no key
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))  # exp(-inf) = 0 on masked and empty rows
    out = torch.matmul(p, v).transpose(1, 2)
    lse = torch.where(empty, float("inf"), lse)
    return out, lse


def test_reference_semantics():
    # Tiny hand-checkable cases for the reference itself: bottom-right causal alignment and empty rows.
    q = torch.zeros(1, 3, 1, 2)
    k = torch.zeros(1, 2, 1, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    out, lse = _reference(q, k, v, causal=True)
    # seqlen_q 3 > seqlen_k 2: row 0 sees nothing, row 1 sees key 0, row 2 sees keys 0..1.
    assert torch.equal(out[0, :, 0], torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 3.0]], dtype=torch.float64))
    assert lse[0, 0, 0] == float("inf")
    assert lse[0, 0, 1] == 0.0
    assert abs(lse[0, 0, 2] - math.log(2.0)) < 1e-15


# ---------------------------------------------------------------------------------------------------------------------
# Launch

def _launch(q, k, v, causal, block_m, block_n, block_d, softmax_scale=None):
    batch, seqlen_q, nheads, head_dim = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    o = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full((batch, nheads, seqlen_q), float("nan"), dtype=torch.float32)
    tensors = {"Q": q, "K": k, "V": v, "O": o, "LSE": lse}
    scalars = {
        "stride_qb": q.stride(0), "stride_qh": q.stride(2), "stride_qm": q.stride(1),
        "stride_kb": k.stride(0), "stride_kh": k.stride(2), "stride_kn": k.stride(1),
        "stride_vb": v.stride(0), "stride_vh": v.stride(2), "stride_vn": v.stride(1),
        "stride_ob": o.stride(0), "stride_oh": o.stride(2), "stride_om": o.stride(1),
        "nheads": nheads, "head_ratio": nheads // nheads_k, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k,
        "head_dim": head_dim, "qk_scale_log2": scale * math.log2(math.e),
    }
    args = {}
    for name, ty in fwd.fwd_params(TL_DTYPE[q.dtype]):
        args[name] = tensors[name] if name in tensors else scalars[name]
        if ty.startswith("*"):
            assert TL_DTYPE[args[name].dtype] == ty[1:], f"{name}: {args[name].dtype} for {ty}"
    assert set(args) == set(tensors) | set(scalars), "fwd_params names changed; update the test"
    grid = fwd.attn_fwd_grid(seqlen_q, batch, nheads, block_m)
    with _interpret_mode():
        fwd.attn_fwd[grid](
            **args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_MASK=head_dim != block_d, IS_CAUSAL=causal,
        )
    return o, lse


def _inputs(shape, head_dim, dtype, seed_key):
    b, sq, sk, h, hk = shape
    gen = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    q = torch.randn(b, sq, h, head_dim, generator=gen).to(dtype)
    k = torch.randn(b, sk, hk, head_dim, generator=gen).to(dtype)
    v = torch.randn(b, sk, hk, head_dim, generator=gen).to(dtype)
    return q, k, v


def _check(q, k, v, causal, o, lse, softmax_scale=None):
    dtype = q.dtype
    assert not torch.isnan(o).any(), f"{int(torch.isnan(o).sum())} of {o.numel()} output elements never written"
    assert not torch.isnan(lse).any(), f"{int(torch.isnan(lse).sum())} of {lse.numel()} LSE elements never written"
    ref_o, ref_lse = _reference(q, k, v, causal, softmax_scale)
    empty = torch.isinf(ref_lse)  # (b, h, sq)
    # Rows that see no key: output exactly 0, LSE exactly +inf.
    empty_o = empty.transpose(1, 2)  # (b, sq, h)
    assert torch.equal(torch.isposinf(lse), empty), "LSE +inf exactly on the rows that see no key"
    assert (o[empty_o] == 0).all(), "rows that see no key must be exactly 0"
    ok = ~empty
    if ok.any():
        lse_err = (lse.double()[ok] - ref_lse[ok]).abs().max().item()
        assert lse_err < LSE_TOL[dtype], f"LSE max abs err {lse_err:.3g}"
    ref_norm = ref_o.norm().item()
    if ref_norm > 0:
        rel = (o.double() - ref_o).norm().item() / ref_norm
        assert rel < O_TOL[dtype], f"O rel err {rel:.3g}"
    else:
        assert (o == 0).all()


@pytest.mark.parametrize(("cfg", "bucket", "shape", "dtype", "causal"), _cases())
def test_fwd_matches_reference(cfg, bucket, shape, dtype, causal, request):
    q, k, v = _inputs(shape, bucket, dtype, request.node.callspec.id)
    o, lse = _launch(q, k, v, causal, cfg["block_m"], cfg["block_n"], bucket)
    _check(q, k, v, causal, o, lse)


def _odd_cases():
    # head_dim below its bucket (the D_MASK path) for the first arch of each vendor, at each bucket it has.
    cases = []
    for vendor in TILES:
        first = next(arch for v, arch, _, _ in CONFIGS if v == vendor)
        for v, arch, bucket, cfg in CONFIGS:
            if v == vendor and arch == first:
                for dtype in DTYPES:
                    head_dim = bucket - 24
                    cid = f"{arch}-d{bucket}-hd{head_dim}-m{cfg['block_m']}n{cfg['block_n']}-{TL_DTYPE[dtype]}"
                    cases.append(pytest.param(cfg, bucket, head_dim, dtype, id=cid))
    return cases


@pytest.mark.parametrize(("cfg", "bucket", "head_dim", "dtype"), _odd_cases())
def test_fwd_dmask_strided_scale(cfg, bucket, head_dim, dtype, request):
    # D_MASK=True (head_dim < BLOCK_D), an explicit softmax_scale, causal GQA, and non-contiguous inputs: Q a slice
    # of a wider tensor, K/V slices of one packed KV tensor, so stride_*m != nheads*head_dim and K/V share storage.
    b, sq, sk, h, hk = 2, 70, 150, 4, 2
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.callspec.id.encode()))
    q = torch.randn(b, sq, h + 1, head_dim, generator=gen).to(dtype)[:, :, 1:]
    kv = torch.randn(b, sk, 2, hk, head_dim, generator=gen).to(dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    o, lse = _launch(q, k, v, True, cfg["block_m"], cfg["block_n"], bucket, softmax_scale=0.3)
    _check(q, k, v, True, o, lse, softmax_scale=0.3)


def test_every_config_covered():
    # Every (arch, bucket) config runs a causal multi-block case and at least two shapes.
    by_cfg = {}
    for p in _cases():
        cfg, bucket, shape, _dtype, causal = p.values
        by_cfg.setdefault((p.id.split("-")[0], bucket), (cfg, set()))[1].add((shape, causal))
    assert set(by_cfg) == {(arch, bucket) for _v, arch, bucket, _c in CONFIGS}
    for key, (cfg, pairs) in by_cfg.items():
        assert len({s for s, _ in pairs}) >= 2, key
        # causal, and crossing several query and key blocks
        assert any(c and s[1] > cfg["block_m"] and s[2] > cfg["block_n"] for s, c in pairs), key
