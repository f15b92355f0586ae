"""flash-attn 2.8's function names, parameter order, defaults and return conventions, mapped onto fa2rt's public calls.

Code written against flash-attn switches by changing `from flash_attn import ...` to `from fa2rt.flash_attn import ...`.
Semantics are those of fa2rt.attention / fa2rt.attention_varlen (flash-attn 2's: bottom-right causal, windows,
softcap, ALiBi, MQA/GQA); this module only renames, unpacks packed tensors (through views, no copies) and shapes the
results. Where the conventions differ, on purpose:
- dropout_p > 0 runs fa2rt's SDPA fallback with attention dropout, announced (reason `dropout`): fa2rt has no dropout
  kernels yet. The dropout pattern comes from torch's RNG, not flash-attn's Philox stream.
- return_attn_probs=True returns (out, softmax_lse, None): fa2rt never materialises the (dropped) probabilities
  flash-attn returns for testing (with dropout_p=0 flash-attn 2.8 returns an empty placeholder tensor there).
- block_table (paged KV in flash_attn_varlen_func) maps onto fa2rt.attention_varlen(block_table=...): page sizes need
  only be multiples of 16 (flash-attn 2.8's varlen kernel asks for multiples of 256), and it is forward-only there.
- flash_attn_with_kvcache maps onto fa2rt.attention_with_kvcache (in-place append, rotary, paged caches); page sizes
  need only be multiples of 16 there.
- Misuse (wrong shapes, dtypes, head counts, cu_seqlens) raises CompatError, which is both a ValueError (fa2rt's
  errors, naming the argument) and a RuntimeError (what flash-attn's C++ checks raise), so either except clause works.
- Inputs run on any device and dtype fa2rt accepts: where no fa2rt kernel fits (CPU, fp32, ...) the call runs fa2rt's
  announced SDPA fallback, where flash-attn would refuse.
"""

import torch

from .. import api

__all__ = [
    "CompatError",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

NO_WINDOW = api.NO_WINDOW


class CompatError(ValueError, RuntimeError):
    """A call fa2rt rejects: fa2rt's message (naming the argument), catchable as flash-attn's RuntimeError."""


def _contiguous_last(t):
    # flash-attn copies an input whose last dim is strided; fa2rt requires stride(-1) == 1, so do the same here.
    return t.contiguous() if isinstance(t, torch.Tensor) and t.dim() > 0 and t.stride(-1) != 1 else t


def _unpack(packed, name: str, axis: int, count: int):
    """Views of the `count` tensors stacked along `axis` of a packed input (qkv or kv)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() <= axis or packed.shape[axis] != count:
        raise CompatError(f"{name}: expected size {count} in dim {axis}, got shape {tuple(packed.shape)}")
    packed = _contiguous_last(packed)
    return packed.unbind(axis)


def _result(returned, return_attn_probs: bool):
    # fa2rt returns (out, lse) when asked for the LSE; flash-attn's third element is the probabilities (see above).
    return (*returned, None) if return_attn_probs else returned


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CompatError:
        raise
    except ValueError as err:
        raise CompatError(str(err)) from err


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs):
    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    returned = _call(api.attention, q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                     softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                     return_lse=bool(return_attn_probs), dropout_p=dropout_p)
    return _result(returned, return_attn_probs)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None):
    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    returned = _call(api.attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                     alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=bool(return_attn_probs),
                     dropout_p=dropout_p, block_table=block_table)
    return _result(returned, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim). Returns out like q, or
    (out, softmax_lse (batch, nheads, seqlen_q) float32, None) with return_attn_probs."""
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim). As flash_attn_func."""
    q, k, v = _unpack(qkv, "qkv", 2, 3)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim). As flash_attn_func."""
    k, v = _unpack(kv, "kv", 2, 2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_*: int32 (batch + 1,).
    With block_table int32 (batch, max_blocks): k, v are paged (num_blocks, page_size, nheads_k, headdim) and
    cu_seqlens_k gives each sequence's key count (fa2rt.attention_varlen's block_table; forward only).
    Returns out like q, or (out, softmax_lse (nheads, total_q) float32, None) with return_attn_probs."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim); cu_seqlens serves queries and keys. As flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, "qkv", 1, 3)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim). As flash_attn_varlen_func."""
    k, v = _unpack(kv, "kv", 1, 2)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=NO_WINDOW, softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q: (batch, seqlen_q, nheads, headdim); caches (batch_cache, seqlen_cache, nheads_k, headdim), or paged
    (num_blocks, page_size, nheads_k, headdim) with block_table. k, v appended in place at cache_seqlens first.
    Returns out like q, or (out, softmax_lse (batch, nheads, seqlen_q) float32) with return_softmax_lse."""
    return _call(api.attention_with_kvcache, q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                 cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                 block_table=block_table, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                 softcap=softcap, rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes,
                 num_splits=num_splits, return_lse=return_softmax_lse)
