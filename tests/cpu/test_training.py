"""Training through fa2rt.attention: a tiny transformer (tests/tiny_transformer.py) trained with fa2rt's attention
follows the loss curve of the same model trained with torch's SDPA.

On the CPU fa2rt.attention is the SDPA fallback (reason not_gpu, announced once), so this checks the fallback's
forward and backward as a training run uses them: causal self-attention, GQA with strided k/v views, gradients of
q, k and v flowing into the projections, repeated calls under autograd.

The bound. In float32 both runs compute the same function with the same (deterministic) initial weights and batches;
the fallback makes the same single causal SDPA call as the yardstick (it is bitwise identical here today). A
different but correct float32 evaluation of attention rounds differently by ~1e-7 relative per step, and training
carries that forward: measured on this model, 250 steps with the attention computed in float64 instead (or with
SDPA's math backend instead of the CPU flash one) stay within 1e-5 relative of the float32 curve. RTOL = 1e-4 keeps
10x margin over that, and is still tight: an attention whose scale is 0.1% off drifts past it within 60 steps, and
one with an exact forward but a missing gradient (k detached) is off by 40% (test_bound_catches_a_wrong_backward).
"""

import warnings

import pytest
from tiny_transformer import CHANCE_LOSS, sdpa_causal, train

import fa2rt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 200
RTOL = 1e-4



def fa2rt_causal(q, k, v):
    return fa2rt.attention(q, k, v, causal=True)


def max_rel_diff(got, want):
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def sdpa_curves():
    cache = {}

    def curve(nheads_kv, steps=STEPS):
        if nheads_kv not in cache:
            cache[nheads_kv] = train(sdpa_causal, steps=STEPS, nheads_kv=nheads_kv, seed=0)
        return cache[nheads_kv][:steps]

    return curve


@pytest.mark.parametrize("nheads_kv", [2, 4], ids=["gqa", "mha"])
def test_fa2rt_training_follows_sdpa(sdpa_curves, nheads_kv, fresh_announcements):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(fa2rt_causal, steps=STEPS, nheads_kv=nheads_kv, seed=0)
    fallbacks = [w for w in caught if issubclass(w.category, fa2rt.FallbackWarning)]
    # 2 layers x STEPS calls, one announcement (on the CPU the reason is always not_gpu).
    assert len(fallbacks) == 1 and "[not_gpu]" in str(fallbacks[0].message), [str(w.message) for w in caught]
    assert not [w for w in caught if w not in fallbacks], [str(w.message) for w in caught]

    want = sdpa_curves(nheads_kv)
    # The model learnt the copy (so the comparison covers a real training run, not noise around chance level).
    assert abs(want[0] - CHANCE_LOSS) < 0.1
    assert sum(want[-10:]) / 10 < 0.05 * CHANCE_LOSS
    assert max_rel_diff(got, want) < RTOL


def test_same_seed_same_curve(sdpa_curves):
    # The premise of the comparison: a run is a function of its seed and its attention only.
    assert train(sdpa_causal, steps=20, nheads_kv=2, seed=0) == sdpa_curves(2, steps=20)
    assert train(sdpa_causal, steps=20, nheads_kv=2, seed=1) != sdpa_curves(2, steps=20)


def test_bound_catches_a_wrong_backward(sdpa_curves):
    # An attention with an exact forward and no gradient for k: the first loss is the same, the curve is not.
    steps = 60
    got = train(lambda q, k, v: sdpa_causal(q, k.detach(), v), steps=steps, nheads_kv=2, seed=0)
    want = sdpa_curves(2, steps=steps)
    assert got[0] == want[0]
    assert max_rel_diff(got, want) > 100 * RTOL
