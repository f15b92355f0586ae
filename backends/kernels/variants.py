"""The AOT variant grid, as data: which kernel images the build produces for which architectures.

Tile configs live in backends/<vendor>/tiles.json (arch -> op -> head-dim bucket); this module only crosses them
with the dtypes and feature flags. It needs no Triton, so build scripts can list the images without compiling.
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BACKENDS_DIR = Path(__file__).resolve().parent.parent

# fwd, then the two backward kernels (bwd.py). An arch whose tiles.json entry has no table for an op gets no images
# of it, and the dispatcher says so.
# decode and decode_combine: the split-KV kernels over a KV cache and the merge of their partials; append: the in-place
# write of a call's new keys and values into the cache before them (decode.py).
# bwd_prep, bwd_ws and bwd_convert: the non-deterministic sm90 backward (bwd_ws.py between bwd.py's prep and convert
# kernels), built where tiles.json has tables for them.
OPS = ("fwd", "bwd_dq", "bwd_dkdv", "bwd_prep", "bwd_ws", "bwd_convert", "decode", "decode_combine", "append")
DTYPES = ("fp16", "bf16")
# Image kinds built per head-dim bucket, as (d_mask, features), in preference order: the manifest keeps this order
# and the dispatcher takes the first image that fits, so an exact head dim without extras wins. Masked images take
# any head dim up to the bucket (a multiple of 8); an image with softcap also takes alibi (slope 0 when unused), which
# keeps the grid at four kinds instead of six. Causal and window_size are run-time parameters of every image.
KINDS = ((False, ()), (True, ()), (True, ("alibi",)), (True, ("softcap", "alibi")))
# Layouts each op is built for (fwd.LAYOUTS): "dense" with every kind and full-band tile above; "varlen" (packed
# sequences, a compile-time flag of the same kernels, so dense images are unchanged) with fewer kinds to keep the
# build small: the exact head dim without extras (the common, fastest case), and masked images with alibi (any head
# dim, slope 0 when unused) and with softcap. It takes the entry's own tile and, like dense, its full-band tile
# (FULL_BAND), so a packed batch of equal sequences runs what the dense call runs.
LAYOUT_KINDS = {"dense": KINDS, "varlen": ((False, ()), (True, ("alibi",)), (True, ("softcap", "alibi")))}
# Paged prefill ("varlen_paged": varlen queries, K/V gathered from a page pool through a block table; fwd.py PAGED) is
# inference, so only the forward has it, and only at the head dims serving uses (those the decode images take): the
# same three kinds as varlen, on the varlen tiles. Causal, windows and the page size are run-time values.
PAGED_PREFILL_KINDS = LAYOUT_KINDS["varlen"]
PAGED_PREFILL_BUCKETS = (64, 128, 256)
# The decode kernels are memory-bound: a masked head dim, a zero ALiBi slope and a run-time softcap switch cost nothing
# measurable beside the cache reads, so one kind per bucket serves every call, keeping the build small. They are built
# per cache layout (decode.LAYOUTS; the page size is a run-time value, any multiple of the manifest's page_multiple);
# the combine reads only the decode kernel's partials (decode.COMBINE_LAYOUT), has no options, and one masked
# bucket (its tiles.json entry) takes every head dim; so does the append, per cache layout.
DECODE_KINDS = ((True, ("softcap", "alibi")),)
OP_LAYOUT_KINDS = {op: LAYOUT_KINDS for op in ("bwd_dq", "bwd_dkdv")} | {
    "fwd": LAYOUT_KINDS | {"varlen_paged": PAGED_PREFILL_KINDS},
    "decode": {"kvcache": DECODE_KINDS, "paged": DECODE_KINDS},
    "decode_combine": {"partials": ((True, ()),)},
    "append": {"kvcache": ((True, ()),), "paged": ((True, ()),)},
    # The warp-specialised backward and the kernels around it: dense calls of exactly the head dim, no score terms
    # (bwd_ws has only WS_TILE images, built by _ws_variants).
    "bwd_prep": {"dense": ((False, ()),)},
    "bwd_convert": {"dense": ((False, ()),)},
    "bwd_ws": {},
}
# Features an image applies only when the call asks for them (so it also serves calls without them), per op; the
# manifest rows carry them ("optional_features") for the dispatcher's feature check. ALiBi with slope 0 adds nothing;
# a compiled-in softcap always caps the scores, except in the decode kernels, where both are run-time switches.
OPTIONAL_FEATURES = {"decode": ("softcap", "alibi"), "append": ()}
DEFAULT_OPTIONAL_FEATURES = ("alibi",)
# Page sizes the paged images take: multiples of this (vLLM's 16-token blocks and up); the manifest carries it.
PAGE_MULTIPLE = 16
PAGED_LAYOUTS = ("paged", "varlen_paged")
# Layouts built only at some head-dim buckets (the others at every bucket of the op's tiles.json table).
LAYOUT_BUCKETS = {"varlen_paged": PAGED_PREFILL_BUCKETS}
# A tiles.json entry's spill allowance for its varlen images, where they spill more than the dense ones: a varlen
# program keeps its sequence's bounds in registers that the dense kernel reads from constant memory, which on a tile
# already at the register limit (sm80 d128) costs a few more spilled bytes. Not measured yet (the varlen benchmark
# will say whether another tile is faster there).
VARLEN_STACK_KEY = "varlen_max_stack_bytes"


def stack_allowance(cfg: dict, layout: str) -> int:
    """Spill bytes the static checks accept for an image of `layout` built from tiles.json entry `cfg` (paged
    images: the varlen allowance, or none when built from the entry's PAGED_TILE)."""
    dense = cfg.get("max_stack_bytes", 0)
    return cfg.get(VARLEN_STACK_KEY, dense) if layout in ("varlen", "varlen_paged") else dense

# A tile table entry may carry a "full_band" entry: the tile for calls whose band covers every key (no causal, no
# window), where it measured faster than the entry's own tile. It builds the same kinds, marked full_band_only and
# listed first, so the dispatcher prefers them for such calls and never gives them a banded one. Built for the
# layouts below (paged prefill keeps its own tiles).
FULL_BAND = "full_band"
FULL_BAND_LAYOUTS = ("dense", "varlen")
# A tile table entry may carry a "paged" entry: the tile of its paged-prefill images, where the entry's own tile
# spills with the gathered page offsets (first choices that pass the static checks, not measured on hardware yet).
PAGED_TILE = "paged"
# The decode op's paged layout is built twice: page-aligned images first (decode.py PAGE_ALIGNED: each tile of
# block_n keys lies in one page, so they take page sizes that are multiples of block_n, and the dispatcher prefers
# them), then images that take any multiple of PAGE_MULTIPLE. A decode entry may carry a "page_aligned" entry: the
# tile of its page-aligned images, where another measured faster (else the entry's own).
PAGE_ALIGNED_OPS = ("decode",)
PAGE_ALIGNED_TILE = "page_aligned"
# A decode entry may carry a "one_split" entry: the tile of extra contiguous-cache images, listed first, that take only
# calls of one split (the batch alone fills the device), where a longer key block reads faster than the entry's own
# tile and the entry's own reads faster for split calls (docs/bench/decode-tile-ab-h100.json).
ONE_SPLIT_TILE = "one_split"
ONE_SPLIT_LAYOUTS = ("kvcache",)
# Programmatic dependent launch (decode.py PDL): on these archs (griddepcontrol needs sm90) the decode images, when they
# split, signal their dependents at their start, the merge images wait for the decode grid before reading its partials
# and are marked to be launched as dependents (the manifest's dependent_launch), so the merge's launch overlaps the
# decode: 0.4-0.7 us of a batch-1 step on the H200 in a JIT A/B (docs/bench/decode-pdl-ab-h200.json), 0.2-0.4 us (1-2%)
# at batch 1, 4k-8k keys, with the installed images on an H100 (decode-pdl-s51-h100.json).
PDL_ARCHS = ("sm90",)
PDL_OPS = {"decode": "primary", "decode_combine": "dependent"}

# A tiles.json fwd or bwd_ws entry may carry a "ws" entry: the schedule of a warp-specialised Gluon kernel (fwd_ws.py,
# bwd_ws.py: TMA loads, wgmma, setmaxnreg; sm90 only, so no AMD entry has one). It builds one image per dtype for
# dense calls of exactly that head dim without softcap or ALiBi, listed before the arch's other images of the op, so
# the dispatcher prefers it for those calls; the forward's Triton images of that kind are not built (WS_REPLACES).
# With "persistent" the grid is one program per SM, each walking tiles. A FULL_BAND dict in it names the schedule
# keys it replaces for an extra image, listed first, for calls without causal or window (docs/bench/gluon-ws-notes.md
# has each schedule's measurements). With WS_BANDED false only that full-band image is built, and the Triton images
# stay for the banded calls (where the schedule measured slower than them). A WS_SHORT dict names the keys it replaces
# for an extra banded image, listed before the banded one, for calls of at most its MAX_SEQLEN_K keys: a schedule
# that measured faster on short tiles and slower on long ones (v17's unpeeled first block, gluon-ws-notes.md).
WS_TILE = "ws"
WS_BANDED = "banded"
WS_SHORT = "short"
MAX_SEQLEN_K = "max_seqlen_k"
WS_FAMILY = "gluon_ws"
WS_REPLACES = ("fwd",)


def ws_bands(ws: dict) -> tuple[bool, ...]:
    """The full_band_only values of a WS_TILE entry's images: the FULL_BAND image first, then the banded one unless
    WS_BANDED is false; an entry that would build neither is refused."""
    bands = ((True,) if FULL_BAND in ws else ()) + ((False,) if ws.get(WS_BANDED, True) else ())
    if not bands:
        raise ValueError(f"tiles.json {WS_TILE} entry {ws}: {WS_BANDED} false needs a {FULL_BAND} entry, "
                         "else it builds no image")
    return bands


def ws_images(ws: dict) -> list[tuple[bool, int]]:
    """(full_band_only, max_seqlen_k) of a WS_TILE entry's images in the dispatcher's preference order: the full-band
    image, the short one (max_seqlen_k > 0), the banded one (ws_bands; the short image only beside a banded one)."""
    bands = ws_bands(ws)
    short = [(False, ws[WS_SHORT][MAX_SEQLEN_K])] if WS_SHORT in ws and False in bands else []
    return [(True, 0)] * (True in bands) + short + [(False, 0)] * (False in bands)


def ws_schedule(arch: str, op: str, head_dim: int, full_band_only: bool, max_seqlen_k: int = 0) -> dict:
    """The WS_TILE schedule an image was built from: with full_band_only, the keys its FULL_BAND dict replaces; with
    max_seqlen_k, those its WS_SHORT dict replaces."""
    ws = arch_info(arch)[op][str(head_dim)][WS_TILE]
    if full_band_only:
        return ws | ws[FULL_BAND]
    return ws | ws[WS_SHORT] if max_seqlen_k else ws


# arch name -> (vendor, Triton target backend, Triton target arch, matrix-core instruction the image must contain)
ARCHS = {
    "sm80": ("cuda", "cuda", 80, "HMMA"),
    "sm89": ("cuda", "cuda", 89, "HMMA"),
    "sm90": ("cuda", "cuda", 90, "HGMMA"),
    "gfx90a": ("rocm", "hip", "gfx90a", "v_mfma"),
    "gfx942": ("rocm", "hip", "gfx942", "v_mfma"),
}


@cache
def tiles(vendor: str) -> dict:
    return json.loads((BACKENDS_DIR / vendor / "tiles.json").read_text())


def dump_tiles(doc: dict) -> str:
    """tiles.json text: one line per head-dim bucket, so a diff shows which tile changed."""
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in doc.items() if k != "archs"] + ['  "archs": {']
    archs = list(doc["archs"].items())
    for i, (arch, info) in enumerate(archs):
        lines.append(f'    "{arch}": {{"max_shared_bytes": {info["max_shared_bytes"]},')
        ops = [op for op in OPS if op in info]
        for k, op in enumerate(ops):
            lines.append(f'      "{op}": {{')
            buckets = sorted(info[op].items(), key=lambda kv: int(kv[0]))
            lines += [f'        "{b}": {json.dumps(cfg)}{"," if j < len(buckets) - 1 else ""}'
                      for j, (b, cfg) in enumerate(buckets)]
            lines.append("      }" + ("," if k < len(ops) - 1 else ""))
        lines.append("    }" + ("," if i < len(archs) - 1 else ""))
    return "\n".join(lines + ["  }", "}"]) + "\n"


def arch_info(arch: str) -> dict:
    """The tiles.json entry of an arch (max_shared_bytes and the per-op tile tables); clear error if unknown."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    return tiles(ARCHS[arch][0])["archs"][arch]


@dataclass(frozen=True)
class Variant:
    op: str
    arch: str
    vendor: str
    target_backend: str  # GPUTarget(target_backend, target_arch, warp_size)
    target_arch: int | str
    warp_size: int
    # The matrix-core instruction the static check requires; None for a kernel with no matrix product to check
    # (tiles.json "mma_instr": null, e.g. decode_combine, a weighted sum of its partials).
    mma_instr: str | None
    max_shared_bytes: int
    dtype: str
    head_dim: int  # the bucket (BLOCK_D)
    d_mask: bool  # takes head dims below the bucket, masking the tail
    features: tuple[str, ...]
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves_per_eu: int | None  # AMD only
    # Spill bytes (the cubin's stack frame) the static checks accept; 0 unless tiles.json grants more for a tile that
    # measured faster spilling than every tile that does not spill (varlen images: VARLEN_STACK_KEY if given).
    max_stack_bytes: int = 0
    full_band_only: bool = False  # built from a FULL_BAND entry: only for calls without causal or window
    max_seqlen_k: int = 0  # built from a WS_SHORT entry: only for calls of at most this many keys (0: any)
    layout: str = "dense"  # the call layout the image takes (LAYOUT_KINDS)
    page_aligned: bool = False  # a paged decode image whose tiles lie in one page each (PAGE_ALIGNED_OPS)
    one_split: bool = False  # built from a ONE_SPLIT_TILE entry: only for decode calls of one split
    family: str = "triton"  # kernel source: "triton" (fwd.py, bwd.py, decode.py) or WS_FAMILY (fwd_ws.py, bwd_ws.py)
    persistent: bool = False  # WS_FAMILY: a grid of one program per SM walks the tiles

    @property
    def page_multiple(self) -> int:
        """The page sizes the image takes are multiples of this (0: no paged cache)."""
        if self.page_aligned:
            return self.block_n
        return PAGE_MULTIPLE if self.layout in PAGED_LAYOUTS else 0

    def ws_schedule(self) -> dict:
        """A WS_FAMILY image's schedule (ws_schedule of its arch, op, head dim and role)."""
        return ws_schedule(self.arch, self.op, self.head_dim, self.full_band_only, self.max_seqlen_k)

    @property
    def pdl(self) -> bool:
        """Compiled with PDL_OPS's griddepcontrol instructions (an op of PDL_OPS on an arch of PDL_ARCHS)."""
        return self.arch in PDL_ARCHS and self.op in PDL_OPS

    @property
    def dependent_launch(self) -> bool:
        """Launched as a programmatic dependent of the kernel before it (it waits for that grid itself)."""
        return self.pdl and PDL_OPS.get(self.op) == "dependent"

    @property
    def feature_tag(self) -> str:
        return "+".join(self.features) or "plain"

    @property
    def name(self) -> str:
        dims = f"d{self.head_dim}{'m' if self.d_mask else ''}"
        tile = f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"
        band = ("-fullband" if self.full_band_only else "") + (f"-k{self.max_seqlen_k}" if self.max_seqlen_k else "")
        layout = "" if self.layout == "dense" else f"-{self.layout}"
        role = ("-aligned" if self.page_aligned else "") + ("-onesplit" if self.one_split else "")
        family = ("-ws" if self.family == WS_FAMILY else "") + ("-persistent" if self.persistent else "")
        return f"{self.op}-{self.arch}-{self.dtype}-{dims}-{self.feature_tag}{band}{layout}{role}{family}-{tile}"


def tile_config(arch: str, op: str, head_dim: int, full_band_only: bool = False, layout: str = "dense",
                page_aligned: bool = False, one_split: bool = False) -> dict:
    """The tiles.json entry an image was built from."""
    cfg = arch_info(arch)[op][str(head_dim)]
    if full_band_only:
        return cfg[FULL_BAND]
    if page_aligned:
        return cfg.get(PAGE_ALIGNED_TILE, cfg)
    if one_split:
        return cfg[ONE_SPLIT_TILE]
    return cfg.get(PAGED_TILE, cfg) if layout == "varlen_paged" else cfg


def _tile_choices(arch: str, op: str, bucket: int, cfg: dict, layout: str) -> list[tuple[dict, dict]]:
    """(the Variant's role flags, tile) of the images built per kind, in the dispatcher's preference order: a
    full-band, page-aligned or one-split tile first, where it applies, then the entry's own."""
    extra = []
    if FULL_BAND in cfg and layout in FULL_BAND_LAYOUTS:
        extra.append(({"full_band_only": True}, cfg[FULL_BAND]))
    if op in PAGE_ALIGNED_OPS and layout == "paged":
        extra.append(({"page_aligned": True}, tile_config(arch, op, bucket, layout=layout, page_aligned=True)))
    if ONE_SPLIT_TILE in cfg and layout in ONE_SPLIT_LAYOUTS:
        extra.append(({"one_split": True}, tile_config(arch, op, bucket, one_split=True)))
    return extra + [({}, tile_config(arch, op, bucket, layout=layout))]


def variants(archs: list[str]) -> list[Variant]:
    out = []
    for arch in dict.fromkeys(archs):  # drop repeats, keep order
        info = arch_info(arch)
        vendor, backend, target_arch, mma = ARCHS[arch]
        for op in OPS:
            out += _ws_variants(arch, op)
            for bucket, cfg in sorted(info.get(op, {}).items(), key=lambda kv: int(kv[0])):
                for layout, kinds in OP_LAYOUT_KINDS[op].items():
                    if int(bucket) not in LAYOUT_BUCKETS.get(layout, (int(bucket),)):
                        continue
                    choices = _tile_choices(arch, op, int(bucket), cfg, layout)
                    for dtype in DTYPES:
                        for d_mask, features in kinds:
                            if op in WS_REPLACES and _ws_takes(cfg, layout, d_mask, features):
                                continue
                            for roles, c in choices:
                                out.append(Variant(
                                    op=op, arch=arch, vendor=vendor, target_backend=backend,
                                    target_arch=target_arch, warp_size=tiles(vendor)["warp_size"],
                                    mma_instr=c.get("mma_instr", mma), max_shared_bytes=info["max_shared_bytes"],
                                    dtype=dtype, head_dim=int(bucket), d_mask=d_mask, features=features,
                                    block_m=c["block_m"], block_n=c["block_n"], num_warps=c["num_warps"],
                                    num_stages=c["num_stages"], waves_per_eu=c.get("waves_per_eu"),
                                    max_stack_bytes=stack_allowance(c, layout), layout=layout, **roles))
    return out


def _ws_takes(cfg: dict, layout: str, d_mask: bool, features: tuple) -> bool:
    """Whether the entry's WS_TILE image takes every call of this kind, so that no Triton image is built for it
    (the dispatcher would never reach one)."""
    return WS_TILE in cfg and False in ws_bands(cfg[WS_TILE]) and layout == "dense" and not d_mask and not features


def _ws_variants(arch: str, op: str) -> list[Variant]:
    """The WS_TILE images of an arch's op: exact head dim, no score terms, dense calls, one per dtype."""
    info = arch_info(arch)
    vendor, backend, target_arch, mma = ARCHS[arch]
    out = []
    for bucket, cfg in sorted(info.get(op, {}).items(), key=lambda kv: int(kv[0])):
        ws = cfg.get(WS_TILE)
        if ws is None:
            continue
        for dtype in DTYPES:
            for full_band_only, max_seqlen_k in ws_images(ws):
                sched = ws_schedule(arch, op, int(bucket), full_band_only, max_seqlen_k)
                out.append(Variant(
                    op=op, arch=arch, vendor=vendor, target_backend=backend, target_arch=target_arch,
                    warp_size=tiles(vendor)["warp_size"], mma_instr=mma, max_shared_bytes=info["max_shared_bytes"],
                    dtype=dtype, head_dim=int(bucket), d_mask=False, features=(), **_ws_blocks(op, sched),
                    num_warps=4, num_stages=sched["stages"], waves_per_eu=None,
                    max_stack_bytes=sched.get("max_stack_bytes", 0), full_band_only=full_band_only,
                    max_seqlen_k=max_seqlen_k, family=WS_FAMILY, persistent=sched.get("persistent", False)))
    return out


def _ws_blocks(op: str, sched: dict) -> dict:
    """A WS_TILE image's blocks: the forward's programs take 64 query rows per consumer and walk block_n keys; the
    backward's take 64 keys per consumer (the launch grid's block) and walk block_m query rows."""
    if op == "fwd":
        return {"block_m": 64 * sched["num_wg"], "block_n": sched["block_n"]}
    return {"block_m": sched["block_m"], "block_n": 64 * sched["num_wg"]}
