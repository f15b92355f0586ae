"""The public calls: attention(), attention_varlen(), attention_with_kvcache() and explain()."""

import dataclasses

import torch

from . import calls, kvcache, kvcache_ops, ops, policy, routing
from .fallback import layout_copies, sdpa_attention, sdpa_varlen_attention
from .validate import NO_WINDOW, Shapes, check_backward_inputs, check_dropout, check_inputs, check_varlen_inputs


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _decide(shapes: Shapes, q, k, v, alibi_slopes, out, deterministic=False, return_lse=False) -> policy.Decision:
    return policy.decide(shapes, q, k, v, needs_grad=_needs_grad(q, k, v), out=out,
                         slopes_need_grad=_needs_grad(alibi_slopes), deterministic=deterministic,
                         return_lse=return_lse)


VARLEN_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def explain(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
            softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, out=None,
            dropout_p=0.0, block_table=None, return_lse=False, deterministic=False) -> policy.Decision:
    """What attention(q, k, v, ...) would run, or with the four varlen arguments what
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...) would (block_table too:
    a paged call), and why: the chosen image (and backward images when an input requires grad), the SDPA backend
    the measured routing table sends the call to (with the measurement), or the fallback reason, with every
    candidate image the dispatcher rejected."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, out=out)
    given = [name for name, value in zip(VARLEN_ARGS, varlen, strict=True) if value is not None]
    if block_table is not None and len(given) != len(VARLEN_ARGS):
        raise TypeError(f"block_table: expected None without {', '.join(VARLEN_ARGS)} (a paged call is a varlen "
                        "call), got a value")
    if not given:
        shapes = check_inputs(q, k, v, **options)
    elif len(given) != len(VARLEN_ARGS):
        missing = [name for name in VARLEN_ARGS if name not in given]
        raise TypeError(f"{missing[0]}: expected a value with {', '.join(given)} (a varlen call takes all of "
                        f"{', '.join(VARLEN_ARGS)}), got None")
    else:
        shapes = check_varlen_inputs(q, k, v, *varlen, **options, block_table=block_table)
    dropout_p = check_dropout(dropout_p)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    decision = (_dropout_decision(dropout_p) if dropout_p
                else _decide(shapes, q, k, v, alibi_slopes, out, deterministic, bool(return_lse)))
    if decision.path != "fallback":
        return decision
    return dataclasses.replace(decision, copies=layout_copies(q=q, k=k, v=v))


def _dropout_decision(dropout_p: float) -> policy.Decision:
    return policy.Decision("fallback", "dropout", f"dropout_p={dropout_p}: no fa2rt kernel applies attention dropout "
                           "(SDPA runs it, with dropout)")


def _decide_traced(shapes: Shapes, q, k, v, alibi_slopes) -> policy.Decision:
    # The dispatcher is native code Dynamo cannot trace: the custom ops select when the graph runs (and fall back
    # there, announced, when no image fits). Decisions that need no device query are taken here.
    use_op = (q.is_cuda and q.dtype in policy.KERNEL_DTYPES and not shapes.trivial
              and not _needs_grad(alibi_slopes))
    return policy.Decision("kernel" if use_op else "fallback")


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
              return_lse=False, out=None, deterministic=False, dropout_p=0.0):
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
    dropout_p: attention dropout (training), in [0, 1); > 0 runs the SDPA fallback with dropout (reason
    `dropout`; no kernel has it), the returned lse staying that of the undropped scores.
    Runs an fa2rt kernel when one fits the device and problem, else PyTorch SDPA (announced once per reason,
    see explain()); an eager call in a problem class where an SDPA backend with the same semantics was measured
    faster on this arch runs that backend (fa2rt.routing; FA2RT_ROUTING=0 turns it off).
    """
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if dropout_p != 0.0:
        return _with_dropout(q, k, v, None, check_dropout(dropout_p), causal=causal, softmax_scale=softmax_scale,
                             window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                             return_lse=return_lse, out=out, deterministic=deterministic)
    compiling = torch.compiler.is_compiling()
    eager = not compiling and ops.can_run_eager(q, k, v, alibi_slopes, out)
    key = None
    if eager:
        # A call like an earlier one that validated and took the kernel path (or was routed): it would again.
        key, call = calls.find(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, out,
                               (deterministic, bool(return_lse), policy.sdpa_flags()))
        if type(call) is routing.RoutedCall:
            return call.run(q, k, v)  # routed calls ask no LSE
        if call is not None:
            out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic, return_lse)
            return (out, lse) if return_lse else out
        q, k, v, alibi_slopes = ops.unwrap_dead(q, k, v, alibi_slopes)
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          softcap=softcap, alibi_slopes=alibi_slopes, out=out)
    if compiling:
        decision = _decide_traced(shapes, q, k, v, alibi_slopes)
    else:
        decision = _decide(shapes, q, k, v, alibi_slopes, out, deterministic, bool(return_lse))
    if decision.path == "routed":
        # Routed calls ask no LSE and give no out= (fa2rt.routing.routable).
        call = routing.RoutedCall(decision.provider, shapes.window == (-1, 0), shapes.softmax_scale)
        if eager:
            calls.remember(key, call)
        out, lse = call.run(q, k, v), None
    elif decision.path == "kernel" and eager:
        call = ops.EagerCall(shapes, decision.image, decision.mode)
        calls.remember(key, call)
        out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic, return_lse)
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


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=NO_WINDOW,
                       softcap=0.0, alibi_slopes=None, deterministic=False):
    """Gradients (dq, dk, dv) of attention(q, k, v, ...) with the same options, from its out and lse
    (return_lse=True) and the gradient dout of out: the FA2 backward kernels, without recomputing the forward. For
    callers that keep the forward's results themselves instead of autograd (torch's SDPA registry); others
    differentiate attention() directly. Where no backward kernel fits, the SDPA fallback's gradients by
    recomputation (announced). Returns contiguous dq, dk, dv in the inputs' dtype; no graph is recorded."""
    shapes = check_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          softcap=softcap, alibi_slopes=alibi_slopes)
    return _backward(dout, q, k, v, out, lse, alibi_slopes, shapes, deterministic)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                              causal=False, softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                              deterministic=False):
    """attention_backward for attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    ...): lse is its float32 (nheads, total_q); the varlen backward kernels, or the fallback's gradients by
    recomputation (announced). Index values are checked as attention_varlen checks them."""
    shapes = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
    return _backward(dout, q, k, v, out, lse, alibi_slopes, shapes, deterministic, (cu_seqlens_q, cu_seqlens_k))


def _backward(dout, q, k, v, out, lse, alibi_slopes, shapes: Shapes, deterministic, cu=()):
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    check_backward_inputs(dout, out, lse, q, shapes)
    with torch.no_grad():
        if shapes.trivial:
            return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        return ops.backward(dout, q, k, v, out, lse, alibi_slopes, shapes, deterministic, cu)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_lse=False, out=None, dropout_p=0.0, block_table=None):
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
    return_lse. Differentiable in q, k and v; deterministic and dropout_p as attention().
    block_table: paged K/V (paged prefill, as flash-attn's varlen call with block_table): k, v are page pools
    (num_blocks, page_size, nheads_k, headdim) with page_size a multiple of 16, block_table int32
    (batch, max_blocks) on q's device with max_blocks * page_size >= max_seqlen_k; key j of sequence b is
    k[block_table[b, j // page_size], j % page_size] for j < cu_seqlens_k[b + 1] - cu_seqlens_k[b] (cu_seqlens_k
    gives only the key counts). Forward only: inputs that require grad are refused. Block ids are checked with the
    cu_seqlens (CPU or FA2RT_CHECK_INDICES=1); the kernels clamp them into the pool otherwise.
    """
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if block_table is not None:
        return _attention_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=return_lse,
                                out=out, dropout_p=dropout_p)
    if dropout_p != 0.0:
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _with_dropout(q, k, v, varlen, check_dropout(dropout_p), causal=causal, softmax_scale=softmax_scale,
                             window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                             return_lse=return_lse, out=out, deterministic=deterministic)
    cu = (cu_seqlens_q, cu_seqlens_k)
    compiling = torch.compiler.is_compiling()
    eager = not compiling and ops.can_run_eager(q, k, v, *cu, alibi_slopes, out)
    key = None
    if eager:
        key, call = calls.find_varlen(q, k, v, *cu, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_size,
                                      softcap, alibi_slopes, out)
        if call is not None:
            out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic, return_lse, cu)
            return (out, lse) if return_lse else out
        q, k, v, alibi_slopes = ops.unwrap_dead(q, k, v, alibi_slopes)
    shapes = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes, out=out)
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
        call = ops.EagerCall(shapes, decision.image, decision.mode)
        calls.remember(key, call, cu)
        out, lse = ops.run_eager(q, k, v, alibi_slopes, out, call, deterministic, return_lse, cu)
    else:
        if decision.path == "fallback" and decision.reason:
            policy.announce(decision)
        res, lse = sdpa_varlen_attention(q, k, v, *cu, causal=shapes.causal, softmax_scale=shapes.softmax_scale,
                                         window_size=shapes.window, softcap=shapes.softcap,
                                         alibi_slopes=alibi_slopes, return_lse=return_lse,
                                         deterministic=deterministic)
        out = res if out is None else out.copy_(res)
    return (out, lse) if return_lse else out


def _attention_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, *, alibi_slopes,
                     deterministic, return_lse, out, dropout_p, **options):
    """attention_varlen with block_table: the paged-prefill images, or the exact fallback (the pages gathered, then
    the varlen fallback), announced; under torch.compile and dispatch modes the custom op fa2rt::varlen_paged_fwd,
    which selects (or falls back) when it runs."""
    shapes = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 alibi_slopes=alibi_slopes, out=out, block_table=block_table, **options)
    dropout_p = check_dropout(dropout_p)
    index = (cu_seqlens_q, cu_seqlens_k, block_table)
    if dropout_p:
        policy.announce(_dropout_decision(dropout_p))
        res, lse = ops.paged_fallback(q, k, v, *index, shapes, alibi_slopes, dropout_p, deterministic)
    elif torch.compiler.is_compiling() or not ops.can_run_eager(q, k, v, *index, alibi_slopes, out):
        left, right = shapes.window
        res, lse = ops.varlen_paged_fwd(q, k, v, *index, shapes.seqlen_q, shapes.seqlen_k, alibi_slopes,
                                        shapes.softmax_scale, left, right, shapes.softcap, "", "")
    else:
        decision = _decide(shapes, q, k, v, alibi_slopes, out)
        if decision.path == "kernel":
            out, lse = ops.EagerCall(shapes, decision.image, decision.mode).forward(q, k, v, alibi_slopes, out, index,
                                                                                     return_lse)
            return (out, lse) if return_lse else out
        if decision.path == "fallback" and decision.reason:
            policy.announce(decision)
        res, lse = ops.paged_fallback(q, k, v, *index, shapes, alibi_slopes, deterministic=deterministic)
    out = res if out is None else out.copy_(res)
    return (out, lse) if return_lse else out


def _with_dropout(q, k, v, varlen, dropout_p, *, return_lse, out, deterministic, **options):
    """A call with attention dropout (dropout_p > 0 validated): the SDPA fallback, announced; varlen: the four varlen
    arguments, or None for a dense call."""
    if varlen is None:
        shapes = check_inputs(q, k, v, out=out, **options)
    else:
        shapes = check_varlen_inputs(q, k, v, *varlen, out=out, **options)
    policy.announce(_dropout_decision(dropout_p))
    fallback_options = dict(causal=shapes.causal, softmax_scale=shapes.softmax_scale, window_size=shapes.window,
                            softcap=shapes.softcap, alibi_slopes=options["alibi_slopes"], return_lse=return_lse,
                            deterministic=deterministic, dropout_p=dropout_p)
    if varlen is None:
        res, lse = sdpa_attention(q, k, v, **fallback_options)
    else:
        res, lse = sdpa_varlen_attention(q, k, v, varlen[0], varlen[1], **fallback_options)
    out = res if out is None else out.copy_(res)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                           cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                           rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_lse=False):
    """Attention of q against a KV cache, appending new keys/values in place first (flash-attn 2.8's
    flash_attn_with_kvcache semantics). No autograd.

    q: (batch, seqlen_q, nheads, headdim), seqlen_q 1 for a decode step, a few for speculative decoding, or more.
    k_cache, v_cache: contiguous (batch_cache, seqlen_cache, nheads_k, headdim), or paged (num_blocks, page_size,
    nheads_k, headdim) with block_table int32 (batch, max_blocks) and page_size a multiple of 16; any strides with a
    contiguous last dim; nheads % nheads_k == 0 (GQA/MQA).
    k, v: None or the new (batch, seqlen_new, nheads_k, headdim), written into the caches in place at logical
    positions cache_seqlens[b] + i (through block_table when paged) before attending.
    cache_seqlens: int or int32 (batch,): tokens already in each sequence's cache (None: the whole cache).
    cache_batch_idx: int32 (batch,): the cache row of each sequence (contiguous caches only; default b).
    cache_leftpad: int32 (batch,): where each sequence starts in its cache (default 0); sequence b attends to
    positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new).
    rotary_cos, rotary_sin: (seqlen_ro >= cache length, rotary_dim / 2) in q's dtype, only with k and v: the new k
    is rotated at positions cache_seqlens[b] + i, q at the same positions when causal or window_size != (-1, -1),
    else every row of q at cache_seqlens[b]; rotary_interleaved pairs features (2j, 2j + 1), else (j, j +
    rotary_dim / 2) (GPT-NeoX). The first rotary_dim features rotate, the rest pass through.
    causal, window_size, softcap, alibi_slopes, softmax_scale: as attention(), aligned to the end of each
    sequence's keys (bottom-right). num_splits: 0 chooses, n > 0 splits the cache into n chunks (kernel path only).
    Index values are checked on the CPU or with FA2RT_CHECK_INDICES=1 (a sync); the kernel path clamps malformed
    ones (wrong numbers at worst, never an access outside the given tensors), the fallback always checks them.
    Returns out (like q) or (out, lse) with lse float32 (batch, nheads, seqlen_q) when return_lse.
    """
    index_tensors = (cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None, cache_batch_idx,
                     cache_leftpad, block_table)
    options = (softmax_scale, causal, softcap, rotary_interleaved, num_splits, window_size)
    if not torch.compiler.is_compiling() and ops.can_run_eager(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                                               alibi_slopes, *index_tensors):
        out, lse = _kvcache_eager(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                  cache_leftpad, block_table, alibi_slopes, options, return_lse, index_tensors)
        return (out, lse) if return_lse else out
    # torch.compile, dispatch modes, transforms: the custom op, which runs _kvcache_eager when the graph runs. Only
    # shapes and options are checked here: a traced graph cannot read index values.
    with torch.no_grad():
        kvcache.check_kvcache_inputs(
            q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
            softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes, num_splits=num_splits)
        tensor = index_tensors[0] is not None
        out, lse = kvcache_fwd(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, index_tensors[0],
                               None if tensor else cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                               alibi_slopes, softmax_scale, causal, *window_size, softcap, rotary_interleaved,
                               num_splits)
    return (out, lse) if return_lse else out


def _kvcache_eager(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                   block_table, alibi_slopes, options: tuple, return_lse: bool, index_tensors: tuple):
    """attention_with_kvcache on plain tensors outside a trace: (out, lse or None). options: (softmax_scale, causal,
    softcap, rotary_interleaved, num_splits, window_size); index_tensors: the index arguments that are tensors (or
    None), whose values a remembered call must not have had checked (calls.remember)."""
    # A decode step repeats one call: like an earlier one that validated and ran the kernels, it would again.
    key, call = calls.find_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                   cache_leftpad, block_table, alibi_slopes, options)
    if call is not None:
        return kvcache_ops.run_call(call, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                    cache_batch_idx, cache_leftpad, block_table, alibi_slopes, return_lse)
    softmax_scale, causal, softcap, rotary_interleaved, num_splits, window_size = options
    with torch.no_grad():
        shapes = kvcache.check_kvcache_inputs(
            q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
            softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes, num_splits=num_splits)
        out, lse, call = kvcache.run(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                     cache_batch_idx, cache_leftpad, block_table, alibi_slopes, shapes, return_lse)
    if call is not None:
        calls.remember(key, call, index_tensors)
    return out, lse


# Registered for every device, as fa2rt::varlen_fwd: the call as torch.compile, dispatch modes and transforms see
# it. When the graph runs, it is the eager call (index values checked, selection, the kernels or the announced
# fallback; a repeated call skips validation there too). It writes the caches in place when k and v are given; lse is
# always computed (the kernels' scratch holds it anyway).
@torch.library.custom_op("fa2rt::kvcache_fwd", mutates_args=("k_cache", "v_cache"))
def kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                v: torch.Tensor | None, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                cache_seqlens: torch.Tensor | None, cache_seqlens_int: int | None, cache_batch_idx: torch.Tensor | None,
                cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None,
                alibi_slopes: torch.Tensor | None, softmax_scale: float | None, causal: bool, window_left: int,
                window_right: int, softcap: float, rotary_interleaved: bool,
                num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqlens = cache_seqlens_int if cache_seqlens is None else cache_seqlens
    options = (softmax_scale, causal, softcap, rotary_interleaved, num_splits, (window_left, window_right))
    out, lse = _kvcache_eager(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx,
                              cache_leftpad, block_table, alibi_slopes, options, True,
                              (cache_seqlens, cache_batch_idx, cache_leftpad, block_table))
    return out.contiguous(), lse  # the fake's layout (a trivial call's out is empty_like(q))


@kvcache_fwd.register_fake
def _kvcache_fwd_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int,
                      cache_batch_idx, cache_leftpad, block_table, alibi_slopes, softmax_scale, causal, window_left,
                      window_right, softcap, rotary_interleaved, num_splits):
    batch, seqlen_q, nheads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32))


def explain_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                         cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                         softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                         rotary_interleaved=True, alibi_slopes=None, num_splits=0) -> policy.Decision:
    """What attention_with_kvcache(...) with these arguments would run, and why, without touching the caches: the
    decode image (Decision.backward holds the combine image when the call splits; Decision.message the split count)
    or the fallback reason with the dispatcher's rejections."""
    shapes = kvcache.check_kvcache_inputs(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes, num_splits=num_splits)
    return kvcache.decide(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                          alibi_slopes, shapes)
