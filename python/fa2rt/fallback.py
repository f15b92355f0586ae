"""Fallback attention through torch's scaled_dot_product_attention, with flash-attn 2 semantics.

One of three paths computes the rows that see at least one key (see PATHS and choose_path):
- plain: no window beyond causal, no softcap, no alibi: one SDPA call with is_causal / causal_lower_right.
- masked: a window and/or alibi, no softcap: SDPA with an additive float mask, per chunk of query rows.
- explicit: softcap (tanh of the scores is no additive bias, so SDPA cannot express it): scores, softcap, bias,
  softmax and @ v written out in float32 (float64 for float64 inputs), per chunk of query rows.
The masks and the alibi bias come from fa2rt.reference, the float64 oracle, so both share one definition.
"""

import collections
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from .reference import alibi_bias, allowed_mask, fold_causal
from .validate import check_cu_seqlens_values, check_paged_values

# cuDNN attention is left out: on an H200 with torch 2.11+cu130 its backward gave wrong gradients (errors ~5, or NaN)
# when grad_out is a transposed view, as ours always is (B, N, H, D -> B, H, N, D); flash, memory-efficient and math
# agreed with the float64 reference.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Deterministic mode: the flash and memory-efficient backwards accumulate dQ with atomics on the GPU.
DETERMINISTIC_BACKENDS = [SDPBackend.MATH]
ALIGN_BYTES = 16
# Query rows are processed in chunks whose (batch, nheads, rows, seqlen_k) score-sized tensors have at most
# CHUNK_ELEMENTS elements (256 MiB in fp32); a chunk holds a few of them (scores, bias, exponentials), about 1 GiB.
CHUNK_ELEMENTS = 1 << 26
LSE_CHUNK_ROWS = 1024
ATTN_CHUNK_ROWS = 1024


@dataclass(frozen=True, eq=False)
class _Problem:
    """What every path needs besides q, k, v; window is the effective one (causal folded in as right = 0)."""

    seqlen_q: int
    seqlen_k: int
    scale: float
    window: tuple[int, int]
    softcap: float
    alibi_slopes: torch.Tensor | None
    deterministic: bool = False
    dropout_p: float = 0.0  # attention dropout on the probabilities (training); LSE is that of the scores, undropped


def _zeros(shape, q, k, v):
    # Zeros attached to the autograd graph (gradient exactly 0, never NaN) so backward works on them.
    z = q.new_zeros(shape)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        z = z + sum(t.reshape(-1)[:0].sum() for t in (q, k, v))
    return z


def sdpa_layout_problem(t) -> str:
    """Why torch's fused SDPA kernels cannot take GPU tensor `t` as it is ("" when they can).

    Their vectorised loads assume a 16-byte aligned base and 16-byte aligned row strides; a view that breaks this
    (a storage offset, a sliced last dim such as head stride 68) faults on the GPU ("misaligned address", H200,
    torch 2.11) instead of being refused. A dim of size 1 never moves by its stride, so it is not checked.
    """
    unit = ALIGN_BYTES // t.element_size()
    # A head dim that is no multiple of the unit never reaches the vectorised kernels as it is: torch pads it (a copy)
    # or runs its math backend.
    if not t.is_cuda or t.numel() == 0 or t.shape[-1] % unit:
        return ""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return f"last-dim stride {t.stride(-1)} (not contiguous)"
    if t.data_ptr() % ALIGN_BYTES:
        return f"base address {t.data_ptr() % ALIGN_BYTES} bytes past a {ALIGN_BYTES}-byte boundary"
    odd = [(dim, t.stride(dim)) for dim in range(t.dim() - 1) if t.shape[dim] > 1 and t.stride(dim) % unit]
    if odd:
        return "stride " + ", ".join(f"{s} of dim {dim}" for dim, s in odd) + f" not a multiple of {unit} elements"
    return ""


# How many tensors the fallback copied because SDPA could not take their layout, per argument name (see
# sdpa_layout_problem); fa2rt.explain names the copies a call would make.
LAYOUT_COPIES: collections.Counter = collections.Counter()


def layout_copies(**tensors) -> tuple:
    """(name, why) for each named tensor the fallback would copy before SDPA (see sdpa_layout_problem)."""
    problems = ((name, sdpa_layout_problem(t)) for name, t in tensors.items() if t is not None)
    return tuple((name, why) for name, why in problems if why)


def _sdpa_ready(t, name):
    """t, or a contiguous copy (differentiable) when SDPA's kernels cannot take its layout; counted per name."""
    if sdpa_layout_problem(t):
        LAYOUT_COPIES[name] += 1
        return t.clone(memory_format=torch.contiguous_format)
    return t


class _SdpaReadyGrad(torch.autograd.Function):
    """Identity whose backward hands SDPA's backward a gradient it can take: the caller's grad_out may be any view."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _sdpa_ready(grad, "grad_out")


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def first_row_with_key(seqlen_q, seqlen_k, window):
    """Query rows before this one see no key; every later row sees at least one (for seqlen_k > 0).

    The window always holds row i's diagonal key i + seqlen_k - seqlen_q, which exists unless that is negative
    (rows above seqlen_q - seqlen_k); such a row sees key 0 only when right is unlimited or reaches it.
    """
    right = window[1]
    return 0 if right < 0 else min(seqlen_q, max(0, seqlen_q - seqlen_k - right))


def choose_path(window, softcap, alibi_slopes) -> str:
    """Which entry of PATHS computes a call with this effective window, softcap and alibi."""
    # Slopes that require grad: SDPA's memory-efficient backward fails on a bias that needs a gradient ("LSE is not
    # correctly aligned", H200, torch 2.11), so the written-out path computes it.
    if softcap > 0 or (alibi_slopes is not None and alibi_slopes.requires_grad):
        return "explicit"
    if alibi_slopes is not None or window not in ((-1, -1), (-1, 0)):
        return "masked"
    return "plain"


def _row_chunks(first, stop, max_rows, budget, batch, nheads, seqlen_k):
    """Ranges covering query rows [first, stop), each with at most `budget` score elements (at least one row)."""
    rows = max(1, min(max_rows, budget // max(1, batch * nheads * seqlen_k)))
    return [range(start, min(start + rows, stop)) for start in range(first, stop, rows)]


def _bounded(fn, *args):
    # Under autograd each chunk would keep its (batch, nheads, rows, seqlen_k) intermediates for backward, adding up
    # to the whole score matrix; recomputing them chunk by chunk during backward keeps memory bounded.
    # torch.func transforms (the fallback's gradients inside custom ops, fa2rt.ops.recompute_grads) refuse the saved
    # tensor hooks checkpointing uses: there the chunks keep their intermediates.
    if (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            and not torch._C._are_functorch_transforms_active()):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _positive_scale(q, scale):
    # torch's flash kernels give NaN for causal with scale < 0 (CPU and H200 seen) and scale 0 (CPU), as if the -inf
    # mask were scaled; so SDPA always gets a positive scale: the sign goes into q (exact), and scale 0 means all
    # scores are exactly 0.
    if scale < 0:
        return -q, -scale
    if scale == 0:
        return q * 0, 1.0
    return q, scale


def _sdpa(q_rows, k, v, p, *, attn_mask=None, is_causal=False):
    """One SDPA call, in and out in our layout (batch, seqlen, nheads, headdim)."""
    # Slicing rows can break the alignment of an aligned q, hence the check here.
    q_rows, scale = _positive_scale(_sdpa_ready(q_rows, "q"), p.scale)
    with sdpa_kernel(DETERMINISTIC_BACKENDS if p.deterministic else SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(
            q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q_rows.shape[2] != k.shape[2],
            dropout_p=p.dropout_p,
        )
    if out.requires_grad and out.is_cuda:
        out = _SdpaReadyGrad.apply(out)
    return out.transpose(1, 2)


def _bias(p, rows, dtype, device):
    """Additive bias for query rows `rows`, broadcastable to (batch, nheads, len(rows), seqlen_k): -slope * distance
    for alibi, -inf on keys outside the window; None when there is neither."""
    bias = None
    if p.alibi_slopes is not None:
        bias = alibi_bias(p.alibi_slopes, p.seqlen_q, p.seqlen_k, dtype, rows)
    if p.window != (-1, -1):
        allowed = allowed_mask(p.seqlen_q, p.seqlen_k, p.window, device, rows)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device) if bias is None else bias
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias


def _by_kv_head(x, nheads_k):
    # (batch, nheads, rows, n) -> (batch, nheads_k, group * rows, n): query head h uses kv head h // group, so each
    # kv head's group of query heads is one matmul against it, with no copy of K or V.
    return x.reshape(x.shape[0], nheads_k, -1, x.shape[-1])


def _scores(q_rows, k, rows, p):
    """Final scores (batch, nheads, len(rows), seqlen_k) in q_rows' dtype: scale, softcap, alibi, window (-inf)."""
    batch, n, nheads, _ = q_rows.shape
    qk = _by_kv_head(q_rows.transpose(1, 2), k.shape[2]) @ k.permute(0, 2, 3, 1)
    s = qk.reshape(batch, nheads, n, p.seqlen_k) * p.scale
    if p.softcap > 0:
        s = p.softcap * torch.tanh(s / p.softcap)
    bias = _bias(p, rows, s.dtype, s.device)
    return s if bias is None else s + bias


def _plain(q, k, v, first, p):
    # The rows from `first` to the end stay together, so the causal mask keeps its bottom-right alignment.
    q_rows = q[:, first:]
    n, seqlen_k = q_rows.shape[1], k.shape[1]
    causal = p.window[1] == 0
    mask = causal_lower_right(n, seqlen_k) if causal and n != seqlen_k else None
    return _sdpa(q_rows, k, v, p, attn_mask=mask, is_causal=causal and n == seqlen_k), None


def _masked_rows(q_rows, k, v, rows, p):
    # The mask must have q's dtype: CUDA's memory-efficient kernel rejects any other ("invalid dtype for bias").
    return _sdpa(q_rows, k, v, p, attn_mask=_bias(p, rows, q_rows.dtype, q_rows.device)), None


def _explicit_rows(q_rows, k, v, rows, p):
    s = _scores(q_rows, k, rows, p)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # finite: every row given here sees a key
    batch, n, nheads, head_dim = q_rows.shape
    probs = torch.exp(s - lse)
    if p.dropout_p > 0:
        probs = F.dropout(probs, p.dropout_p)
    out = (_by_kv_head(probs, k.shape[2]) @ v.transpose(1, 2)).reshape(batch, nheads, n, head_dim)
    return out.transpose(1, 2), lse.squeeze(-1).detach()


def _chunked(row_fn, q, k, v, first, p):
    chunks = _row_chunks(first, p.seqlen_q, ATTN_CHUNK_ROWS, CHUNK_ELEMENTS, q.shape[0], q.shape[2], p.seqlen_k)
    parts = [_bounded(row_fn, q[:, rows.start:rows.stop], k, v, rows, p) for rows in chunks]
    lse = None if parts[0][1] is None else torch.cat([lse for _, lse in parts], dim=-1)
    return torch.cat([out for out, _ in parts], dim=1), lse


def _masked(q, k, v, first, p):
    # An alibi bias rounded to fp16/bf16 is off by up to |bias| * 2**-9 (0.03 at a distance of 4096 with slope
    # 2**-8), so with alibi half-precision inputs run in float32; a window alone (0 or -inf) is exact in any dtype.
    dtype = q.dtype if p.alibi_slopes is None else _compute_dtype(q)
    out, lse = _chunked(_masked_rows, q.to(dtype), k.to(dtype), v.to(dtype), first, p)
    return out.to(q.dtype), lse


def _explicit(q, k, v, first, p):
    dtype = _compute_dtype(q)
    out, lse = _chunked(_explicit_rows, q.to(dtype), k.to(dtype), v.to(dtype), first, p)
    return out.to(q.dtype), lse


# Each takes (q, k, v, first, problem) and returns rows first.. of out (batch, rows, nheads, headdim), and their
# lse (batch, nheads, rows) when it comes for free, else None.
PATHS = {"plain": _plain, "masked": _masked, "explicit": _explicit}


def _lse(q, k, first, p):
    """(batch, nheads, seqlen_q - first) log-sum-exp of the final scores of rows first.. (every one sees a key).

    Not differentiable (computed without grad), in query chunks so memory stays bounded.
    """
    dtype = _compute_dtype(q)
    chunks = _row_chunks(first, p.seqlen_q, LSE_CHUNK_ROWS, CHUNK_ELEMENTS, q.shape[0], q.shape[2], p.seqlen_k)
    with torch.no_grad():
        q, k = q.to(dtype), k.to(dtype)
        parts = [torch.logsumexp(_scores(q[:, rows.start:rows.stop], k, rows, p), dim=-1) for rows in chunks]
    return torch.cat(parts, dim=-1)


def sdpa_attention(q, k, v, *, causal, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   return_lse=False, deterministic=False, dropout_p=0.0):
    """Attention via torch.nn.functional.scaled_dot_product_attention (or, for softcap, written out); differentiable
    through autograd.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); inputs already validated
    (see fa2rt.validate.check_inputs for window_size, softcap and alibi_slopes; fa2rt.reference for the math).
    Causal mask is bottom-right aligned; rows that see no key get output 0 (zero gradient) and lse +inf.
    Returns (out, lse): out in q's dtype, (batch, seqlen_q, nheads, headdim) contiguous; lse float32
    (batch, nheads, seqlen_q) (not differentiable) when return_lse, else None. deterministic: SDPA's math backend
    only, whose backward has no atomics. dropout_p > 0: attention dropout on the probabilities (torch's RNG; the
    checkpointed chunks replay it in backward), the LSE staying that of the scores.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    p = _Problem(seqlen_q, seqlen_k, scale, fold_causal(window_size, causal), float(softcap), alibi_slopes,
                 deterministic, float(dropout_p))
    q, k, v = (_sdpa_ready(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))

    if q.numel() == 0 or k.numel() == 0:
        out = _zeros(q.shape, q, k, v)
        lse = torch.full((batch, nheads, seqlen_q), float("inf"), dtype=torch.float32, device=q.device)
        return out, (lse if return_lse else None)

    # The first rows may see no key; SDPA would give NaN rows (and NaN gradients) for them, so only the remaining
    # rows are computed, and the skipped ones get out 0 (no gradient) and lse +inf.
    first = first_row_with_key(seqlen_q, seqlen_k, p.window)
    out, lse = PATHS[choose_path(p.window, p.softcap, alibi_slopes)](q, k, v, first, p)
    if first:
        out = torch.cat([out.new_zeros(batch, first, nheads, head_dim), out], dim=1)
    out = out.contiguous()

    if not return_lse:
        return out, None
    lse = _lse(q, k, first, p) if lse is None else lse
    skipped = torch.full((batch, nheads, first), float("inf"), dtype=torch.float32, device=q.device)
    return out, torch.cat([skipped, lse.to(torch.float32)], dim=-1)


def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, softmax_scale=None, window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, return_lse=False, deterministic=False, dropout_p=0.0):
    """sdpa_attention applied to each sequence of a packed (varlen) call on its own; differentiable through autograd.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q/_k (batch + 1,) int32; inputs
    validated by fa2rt.validate.check_varlen_inputs. The bounds are read to the host here (a sync the fallback
    pays anyway), so their values are always checked on this path. alibi_slopes (batch, nheads) give sequence b
    its row b. Returns (out, lse): out (total_q, nheads, headdim) contiguous in q's dtype; lse float32
    (nheads, total_q) when return_lse, else None.
    """
    total_q, nheads, head_dim = q.shape
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # The message names no max_seqlen: the fallback never reads it, so any value is accepted here.
    check_cu_seqlens_values("cu_seqlens_q", bounds_q, total_q, total_q, "max_seqlen_q")
    check_cu_seqlens_values("cu_seqlens_k", bounds_k, k.shape[0], k.shape[0], "max_seqlen_k")
    if q.numel() == 0 or k.numel() == 0:
        lse = torch.full((nheads, total_q), float("inf"), dtype=torch.float32, device=q.device)
        return _zeros(q.shape, q, k, v), (lse if return_lse else None)
    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        rows_q, rows_k = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = sdpa_attention(q[None, rows_q], k[None, rows_k], v[None, rows_k], causal=causal,
                                  softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                  alibi_slopes=slopes, return_lse=return_lse, deterministic=deterministic,
                                  dropout_p=dropout_p)
        outs.append(out[0])
        lses.append(lse[0] if return_lse else None)
    out = torch.cat(outs) if outs else _zeros(q.shape, q, k, v)
    if not return_lse:
        return out, None
    lse = torch.cat(lses, dim=-1) if lses else torch.empty((nheads, 0), dtype=torch.float32, device=q.device)
    return out, lse


def gather_pages(k, v, cu_seqlens_k, block_table):
    """The keys and values of a paged call (k, v: (num_blocks, page_size, nheads_k, headdim) pools; block_table
    int32 (batch, max_blocks)) packed sequence after sequence as (total_k, nheads_k, headdim) copies, which
    cu_seqlens_k then indexes as in a varlen call: the paged fallback is this gather, then sdpa_varlen_attention.
    Reads the index values to the host and checks them (the sync the fallback pays anyway); differentiable in k, v."""
    num_blocks, page_size = k.shape[:2]
    lengths, table = check_paged_values(cu_seqlens_k, block_table, None, page_size, num_blocks)
    counts = torch.tensor(lengths, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    # Position of each packed row inside its sequence: its index minus its sequence's first row.
    pos = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    blocks = table.long()[seq, pos // page_size].to(k.device)
    rows = (pos % page_size).to(k.device)
    return k[blocks, rows], v[blocks, rows]
