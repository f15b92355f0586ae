"""Fallback attention through torch's scaled_dot_product_attention, with flash-attn 2 semantics."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# cuDNN attention is left out: on an H200 with torch 2.11+cu130 its backward gave wrong gradients (errors ~5, or NaN)
# when grad_out is a transposed view, as ours always is (B, N, H, D -> B, H, N, D); flash, memory-efficient and math
# agreed with the float64 reference.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LSE_CHUNK_ROWS = 1024
ALIGN_BYTES = 16
# Upper bound on the fp32 score elements materialised at once while computing the LSE (1 GiB).
LSE_CHUNK_ELEMENTS = 1 << 28


def _zeros(shape, q, k, v):
    # Zeros attached to the autograd graph (gradient exactly 0, never NaN) so backward works on them.
    z = q.new_zeros(shape)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        z = z + sum(t.reshape(-1)[:0].sum() for t in (q, k, v))
    return z


def _aligned(t):
    # torch's fused SDPA kernels fault (misaligned address, seen on an H200 with torch 2.11) on a GPU tensor whose
    # storage offset breaks 16-byte alignment; a copy is aligned. Differentiable, and free for aligned inputs.
    if t.is_cuda and t.numel() > 0 and t.data_ptr() % ALIGN_BYTES:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _lse(q, k, *, causal, scale):
    """(batch, nheads, seqlen_q) float32 log-sum-exp of the scaled, masked scores; +inf for rows with no key.

    Not differentiable (computed on detached inputs), in query chunks so memory stays bounded.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Query head h uses key head h // group: split the head dim as (nheads_k, group) instead of copying K.
    qg = q.detach().to(compute_dtype).permute(0, 2, 1, 3).reshape(batch, nheads_k, group, seqlen_q, head_dim)
    kt = k.detach().to(compute_dtype).permute(0, 2, 3, 1).unsqueeze(2)  # (batch, nheads_k, 1, head_dim, seqlen_k)
    rows = max(1, min(LSE_CHUNK_ROWS, LSE_CHUNK_ELEMENTS // max(1, batch * nheads * seqlen_k)))
    j = torch.arange(seqlen_k, device=q.device)
    chunks = []
    for start in range(0, seqlen_q, rows):
        scores = (qg[..., start:start + rows, :] @ kt) * scale
        i = torch.arange(start, min(start + rows, seqlen_q), device=q.device)
        if causal:
            scores = scores.masked_fill(j[None, :] > i[:, None] + seqlen_k - seqlen_q, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        if causal:
            lse = torch.where(i + seqlen_k - seqlen_q >= 0, lse, float("inf"))
        chunks.append(lse)
    return torch.cat(chunks, dim=-1).reshape(batch, nheads, seqlen_q).to(torch.float32)


def sdpa_attention(q, k, v, *, causal, softmax_scale=None, return_lse=False):
    """Attention via torch.nn.functional.scaled_dot_product_attention; differentiable through autograd.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); inputs already validated.
    Causal mask is bottom-right aligned; rows that see no key get output 0 (zero gradient) and lse +inf.
    Returns (out, lse): out in q's dtype, (batch, seqlen_q, nheads, headdim) contiguous; lse float32
    (batch, nheads, seqlen_q) (not differentiable) when return_lse, else None.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_aligned(t) for t in (q, k, v))

    if q.numel() == 0 or k.numel() == 0:
        out = _zeros(q.shape, q, k, v)
        lse = torch.full((batch, nheads, seqlen_q), float("inf"), dtype=torch.float32, device=q.device)
        return out, (lse if return_lse else None)

    # The first seqlen_q - seqlen_k rows see no key; SDPA would give NaN rows (and NaN gradients) for them,
    # so only the remaining rows go through SDPA, where the mask becomes top-left causal with equal lengths.
    skip = seqlen_q - seqlen_k if causal and seqlen_q > seqlen_k else 0
    q_rows = q[:, skip:]
    # torch's flash kernels give NaN for causal with scale < 0 (CPU and H200 seen) and scale 0 (CPU), as if the -inf
    # mask were scaled; so SDPA always gets a positive scale: the sign goes into q (exact), and scale 0 means all
    # scores are exactly 0.
    sdpa_scale = scale
    if scale < 0:
        q_rows, sdpa_scale = -q_rows, -scale
    elif scale == 0:
        q_rows, sdpa_scale = q_rows * 0, 1.0
    mask, is_causal = None, False
    if causal and q_rows.shape[1] == seqlen_k:
        is_causal = True
    elif causal:
        mask = causal_lower_right(seqlen_q, seqlen_k)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(
            q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=is_causal, scale=sdpa_scale, enable_gqa=nheads != k.shape[2],
        ).transpose(1, 2)
    if skip:
        out = torch.cat([out.new_zeros(batch, skip, nheads, head_dim), out], dim=1)
    out = out.contiguous()

    if not return_lse:
        return out, None
    return out, _lse(q, k, causal=causal, scale=scale)
