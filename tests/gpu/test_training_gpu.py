"""Training on the GPU: the tiny transformer (tests/tiny_transformer.py) with fa2rt's kernels (forward and backward,
bf16 attention inside a float32 model) follows the loss curve of the same model with torch's SDPA flash in bf16.

bf16 attention rounds differently in the two implementations, and training carries the difference forward, so the
curves are compared loosely: both must learn the copy task, and their smoothed losses must agree within 10% of chance
loss at every point (a missing or wrong gradient leaves the loss near chance, CPU suite: off by 40%).
"""

import pytest
import torch
from tiny_transformer import CHANCE_LOSS, sdpa_causal, train

import fa2rt

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")
STEPS = 300


def fa2rt_causal(q, k, v):
    return fa2rt.attention(q, k, v, causal=True)


def _smooth(losses, width=10):
    return [sum(losses[i:i + width]) / width for i in range(0, len(losses) - width + 1, width)]


def test_training_follows_sdpa():
    q = torch.zeros(1, 64, 4, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    decision = fa2rt.explain(q, q, q, causal=True)
    assert decision.path == "kernel" and decision.backward, decision
    common = dict(steps=STEPS, device="cuda", dtype=torch.float32, attn_dtype=torch.bfloat16, seed=0)
    ours, theirs = train(fa2rt_causal, **common), train(sdpa_causal, **common)
    assert sum(ours[-10:]) / 10 < 0.05 * CHANCE_LOSS and sum(theirs[-10:]) / 10 < 0.05 * CHANCE_LOSS, (
        ours[-10:], theirs[-10:])
    gaps = [abs(a - b) for a, b in zip(_smooth(ours), _smooth(theirs), strict=True)]
    assert max(gaps) < 0.1 * CHANCE_LOSS, gaps
