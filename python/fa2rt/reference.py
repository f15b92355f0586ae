"""Float64 reference attention: plain math, used by the tests and by the doctor's numerical check."""

import torch


def attention_reference(q, k, v, *, causal=False, softmax_scale=None):
    """Exact flash-attn 2 semantics, computed in float64 on the inputs' device.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0.
    Causal mask is bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q.
    Returns (out, lse): out (batch, seqlen_q, nheads, headdim) float64, lse (batch, nheads, seqlen_q) float64,
    natural log of the scaled scores. A query row that sees no key gets out 0 and lse +inf.
    Differentiable, and its gradient has no NaN for rows that see no key.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if nheads != nheads_k:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    allowed = j <= i + seqlen_k - seqlen_q
    if not causal:
        allowed = torch.ones_like(allowed)
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1)  # (seqlen_q,)

    # Stable softmax; every where() picks a safe operand for rows without keys so backward stays NaN-free.
    row_max = scores.amax(dim=-1) if seqlen_k > 0 else scores.new_zeros(scores.shape[:-1])
    row_max = torch.where(has_key, row_max, 0.0).detach()
    e = torch.exp(scores - row_max[..., None])
    denom = torch.where(has_key, e.sum(dim=-1), 1.0)
    out = torch.einsum("bhqk,bkhd->bqhd", e / denom[..., None], v)
    lse = torch.where(has_key, row_max + torch.log(denom), float("inf"))
    return out, lse
