"""The Triton backward kernels (backends/kernels/bwd.py) run in the Triton interpreter against float64 autograd.

attn_bwd_dq runs first (it also writes DELTA = rowsum(dO * O)), then attn_bwd_dkdv (which reads DELTA), as
ops.run_backward launches them, on CPU tensors. Their inputs are what the forward hands the backward: O is the float64
reference output rounded to the test dtype, LSE the reference's natural log-sum-exp in float32 (+inf for rows that see
no key). The arguments are the library's own (validate.check_inputs, ops._shapes, ops.bwd_kernel_args: window
clamping, head_dim_8, score parameters, sm_scale, slope strides, the shared zero slope), packed once by the
dispatcher's packer (_C.pack_params) and launched on the dispatcher's grids (_C.launch_config), so a host-side bug
fails here too; only the pointers are mapped back to their tensors for the interpreter. dQ, dK, dV and DELTA are
poisoned with NaN and followed by NaN guards, so an element a kernel never writes, or one written outside them, fails.
The expected gradients are torch.autograd.grad of fa2rt.reference.attention_reference in float64.

The interpreter loader, the numpy >= 2.4 shim and the input helpers come from the forward test
(test_kernel_interpreter.py; tests/cpu is on sys.path through its conftest.py). bwd.py imports its helpers with
`from fwd import ...`: the forward test's interpreted fwd module stands in for `fwd` while bwd.py loads, so those
helpers run interpreted too.

What runs (one parametrized test over CASES; the meta tests at the end keep the coverage from shrinking silently):
- every backward tile of tiles.json (bwd_dq and bwd_dkdv of one arch and head-dim bucket; each kernel runs with its
  own op's block sizes): small odd shapes, causal and not, seqlen_q ==, <, > seqlen_k, ragged lengths, GQA/MQA (dK,
  dV sum over query heads), rows that see no key and keys no row sees, sliding windows; causal shapes derived from the
  block sizes where a program of each kernel runs both whole and masked blocks (the _key_phases split); a head dim
  below the bucket (the D_MASK images) on strided inputs; fp16 on a causal MQA call; seeded random calls (windows
  near the block sizes, any image kind, strided or not);
- on one tile (bucket FEATURE_BUCKET): every window of WINDOWS with causal off and on and seqlen_q ==, <, > seqlen_k;
  softcap, ALiBi ((nheads,) and (batch, nheads) slopes with odd strides) and both, the softcap image without slopes
  (the zero slope); negative and zero softmax_scale; fp16 on a subset.
bf16 misbehaves in the interpreter and is not run. Archs that share block sizes and bucket run once (the interpreter
ignores num_warps and num_stages). The interpreter runs each program with numpy, one at a time: shapes stay small, and
numpy's OpenBLAS runs single-threaded during launches (see _single_threaded_blas).
"""

import contextlib
import ctypes
import importlib.util
import json
import math
import random
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch
import triton
from test_kernel_interpreter import (
    ALIBI,
    GUARD,
    MASKED,
    MODULE_NAME,
    PLAIN,
    ROOT,
    SOFTCAP,
    TILES,
    TL_DTYPE,
    _dmask_head_dim,
    _image_takes,
    _inputs,
    _interpret_mode,
    exec_interpreted,
    fwd,
    option_tags,
    variants,
)
from triton.runtime.interpreter import InterpretedFunction

from fa2rt import _C, ops, policy
from fa2rt.reference import allowed_mask, attention_reference, fold_causal
from fa2rt.validate import check_inputs

BWD_SRC = ROOT / "backends" / "kernels" / "bwd.py"
BWD_MODULE_NAME = "fa2rt_kernels_bwd_interp"
BWD_OPS = ("bwd_dq", "bwd_dkdv")
assert tuple(policy.BACKWARD_PLANS["fa2"]) == BWD_OPS, "the backward launch order changed: update this test"


def _load_interpreted_bwd():
    """bwd.py with every @triton.jit function an InterpretedFunction, its `from fwd import ...` bound to the forward
    test's interpreted fwd module (sys.modules["fwd"] is restored afterwards)."""
    spec = importlib.util.spec_from_file_location(BWD_MODULE_NAME, BWD_SRC)
    mod = importlib.util.module_from_spec(spec)
    missing = object()
    prev_fwd = sys.modules.get("fwd", missing)
    sys.modules["fwd"] = fwd
    try:
        exec_interpreted(spec, mod, BWD_MODULE_NAME)
    finally:
        if prev_fwd is missing:
            sys.modules.pop("fwd", None)
        else:
            sys.modules["fwd"] = prev_fwd
    assert fwd.__name__ == MODULE_NAME
    for name in ("attn_bwd_dq", "attn_bwd_dkdv", "_dq_block", "_dkdv_block", "_scores", "_dscores", "_key_phases",
                 "_d_ok", "_tanh"):
        fn = getattr(mod, name)
        if not isinstance(fn, InterpretedFunction):
            raise RuntimeError(f"{BWD_SRC}: {name} is a {type(fn).__module__}.{type(fn).__name__}, not a triton "
                               "InterpretedFunction; the kernel would not run in the Triton interpreter")
    assert mod._key_phases is fwd._key_phases, "bwd.py must use the forward's (interpreted) phase helper"
    return mod


bwd = _load_interpreted_bwd()


# ---------------------------------------------------------------------------------------------------------------------
# Tiles, read from tiles.json at collection time (block sizes may be retuned; the meta tests follow them).

def _bwd_configs():
    """(vendor, arch, bucket, bwd_dq config or None, bwd_dkdv config or None) per arch with backward tiles."""
    configs = []
    for vendor, path in TILES.items():
        doc = json.loads(path.read_text())
        for arch, entry in doc["archs"].items():
            dq, dkdv = entry.get("bwd_dq", {}), entry.get("bwd_dkdv", {})
            for bucket in sorted(set(dq) | set(dkdv), key=int):
                configs.append((vendor, arch, int(bucket), dq.get(bucket), dkdv.get(bucket)))
                # A full-band dK/dV tile (tiles.json "full_band") runs with the bucket's dQ tile.
                if "full_band" in dkdv.get(bucket, {}):
                    configs.append((vendor, f"{arch}-fullband", int(bucket), dq.get(bucket), dkdv[bucket]["full_band"]))
    return configs


CONFIGS = _bwd_configs()


def _tile_of(bucket, dq_cfg, dkdv_cfg):
    # (dq block_m, dq block_n, dkdv block_m, dkdv block_n, bucket)
    return (dq_cfg["block_m"], dq_cfg["block_n"], dkdv_cfg["block_m"], dkdv_cfg["block_n"], bucket)


def _tiles():
    """tile -> the archs whose configs have it, in file order (configs sharing block sizes and bucket run once)."""
    tiles = {}
    for _vendor, arch, bucket, dq_cfg, dkdv_cfg in CONFIGS:
        if dq_cfg and dkdv_cfg:
            tiles.setdefault(_tile_of(bucket, dq_cfg, dkdv_cfg), []).append(arch)
    return {tile: tuple(archs) for tile, archs in tiles.items()}


TILE_ARCHS = _tiles()
FEATURE_BUCKET = 64


def _feature_tile():
    """The tile the window and feature crosses run on: at FEATURE_BUCKET, the one with the smallest key blocks (the
    most dK/dV programs, so the small shapes below cross key-block edges in both kernels)."""
    at_bucket = [t for t in TILE_ARCHS if t[4] == FEATURE_BUCKET]
    return min(at_bucket, key=lambda t: (t[3], t[1], t[2], t[0])) if at_bucket else None


FEATURE_TILE = _feature_tile()


# ---------------------------------------------------------------------------------------------------------------------
# Cases

def _shapes_for(tile):
    """(batch, seqlen_q, seqlen_k, nheads, nheads_k) run on a tile with causal off and on: ragged, GQA/MQA, both seqlen
    orders, several blocks of either kernel whatever the block sizes."""
    qm, qn, km, kn, _bucket = tile
    return [
        (1, 1, 1, 1, 1),
        (2, 37, 37, 2, 1),  # MQA, batch 2, one ragged block
        # GQA, seqlen_q < seqlen_k: several key blocks in both kernels; causal: a whole key block for every row of the
        # first dQ program
        (1, 45, max(qn, kn) + 22, 4, 2),
        (1, max(qm, km) + 16, 29, 2, 1),  # MQA, seqlen_q > seqlen_k; causal: the first rows see no key
    ]


def _diag_shapes(tile):
    """Causal shapes where some program of each kernel runs both its unmasked phase and a masked one (the phase
    bounds of _key_phases; test_diag_shapes_split_phases checks it against a copy of that function):
    - dQ: shift = qn + 5, so every row of the first query program sees the whole first key block, then the diagonal;
    - dK/dV: shift = kn - km (0 if negative), so rows >= km - 1 see every key of the first key program (the whole
      query block from km on), the rows before it through the diagonal."""
    qm, qn, km, kn, _bucket = tile
    return [(1, qm + 9, qm + qn + 14, 1, 1), (1, 2 * km + 5, 2 * km + 5 + max(kn - km, 0), 1, 1)]


# seqlen_q == seqlen_k, seqlen_q < seqlen_k, seqlen_q > seqlen_k
WINDOW_SHAPES = [(1, 37, 37, 2, 1), (1, 45, 80, 4, 2), (1, 80, 45, 2, 1)]
# (left, right) as the caller gives them, each with causal off and on (causal folds right to 0). With the shapes
# above, (3, 0), (0, 0) and (5, 2) leave rows without keys (seqlen_q > seqlen_k) and keys without rows (<).
WINDOWS = [(3, 0), (5, 2), (0, 0), (-1, 4), (7, -1)]
DTYPES = (torch.float32, torch.float16)
FUZZ_PER_TILE = 3


@dataclass(frozen=True)
class Case:
    group: str
    tile: tuple[int, int, int, int, int]  # (dq block_m, dq block_n, dkdv block_m, dkdv block_n, bucket)
    kind: tuple[bool, tuple[str, ...]]  # (d_mask, features): one of variants.KINDS
    shape: tuple[int, int, int, int, int]  # (batch, seqlen_q, seqlen_k, nheads, nheads_k)
    head_dim: int
    dtype: torch.dtype
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # the caller's window_size
    softmax_scale: float | None = None
    softcap: float = 0.0
    alibi: str | None = None  # None, or a layout name of test_kernel_interpreter._slopes
    strided: bool = False  # q, k, v, o and do are views with padded strides

    @property
    def id(self):
        qm, qn, km, kn, bucket = self.tile
        b, sq, sk, h, hk = self.shape
        d_mask, features = self.kind
        parts = [self.group, "+".join(TILE_ARCHS[self.tile]), f"d{bucket}{'m' if d_mask else ''}",
                 "+".join(features) or "plain", f"dq{qm}x{qn}", f"dkdv{km}x{kn}", f"b{b}q{sq}k{sk}h{h}kv{hk}",
                 f"hd{self.head_dim}", TL_DTYPE[self.dtype], "causal" if self.causal else "full"]
        return "-".join(parts + option_tags(self))


def _tile_cases():
    # Every tile: the shape list with and without causal (plain image, fp32), a causal GQA call in fp16, the diagonal
    # shapes, sliding windows, and a head dim below the bucket on strided inputs (the masked image; fp16 too at the
    # small buckets).
    cases = []
    for tile in TILE_ARCHS:
        _qm, qn, _km, kn, bucket = tile
        shapes = _shapes_for(tile)
        for shape in shapes:
            for causal in (False, True):
                cases.append(Case("tile", tile, PLAIN, shape, bucket, torch.float32, causal))
        cases.append(Case("tile", tile, PLAIN, shapes[1], bucket, torch.float16, True))
        for shape in _diag_shapes(tile):
            cases.append(Case("diag", tile, PLAIN, shape, bucket, torch.float32, True))
        # Sliding windows with seqlen_q < seqlen_k: the first keys are seen by no row (dK, dV exactly 0 there).
        banded = (1, 40, 51 + max(qn, kn) // 2, 2, 1)
        for window, causal in (((5, 2), False), ((3, -1), True)):
            cases.append(Case("band", tile, PLAIN, banded, bucket, torch.float32, causal, window))
        for dtype in DTYPES if bucket <= 64 else DTYPES[:1]:
            cases.append(Case("dmask", tile, MASKED, (2, 45, 70, 2, 1), _dmask_head_dim(bucket), dtype, causal=True,
                              softmax_scale=0.3, strided=True))
    return cases


def _window_cases():
    cases = []
    if FEATURE_TILE is None:
        return cases
    for window in WINDOWS:
        for causal in (False, True):
            for shape in WINDOW_SHAPES:
                cases.append(Case("window", FEATURE_TILE, PLAIN, shape, FEATURE_BUCKET, torch.float32, causal, window))
    return cases


def _feature_cases():
    # On the feature tile: softcap, ALiBi and both on the kinds that carry them, exact and masked head dims, both
    # slope layouts with odd strides, windows, negative and zero scales, rows without keys.
    if FEATURE_TILE is None:
        return []
    tile, d = FEATURE_TILE, FEATURE_BUCKET
    dm = _dmask_head_dim(d)
    f32, f16 = torch.float32, torch.float16
    long_q, long_k, mqa, batch2 = (1, 80, 45, 4, 2), (1, 45, 80, 4, 1), (2, 37, 37, 2, 1), (2, 50, 30, 2, 1)
    return [
        # scale sign and zero
        Case("scale", tile, PLAIN, long_q, d, f32, False, softmax_scale=-0.7),
        Case("scale", tile, PLAIN, long_q, d, f32, True, softmax_scale=-0.7),
        Case("scale", tile, PLAIN, long_k, d, f16, False, (7, 3), softmax_scale=-1.3),
        Case("scale", tile, PLAIN, long_k, d, f32, True, softmax_scale=0.0),
        Case("scale", tile, MASKED, long_q, dm, f32, False, (2, 2), softmax_scale=0.0),
        Case("scale", tile, MASKED, mqa, d, f32, False, (2, 2), softmax_scale=-0.6),  # masked image, exact dim
        # ALiBi image: slopes (nheads,) and (batch, nheads), strided; exact and masked head dims
        Case("alibi", tile, ALIBI, long_k, d, f32, True, alibi="heads_strided"),
        Case("alibi", tile, ALIBI, batch2, dm, f32, False, alibi="batch_heads_transposed"),
        Case("alibi", tile, ALIBI, batch2, d, f32, True, (7, -1), alibi="batch_heads_sliced"),
        Case("alibi", tile, ALIBI, mqa, dm, f16, False, (-1, 4), alibi="batch_heads_transposed"),
        Case("alibi", tile, ALIBI, long_q, d, f32, False, softmax_scale=-0.5, alibi="heads_strided"),
        Case("alibi", tile, ALIBI, long_q, dm, f32, False, (5, 2), alibi="heads_strided", strided=True),
        # softcap image without slopes (reads the shared zero slope), with (nheads,) and (batch, nheads) slopes
        Case("softcap", tile, SOFTCAP, long_k, d, f32, False, softmax_scale=1.0, softcap=1.5),
        Case("softcap", tile, SOFTCAP, long_q, dm, f32, True, softcap=0.8),
        Case("softcap", tile, SOFTCAP, mqa, d, f16, False, (2, 2), softmax_scale=2.0, softcap=3.0),
        Case("softcap", tile, SOFTCAP, long_q, d, f32, False, (0, 5), softmax_scale=-0.9, softcap=1.2),
        Case("softcap", tile, SOFTCAP, long_k, dm, f32, True, softmax_scale=0.0, softcap=1.0, strided=True),
        Case("softcap_alibi", tile, SOFTCAP, long_k, d, f32, True, softcap=1.5, alibi="heads_strided"),
        Case("softcap_alibi", tile, SOFTCAP, batch2, dm, f32, False, (7, -1), softmax_scale=-1.1, softcap=2.0,
             alibi="batch_heads_transposed"),
        Case("softcap_alibi", tile, SOFTCAP, batch2, d, f16, True, softcap=0.9, alibi="batch_heads_sliced"),
    ]


def _fuzz_side(rng, block):
    # -1 (unlimited), 0, short, about a block
    return rng.choice([-1, 0, rng.randint(1, 8), rng.randint(block - 2, block + 2)])


def _fuzz_cases():
    # Seeded random calls on every tile: lengths up to a few blocks of either kernel, random windows (often near the
    # block sizes), GQA/MQA, any image kind with its features. The fixed seed keeps the list (and the ids) stable.
    rng = random.Random(20250117)
    cases = []
    for tile in TILE_ARCHS:
        qm, qn, km, kn, bucket = tile
        for _ in range(FUZZ_PER_TILE):
            h, hk = rng.choice([(1, 1), (2, 1), (4, 2), (3, 3)])
            shape = (rng.choice([1, 2]), rng.randint(1, max(qm, km) + 17), rng.randint(1, max(qn, kn) + 17), h, hk)
            kind = rng.choice(variants.KINDS)
            head_dim = bucket if not kind[0] or rng.random() < 0.5 else _dmask_head_dim(bucket)
            cases.append(Case(
                "fuzz", tile, kind, shape, head_dim, torch.float32, rng.random() < 0.3,
                (_fuzz_side(rng, min(qn, km)), _fuzz_side(rng, min(qm, kn))),
                softmax_scale=rng.choice([None, None, 0.5, -0.4]),
                softcap=round(rng.uniform(0.5, 3.0), 2) if "softcap" in kind[1] else 0.0,
                alibi=rng.choice([None, "heads_strided", "batch_heads_transposed", "batch_heads_sliced"])
                if "alibi" in kind[1] else None,
                strided=rng.random() < 0.3))
    return cases


CASES = _tile_cases() + _window_cases() + _feature_cases() + _fuzz_cases()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, launch and check

# Gradient errors, relative to the reference's scale: the max abs error over max(1, max |ref|), and the RMS error over
# max(1, RMS of ref). (Not the error norm over the reference norm: a band of one key makes dS = P (dP - delta) vanish
# exactly, so dQ and dK are ~0 and only rounding is left.)
# fp32: the kernels compute what the math says in fp32 (the interpreter's tl.dot is an fp32 numpy matmul), from O and
# LSE rounded to fp32; dot products run over <= 256 head dims and sums over a few hundred keys or rows. Seen: max
# ~4e-5 (the one-key bands, where dP - delta cancels), RMS ~3e-6. A wrong mask, scale or phase bound gives errors of
# order 1e-2 or more. fp16: P and dS are rounded to fp16 before their matmuls (eps 2^-11 ~ 4.9e-4 each), and O is an
# fp16 rounding (delta carries its error). Seen: max and RMS ~7e-4.
GRAD_ABS_TOL = {torch.float32: 2e-4, torch.float16: 5e-3}
GRAD_RMS_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
# DELTA: an fp32 sum over <= 256 head dims of products of the O and dO values given: its error is bounded by a few
# 1e-5 of the sum of the products' magnitudes (in either dtype, the products of fp16 values being exact in fp32).
DELTA_TOL = 1e-5


def _padded_like(shape, dtype, gen, fill=None, strided=False):
    """A (b, s, h, d) tensor (random normal, or `fill`); when strided, a view of a (b, s, h + 2, d) tensor without
    its first two heads (row stride != h * d, offset 2 * d elements)."""
    b, s, h, d = shape
    full = (b, s, h + 2, d) if strided else shape
    t = torch.randn(*full, generator=gen).to(dtype) if fill is None else torch.full(full, fill, dtype=dtype)
    return t[:, :, 2:] if strided else t


def _poisoned(shape, dtype):
    """A contiguous NaN tensor followed by GUARD NaN elements in its buffer: (tensor, buffer)."""
    buf = torch.full((math.prod(shape) + GUARD,), float("nan"), dtype=dtype)
    return buf[: math.prod(shape)].view(shape), buf


def _openblas_thread_controls():
    """(get, set) of the OpenBLAS threads of the numpy this process loaded, or None (no OpenBLAS, not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                try:
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                    set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                except AttributeError:
                    continue
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


_BLAS_THREADS = _openblas_thread_controls()


@contextlib.contextmanager
def _single_threaded_blas():
    """The interpreter runs each tl.dot as one small numpy matmul: OpenBLAS's worker threads only add a hand-off per
    call, and on a busy machine a worker that waits for a core makes a 64x128x128 product take ~20 ms instead of
    ~20 us (the whole file several times slower). Run them on the calling thread; restore the count after."""
    if _BLAS_THREADS is None:
        yield
        return
    get, set_ = _BLAS_THREADS
    prev = get()
    set_(1)
    try:
        yield
    finally:
        set_(prev)


def _synthetic_image(op, tile, case, dtype):
    qm, qn, km, kn, bucket = tile
    d_mask, features = case.kind
    img = _C.ImageInfo()
    img.name = f"{op}-interp-{TL_DTYPE[dtype]}-d{bucket}"
    img.op, img.arch, img.dtype, img.head_dim, img.vendor = op, "sm80", TL_DTYPE[dtype], bucket, "cuda"
    img.d_mask, img.features = d_mask, list(features)
    img.block_m, img.block_n = (qm, qn) if op == "bwd_dq" else (km, kn)
    img.num_warps, img.warp_size, img.shared_bytes, img.align16 = 4, 32, 0, True
    img.kernel_name = {"bwd_dq": "attn_bwd_dq", "bwd_dkdv": "attn_bwd_dkdv"}[op]
    img.params = bwd.bwd_params(TL_DTYPE[dtype])
    return img


def _launch(case, tensors, lse, delta, alibi):
    """Run both backward kernels of `case`'s tile on the call; tensors maps q, k, v, o, do, dq, dk, dv."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    d_mask, features = case.kind
    bucket = case.tile[4]
    # The public API's validation and resolution (default scale, causal folded into the window), then the Shapes
    # ops.run_backward builds from what the forward saved.
    api_shapes = check_inputs(q, k, v, causal=case.causal, softmax_scale=case.softmax_scale, window_size=case.window,
                              softcap=case.softcap, alibi_slopes=alibi)
    left, right = api_shapes.window
    shapes = ops._shapes(q, k, api_shapes.softmax_scale, left, right, api_shapes.softcap, alibi)
    assert _image_takes(case.kind, bucket, shapes), f"{case.id}: the image kind {case.kind} cannot run this call"
    args = ops.bwd_kernel_args(tensors, lse, delta, alibi, shapes)

    params = bwd.bwd_params(TL_DTYPE[q.dtype])
    assert set(args) == {name for name, _ in params}, "bwd_kernel_args and bwd_params disagree on the parameter names"
    pointers = {name.upper(): t for name, t in tensors.items()} | {
        "LSE": lse, "DELTA": delta, "ALIBI": alibi if alibi is not None else ops._no_slopes(q.device)}
    launch = {}
    for name, ty in params:
        value = args[name]
        if ty.startswith("*"):
            t = pointers[name]
            assert value == t.data_ptr(), f"{name}: bwd_kernel_args passes another pointer"
            assert TL_DTYPE[t.dtype] == ty[1:], f"{name}: {t.dtype} for {ty}"
            launch[name] = t
        elif ty in ("i32", "i64"):
            bits = int(ty[1:])
            assert isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} for {ty}"
            assert -(2 ** (bits - 1)) <= value < 2 ** (bits - 1), f"{name}={value} overflows {ty}"
            launch[name] = value
        else:
            assert isinstance(value, float) and math.isfinite(value), f"{name}={value!r} for {ty}"
            launch[name] = value
    if alibi is None:
        zero = pointers["ALIBI"]
        assert zero.dtype == torch.float32 and zero.numel() >= 1 and not zero.any()

    registry = _C.Registry()
    for op, kernel in zip(BWD_OPS, (bwd.attn_bwd_dq, bwd.attn_bwd_dkdv), strict=True):
        problem = policy.problem_for(shapes, tensors.values(), op)
        assert problem.aligned16 and problem.strides8, "the dispatcher would not run a kernel on these inputs"
        image = _synthetic_image(op, case.tile, case, q.dtype)
        registry.add(image)
        _C.pack_params(registry, image.name, args)  # the dispatcher's packer takes every argument, by name and type
        grid, _block, _shared = _C.launch_config(registry, image.name, problem)
        b, sq, sk, h, hk = case.shape
        over = triton.cdiv(sq, image.block_m) if op == "bwd_dq" else triton.cdiv(sk, image.block_n)
        assert tuple(grid) == (over, b * (h if op == "bwd_dq" else hk), 1), f"{op}: grid {grid}"
        with _interpret_mode(), _single_threaded_blas():
            kernel[grid](**launch, **bwd.bwd_constexprs(image.block_m, image.block_n, bucket, d_mask, features))


def _check_written(name, t, buf):
    assert not torch.isnan(t).any(), f"{int(torch.isnan(t).sum())} of {t.numel()} {name} elements NaN (unwritten?)"
    assert torch.isnan(buf[t.numel():]).all(), f"the kernel wrote past the end of {name}"


def _check_grad(name, got, ref, dtype):
    diff = got.double() - ref
    scale = max(1.0, ref.abs().max().item())
    err = diff.abs().max().item() / scale
    rms = diff.norm().item() / max(ref.norm().item(), got.numel() ** 0.5)
    where = tuple(int(i) for i in torch.unravel_index(diff.abs().argmax(), diff.shape)) if got.numel() else ()
    what = (f"{name}: max abs err {err:.3g} (relative to {scale:.3g}) at (b, s, h, d) = {where} of {tuple(got.shape)}, "
            f"RMS err {rms:.3g}")
    assert err < GRAD_ABS_TOL[dtype], what
    assert rms < GRAD_RMS_TOL[dtype], what


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bwd_matches_reference(case, request):
    seed_key = request.node.callspec.id
    q, k, v, alibi = _inputs(case, seed_key)
    b, sq, sk, h, hk = case.shape
    dtype = case.dtype
    gen = torch.Generator().manual_seed(zlib.crc32((seed_key + "-do").encode()))

    # The float64 reference forward (its inputs are the test-dtype values, exactly) and its gradients.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(causal=case.causal, softmax_scale=case.softmax_scale, window_size=case.window, softcap=case.softcap,
              alibi_slopes=alibi)
    ref_o, ref_lse = attention_reference(q64, k64, v64, **kw)
    do = _padded_like(q.shape, dtype, gen, strided=case.strided)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_o, (q64, k64, v64), do.double())

    # What the forward hands the backward: O in the test dtype, LSE in fp32.
    o = _padded_like(q.shape, dtype, gen, fill=0.0, strided=case.strided)
    o.copy_(ref_o.detach())
    lse = ref_lse.detach().float().contiguous()
    dq, dq_buf = _poisoned(q.shape, dtype)
    dk, dk_buf = _poisoned(k.shape, dtype)
    dv, dv_buf = _poisoned(v.shape, dtype)
    delta, delta_buf = _poisoned(lse.shape, torch.float32)
    tensors = {"q": q, "k": k, "v": v, "o": o, "do": do, "dq": dq, "dk": dk, "dv": dv}
    _launch(case, tensors, lse, delta, alibi)

    for name, t, buf in (("dQ", dq, dq_buf), ("dK", dk, dk_buf), ("dV", dv, dv_buf), ("DELTA", delta, delta_buf)):
        _check_written(name, t, buf)
    products = (o.double() * do.double()).transpose(1, 2)  # (b, h, sq, d)
    delta_err = (delta.double() - products.sum(-1)).abs()
    assert (delta_err <= DELTA_TOL * products.abs().sum(-1).clamp(min=1.0)).all(), \
        f"DELTA max abs err {delta_err.max().item():.3g}"

    # Rows that see no key get dQ exactly 0; keys no row sees get dK and dV exactly 0 (P is exactly 0 there).
    allowed = allowed_mask(sq, sk, fold_causal(case.window, case.causal), "cpu")
    assert (dq[:, ~allowed.any(dim=1)] == 0).all(), "dQ of rows that see no key must be exactly 0"
    unseen = ~allowed.any(dim=0)
    assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all(), "dK, dV of keys no row sees must be exactly 0"

    for name, got, ref in (("dQ", dq, ref_dq), ("dK", dk, ref_dk), ("dV", dv, ref_dv)):
        _check_grad(name, got, ref, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Meta tests: coverage cannot shrink silently when tiles, kinds or case lists change.

def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_bwd_tiles_exist():
    # Every arch of both vendors has backward images; every arch with one backward op has the other at the same
    # buckets.
    for vendor, path in TILES.items():
        for arch in json.loads(path.read_text())["archs"]:
            assert any(a == arch for v, a, *_ in CONFIGS if v == vendor), f"no backward tiles for {arch} in {path}"
    for _vendor, arch, bucket, dq_cfg, dkdv_cfg in CONFIGS:
        assert dq_cfg and dkdv_cfg, f"{arch} d{bucket}: bwd_dq and bwd_dkdv tiles must come together"
    assert FEATURE_TILE is not None, f"no backward tile at bucket {FEATURE_BUCKET}"


def _orders(cases):
    return {(c.shape[1] > c.shape[2]) - (c.shape[1] < c.shape[2]) for c in cases}


def _some_empty_row(c):
    _b, sq, sk, _h, _hk = c.shape
    return not allowed_mask(sq, sk, fold_causal(c.window, c.causal), "cpu").any(dim=1).all()


def _some_unseen_key(c):
    _b, sq, sk, _h, _hk = c.shape
    return not allowed_mask(sq, sk, fold_causal(c.window, c.causal), "cpu").any(dim=0).all()


def _window_args(case):
    """(window_left, window_right) as bwd_kernel_args passes them (unlimited and over-long windows clamped)."""
    b, sq, sk, h, hk = case.shape
    q = torch.empty(b, sq, h, case.head_dim, device="meta")
    k = torch.empty(b, sk, hk, case.head_dim, device="meta")
    left, right = fold_causal(case.window, case.causal)
    slopes = torch.zeros(h)  # any slopes: without, _problem_args would cache a zero slope on the meta device
    args = ops._problem_args(slopes, ops._shapes(q, k, 1.0, left, right, 0.0, slopes), "meta")
    return args["window_left"], args["window_right"]


def _key_phases(m0, seqlen_q, seqlen_k, shift, window_left, window_right, block_m, block_n):
    """(whole blocks, masked blocks) of one program: a copy of fwd._key_phases and of the block counts the backward
    kernels derive from it (every division has a non-negative numerator, so // matches the kernel's)."""
    m_last = min(m0 + block_m, seqlen_q) - 1
    lo = max(m0 + shift - window_left, 0) // block_n * block_n
    hi = min(m_last + shift + window_right + 1, seqlen_k)
    full_lo = -(-max(m_last + shift - window_left, 0) // block_n) * block_n
    full_hi = max(min(m0 + shift + window_right + 1, seqlen_k), 0) // block_n * block_n
    full_lo = min(max(full_lo, lo), hi)
    full_hi = min(max(full_hi, full_lo), hi)
    masked = -(-max(full_lo - lo, 0) // block_n) + -(-max(hi - full_hi, 0) // block_n)
    return (full_hi - full_lo) // block_n, masked


def _splits_phases(case, op):
    """Whether some program of `op` runs both whole blocks and masked ones on this case."""
    qm, qn, km, kn, _bucket = case.tile
    _b, sq, sk, _h, _hk = case.shape
    left, right = _window_args(case)
    shift = sk - sq
    if op == "bwd_dq":
        programs = [_key_phases(m0, sq, sk, shift, left, right, qm, qn) for m0 in range(0, sq, qm)]
    else:
        programs = [_key_phases(n0, sk, sq, -shift, right, left, kn, km) for n0 in range(0, sk, kn)]
    return any(full > 0 and masked > 0 for full, masked in programs)


def test_every_bwd_tile_covered():
    # Every (vendor, arch, bucket) backward config runs through its tile: both kernels across several of their
    # blocks, causal and not, the three seqlen orders, GQA and MQA, rows without keys and keys without rows, a
    # strided call below the bucket on the masked image, fp16, random calls.
    for _vendor, arch, bucket, dq_cfg, dkdv_cfg in CONFIGS:
        tile = _tile_of(bucket, dq_cfg, dkdv_cfg)
        assert arch in TILE_ARCHS[tile]
        qm, qn, km, kn, _ = tile
        mine = [c for c in CASES if c.tile == tile]
        assert {False, True} <= {c.causal for c in mine}, (arch, bucket)
        assert _orders(mine) == {-1, 0, 1}, (arch, bucket)
        assert any(c.causal and c.shape[1] > qm and c.shape[2] > qn for c in mine), (arch, bucket, "dq blocks")
        assert any(c.causal and c.shape[1] > km and c.shape[2] > kn for c in mine), (arch, bucket, "dkdv blocks")
        assert any(1 < c.shape[4] < c.shape[3] for c in mine), (arch, bucket, "GQA")
        assert any(c.shape[4] == 1 < c.shape[3] for c in mine), (arch, bucket, "MQA")
        assert any(c.shape[2] % kn and c.shape[2] % qn and c.shape[1] % qm and c.shape[1] % km and c.shape[1] > 1
                   for c in mine), (arch, bucket, "ragged lengths")
        for op in BWD_OPS:
            assert any(c.causal and _splits_phases(c, op) for c in mine), (arch, bucket, op, "whole and masked blocks")
        assert any(_some_empty_row(c) for c in mine), (arch, bucket, "rows without keys")
        assert any(_some_unseen_key(c) for c in mine), (arch, bucket, "keys without rows")
        assert any(c.kind == MASKED and c.head_dim < bucket and c.strided for c in mine), (arch, bucket)
        assert any(c.dtype == torch.float16 for c in mine), (arch, bucket)
        assert sum(c.group == "fuzz" for c in mine) >= FUZZ_PER_TILE, (arch, bucket)


def test_diag_shapes_split_phases():
    for tile in TILE_ARCHS:
        dq_shape, dkdv_shape = _diag_shapes(tile)
        assert _splits_phases(Case("diag", tile, PLAIN, dq_shape, tile[4], torch.float32, True), "bwd_dq"), tile
        assert _splits_phases(Case("diag", tile, PLAIN, dkdv_shape, tile[4], torch.float32, True), "bwd_dkdv"), tile


def test_every_window_covered():
    got = {(c.window, c.causal, (c.shape[1] > c.shape[2]) - (c.shape[1] < c.shape[2]))
           for c in CASES if c.tile == FEATURE_TILE and c.group == "window"}
    for window in WINDOWS:
        for causal in (False, True):
            for order in (-1, 0, 1):
                assert (window, causal, order) in got, (window, causal, order)


def test_every_kind_and_feature_covered():
    assert set(variants.KINDS) == {PLAIN, MASKED, ALIBI, SOFTCAP}, "image kinds changed: cover the new ones"
    mine = [c for c in CASES if c.tile == FEATURE_TILE]
    for kind in variants.KINDS:
        assert any(c.kind == kind and c.head_dim == FEATURE_BUCKET for c in mine), kind
        if kind[0]:
            assert any(c.kind == kind and c.head_dim < FEATURE_BUCKET for c in mine), kind
    need = {
        "softcap without slopes (zero slope)": lambda c: c.softcap > 0 and c.alibi is None,
        "softcap with (nheads,) slopes": lambda c: c.softcap > 0 and c.alibi == "heads_strided",
        "softcap with (batch, nheads) slopes": lambda c: c.softcap > 0 and c.alibi and c.alibi.startswith("batch"),
        "softcap, negative scale": lambda c: c.softcap > 0 and (c.softmax_scale or 0) < 0,
        "softcap, zero scale": lambda c: c.softcap > 0 and c.softmax_scale == 0,
        "alibi (nheads,)": lambda c: c.alibi == "heads_strided" and c.softcap == 0,
        "alibi (batch, nheads) transposed": lambda c: c.alibi == "batch_heads_transposed" and c.shape[0] > 1,
        "alibi (batch, nheads) sliced": lambda c: c.alibi == "batch_heads_sliced" and c.shape[0] > 1,
        "alibi, negative scale": lambda c: c.alibi and c.softcap == 0 and (c.softmax_scale or 0) < 0,
        "alibi with a window": lambda c: c.alibi and c.window != (-1, -1),
        "alibi, strided inputs": lambda c: c.alibi and c.strided,
        "negative scale, plain image, unmasked": lambda c: c.kind == PLAIN and (c.softmax_scale or 0) < 0
        and not c.causal and c.window == (-1, -1),
        "negative scale, plain image, causal": lambda c: c.kind == PLAIN and (c.softmax_scale or 0) < 0 and c.causal,
        "zero scale": lambda c: c.softmax_scale == 0 and c.kind in (PLAIN, MASKED),
        "fp16 softcap+alibi": lambda c: c.dtype == torch.float16 and c.softcap > 0 and c.alibi,
        "fp16 alibi": lambda c: c.dtype == torch.float16 and c.alibi and c.softcap == 0,
        "alibi, rows without keys": lambda c: c.alibi and _some_empty_row(c),
        "softcap, rows without keys": lambda c: c.softcap > 0 and _some_empty_row(c),
        "GQA": lambda c: 1 < c.shape[4] < c.shape[3],
        "MQA": lambda c: c.shape[4] == 1 < c.shape[3],
    }
    for what, pred in need.items():
        assert any(pred(c) for c in mine), what


def test_library_units_match_kernel():
    # bwd_kernel_args passes head_dim // _C.HEAD_DIM_MULTIPLE and strides // _C.STRIDE_MULTIPLE; bwd.py multiplies
    # them back by 8 (the forward's units).
    assert ops._C.HEAD_DIM_MULTIPLE == fwd.HEAD_DIM_MULTIPLE == 8
    assert ops._C.STRIDE_MULTIPLE == fwd.STRIDE_UNIT == 8


# ---------------------------------------------------------------------------------------------------------------------
# attn_bwd_prep and attn_bwd_convert: the Triton kernels around the warp-specialised sm90 backward (bwd_ws.py, Gluon,
# which the interpreter cannot run: it ran on the H200, docs/bench/gluon-ws-notes.md). Every tile of theirs in
# tiles.json, with the library's arguments (ops._aux_constants, ops._dq_accumulator) packed by the dispatcher's packer
# on its grid.

AUX_TILES = sorted({(op, arch, int(bucket), cfg["block_m"])
                    for path in TILES.values() for arch, entry in json.loads(path.read_text())["archs"].items()
                    for op in ("bwd_prep", "bwd_convert") for bucket, cfg in entry.get(op, {}).items()})


def _aux_launch(op, bucket, block_m, shapes, tensors, buffers):
    img = _C.ImageInfo()
    img.name, img.op, img.arch, img.vendor = f"{op}-interp-d{bucket}", op, "sm90", "cuda"
    img.dtype, img.head_dim, img.d_mask, img.features = TL_DTYPE[shapes.dtype], bucket, False, []
    img.block_m, img.block_n, img.num_warps, img.warp_size, img.align16 = block_m, 64, 4, 32, True
    img.kernel_name = f"attn_{op}"
    img.params = bwd.aux_params(TL_DTYPE[shapes.dtype])
    registry = _C.Registry()
    registry.add(img)
    pointers = {name.upper(): t for name, t in tensors.items()} | buffers
    args = ops._aux_constants(tensors, None, shapes) | {name: t.data_ptr() for name, t in pointers.items()}
    _C.pack_params(registry, img.name, args)
    problem = policy.problem_for(shapes, tensors.values(), op)
    grid, _block, _shared = _C.launch_config(registry, img.name, problem)
    assert tuple(grid) == (triton.cdiv(shapes.seqlen_q, block_m), shapes.batch * shapes.nheads, 1)
    launch = {name: (pointers[name] if ty.startswith("*") else args[name]) for name, ty in img.params}
    with _interpret_mode(), _single_threaded_blas():
        getattr(bwd, f"attn_{op}")[grid](**launch, **bwd.aux_constexprs(block_m, 64, bucket, False, ()))


@pytest.mark.parametrize("dtype", DTYPES, ids=[TL_DTYPE[d] for d in DTYPES])
@pytest.mark.parametrize("op, arch, bucket, block_m", AUX_TILES, ids=[f"{t[0]}-{t[1]}-d{t[2]}" for t in AUX_TILES])
def test_prep_and_convert_around_the_warp_specialised_backward(op, arch, bucket, block_m, dtype):
    """prep: delta = rowsum(dO * O) laid out as LSE, and the accumulator's first seqlen_q of every row zeroed (the
    padding past it untouched); convert: dQ = the accumulator transposed, rounded to the dtype once. Strided O and dO;
    seqlen_q = block_m + 37: two row blocks, the second ragged, and accumulator rows padded by 3."""
    b, sq, h = 2, block_m + 37, 3
    gen = torch.Generator().manual_seed(bucket + block_m)
    o, do = (_padded_like((b, sq, h, bucket), dtype, gen, strided=True) for _ in range(2))
    q = torch.empty(b, sq, h, bucket, dtype=dtype)
    shapes = ops._shapes(q, q, 0.5, -1, -1, 0.0, None)
    acc = ops._dq_accumulator(shapes).fill_(float("nan"))
    rows = acc.shape[-1]
    assert rows % 4 == 0 and sq <= rows < sq + 4
    delta, delta_buf = _poisoned((b, h, sq), torch.float32)
    dq, dq_buf = _poisoned(q.shape, dtype)
    tensors = {"o": o, "do": do, "dq": dq}
    if op == "bwd_prep":
        _aux_launch(op, bucket, block_m, shapes, tensors, {"DELTA": delta, "DQACC": acc})
        _check_written("DELTA", delta, delta_buf)
        products = (o.double() * do.double()).transpose(1, 2)
        assert ((delta.double() - products.sum(-1)).abs() <= DELTA_TOL * products.abs().sum(-1).clamp(min=1)).all()
        assert (acc[..., :sq] == 0).all() and acc[..., sq:].isnan().all()
        return
    acc[..., :sq] = torch.randn(b, h, bucket, sq, generator=gen)
    _aux_launch(op, bucket, block_m, shapes, tensors, {"DELTA": delta, "DQACC": acc})
    _check_written("dQ", dq, dq_buf)
    assert torch.equal(dq, acc[..., :sq].permute(0, 3, 1, 2).to(dtype))


def test_aux_tiles_exist():
    """sm90 has prep and convert tiles at every bucket its warp-specialised backward serves."""
    ws = set(json.loads(TILES["cuda"].read_text())["archs"]["sm90"]["bwd_ws"])
    for op in ("bwd_prep", "bwd_convert"):
        assert {str(t[2]) for t in AUX_TILES if t[0] == op and t[1] == "sm90"} == ws
