"""Repeated eager calls: one dict lookup instead of validation, the decision and the launch-plan lookups.

Training loops repeat a few calls, and at short sequences validating, deciding and looking plans up cost more host
time than the kernels run. A call's key holds everything check_inputs, policy.decide and the launch plans read of it;
only calls that passed validation and took the eager kernel path are remembered, with their ops.EagerCall, so a hit
is a call that would validate, decide and launch the same. Calls a key cannot describe take the validated path.
"""

import torch

from . import _C, ops, policy

_CALLS: dict = {}


def _tensor(t) -> tuple:
    # What validation reads (type, layout, dtype, device, shape, strides) and requires_grad, which with grad mode
    # decides whether the call is differentiable, out= refused, or slopes send it to the fallback.
    return type(t), t.layout, t.dtype, t.device, t.shape, t.stride(), t.requires_grad


def _options(*values) -> tuple:
    # With their types: True == 1 as a key, but only one of them is a valid causal (likewise 1 and 1.0 as sizes).
    return values, tuple(map(type, values))


def _window(window_size) -> tuple:
    if type(window_size) is tuple or type(window_size) is list:
        return type(window_size), _options(*window_size)
    return _options(window_size)


def _key(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out) -> tuple:
    tensors = (_tensor(q), _tensor(k), _tensor(v), None if out is None else _tensor(out),
               None if alibi is None else _tensor(alibi))
    # Decisions assume what they saw of the base addresses (policy.layout_key); the addresses change every call.
    pointers = q.data_ptr() | k.data_ptr() | v.data_ptr() | (0 if out is None else out.data_ptr())
    return (tensors, pointers % _C.ALIGN_BYTES == 0, torch.is_grad_enabled(), _options(causal, softmax_scale, softcap),
            _window(window_size), policy.environment_key(q.device))


def find(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out) -> tuple:
    """(key, ops.EagerCall or None) for an eager call (ops.can_run_eager holds): the key is None when the call cannot
    be described by one (a tensor without strides, an unhashable option), the EagerCall None when none is remembered
    for it."""
    try:
        key = _key(q, k, v, causal, softmax_scale, window_size, softcap, alibi, out)
        call = _CALLS.get(key)
    except (RuntimeError, TypeError):  # sparse/nested tensors have no strides; lists and arrays no hash
        return None, None
    return key, call if call is not None and call.current() else None


def remember(key, call: "ops.EagerCall") -> None:
    """Keep `call` for later calls of `key` (a validated call on the eager kernel path); bounded as policy's caches."""
    if key is None:
        return
    if len(_CALLS) >= policy.SELECTION_CACHE_SIZE:
        _CALLS.clear()
    _CALLS[key] = call
