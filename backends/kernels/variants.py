"""The AOT variant grid, as data: which kernel images the build produces for which architectures.

Tile configs live in backends/<vendor>/tiles.json (arch -> op -> head-dim bucket); this module only crosses them
with the dtypes and feature flags. It needs no Triton, so build scripts can list the images without compiling.
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BACKENDS_DIR = Path(__file__).resolve().parent.parent

OPS = ("fwd",)
DTYPES = ("fp16", "bf16")
CAUSAL = (False, True)

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
    mma_instr: str
    max_shared_bytes: int
    dtype: str
    head_dim: int
    causal: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves_per_eu: int | None  # AMD only

    @property
    def features(self) -> list[str]:
        return ["causal"] if self.causal else []

    @property
    def name(self) -> str:
        flag = "causal" if self.causal else "full"
        tile = f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"
        return f"{self.op}-{self.arch}-{self.dtype}-d{self.head_dim}-{flag}-{tile}"


def variants(archs: list[str]) -> list[Variant]:
    out = []
    for arch in dict.fromkeys(archs):  # drop repeats, keep order
        info = arch_info(arch)
        vendor, backend, target_arch, mma = ARCHS[arch]
        for op in OPS:
            for bucket, cfg in sorted(info[op].items(), key=lambda kv: int(kv[0])):
                for dtype in DTYPES:
                    for causal in CAUSAL:
                        out.append(Variant(
                            op=op, arch=arch, vendor=vendor, target_backend=backend, target_arch=target_arch,
                            warp_size=tiles(vendor)["warp_size"], mma_instr=mma,
                            max_shared_bytes=info["max_shared_bytes"], dtype=dtype, head_dim=int(bucket),
                            causal=causal, block_m=cfg["block_m"], block_n=cfg["block_n"],
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            waves_per_eu=cfg.get("waves_per_eu")))
    return out
