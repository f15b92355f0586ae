"""The public calls: attention() and explain()."""

import torch

from . import ops, policy
from .fallback import sdpa_attention
from .validate import check_inputs


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def explain(q, k, v, *, causal=False, softmax_scale=None) -> policy.Decision:
    """What attention(q, k, v, ...) would run, and why: the chosen image or the fallback reason, with every
    candidate image the dispatcher rejected."""
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return policy.decide(shapes, q, k, v, causal=causal, needs_grad=_needs_grad(q, k, v))


def attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False):
    """Exact attention, flash-attn 2 semantics.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with nheads % nheads_k == 0.
    causal: mask aligned to the bottom-right corner when seqlen_q != seqlen_k (rows that see no key give 0).
    softmax_scale: defaults to headdim ** -0.5.
    Returns out (like q), or (out, lse) with lse float32 (batch, nheads, seqlen_q) when return_lse.
    Runs an fa2rt kernel when one fits the device and problem, else PyTorch SDPA (announced once per reason,
    see explain()).
    """
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if torch.compiler.is_compiling():
        # The dispatcher is native code Dynamo cannot trace: the custom op selects when the graph runs (and falls
        # back there, announced, when no image fits). Decisions that need no device query are taken here.
        use_op = q.is_cuda and q.dtype in policy.KERNEL_DTYPES and not _needs_grad(q, k, v) and not shapes.trivial
        decision = policy.Decision("kernel" if use_op else "fallback")
    else:
        decision = policy.decide(shapes, q, k, v, causal=causal, needs_grad=_needs_grad(q, k, v))
    if decision.path == "kernel":
        out, lse = ops.fwd(q, k, v, causal, shapes.softmax_scale, decision.image or "", decision.mode or "")
    else:
        if decision.path == "fallback" and decision.reason:
            policy.announce(decision)
        out, lse = sdpa_attention(q, k, v, causal=causal, softmax_scale=shapes.softmax_scale,
                                  return_lse=return_lse)
    return (out, lse) if return_lse else out
