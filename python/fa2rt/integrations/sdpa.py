"""fa2rt as a flash-attention implementation behind PyTorch's SDPA: `register()`, then the user opts in with
`torch.nn.attention.activate_flash_attention_impl("fa2rt")`. Nothing is registered or activated on import.

Activation overrides, for the GPU dispatch key, the aten flash-attention ops SDPA's flash backend calls (those the
installed torch has): the dense forward and backward (`_scaled_dot_product_flash_attention[_backward]`) and the
flash-attn-style entry points behind torch's varlen attention and nested tensors (`_flash_attention_forward`,
`_flash_attention_backward`, `_flash_attention_forward_no_dropout_inplace`). Each override keeps the op's semantics:
SDPA's causal is top-left aligned (torch sends only seqlen_q == seqlen_k causal calls to flash, where both alignments
agree; any other causal call of the dense op goes to the original kernel), the flash-attn-style ops keep flash-attn's
(bottom-right causal, windows, ALiBi), LSE is the natural-log float32 (batch, nheads, seqlen_q), or
(nheads, total_q) for varlen.

A call goes to fa2rt's public calls when fa2rt.explain says a kernel takes it (fp16/bf16 on a supported GPU, no
dropout, no debug mask, no paged KV or seqused_k); everything else runs the kernel the override replaced, captured
with torch.library.get_kernel at activation. fa2rt's own SDPA fallback is never used from inside an override (it
would call SDPA, and so the override, again).

The backward overrides run fa2rt.attention_backward / fa2rt.attention_varlen_backward on the forward's out and LSE:
the backward kernels alone, as torch's own flash backward.
"""

import threading
from collections import Counter
from dataclasses import dataclass

import torch

import fa2rt

DEFAULT_NAME = "fa2rt"
DISPATCH_KEY = "CUDA"  # the key AMD GPUs dispatch under in ROCm builds of torch too
MIN_TORCH = "2.11"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

# Which calls ran where, per op: calls[(op, "fa2rt")] and calls[(op, "original")]. Read by tests and the doctor-minded.
calls: Counter = Counter()

_local = threading.local()


def _registry_functions():
    attention = torch.nn.attention
    missing = [name for name, owner in (("register_flash_attention_impl", attention), ("get_kernel", torch.library))
               if not hasattr(owner, name)]
    if missing:
        raise RuntimeError(f"fa2rt.integrations.sdpa needs torch >= {MIN_TORCH} (torch.nn.attention's "
                           f"flash-attention implementation registry and torch.library.get_kernel); installed torch "
                           f"{torch.__version__} lacks {', '.join(missing)}")
    return attention.register_flash_attention_impl


def register(name: str = DEFAULT_NAME) -> str:
    """Make fa2rt available to torch.nn.attention.activate_flash_attention_impl(name); returns the name. Idempotent;
    activates nothing."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    _registry_functions()(name, register_fn=activate)
    return name


# ---------------------------------------------------------------------------------------------------------------
# Activation: the overrides and the kernels they replace


class _Decline(str):
    """Why fa2rt does not take a call: the override hands it to the original kernel."""


@dataclass
class Handle:
    """What activation returns to torch's registry; remove() restores the original kernels."""

    library: object

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
        self.library = None


def _original(op: str, dispatch_key: str):
    try:
        return torch.library.get_kernel(f"aten::{op}", dispatch_key)
    except RuntimeError:
        return None  # no kernel for this key (a CPU-only torch): a declined call raises, saying so


class _Override:
    def __init__(self, op: str, implementation, original):
        self.op, self.implementation, self.original = op, implementation, original

    def __call__(self, keyset, *args, **kwargs):
        result = _Decline("called from inside fa2rt") if getattr(_local, "busy", False) else self._fa2rt(args, kwargs)
        if not isinstance(result, _Decline):
            calls[(self.op, "fa2rt")] += 1
            return result
        calls[(self.op, "original")] += 1
        if self.original is None:
            raise RuntimeError(f"fa2rt cannot take this aten::{self.op} call ({result}) and the installed torch has "
                               "no kernel of its own for it on this device")
        return self.original.call_boxed(keyset, *args, **kwargs)

    def _fa2rt(self, args, kwargs):
        _local.busy = True
        try:
            return self.implementation(*args, **kwargs)
        finally:
            _local.busy = False


def activate(dispatch_key: str | None = None) -> Handle:
    """Install the overrides for dispatch_key (default DISPATCH_KEY; torch's registry calls this with no argument)."""
    dispatch_key = dispatch_key or DISPATCH_KEY
    ops = {op: impl for op, impl in OVERRIDES.items() if hasattr(torch.ops.aten, op)}
    originals = {op: _original(op, dispatch_key) for op in ops}  # before the overrides replace them
    library = torch.library.Library("aten", "IMPL", dispatch_key)
    for op, implementation in ops.items():
        library.impl(op, _Override(op, implementation, originals[op]), dispatch_key, with_keyset=True)
    return Handle(library)


# ---------------------------------------------------------------------------------------------------------------
# What fa2rt can take


def _decline_common(query, dropout_p, return_debug_mask=False, extra=None):
    # extra: keyword arguments a newer torch passes that this module does not know; set ones may change semantics.
    unknown = sorted(name for name, value in (extra or {}).items() if value is not None)
    if unknown:
        return _Decline(f"arguments fa2rt does not know: {', '.join(unknown)}")
    if dropout_p != 0:
        return _Decline(f"dropout_p={dropout_p}: fa2rt has no dropout")
    if return_debug_mask:
        return _Decline("return_debug_mask=True")
    if query.dtype not in KERNEL_DTYPES:
        return _Decline(f"dtype {query.dtype}")
    return None


def _kernel_decision(*args, **kwargs):
    # Every op replaced here returns the LSE, which the routing table never routes: the question is the kernel's.
    try:
        decision = fa2rt.explain(*args, **kwargs, return_lse=True)
    except (TypeError, ValueError) as err:  # fa2rt's validation: torch's own kernel gives its own verdict
        return _Decline(f"fa2rt.explain: {err}")
    if decision.path != "kernel":
        return _Decline(f"fa2rt.explain: {decision.path} [{decision.reason}] {decision.message}")
    return None


def _window(left, right) -> tuple[int, int]:
    return (-1 if left is None else int(left), -1 if right is None else int(right))


def _rng_outputs(device):
    # Placeholders for the dropout seed and offset (no dropout here), shaped and typed as torch's flash kernels make
    # them: (2,) and () uint64 on CUDA, two int64 scalars on ROCm.
    if torch.version.hip:
        return torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)
    return torch.zeros((2,), dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device)


def _bshd(*tensors):
    return tuple(t.transpose(1, 2) for t in tensors)


def _leaves(*tensors):
    return tuple(t.detach().requires_grad_() for t in tensors)


def _backward(grad_out, query, key, value, out, logsumexp, varlen, options):
    """fa2rt's backward entry for a call fa2rt.explain gave to the kernels (leaves that require grad: the decision
    covers the backward images), or a _Decline."""
    declined = _kernel_decision(*_leaves(query, key, value), *varlen, **options)
    if declined is not None:
        return declined
    try:
        if varlen:
            return fa2rt.attention_varlen_backward(grad_out, query, key, value, out, logsumexp, *varlen, **options)
        return fa2rt.attention_backward(grad_out, query, key, value, out, logsumexp, **options)
    except (TypeError, ValueError) as err:  # raised before any launch, e.g. an LSE fa2rt's kernels cannot read
        return _Decline(f"fa2rt backward: {err}")


# ---- SDPA's dense flash ops: (batch, nheads, seqlen, headdim)


def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None,
                       **extra):
    """aten::_scaled_dot_product_flash_attention through fa2rt.attention, or a _Decline."""
    declined = _decline_common(query, dropout_p, return_debug_mask, extra)
    if declined is None and is_causal and query.shape[2] != key.shape[2]:
        declined = _Decline("causal with seqlen_q != seqlen_k (SDPA aligns it top-left, fa2rt bottom-right)")
    q, k, v = _bshd(query, key, value)
    if declined is None:
        declined = _kernel_decision(q, k, v, causal=is_causal, softmax_scale=scale)
    if declined is not None:
        return declined
    out = torch.empty_like(query)
    with torch.no_grad():
        _, lse = fa2rt.attention(q, k, v, causal=is_causal, softmax_scale=scale, return_lse=True,
                                 out=out.transpose(1, 2))
    seed, offset = _rng_outputs(query.device)
    debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, lse, None, None, query.shape[2], key.shape[2], seed, offset, debug_mask


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None, **extra):
    """aten::_scaled_dot_product_flash_attention_backward through fa2rt.attention_backward, or a _Decline."""
    declined = _decline_common(query, dropout_p, extra=extra)
    if declined is None and is_causal and query.shape[2] != key.shape[2]:
        declined = _Decline("causal with seqlen_q != seqlen_k (SDPA aligns it top-left, fa2rt bottom-right)")
    if declined is not None:
        return declined
    grads = _backward(*_bshd(grad_out, query, key, value, out), logsumexp, (),
                      dict(causal=is_causal, softmax_scale=scale))
    return grads if isinstance(grads, _Decline) else tuple(g.transpose(1, 2) for g in grads)


# ---- flash-attn-style ops: (batch, seqlen, nheads, headdim), or varlen (total, nheads, headdim) with cum_seq_*


def _varlen_args(cum_seq_q, cum_seq_k, max_q, max_k):
    return () if cum_seq_q is None else (cum_seq_q, cum_seq_k, int(max_q), int(max_k))


def _flash_options(is_causal, scale, window_size_left, window_size_right, alibi_slopes=None):
    return dict(causal=is_causal, softmax_scale=scale, window_size=_window(window_size_left, window_size_right),
                alibi_slopes=alibi_slopes)


def _flash_call(query, key, value, varlen, options, **extra):
    if varlen:
        return fa2rt.attention_varlen(query, key, value, *varlen, **options, **extra)
    return fa2rt.attention(query, key, value, **options, **extra)


def _flash_forward_declined(query, key, value, varlen, dropout_p, return_debug_mask, seqused_k, block_table,
                            options, extra, out=None):
    declined = _decline_common(query, dropout_p, return_debug_mask, extra)
    if declined is None and seqused_k is not None:
        declined = _Decline("seqused_k")
    if declined is None and block_table is not None:
        declined = _Decline("block_table (paged KV)")
    if declined is None:
        declined = _kernel_decision(query, key, value, *varlen, out=out, **options)
    return declined


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                  *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None, **extra):
    """aten::_flash_attention_forward through fa2rt (num_splits, a scheduling hint, is not needed), or a _Decline."""
    varlen = _varlen_args(cum_seq_q, cum_seq_k, max_q, max_k)
    options = _flash_options(is_causal, scale, window_size_left, window_size_right, alibi_slopes)
    declined = _flash_forward_declined(query, key, value, varlen, dropout_p, return_debug_mask, seqused_k,
                                       block_table, options, extra)
    if declined is not None:
        return declined
    with torch.no_grad():
        out, lse = _flash_call(query, key, value, varlen, options, return_lse=True)
    seed, offset = _rng_outputs(query.device)
    return out, lse, seed, offset, torch.empty(0, dtype=query.dtype, device=query.device)


def flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                          return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                          seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None, **extra):
    """aten::_flash_attention_forward_no_dropout_inplace (writes out, returns the LSE), or a _Decline."""
    varlen = _varlen_args(cum_seq_q, cum_seq_k, max_q, max_k)
    options = _flash_options(is_causal, scale, window_size_left, window_size_right, alibi_slopes)
    declined = _flash_forward_declined(query, key, value, varlen, dropout_p, return_debug_mask, seqused_k,
                                       block_table, options, extra, out=out)
    if declined is not None:
        return declined
    with torch.no_grad():
        _, lse = _flash_call(query, key, value, varlen, options, return_lse=True, out=out)
    return lse


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None,
                   **extra):
    """aten::_flash_attention_backward through fa2rt's backward entries, or a _Decline."""
    declined = _decline_common(query, dropout_p, extra=extra)
    if declined is not None:
        return declined
    varlen = _varlen_args(cum_seq_q if cum_seq_q is not None and cum_seq_q.numel() else None, cum_seq_k, max_q,
                          max_k)
    options = _flash_options(is_causal, scale, window_size_left, window_size_right)
    return _backward(grad_out, query, key, value, out, logsumexp, varlen, options)


OVERRIDES = {
    "_scaled_dot_product_flash_attention": sdpa_flash_forward,
    "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward,
    "_flash_attention_forward": flash_forward,
    "_flash_attention_forward_no_dropout_inplace": flash_forward_inplace,
    "_flash_attention_backward": flash_backward,
}
