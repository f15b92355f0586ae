"""A tiny decoder-only transformer with pluggable attention, and a deterministic training loop, for the training checks
of the CPU and GPU suites (tests/cpu/test_training.py and its GPU variant).

The attention is any function attn(q, k, v) -> out taking q (batch, seqlen, nheads, headdim) and k, v
(batch, seqlen, nheads_kv, headdim) (fa2rt's layout, GQA when nheads_kv < nheads) and returning causal attention
shaped like q. k and v are strided views of one projection (as in most models), not contiguous tensors.

The task is copying: a sequence is PREFIX_LEN random tokens, a separator, then the same tokens again; the loss is the
cross entropy of the copied half. Only attention can bring it down: the token to predict at a position is the one
PREFIX_LEN positions back, which that position can see only through attention. It starts at CHANCE_LOSS
(ln(VOCAB - 2)) and falls far below it within a couple of hundred steps.

train() is deterministic: the same seed gives the same initial weights (drawn on the CPU from the seed, whatever the
device and dtype) and the same batches (from a generator of their own), and leaves torch's global RNG untouched, so
two runs differ only by what their attention functions compute.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEP = 1  # separator between the prefix and its copy; 0 is unused, random tokens are 2..VOCAB-1
PREFIX_LEN = 16
SEQLEN = 2 * PREFIX_LEN + 1  # prefix, separator, copy (the last copied token is only a target)
CHANCE_LOSS = math.log(VOCAB - 2)  # the loss of a model that has learnt nothing: uniform over the random tokens


def sdpa_causal(q, k, v):
    """Reference attention: torch SDPA, causal, from and to the (batch, seqlen, nheads, headdim) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, d_model, nheads, nheads_kv, attn_dtype=None):
        super().__init__()
        self.nheads, self.nheads_kv, self.head_dim = nheads, nheads_kv, d_model // nheads
        self.attn_dtype = attn_dtype
        self.q_proj = nn.Linear(d_model, nheads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * nheads_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(nheads * self.head_dim, d_model, bias=False)

    def forward(self, x, attn):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.nheads, self.head_dim)
        k, v = self.kv_proj(x).view(b, n, 2, self.nheads_kv, self.head_dim).unbind(2)
        if self.attn_dtype is not None:
            q, k, v = (t.to(self.attn_dtype) for t in (q, k, v))
        out = attn(q, k, v)
        assert out.shape == q.shape, (out.shape, q.shape)
        return self.o_proj(out.to(x.dtype).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, d_model, nheads, nheads_kv, attn_dtype=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, nheads, nheads_kv, attn_dtype)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, attn):
        x = x + self.attn(self.ln1(x), attn)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Pre-LN decoder: token and learned position embeddings, `layers` blocks, final LayerNorm, linear head."""

    def __init__(self, *, vocab=VOCAB, seqlen=SEQLEN, d_model=64, nheads=4, nheads_kv=2, layers=2, attn_dtype=None):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seqlen, d_model)
        self.blocks = nn.ModuleList(Block(d_model, nheads, nheads_kv, attn_dtype) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens, attn):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, attn)
        return self.head(self.ln_f(x))


def copy_batch(generator, batch):
    """(tokens, targets): tokens (batch, SEQLEN - 1) and targets (batch, PREFIX_LEN), the copied half."""
    prefix = torch.randint(2, VOCAB, (batch, PREFIX_LEN), generator=generator)
    seq = torch.cat([prefix, torch.full((batch, 1), SEP), prefix], dim=1)
    return seq[:, :-1], prefix


def train(attn, *, steps=250, device="cpu", dtype=torch.float32, seed=0, batch=16, lr=3e-3, attn_dtype=None,
          nheads=4, nheads_kv=2, layers=2, d_model=64) -> list[float]:
    """Train a TinyTransformer using `attn` on the copy task with AdamW; returns the loss of every step.

    dtype: the parameters' and activations' dtype; attn_dtype: q, k, v are cast to it for attn (e.g. a float32 model
    with bfloat16 attention), default dtype. The loss is computed in float32.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyTransformer(d_model=d_model, nheads=nheads, nheads_kv=nheads_kv, layers=layers,
                                attn_dtype=attn_dtype)
    model = model.to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        tokens, targets = (t.to(device) for t in copy_batch(data, batch))
        logits = model(tokens, attn)[:, PREFIX_LEN:]  # the positions that predict the copy
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
