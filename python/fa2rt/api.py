"""The public calls: attention(), attention_varlen() and explain()."""

import dataclasses

import torch

from . import calls, ops, policy
from .fallback import layout_copies, sdpa_attention, sdpa_varlen_attention
from .validate import Shapes, check_inputs, check_varlen_inputs

NO_WINDOW = (-1, -1)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _decide(shapes: Shapes, q, k, v, alibi_slopes, out) -> policy.Decision:
    return policy.decide(shapes, q, k, v, needs_grad=_needs_grad(q, k, v), out=out,
                         slopes_need_grad=_needs_grad(alibi_slopes))


VARLEN_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def explain(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
            softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, out=None) -> policy.Decision:
    """What attention(q, k, v, ...) would run, or with the four varlen arguments what
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...) would, and why: the
    chosen image (and backward images when an input requires grad) or the fallback reason, with every candidate
    image the dispatcher rejected."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, out=out)
    given = [name for name, value in zip(VARLEN_ARGS, varlen, strict=True) if value is not None]
    if not given:
        shapes = check_inputs(q, k, v, **options)
    elif len(given) != len(VARLEN_ARGS):
        missing = [name for name in VARLEN_ARGS if name not in given]
        raise TypeError(f"{missing[0]}: expected a value with {', '.join(given)} (a varlen call takes all of "
                        f"{', '.join(VARLEN_ARGS)}), got None")
    else:
        shapes = check_varlen_inputs(q, k, v, *varlen, **options)
    decision = _decide(shapes, q, k, v, alibi_slopes, out)
    if decision.path != "fallback":
        return decision
    return dataclasses.replace(decision, copies=layout_copies(q=q, k=k, v=v))


def _decide_traced(shapes: Shapes, q, k, v, alibi_slopes) -> policy.Decision:
    # The dispatcher is native code Dynamo cannot trace: the custom ops select when the graph runs (and fall back
    # there, announced, when no image fits). Decisions that need no device query are taken here.
    use_op = (q.is_cuda and q.dtype in policy.KERNEL_DTYPES and not shapes.trivial
              and not _needs_grad(alibi_slopes))
    return policy.Decision("kernel" if use_op else "fallback")


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
              return_lse=False, out=None, deterministic=False):
    """Exact attention, flash-attn 2 semantics.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with nheads % nheads_k == 0
    (MQA/GQA without copying K/V). With shift = seqlen_k - seqlen_q, query i may see key j when
    i + shift - left <= j <= i + shift + right for window_size=(left, right) (-1: unlimited on that side);
    causal=True sets right = 0 (the bottom-right aligned causal mask). Rows that see no key give 0 and lse +inf.
    softmax_scale: defaults to headdim ** -0.5. softcap > 0: scores become softcap * tanh(score / softcap).
    alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + shift - j| to the scores.
    out: optional tensor shaped like q (last dim contiguous) the output is written into and returned; not with
    inputs that require grad.
    deterministic: bitwise reproducible gradients (also on when torch.use_deterministic_algorithms(True)); the
    kernels always are, this restricts the fallback to SDPA's math backend.
    Returns out (like q), or (out, lse) with lse float32 (batch, nheads, seqlen_q) when return_lse; lse carries
    no gradient. Differentiable in q, k and v (FA2 backward kernels, recomputing from lse); alibi_slopes that
    require grad run on the fallback.
    Runs an fa2rt kernel when one fits the device and problem, else PyTorch SDPA (announced once per reason,
    see explain()).
    """
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    compiling = torch.compiler.is_compiling()
    eager = not compiling and ops.can_run_eager(q, k, v, alibi_slopes, out)
    key = None
    if eager:
        # A call like an earlier one that validated and took the kernel path: it would again, with the same plans.
        key, call = calls.find(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, out)
        if call is not None:
            out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic)
            return (out, lse) if return_lse else out
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          softcap=softcap, alibi_slopes=alibi_slopes, out=out)
    if compiling:
        decision = _decide_traced(shapes, q, k, v, alibi_slopes)
    else:
        decision = _decide(shapes, q, k, v, alibi_slopes, out)
    if decision.path == "kernel" and eager:
        call = ops.EagerCall(shapes, decision.image, decision.mode)
        calls.remember(key, call)
        out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic)
    elif decision.path == "kernel":
        left, right = shapes.window
        args = (shapes.softmax_scale, left, right, shapes.softcap, decision.image or "", decision.mode or "")
        if out is None:
            out, lse = ops.fwd(q, k, v, alibi_slopes, *args, deterministic)
        else:
            lse = ops.fwd_out(q, k, v, alibi_slopes, out, *args)
    else:
        if decision.path == "fallback" and decision.reason:
            policy.announce(decision)
        res, lse = sdpa_attention(q, k, v, causal=shapes.causal, softmax_scale=shapes.softmax_scale,
                                  window_size=shapes.window, softcap=shapes.softcap, alibi_slopes=alibi_slopes,
                                  return_lse=return_lse, deterministic=deterministic)
        out = res if out is None else out.copy_(res)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_lse=False, out=None):
    """Exact attention over variable-length sequences packed end to end (flash-attn's varlen call).

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), any strides with a contiguous last dim.
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on q's device: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    and k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]; they start at 0, never decrease and end at total_q / total_k.
    max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence's length.
    Every option of attention() applies to each sequence on its own (bottom-right causal alignment per sequence,
    window_size, softcap, softmax_scale, GQA/MQA); alibi_slopes is float32 (nheads,) or (batch, nheads), row b for
    sequence b. Sequences may be empty; rows that see no key give 0 and lse +inf.
    The values of cu_seqlens are checked when they are on the CPU, or on the GPU when FA2RT_CHECK_INDICES=1 (a
    device sync per call); unchecked malformed values give wrong numbers at worst, never an access outside the
    given tensors.
    Returns out (like q, contiguous when allocated here), or (out, lse) with lse float32 (nheads, total_q) when
    return_lse. Differentiable in q, k and v; deterministic as attention().
    """
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    shapes = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes, out=out)
    cu = (cu_seqlens_q, cu_seqlens_k)
    compiling = torch.compiler.is_compiling()
    eager = not compiling and ops.can_run_eager(q, k, v, *cu, alibi_slopes, out)
    if not eager and not _needs_grad(alibi_slopes):
        # torch.compile, dispatch modes, transforms: the custom op (registered for every device) selects when it runs,
        # and falls back there, announced: a fallback traced here would read cu_seqlens' values into the graph.
        # (Slopes that require grad take the fallback below: the op gives them no gradient.)
        left, right = shapes.window
        res, lse = ops.varlen_fwd(q, k, v, *cu, shapes.seqlen_q, shapes.seqlen_k, alibi_slopes, shapes.softmax_scale,
                                  left, right, shapes.softcap, "", "", deterministic)
        out = res if out is None else out.copy_(res)
        return (out, lse) if return_lse else out
    # Compiling here means slopes that require grad: no kernel takes them, and the dispatcher cannot be traced.
    decision = policy.Decision("fallback") if compiling else _decide(shapes, q, k, v, alibi_slopes, out)
    if decision.path == "kernel":
        out, lse = ops.run_eager(q, k, v, alibi_slopes, out, ops.EagerCall(shapes, decision.image, decision.mode),
                                 deterministic, cu)
    else:
        if decision.path == "fallback" and decision.reason:
            policy.announce(decision)
        res, lse = sdpa_varlen_attention(q, k, v, *cu, causal=shapes.causal, softmax_scale=shapes.softmax_scale,
                                         window_size=shapes.window, softcap=shapes.softcap,
                                         alibi_slopes=alibi_slopes, return_lse=return_lse,
                                         deterministic=deterministic)
        out = res if out is None else out.copy_(res)
    return (out, lse) if return_lse else out
