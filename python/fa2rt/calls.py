"""Repeated calls: one dict lookup instead of validation, the decision and the launch-plan lookups.

Training loops and decode steps repeat a few calls, and at short sequences validating, deciding and looking plans up
cost more host time than the kernels run. A call's key holds everything validation, the decision and the launch plans
read of it; only calls that passed validation and took the eager kernel path or were routed are remembered, with their
resolved call (ops.EagerCall, kvcache_ops.KVCall, routing.RoutedCall), so a hit is a call that would validate, decide
and launch the same. Calls a key cannot describe take the validated path, and so do calls whose index values are
checked (see remember): a key holds no values of index tensors.
"""

import torch

from . import _C, policy
from .validate import NO_WINDOW, should_check_values

_CALLS: dict = {}


def _tensor(t) -> tuple:
    # What validation reads (dtype, device, shape, strides) and requires_grad, which with grad mode decides whether the
    # call is differentiable, out= refused, or slopes send it to the fallback. The type is not read: callers pass only
    # plain tensors (ops.can_run_eager), and a tensor of another layout has no strides (stride() raises, see _lookup).
    return t.dtype, t.device, t.shape, t.stride(), t.requires_grad


def _addressed(t) -> tuple:
    # _tensor with the address's alignment: reading the address keeps functorch wrappers out (see _key).
    return _tensor(t) + (t.data_ptr() % _C.ALIGN_BYTES,)


def _options(*values) -> tuple:
    # With their types: True == 1 as a key, but only one of them is a valid causal (likewise 1 and 1.0 as sizes).
    return values, tuple(map(type, values))


def _window(window_size) -> tuple:
    if window_size is NO_WINDOW:  # the default
        return NO_WINDOW
    if type(window_size) is tuple or type(window_size) is list:
        return type(window_size), _options(*window_size)
    return _options(window_size)


def _key(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out, flags=()) -> tuple:
    # One flat tuple, spelled out: the repeated call's host time is mostly building this key (_tensor three times and
    # nested tuples cost ~2x).
    # Decisions assume what they saw of the base addresses (policy.layout_key); the addresses change every call.
    # Reading every tensor's address also keeps functorch wrappers (no storage: data_ptr raises) out of the keys.
    pointers = q.data_ptr() | k.data_ptr() | v.data_ptr()
    if out is not None:
        pointers |= out.data_ptr()
    return (q.dtype, q.device, q.shape, q.stride(), q.requires_grad, k.dtype, k.device, k.shape, k.stride(),
            k.requires_grad, v.dtype, v.device, v.shape, v.stride(), v.requires_grad,
            None if out is None else _tensor(out), None if alibi is None else _addressed(alibi),
            pointers % _C.ALIGN_BYTES == 0, torch.is_grad_enabled(), causal, type(causal), softmax_scale,
            type(softmax_scale), softcap, type(softcap), _window(window_size), flags,
            policy.environment_key(q.device))


def _varlen_key(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window_size, softcap, alibi, out) -> tuple:
    return ("varlen", _key(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out), _tensor(cu_q),
            _tensor(cu_k), _options(max_q, max_k))


def _kv_tensor(t) -> tuple | None:
    # What KV-cache validation reads (no autograd: requires_grad is irrelevant); as _tensor, no type.
    return None if t is None else (t.dtype, t.device, t.shape, t.stride())


def _kvcache_key(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, alibi, options) -> tuple:
    # Flat, as _key: q and the caches spelled out, the optional tensors (mostly None) through _kv_tensor.
    # An int cache_seqlens is validated against the cache's length: its value is part of the key.
    seqlens = _kv_tensor(cache_seqlens) if isinstance(cache_seqlens, torch.Tensor) else _options(cache_seqlens)
    pointers = q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
    return ("kvcache", q.dtype, q.device, q.shape, q.stride(), k_cache.dtype, k_cache.device, k_cache.shape,
            k_cache.stride(), v_cache.dtype, v_cache.device, v_cache.shape, v_cache.stride(), _kv_tensor(k),
            _kv_tensor(v), _kv_tensor(rotary_cos), _kv_tensor(rotary_sin), _kv_tensor(cache_batch_idx),
            _kv_tensor(cache_leftpad), _kv_tensor(block_table), _kv_tensor(alibi), seqlens,
            pointers % _C.ALIGN_BYTES == 0, _options(*options[:-1]), _window(options[-1]),
            policy.environment_key(q.device))


def _lookup(make_key, *args) -> tuple:
    try:
        key = make_key(*args)
        call = _CALLS.get(key)
    except (RuntimeError, TypeError):  # sparse/nested tensors have no strides; lists and arrays no hash
        return None, None
    return key, call if call is not None and call.current() else None


def find(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out, flags: tuple) -> tuple:
    """(key, ops.EagerCall or None) for an eager call (ops.can_run_eager holds): the key is None when the call cannot
    be described by one (a tensor without strides, an unhashable option), the EagerCall None when none is remembered
    for it (or the routing.RoutedCall of a routed call). flags: (deterministic, return_lse, policy.sdpa_flags()),
    which decide whether the routing table applies."""
    # _lookup spelled out: the dense call is the most repeated one, and passing its arguments on costs ~0.2 us.
    try:
        key = _key(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out, flags)
        call = _CALLS.get(key)
    except (RuntimeError, TypeError):
        return None, None
    return key, call if call is not None and call.current() else None


def find_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window_size, softcap, alibi, out) -> tuple:
    """find() for an attention_varlen call."""
    return _lookup(_varlen_key, q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window_size, softcap, alibi,
                   out)


def find_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, alibi, options: tuple) -> tuple:
    """find() for an attention_with_kvcache call; options: (softmax_scale, causal, softcap, rotary_interleaved,
    num_splits, window_size)."""
    return _lookup(_kvcache_key, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table, alibi, options)


def _op_key(op: tuple, q, k, v, alibi, out, options: tuple, cu: tuple) -> tuple:
    # The dense key's tensor part (its option fields left empty: the op's scalars are `options`), the index tensors.
    return ("op", op, _key(q, k, v, None, None, NO_WINDOW, None, alibi, out), _options(*options),
            tuple(map(_tensor, cu)))


def find_op(op: tuple, q, k, v, alibi, out, options: tuple, cu: tuple = ()) -> tuple:
    """find() for the calls torch.compile graphs make (the custom ops' bodies) and for attention_backward: (key, the
    ops.EagerCall an earlier call of the same key resolved, or None). op: what else decides the call (its kind, the
    image it names); options: its scalar arguments; cu: its index tensors (cu_seqlens, block_table)."""
    return _lookup(_op_key, op, q, k, v, alibi, out, options, cu)


def remember(key, call, indices=()) -> None:
    """Keep `call` for later calls of `key` (a validated call on the eager kernel path); bounded as policy's caches.
    indices: the call's index tensors (None allowed); not kept when their values were checked (on the CPU, or
    FA2RT_CHECK_INDICES), since a hit skips validation."""
    if key is None or any(t is not None and should_check_values(t) for t in indices):
        return
    if len(_CALLS) >= policy.SELECTION_CACHE_SIZE:
        _CALLS.clear()
    _CALLS[key] = call
