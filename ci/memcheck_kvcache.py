"""KV-cache calls with malformed index values for compute-sanitizer memcheck: cache_seqlens past the cache and
negative, cache_leftpad past the end, cache_batch_idx and block_table entries outside the cache / pool, each with
and without new tokens appended, one and several splits, contiguous and paged (pages of 16 through the per-key
images, of 64 through the page-aligned ones). The kernel path never checks these values on the GPU (no sync;
FA2RT_CHECK_INDICES unset), so every access must stay inside the given tensors: memcheck must report 0 errors.

    compute-sanitizer --tool memcheck --error-exitcode 9 python ci/memcheck_kvcache.py
"""

import os

import torch

import fa2rt

os.environ.pop("FA2RT_CHECK_INDICES", None)
DEV, BF16 = "cuda", torch.bfloat16
I32 = dict(dtype=torch.int32, device=DEV)
BATCH, H, HK, D, CAPACITY = 3, 8, 2, 128, 512


def caches(page):
    if page:
        pool = BATCH * CAPACITY // page
        table = torch.randperm(pool, device=DEV).reshape(BATCH, CAPACITY // page).to(torch.int32)
        return torch.randn(pool, page, HK, D, dtype=BF16, device=DEV), table
    return torch.randn(BATCH, CAPACITY, HK, D, dtype=BF16, device=DEV), None


MALFORMED = [  # (name, page size, arguments)
    ("seqlens_past_cache", 0, lambda t: {"cache_seqlens": torch.tensor([10**6, -5, 2**31 - 1], **I32)}),
    ("seqlens_past_pages", 16, lambda t: {"cache_seqlens": torch.tensor([10**6, -5, 2**31 - 1], **I32)}),
    ("leftpad_past_end", 64, lambda t: {"cache_leftpad": torch.tensor([10**6, -3, 7], **I32)}),
    ("batch_idx_outside", 0, lambda t: {"cache_batch_idx": torch.tensor([-1, 99, 2**31 - 1], **I32)}),
    ("blocks_outside_pool", 16, lambda t: {"block_table": torch.full_like(t, -7).index_fill_(
        1, torch.tensor([1], device=DEV), 10**6)}),
    ("blocks_huge", 64, lambda t: {"block_table": torch.full_like(t, 2**31 - 1)}),
    ("blocks_outside_pool_aligned", 64, lambda t: {"block_table": torch.full_like(t, -7).index_fill_(
        1, torch.tensor([1], device=DEV), 10**6)}),
]
ran = 0
for name, page, malformed in MALFORMED:
    for new in (0, 1):
        for splits in (1, 4):
            k_cache, table = caches(page)
            v_cache = torch.randn_like(k_cache)
            kw = {"cache_seqlens": torch.full((BATCH,), 100, **I32), "num_splits": splits, "causal": True}
            if table is not None:
                kw["block_table"] = table
            if new:
                kw |= {"k": torch.randn(BATCH, 1, HK, D, dtype=BF16, device=DEV),
                       "v": torch.randn(BATCH, 1, HK, D, dtype=BF16, device=DEV)}
            kw |= malformed(table)
            q = torch.randn(BATCH, 1, H, D, dtype=BF16, device=DEV)
            decision = fa2rt.explain_with_kvcache(q, k_cache, v_cache, **kw)
            assert decision.path == "kernel", (name, decision)
            out = fa2rt.attention_with_kvcache(q, k_cache, v_cache, **kw)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), name
            ran += 1
print(f"memcheck kvcache ran {ran} malformed calls")
