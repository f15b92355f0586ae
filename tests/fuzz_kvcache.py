"""Seeded fuzz of KV-cache calls (fa2rt.attention_with_kvcache), beside tests/fuzz_cases.py's attention calls.

A case is a random decode or speculative step: batch, query rows, GQA/MQA ratios, head dims (multiples of 8 and
not), a contiguous or paged cache (pages 16, 32, 64), new tokens appended or not, cache_seqlens as an int, a tensor
or None, cache_batch_idx, cache_leftpad, rotary (both styles), causal, windows, softcap, ALiBi, softmax_scale and
num_splits. Inputs are drawn on the CPU from the case's own seed, then moved, so a case is the same call on every
device. MALFORMED lists index values outside the cache: on the CPU (or with FA2RT_CHECK_INDICES=1) each must raise
naming the index argument and entry; on the GPU kernel path they must never fault (wrong numbers at worst).
"""

import random
import zlib
from dataclasses import dataclass

import torch

from fa2rt.reference import kvcache_reference

SEED = 20261217
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (8, 16, 24, 40, 64, 72, 128, 12)
HEAD_RATIOS = ((1, 1), (2, 1), (4, 1), (4, 2), (6, 3), (8, 2))
PAGES = (0, 0, 16, 32, 64)


@dataclass(frozen=True)
class KVCase:
    index: int
    batch: int
    seqlen_q: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    capacity: int
    page: int  # 0: contiguous
    new: int
    seqlens: str  # "tensor", "int", "none" (only without new tokens)
    batch_idx: bool = False
    leftpad: bool = False
    rotary_dim: int = 0
    interleaved: bool = True
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    scale: float | None = None
    splits: int = 0

    @property
    def id(self) -> str:
        parts = [f"{self.index:03d}", f"b{self.batch}q{self.seqlen_q}h{self.nheads}kv{self.nheads_k}d{self.head_dim}",
                 self.dtype, f"cap{self.capacity}", f"page{self.page}" if self.page else "contig",
                 f"new{self.new}", f"len-{self.seqlens}"]
        parts += ["bidx"] if self.batch_idx else []
        parts += ["leftpad"] if self.leftpad else []
        parts += [f"rot{self.rotary_dim}{'i' if self.interleaved else 'n'}"] if self.rotary_dim else []
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += ["alibi"] if self.alibi else []
        parts += [f"scale{self.scale:g}"] if self.scale is not None else []
        parts += [f"split{self.splits}"] if self.splits else []
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def generate(count: int = 60, seed: int = SEED, dtypes=("fp32", "fp16")) -> list[KVCase]:
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        h_ratio = rng.choice(HEAD_RATIOS)
        page = rng.choice(PAGES)
        capacity = page * rng.randint(1, 5) if page else rng.choice((1, 7, 33, 64, 100, 257))
        new = rng.choice((0, 0, 1, 1, 2, 4)) if capacity >= 4 else 0
        rotary_dim = rng.choice((0, 0, 8, 16)) if new else 0
        head_dim = rng.choice(HEAD_DIMS)
        rotary_dim = rotary_dim if rotary_dim <= head_dim else 0
        multiplier = rng.randint(1, 3)
        cases.append(KVCase(
            index=index, batch=rng.choice((1, 2, 3)), seqlen_q=rng.choice((1, 1, 2, 4)),
            nheads=h_ratio[0] * multiplier, nheads_k=h_ratio[1] * multiplier, head_dim=head_dim,
            dtype=rng.choice(dtypes), capacity=capacity, page=page, new=new,
            seqlens=rng.choice(("tensor", "tensor", "int") + (() if new else ("none",))),
            batch_idx=not page and rng.random() < 0.3, leftpad=rng.random() < 0.3, rotary_dim=rotary_dim,
            interleaved=rng.random() < 0.5, causal=rng.random() < 0.5,
            window=rng.choice(((-1, -1),) * 3 + ((rng.randint(0, 40), rng.choice((-1, 0, 3))),)),
            softcap=rng.choice((0.0, 0.0, 0.0, 2.5)), alibi=rng.random() < 0.25,
            scale=rng.choice((None, None, 0.3, -0.2)), splits=rng.choice((0, 0, 1, 3))))
    return cases


def build(case: KVCase, device="cpu") -> dict:
    """attention_with_kvcache's arguments for the case (caches filled with random data), on `device`."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    b, hk, d = case.batch, case.nheads_k, case.head_dim
    args = {"q": randn(b, case.seqlen_q, case.nheads, d)}
    rows = b + 2 if case.batch_idx else b
    if case.page:
        blocks = case.capacity // case.page
        pool = b * blocks + 1
        args["k_cache"], args["v_cache"] = randn(pool, case.page, hk, d), randn(pool, case.page, hk, d)
        args["block_table"] = torch.randperm(pool, generator=gen)[: b * blocks].reshape(b, blocks).to(torch.int32)
    else:
        args["k_cache"], args["v_cache"] = randn(rows, case.capacity, hk, d), randn(rows, case.capacity, hk, d)
    lens = torch.randint(0, case.capacity - case.new + 1, (b,), generator=gen, dtype=torch.int32)
    if case.seqlens == "tensor":
        args["cache_seqlens"] = lens
    elif case.seqlens == "int":
        args["cache_seqlens"] = int(lens[0])
        lens = lens[:1].expand(b)
    else:
        lens = torch.full((b,), case.capacity, dtype=torch.int32)
    if case.new:
        args["k"], args["v"] = randn(b, case.new, hk, d), randn(b, case.new, hk, d)
    if case.batch_idx:
        args["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:b].to(torch.int32)
    if case.leftpad:
        args["cache_leftpad"] = (torch.rand(b, generator=gen) * (lens + 1)).to(torch.int32).clamp(max=lens)
    if case.rotary_dim:
        angles = torch.rand(case.capacity, case.rotary_dim // 2, generator=gen, dtype=torch.float64) * 6.3
        args["rotary_cos"], args["rotary_sin"] = angles.cos().to(dtype), angles.sin().to(dtype)
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


def options(case: KVCase, device="cpu") -> dict:
    opts = {"causal": case.causal, "window_size": case.window, "softcap": case.softcap,
            "rotary_interleaved": case.interleaved, "num_splits": case.splits}
    if case.scale is not None:
        opts["softmax_scale"] = case.scale
    if case.alibi:
        gen = torch.Generator().manual_seed(case.seed + 1)
        opts["alibi_slopes"] = (torch.rand(case.batch, case.nheads, generator=gen) * 0.3).to(device)
    return opts


def reference(case: KVCase, args: dict, opts: dict):
    """kvcache_reference on CPU copies: (out, lse, k_cache, v_cache) in float64."""
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    ref_opts = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in opts.items() if n != "num_splits"}
    return kvcache_reference(**cpu, **ref_opts)


OUT_TOL = {"fp32": 2e-5, "fp16": 4e-3, "bf16": 3e-2}
# Absolute, natural log. Rotary rounds the rotated q and k to the inputs' dtype (as flash-attn does), which moves a
# score by up to about its size times the dtype's epsilon: 2^-8 in bf16 (up to 6e-3 seen on the CPU's fallback).
LSE_TOL = {"fp32": 1e-3, "fp16": 1e-3, "bf16": 1.5e-2}


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def errors(case: KVCase, out, lse, k_cache, v_cache, ref) -> dict:
    """The call's errors against reference(...) (taken before the call, which writes the caches), and whether each is
    within its tolerance: out, the LSE (the same rows infinite, the finite ones within LSE_TOL) and both caches."""
    ref_out, ref_lse, ref_k, ref_v = ref
    tol = OUT_TOL[case.dtype]
    lse, finite = lse.cpu(), ref_lse.isfinite()
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    if not torch.equal(lse.isfinite(), finite):
        lse_err = float("inf")  # a row that sees no key where the reference's sees one, or the other way round
    found = {"out": rel_err(out.cpu(), ref_out), "lse": lse_err, "k_cache": rel_err(k_cache.cpu(), ref_k),
             "v_cache": rel_err(v_cache.cpu(), ref_v)}
    limits = {"out": tol, "lse": LSE_TOL[case.dtype], "k_cache": tol, "v_cache": tol}
    return {"errors": found, "ok": all(found[n] <= limits[n] for n in found)}


GPU_SEED = SEED + 1


def gpu_cases(count: int = 60) -> list[KVCase]:
    """The GPU's cases: half-precision dtypes only, so that every head dim the decode images take runs them."""
    return generate(count, GPU_SEED, dtypes=("fp16", "bf16"))


def _past_cache(args):
    b = args["q"].shape[0]
    capacity = (args["block_table"].shape[1] * args["k_cache"].shape[1] if "block_table" in args
                else args["k_cache"].shape[1])
    return {"cache_seqlens": torch.full((b,), capacity + 5, dtype=torch.int32, device=args["q"].device)}


def _negative(args):
    b = args["q"].shape[0]
    return {"cache_seqlens": torch.full((b,), -1, dtype=torch.int32, device=args["q"].device)}


def _leftpad_past(args):
    b = args["q"].shape[0]
    return {"cache_seqlens": torch.full((b,), 2, dtype=torch.int32, device=args["q"].device),
            "cache_leftpad": torch.full((b,), 3, dtype=torch.int32, device=args["q"].device)}


def _row_outside(args):
    b = args["q"].shape[0]
    return {"cache_batch_idx": torch.full((b,), args["k_cache"].shape[0], dtype=torch.int32,
                                          device=args["q"].device)}


def _block_outside(args):
    return {"block_table": torch.full_like(args["block_table"], args["k_cache"].shape[0])}


def _block_negative(args):
    return {"block_table": torch.full_like(args["block_table"], -1)}


# (name, paged cache?, replacement arguments, the argument the error must name)
MALFORMED = [
    ("seqlens_past_cache", False, _past_cache, "cache_seqlens[0]"),
    ("seqlens_past_pages", True, _past_cache, "cache_seqlens[0]"),
    ("seqlens_negative", False, _negative, "cache_seqlens[0]"),
    ("leftpad_past_seqlens", True, _leftpad_past, "cache_leftpad[0]"),
    ("batch_idx_outside", False, _row_outside, "cache_batch_idx[0]"),
    ("block_outside_pool", True, _block_outside, "block_table[0, 0]"),
    ("block_negative", True, _block_negative, "block_table[0, 0]"),
]


def malformed_case(paged: bool) -> KVCase:
    return KVCase(index=900 + paged, batch=2, seqlen_q=1, nheads=4, nheads_k=2, head_dim=16, dtype="fp16",
                  capacity=64, page=16 if paged else 0, new=1, seqlens="tensor", batch_idx=not paged)
