"""The Triton forward kernel source (backends/kernels/fwd.py) run in the Triton interpreter against a float64 reference.

Every (vendor, arch, head-dim bucket) tile config of backends/cuda/tiles.json and backends/rocm/tiles.json is launched
with its block_m/block_n on CPU tensors, with the arguments the library itself computes (validate.check_inputs,
ops._shapes, ops.kernel_args: window clamping, head_dim_8, the score parameters, slope strides, the shared zero slope),
so a host-side bug fails here too; only the pointers are mapped back to their tensors for the interpreter. O and LSE
are poisoned with NaN, and followed by NaN guards, so an element the kernel never writes, or one it writes outside
them, fails the test. The expected values come from fa2rt.reference.attention_reference.

What runs (one parametrized test over CASES; the meta tests at the end keep the coverage from shrinking silently):
- every tile: small odd shapes crossing several key blocks, causal and not (unmasked and masked phases, ragged
  seqlen_k, rows that see no key, GQA/MQA), causal shapes and sliding-window shapes derived from the block sizes that
  put the phase bounds (_key_phases in the kernel) one key off a block edge, and a head dim below the bucket (the
  D_MASK images) on strided inputs;
- per vendor, on one tile: every window of WINDOWS with causal off and on and seqlen_q ==, <, > seqlen_k; softcap,
  ALiBi ((nheads,) and (batch, nheads) slopes with odd strides) and both on the image kinds that carry them, the
  softcap image without slopes (the zero slope); negative and zero softmax_scale;
- per (block_m, block_n) pair, on one tile: every window again, and seeded random calls.
fp32 throughout, fp16 on a subset; bf16 misbehaves in the interpreter. Configs that share block sizes and bucket run
once (the interpreter ignores num_warps and num_stages). The interpreter executes each program with numpy, one program
at a time: shapes stay small (the whole file takes under a minute on 2 idle cores).
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
import random  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
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

from fa2rt import ops, policy  # noqa: E402
from fa2rt.reference import allowed_mask, attention_reference, fold_causal  # noqa: E402
from fa2rt.validate import check_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FWD_SRC = ROOT / "backends" / "kernels" / "fwd.py"
VARIANTS_SRC = ROOT / "backends" / "kernels" / "variants.py"
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


def exec_interpreted(spec, mod, name):
    """Execute a kernel module's source in interpreter mode, registered as sys.modules[name] (dropped on failure)."""
    with _interpret_mode():
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise


def _load_interpreted_kernel():
    # Another test module may have imported triton (or even fwd.py under its package name) earlier in this process,
    # so load a fresh copy under a private module name with the knob forced on; the env var alone is not enough if
    # someone assigned knobs.runtime.interpret explicitly, since an assigned value shadows the environment.
    spec = importlib.util.spec_from_file_location(MODULE_NAME, FWD_SRC)
    mod = importlib.util.module_from_spec(spec)
    try:
        exec_interpreted(spec, mod, MODULE_NAME)
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


def _load_plain_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The variant grid (image kinds per bucket); plain Python, no Triton.
variants = _load_plain_module("fa2rt_kernels_variants_interp", VARIANTS_SRC)


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


def _tiles():
    """(block_m, block_n, bucket) -> the archs whose config has it, in file order.

    The interpreter runs a kernel the same way whatever num_warps/num_stages say, so configs that share block sizes
    and bucket are one computation: each distinct tile runs once, named after every arch it stands for.
    """
    tiles = {}
    for _vendor, arch, bucket, cfg in CONFIGS:
        tiles.setdefault((cfg["block_m"], cfg["block_n"], bucket), []).append(arch)
    return {tile: tuple(archs) for tile, archs in tiles.items()}


TILE_ARCHS = _tiles()


FEATURE_BUCKET = 64


def _feature_tile(vendor):
    """The tile the feature and window crosses run on for a vendor: its last arch's config at FEATURE_BUCKET."""
    arch, cfg = [(a, c) for v, a, b, c in CONFIGS if v == vendor and b == FEATURE_BUCKET][-1]
    return (cfg["block_m"], cfg["block_n"], FEATURE_BUCKET), arch

# (batch, seqlen_q, seqlen_k, nheads, nheads_k)
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 37, 37, 2, 1),  # MQA, one ragged block
    (1, 130, 200, 2, 2),  # causal: diagonal across 2-4 key blocks, unmasked phase for the second query block
    (1, 200, 130, 4, 2),  # GQA; causal: the first 70 query rows see no key
    (1, 3, 300, 1, 1),  # causal: unmasked multi-block phase then a ragged boundary block
]
FP16_SHAPES = [(1, 130, 200, 2, 2), (1, 200, 130, 4, 2)]  # causal
# seqlen_q == seqlen_k, seqlen_q < seqlen_k, seqlen_q > seqlen_k (several query and key blocks)
WINDOW_SHAPES = [(1, 37, 37, 2, 1), (1, 130, 200, 1, 1), (1, 200, 130, 2, 1)]
# (left, right) as the caller gives them, each run with causal off and on (causal folds right to 0)
WINDOWS = [(3, 0), (0, 5), (2, 2), (-1, 4), (7, -1), (0, 0)]
# The image kinds as (d_mask, features); test_every_kind_and_feature_covered_per_vendor checks these are variants.KINDS.
PLAIN, MASKED, ALIBI, SOFTCAP = (False, ()), (True, ()), (True, ("alibi",)), (True, ("softcap", "alibi"))
DTYPES = [torch.float16, torch.float32]
# Relative Frobenius error of O and max abs error of O, and max abs error of LSE (over rows that see a key).
O_REL_TOL = {torch.float16: 2e-3, torch.float32: 1e-4}
O_ABS_TOL = {torch.float16: 8e-3, torch.float32: 2e-4}
LSE_TOL = {torch.float16: 1e-4, torch.float32: 1e-4}  # scores are exact fp32 products either way; seen ~1e-6
TL_DTYPE = {torch.float16: "fp16", torch.float32: "fp32"}
GUARD = 64  # NaN elements after O and LSE in their buffers: a write past the end fails the test


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


def _window_edge_shapes(block_m, block_n):
    """(target, shape, window, causal): band edges of a program's first or last row at a key-block edge.

    seqlen_q = block_m + 5 gives two query programs, p0 (rows 0 .. block_m-1) and p1 (rows block_m .. block_m+4).
    Row i sees keys i + shift - left ..= i + shift + right (shift = seqlen_k - seqlen_q); the kernel splits each
    program's keys into the masked left edge [lo, full_lo), the blocks every row sees whole [full_lo, full_hi) and
    the masked right edge [full_hi, hi). Each target is checked against these definitions by
    test_window_edge_shapes_hit_their_targets:
    - last_left_past_edge: p0's last row starts one key past a block edge, so that block is not whole for it
      (full_lo rounded down would run it unmasked); its band also ends inside a ragged last block;
    - first_left_block_end: p1's first row starts at the last key of a block (lo rounded up would skip the key);
    - first_right_short: p0's first row ends one key short of a block end (full_hi rounded up would run the block
      unmasked for it);
    - last_right_one_key: p0's last row ends at the first key of a block (hi rounded down would skip that block);
    - ragged_narrow_end: seqlen_q == seqlen_k ragged, a narrow band: the last program's band lies inside the last,
      partial key block (the masked left edge must reach past every whole block to the ragged end).
    """
    bm, bn = block_m, block_n
    sq = bm + 5
    left = bn + 3
    n = max(2, -(-bm // bn)) * bn + 9  # > block_m: two query programs, the last one inside the ragged key block
    return [
        # p0 last row: (bm - 1) + shift - 5 == bn + 1; no right edge, then causal's
        ("last_left_past_edge", (1, sq, sq + bn + 2 - bm + 5, 1, 1), (5, -1), False),
        ("last_left_past_edge", (1, sq, sq + bn + 2 - bm + 5, 1, 1), (5, -1), True),
        # p1 first row: bm + shift - left == 2*bn - 1; causal's right edge, then one 2 keys further
        ("first_left_block_end", (1, sq, sq + 2 * bn - 1 - bm + left, 1, 1), (left, 0), False),
        ("first_left_block_end", (1, sq, sq + 2 * bn - 1 - bm + left, 1, 1), (left, 2), False),
        # p0 first row: shift + 4 == 2*bn - 2; whole blocks before it, then a masked left edge too
        ("first_right_short", (1, sq, sq + 2 * bn - 6, 1, 1), (-1, 4), False),
        ("first_right_short", (1, sq, sq + 2 * bn - 6, 1, 1), (bn + 9, 4), False),
        # p0 last row: bm - 1 + shift + 4 == 2*bn
        ("last_right_one_key", (1, sq, sq + 2 * bn - bm - 3, 1, 1), (-1, 4), False),
        ("last_right_one_key", (1, sq, sq + 2 * bn - bm - 3, 1, 1), (2, 4), False),
        ("ragged_narrow_end", (1, n, n, 1, 1), (3, 0), False),
        ("ragged_narrow_end", (1, n, n, 1, 1), (3, -1), True),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Cases: one dataclass per launch, checked by one test; the meta tests below read the same list.

@dataclass(frozen=True)
class Case:
    group: str
    tile: tuple[int, int, int]  # (block_m, block_n, bucket)
    kind: tuple[bool, tuple[str, ...]]  # (d_mask, features): one of variants.KINDS
    shape: tuple[int, int, int, int, int]  # (batch, seqlen_q, seqlen_k, nheads, nheads_k)
    head_dim: int
    dtype: torch.dtype
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # the caller's window_size
    softmax_scale: float | None = None
    softcap: float = 0.0
    alibi: str | None = None  # None, or a layout name of _slopes
    strided: bool = False  # q, k, v and out are views with padded strides (see _inputs)

    @property
    def id(self):
        bm, bn, bucket = self.tile
        b, sq, sk, h, hk = self.shape
        d_mask, features = self.kind
        parts = [self.group, "+".join(TILE_ARCHS[self.tile]), f"d{bucket}{'m' if d_mask else ''}",
                 "+".join(features) or "plain", f"m{bm}n{bn}", f"b{b}q{sq}k{sk}h{h}kv{hk}", f"hd{self.head_dim}",
                 TL_DTYPE[self.dtype], "causal" if self.causal else "full"]
        return "-".join(parts + option_tags(self))


def option_tags(case) -> list[str]:
    """The id parts of a case's optional call settings (window, scale, softcap, slopes, strided inputs), shared by
    the forward and backward cases."""
    tags = []
    if case.window != (-1, -1):
        tags.append(f"w{case.window[0]}_{case.window[1]}")
    if case.softmax_scale is not None:
        tags.append(f"scale{case.softmax_scale:g}")
    if case.softcap:
        tags.append(f"cap{case.softcap:g}")
    if case.alibi:
        tags.append(f"alibi_{case.alibi}")
    if case.strided:
        tags.append("strided")
    return tags


def _tile_cases():
    # Every tile: the shape list with and without causal, the diagonal-edge shapes, the window-edge shapes; fp32,
    # and fp16 on the causal multi-block shapes. The plain image (head dim == bucket).
    cases = []
    for tile in TILE_ARCHS:
        bm, bn, bucket = tile
        for shape in SHAPES:
            for causal in (False, True):
                cases.append(Case("tile", tile, PLAIN, shape, bucket, torch.float32, causal))
        for shape in FP16_SHAPES:
            cases.append(Case("tile", tile, PLAIN, shape, bucket, torch.float16, True))
        for shape in _diagonal_edge_shapes(bm, bn):
            cases.append(Case("diag_edge", tile, PLAIN, shape, bucket, torch.float32, True))
        for _target, shape, window, causal in _window_edge_shapes(bm, bn):
            cases.append(Case("window_edge", tile, PLAIN, shape, bucket, torch.float32, causal, window))
    return cases


def _dmask_head_dim(bucket):
    return bucket - 8 if bucket > 16 else 8


def _dmask_cases():
    # Every tile: a head dim below the bucket (the masked image), strided causal MQA with an explicit scale; both
    # dtypes at the smaller buckets, fp32 at the large ones (the interpreter's cost grows with the bucket).
    cases = []
    for tile in TILE_ARCHS:
        bucket = tile[2]
        for dtype in DTYPES if bucket <= 64 else [torch.float32]:
            cases.append(Case("dmask", tile, MASKED, (2, 70, 150, 2, 1), _dmask_head_dim(bucket), dtype,
                              causal=True, softmax_scale=0.3, strided=True))
    return cases


def _block_pair_tiles():
    """One tile per distinct (block_m, block_n), the one with the smallest bucket (the cheapest to interpret)."""
    out = {}
    for tile in sorted(TILE_ARCHS, key=lambda t: t[2]):
        out.setdefault(tile[:2], tile)
    return list(out.values())


def _window_cases():
    # Every window with causal off and on: on each vendor's feature tile with seqlen_q ==, < and > seqlen_k each, on
    # one tile of every other (block_m, block_n) pair with one of the three shapes in turn.
    cases = []
    full = list(dict.fromkeys(_feature_tile(vendor)[0] for vendor in TILES))
    for tile in full + [t for t in _block_pair_tiles() if t not in full]:
        pairs = [(window, causal) for window in WINDOWS for causal in (False, True)]
        for i, (window, causal) in enumerate(pairs):
            shapes = WINDOW_SHAPES if tile in full else [WINDOW_SHAPES[i % len(WINDOW_SHAPES)]]
            for shape in shapes:
                cases.append(Case("window", tile, PLAIN, shape, tile[2], torch.float32, causal, window))
    return cases


def _feature_cases():
    # Per vendor, its feature tile: softcap, ALiBi and both on the kinds that carry them, with exact and masked head
    # dims, both slope layouts with odd strides, windows, negative and zero scales (a negative scale sends every key
    # block through the masked loop), rows with no key. Vendors whose feature tiles coincide share the cases.
    cases = []
    for tile in dict.fromkeys(_feature_tile(vendor)[0] for vendor in TILES):
        d = tile[2]
        dm = _dmask_head_dim(d)
        f32, f16 = torch.float32, torch.float16
        # seqlen_q > seqlen_k (rows without keys under causal), GQA with seqlen_q < seqlen_k, MQA with a batch
        gqa_long_q, gqa_long_k, mqa = (1, 200, 130, 2, 1), (1, 70, 200, 4, 2), (2, 37, 37, 2, 1)
        batch2 = (2, 150, 90, 2, 1)
        cases += [
            # scale sign and zero on the plain image: hot path, masked edges, empty rows
            Case("scale", tile, PLAIN, gqa_long_q, d, f32, False, softmax_scale=-0.7),
            Case("scale", tile, PLAIN, gqa_long_q, d, f32, True, softmax_scale=-0.7),
            Case("scale", tile, PLAIN, gqa_long_k, d, f16, False, (7, 3), softmax_scale=-1.3),
            Case("scale", tile, PLAIN, gqa_long_k, d, f32, True, softmax_scale=0.0),
            Case("scale", tile, MASKED, gqa_long_q, dm, f32, False, (2, 2), softmax_scale=0.0),
            Case("scale", tile, MASKED, mqa, d, f32, False, (2, 2), softmax_scale=-0.6),  # masked image, exact dim
            # ALiBi image: slopes (nheads,) and (batch, nheads), strided; exact and masked head dims
            Case("alibi", tile, ALIBI, gqa_long_k, d, f32, True, alibi="heads_strided"),
            Case("alibi", tile, ALIBI, batch2, dm, f32, False, alibi="batch_heads_transposed"),
            Case("alibi", tile, ALIBI, batch2, d, f32, True, (7, -1), alibi="batch_heads_sliced"),
            Case("alibi", tile, ALIBI, mqa, dm, f16, False, (-1, 4), alibi="batch_heads_transposed"),
            Case("alibi", tile, ALIBI, gqa_long_q, d, f32, False, softmax_scale=-0.5, alibi="heads_strided"),
            Case("alibi", tile, ALIBI, gqa_long_k, d, f32, False, (3, 0), softmax_scale=0.0, alibi="heads_strided"),
            Case("alibi", tile, ALIBI, (1, 130, 200, 1, 1), dm, f32, True, (7, 3), alibi="heads_strided",
                 strided=True),
            # softcap image without slopes (reads the shared zero slope), with (nheads,) and (batch, nheads) slopes
            Case("softcap", tile, SOFTCAP, gqa_long_k, d, f32, False, softmax_scale=1.0, softcap=1.5),
            Case("softcap", tile, SOFTCAP, gqa_long_q, dm, f32, True, softcap=0.8),
            Case("softcap", tile, SOFTCAP, mqa, d, f16, False, (2, 2), softmax_scale=2.0, softcap=3.0),
            Case("softcap", tile, SOFTCAP, gqa_long_q, d, f32, False, (0, 5), softmax_scale=-0.9, softcap=1.2),
            Case("softcap", tile, SOFTCAP, gqa_long_k, dm, f32, True, softmax_scale=0.0, softcap=1.0),
            Case("softcap_alibi", tile, SOFTCAP, gqa_long_k, d, f32, True, softcap=1.5, alibi="heads_strided"),
            Case("softcap_alibi", tile, SOFTCAP, batch2, dm, f32, False, (7, -1), softmax_scale=-1.1, softcap=2.0,
                 alibi="batch_heads_transposed"),
            Case("softcap_alibi", tile, SOFTCAP, batch2, d, f16, True, softcap=0.9, alibi="batch_heads_sliced"),
        ]
    return cases


FUZZ_PER_PAIR = 8


def _fuzz_side(rng, block_m, block_n):
    # -1 (unlimited), 0, short, about a key block, up to two query blocks
    return rng.choice([-1, 0, rng.randint(1, 8), rng.randint(block_n - 2, block_n + 2), rng.randint(0, 2 * block_m)])


def _fuzz_cases():
    # Seeded random calls on one tile of every (block_m, block_n) pair: lengths up to a few blocks, random windows
    # (often near block sizes), GQA/MQA, any image kind with the features it carries; the fixed seed keeps the list
    # (and the test ids) stable.
    rng = random.Random(20240611)
    cases = []
    for tile in _block_pair_tiles():
        bm, bn, bucket = tile
        for _ in range(FUZZ_PER_PAIR):
            h, hk = rng.choice([(1, 1), (2, 1), (4, 2), (3, 3)])
            shape = (rng.choice([1, 2]), rng.randint(1, 2 * bm + 9), rng.randint(1, 3 * bn + 9), h, hk)
            kind = rng.choice([PLAIN, MASKED, ALIBI, SOFTCAP])
            head_dim = bucket if not kind[0] or rng.random() < 0.5 else _dmask_head_dim(bucket)
            cases.append(Case(
                "fuzz", tile, kind, shape, head_dim, torch.float32, rng.random() < 0.3,
                (_fuzz_side(rng, bm, bn), _fuzz_side(rng, bm, bn)),
                softmax_scale=rng.choice([None, None, 0.5, -0.4]),
                softcap=rng.uniform(0.5, 3.0) if kind == SOFTCAP else 0.0,
                alibi=rng.choice([None, "heads_strided", "batch_heads_transposed", "batch_heads_sliced"])
                if "alibi" in kind[1] else None))
    return cases


CASES = _tile_cases() + _dmask_cases() + _window_cases() + _feature_cases() + _fuzz_cases()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and launch: the kernel arguments come from the library (validate.check_inputs -> ops._shapes ->
# ops.kernel_args, as the custom op's ops.run_forward computes them; test_eager_path checks that eager calls' launch
# plans pack the same); the test only turns pointers into tensors.

def _slopes(layout, batch, nheads, gen):
    """fp32 ALiBi slopes in [0.01, 0.3], as views with strides the kernel must honour."""
    def rand(*size):
        return torch.rand(*size, generator=gen) * 0.29 + 0.01
    if layout == "heads_strided":  # (nheads,), stride 2, offset 1
        return rand(2 * nheads + 1)[1::2]
    if layout == "batch_heads_transposed":  # (batch, nheads), strides (1, batch)
        return rand(nheads, batch).t()
    if layout == "batch_heads_sliced":  # (batch, nheads), strides (nheads + 3, 1), offset 2
        return rand(batch, nheads + 3)[:, 2:2 + nheads]
    raise ValueError(layout)


def _odd_size1_strides(t):
    """t with stride 1 on its batch, seqlen and head dims of size 1: the dispatcher lets any stride through there
    (the kernel only ever multiplies it by 0), so kernel_args' division by the stride unit must not matter."""
    strides = [1 if i < 3 and t.shape[i] == 1 else st for i, st in enumerate(t.stride())]
    return t.as_strided(t.shape, strides, t.storage_offset())


def _inputs(case, seed_key):
    b, sq, sk, h, hk = case.shape
    d = case.head_dim
    gen = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    if case.strided:
        # Q a slice of a wider tensor, K/V slices of one packed KV tensor: stride_*m != nheads*head_dim, K and V
        # share storage.
        q = torch.randn(b, sq, h + 1, d, generator=gen).to(case.dtype)[:, :, 1:]
        kv = torch.randn(b, sk, 2, hk, d, generator=gen).to(case.dtype)
        k, v = _odd_size1_strides(kv[:, :, 0]), _odd_size1_strides(kv[:, :, 1])
        q = _odd_size1_strides(q)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    else:
        q = torch.randn(b, sq, h, d, generator=gen).to(case.dtype)
        k = torch.randn(b, sk, hk, d, generator=gen).to(case.dtype)
        v = torch.randn(b, sk, hk, d, generator=gen).to(case.dtype)
    alibi = _slopes(case.alibi, b, h, gen) if case.alibi else None
    return q, k, v, alibi


def _outputs(q, strided):
    """O and LSE, NaN-poisoned, each followed by GUARD NaN elements in its buffer (and O with a NaN head before its
    rows when strided: out= with a padded row stride)."""
    b, sq, h, d = q.shape
    if strided:
        o_buf = torch.full((b * sq * (h + 1) * d + GUARD,), float("nan"), dtype=q.dtype)
        o = o_buf[: b * sq * (h + 1) * d].view(b, sq, h + 1, d)[:, :, 1:]
    else:
        o_buf = torch.full((b * sq * h * d + GUARD,), float("nan"), dtype=q.dtype)
        o = o_buf[: b * sq * h * d].view(b, sq, h, d)
    lse_buf = torch.full((b * h * sq + GUARD,), float("nan"), dtype=torch.float32)
    lse = lse_buf[: b * h * sq].view(b, h, sq)
    return o, lse, o_buf, lse_buf


def _image_takes(kind, bucket, shapes):
    """Whether an image of this kind and bucket may run the call (the dispatcher's head-dim and feature rules)."""
    d_mask, features = kind
    head_ok = shapes.head_dim == bucket or (d_mask and shapes.head_dim < bucket
                                            and shapes.head_dim % fwd.HEAD_DIM_MULTIPLE == 0)
    needed = {"softcap"} if shapes.softcap > 0 else set()
    needed |= {"alibi"} if shapes.has_alibi else set()
    # A softcap image cannot run softcap off: it always computes softcap * tanh(score / softcap).
    return head_ok and needed <= set(features) and ("softcap" in needed or "softcap" not in features)


def _launch(case, q, k, v, alibi, o, lse):
    """Run the kernel image `case` selects on the call `case` describes; returns the library's kernel_args."""
    block_m, block_n, bucket = case.tile
    d_mask, features = case.kind
    # The public API's validation and resolution (default scale, causal folded into the window), then the same
    # Shapes ops.run_forward builds from what api.attention hands it.
    api_shapes = check_inputs(q, k, v, causal=case.causal, softmax_scale=case.softmax_scale,
                              window_size=case.window, softcap=case.softcap, alibi_slopes=alibi, out=o)
    left, right = api_shapes.window
    shapes = ops._shapes(q, k, api_shapes.softmax_scale, left, right, api_shapes.softcap, alibi)
    assert _image_takes(case.kind, bucket, shapes), f"{case.id}: the image kind {case.kind} cannot run this call"
    problem = policy.problem_for(shapes, (q, k, v, o))
    assert problem.aligned16 and problem.strides8, "the dispatcher would not run a kernel on these inputs"
    args = ops.kernel_args(q, k, v, o, lse, alibi, shapes)

    pointers = {"Q": q, "K": k, "V": v, "O": o, "LSE": lse,
                "ALIBI": alibi if alibi is not None else ops._no_slopes(q.device)}
    params = fwd.fwd_params(TL_DTYPE[q.dtype])
    assert set(args) == {name for name, _ in params}, "kernel_args and fwd_params disagree on the parameter names"
    launch = {}
    for name, ty in params:
        if ty.startswith("*"):
            t = pointers[name]
            assert args[name] == t.data_ptr(), f"{name}: kernel_args passes another pointer"
            assert TL_DTYPE[t.dtype] == ty[1:], f"{name}: {t.dtype} for {ty}"
            launch[name] = t
        else:
            value = args[name]
            if ty in ("i32", "i64"):
                bits = int(ty[1:])
                assert isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} for {ty}"
                assert -(2 ** (bits - 1)) <= value < 2 ** (bits - 1), f"{name}={value} overflows {ty}"
            else:
                assert isinstance(value, float) and math.isfinite(value), f"{name}={value!r} for {ty}"
            launch[name] = value
    if alibi is None:
        zero = pointers["ALIBI"]
        assert zero.dtype == torch.float32 and zero.numel() >= 1 and not zero.any()
    grid = fwd.attn_fwd_grid(shapes.seqlen_q, shapes.batch, shapes.nheads, block_m)
    with _interpret_mode():
        fwd.attn_fwd[grid](**launch, **fwd.fwd_constexprs(block_m, block_n, bucket, d_mask, features))
    return args


def _check(case, q, k, v, alibi, o, lse, o_buf, lse_buf):
    dtype = q.dtype
    for name, t in (("O", o), ("LSE", lse)):
        assert not torch.isnan(t).any(), f"{int(torch.isnan(t).sum())} of {t.numel()} {name} elements NaN (unwritten?)"
    # Nothing written outside O and LSE: the guard tails (and the padding heads of a strided O) stay NaN.
    written = torch.zeros_like(o_buf, dtype=torch.bool)
    written.as_strided(o.shape, o.stride(), o.storage_offset()).fill_(True)
    assert torch.isnan(o_buf[~written]).all(), "the kernel wrote outside O"
    assert torch.isnan(lse_buf[lse.numel():]).all(), "the kernel wrote past the end of LSE"

    ref_o, ref_lse = attention_reference(q, k, v, causal=case.causal, softmax_scale=case.softmax_scale,
                                         window_size=case.window, softcap=case.softcap, alibi_slopes=alibi)
    empty = torch.isinf(ref_lse)  # (b, h, sq)
    # Rows that see no key: output exactly 0, LSE exactly +inf.
    empty_o = empty.transpose(1, 2)  # (b, sq, h)
    assert torch.equal(torch.isposinf(lse), empty), "LSE +inf exactly on the rows that see no key"
    assert (o[empty_o] == 0).all(), "rows that see no key must be exactly 0"
    ok = ~empty
    if ok.any():
        lse_err = (lse.double()[ok] - ref_lse[ok]).abs().max().item()
        assert lse_err < LSE_TOL[dtype], f"LSE max abs err {lse_err:.3g}"
    err = (o.double() - ref_o).abs()
    assert err.max().item() < O_ABS_TOL[dtype], f"O max abs err {err.max().item():.3g}"
    ref_norm = ref_o.norm().item()
    if ref_norm > 0:
        rel = (o.double() - ref_o).norm().item() / ref_norm
        assert rel < O_REL_TOL[dtype], f"O rel err {rel:.3g}"
    else:
        assert (o == 0).all()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fwd_matches_reference(case, request):
    q, k, v, alibi = _inputs(case, request.node.callspec.id)
    o, lse, o_buf, lse_buf = _outputs(q, case.strided)
    _launch(case, q, k, v, alibi, o, lse)
    _check(case, q, k, v, alibi, o, lse, o_buf, lse_buf)


# ---------------------------------------------------------------------------------------------------------------------
# Meta tests: coverage cannot shrink silently when tiles, kinds or case lists change.

def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_config_covered():
    # Every (vendor, arch, bucket) config runs through its tile: a causal multi-block case, at least two shapes, the
    # diagonal-edge and window-edge shapes of its block sizes, and a head dim below the bucket.
    for _vendor, arch, bucket, cfg in CONFIGS:
        tile = (cfg["block_m"], cfg["block_n"], bucket)
        assert arch in TILE_ARCHS[tile]
        mine = [c for c in CASES if c.tile == tile]
        assert len({c.shape for c in mine}) >= 2, (arch, bucket)
        assert any(c.causal and c.shape[1] > cfg["block_m"] and c.shape[2] > cfg["block_n"] for c in mine), \
            (arch, bucket)
        assert {s for s in _diagonal_edge_shapes(cfg["block_m"], cfg["block_n"])} <= {
            c.shape for c in mine if c.group == "diag_edge" and c.causal}, (arch, bucket)
        assert {(s, w, c) for _t, s, w, c in _window_edge_shapes(cfg["block_m"], cfg["block_n"])} <= {
            (c.shape, c.window, c.causal) for c in mine if c.group == "window_edge"}, (arch, bucket)
        assert any(c.head_dim < bucket and c.kind[0] for c in mine), (arch, bucket)
        assert any(c.dtype == torch.float16 for c in mine), (arch, bucket)


def test_every_kind_and_feature_covered_per_vendor():
    assert set(variants.KINDS) == {PLAIN, MASKED, ALIBI, SOFTCAP}, "image kinds changed: cover the new ones"
    for vendor in TILES:
        tile, arch = _feature_tile(vendor)
        assert arch in TILE_ARCHS[tile]
        mine = [c for c in CASES if c.tile == tile]
        for kind in variants.KINDS:
            for exact in (True, False):
                if kind[0] or exact:  # a masked image with the bucket's own head dim, and below it
                    assert any(c.kind == kind and (c.head_dim == tile[2]) == exact for c in mine), (vendor, kind)
        need = {
            "softcap without slopes (zero slope)": lambda c: c.softcap > 0 and c.alibi is None,
            "softcap with (nheads,) slopes": lambda c: c.softcap > 0 and c.alibi == "heads_strided",
            "softcap with (batch, nheads) slopes": lambda c: c.softcap > 0 and c.alibi
            and c.alibi.startswith("batch_heads"),
            "softcap, negative scale": lambda c: c.softcap > 0 and (c.softmax_scale or 0) < 0,
            "softcap, zero scale": lambda c: c.softcap > 0 and c.softmax_scale == 0,
            "alibi (nheads,) strided": lambda c: c.alibi == "heads_strided" and c.softcap == 0,
            "alibi (batch, nheads) transposed": lambda c: c.alibi == "batch_heads_transposed" and c.shape[0] > 1,
            "alibi (batch, nheads) sliced": lambda c: c.alibi == "batch_heads_sliced" and c.shape[0] > 1,
            "alibi, negative scale": lambda c: c.alibi and c.softcap == 0 and (c.softmax_scale or 0) < 0,
            "alibi with a window": lambda c: c.alibi and c.window != (-1, -1),
            "negative scale, plain image, unmasked": lambda c: c.kind == PLAIN and (c.softmax_scale or 0) < 0
            and not c.causal and c.window == (-1, -1),
            "negative scale, plain image, causal": lambda c: c.kind == PLAIN and (c.softmax_scale or 0) < 0
            and c.causal,
            "zero scale, plain image": lambda c: c.kind == PLAIN and c.softmax_scale == 0,
            "zero scale, masked image": lambda c: c.kind == MASKED and c.softmax_scale == 0,
            "fp16 softcap+alibi": lambda c: c.dtype == torch.float16 and c.softcap > 0 and c.alibi,
            "fp16 alibi": lambda c: c.dtype == torch.float16 and c.alibi and c.softcap == 0,
            "strided, size-1 batch and head dims with odd strides": lambda c: c.strided and c.shape[0] == 1
            and c.shape[3] == 1,
            "GQA": lambda c: 1 < c.shape[4] < c.shape[3],
            "MQA": lambda c: c.shape[4] == 1 < c.shape[3],
        }
        for what, pred in need.items():
            assert any(pred(c) for c in mine), (vendor, what)


def test_every_window_covered_per_vendor():
    for vendor in TILES:
        tile, _arch = _feature_tile(vendor)
        got = {(c.window, c.causal, (c.shape[1] > c.shape[2]) - (c.shape[1] < c.shape[2]))
               for c in CASES if c.tile == tile and c.group == "window"}
        for window in WINDOWS:
            for causal in (False, True):
                for order in (-1, 0, 1):
                    assert (window, causal, order) in got, (vendor, window, causal, order)


def test_rows_without_keys_covered():
    # Cases with query rows that see no key on every tile, and on the ALiBi and softcap images.
    def some_empty(c):
        _b, sq, sk, _h, _hk = c.shape
        return not allowed_mask(sq, sk, fold_causal(c.window, c.causal), "cpu").any(dim=1).all()
    for tile in TILE_ARCHS:
        assert any(some_empty(c) for c in CASES if c.tile == tile and c.kind == PLAIN), tile
    for kind in (ALIBI, SOFTCAP):
        assert any(some_empty(c) for c in CASES if c.kind == kind), kind


def test_window_edge_shapes_hit_their_targets():
    # The targets of _window_edge_shapes, from the band definition (row i sees i + shift - left ..= i + shift +
    # right, clamped to the keys), for every tile's block sizes.
    for block_m, block_n, _bucket in TILE_ARCHS:
        for target, (_b, sq, sk, _h, _hk), window, causal in _window_edge_shapes(block_m, block_n):
            assert sk > 0, (target, block_m, block_n)
            shift = sk - sq
            left, right = fold_causal(window, causal)
            lefts = [max(i + shift - left, 0) if left >= 0 else 0 for i in range(sq)]
            rights = [min(i + shift + right, sk - 1) if right >= 0 else sk - 1 for i in range(sq)]
            assert sq > block_m, (target, block_m, block_n)  # two query programs at least
            p0_last, p1_first, last = block_m - 1, block_m, sq - 1
            if target == "last_left_past_edge":
                ok = lefts[p0_last] % block_n == 1 and lefts[p0_last] > block_n and sk % block_n != 0
            elif target == "first_left_block_end":
                ok = lefts[p1_first] % block_n == block_n - 1 and right >= 0
            elif target == "first_right_short":
                ok = rights[0] % block_n == block_n - 2 and rights[0] < sk - 1
            elif target == "last_right_one_key":
                ok = rights[p0_last] % block_n == 0 and rights[p0_last] < sk - 1
            elif target == "ragged_narrow_end":
                ok = sq == sk and sk % block_n != 0 and lefts[last] > sk // block_n * block_n
            else:
                ok = False
            assert ok, (target, block_m, block_n, sq, sk, window)


def test_library_units_match_kernel():
    # kernel_args passes head_dim // _C.HEAD_DIM_MULTIPLE and strides // _C.STRIDE_MULTIPLE; the kernel multiplies
    # them back by its own constants.
    assert ops._C.HEAD_DIM_MULTIPLE == fwd.HEAD_DIM_MULTIPLE
    assert ops._C.STRIDE_MULTIPLE == fwd.STRIDE_UNIT
