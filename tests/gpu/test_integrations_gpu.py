"""fa2rt.integrations on the GPU: the SDPA registry activated (F.scaled_dot_product_attention under the flash backend
runs fa2rt's images and matches torch's own flash kernel, forward and backward), and transformers models in bf16 with
attn_implementation="fa2rt" against float32 eager attention within the error SDPA itself makes in bf16.

Error bound: fa2rt's error against the float32 eager result at most twice that of torch's SDPA in the same dtype,
plus a small floor (tests/gpu/gpu_helpers.py explains the yardstick)."""

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import DEVICE, rel_err
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fa2rt
from fa2rt.integrations import sdpa
from fa2rt.integrations import transformers as tfi

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")
FLOOR = 1e-3
DTYPE = torch.bfloat16


def within_sdpa_error(ours, theirs, exact, what):
    ours_err, theirs_err = rel_err(ours.float(), exact.float()), rel_err(theirs.float(), exact.float())
    assert ours_err <= 2 * theirs_err + FLOOR, f"{what}: fa2rt {ours_err:.3g} vs SDPA {theirs_err:.3g}"


# ---- SDPA registry


def bhsd(b, h, hk, n, d, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(b, heads, n, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
            for heads in (h, hk, hk)]


def sdpa_flash(q, k, v, causal, grad):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def exact(q, k, v, causal, grad):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return (out, *torch.autograd.grad(out, (q32, k32, v32), grad.float()))


@pytest.fixture
def fa2rt_flash():
    sdpa.register()
    sdpa.calls.clear()
    torch.nn.attention.activate_flash_attention_impl("fa2rt")
    yield
    torch.nn.attention.restore_flash_attention_impl()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h,hk,n,d", [(2, 8, 8, 1024, 128), (1, 8, 2, 777, 64)])
def test_sdpa_flash_runs_fa2rt_and_matches_torch_flash(b, h, hk, n, d, causal, request):
    q, k, v = bhsd(b, h, hk, n, d, seed=n + d)
    grad = torch.randn_like(q)
    torch_flash = sdpa_flash(q, k, v, causal, grad)  # before activation: torch's own kernel
    reference = exact(q, k, v, causal, grad)
    decision = fa2rt.explain(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal)
    assert decision.path == "kernel" and decision.backward, decision
    request.getfixturevalue("fa2rt_flash")
    ours = sdpa_flash(q, k, v, causal, grad)
    assert sdpa.calls[("_scaled_dot_product_flash_attention", "fa2rt")] == 1, sdpa.calls
    assert sdpa.calls[("_scaled_dot_product_flash_attention_backward", "fa2rt")] == 1, sdpa.calls
    for name, a, b_, ref in zip(("out", "dq", "dk", "dv"), ours, torch_flash, reference, strict=True):
        within_sdpa_error(a, b_, ref, name)


def test_sdpa_declined_calls_run_torch_flash(fa2rt_flash):
    q, k, v = bhsd(1, 4, 4, 256, 64, seed=1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)  # dropout: not fa2rt's
    assert out.isfinite().all()
    assert sdpa.calls[("_scaled_dot_product_flash_attention", "original")] == 1, sdpa.calls


def test_flash_attention_forward_varlen_matches_torch_flash():
    g = torch.Generator(device=DEVICE).manual_seed(5)
    lengths = [300, 17, 1000]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), heads, 128, device=DEVICE, generator=g).to(DTYPE) for heads in (8, 2, 2))
    args = (q, k, v, cu, cu, max(lengths), max(lengths), 0.0, True, False)
    theirs, theirs_lse = torch.ops.aten._flash_attention_forward(*args)[:2]
    sdpa.register()
    torch.nn.attention.activate_flash_attention_impl("fa2rt")
    try:
        ours, ours_lse = torch.ops.aten._flash_attention_forward(*args)[:2]
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    ref = fa2rt.reference.attention_reference
    for b in range(len(lengths)):
        rows = slice(cu[b].item(), cu[b + 1].item())
        expected, _ = ref(q[None, rows].float(), k[None, rows].float(), v[None, rows].float(), causal=True)
        within_sdpa_error(ours[rows], theirs[rows], expected[0], f"sequence {b}")
    assert ours_lse.shape == theirs_lse.shape == (8, sum(lengths))
    assert torch.allclose(ours_lse, theirs_lse, atol=1e-2)


def test_flash_attention_backward_varlen_runs_fa2rt_and_matches_torch_flash():
    # torch's own varlen forward, then the backward op with and without fa2rt's override: fa2rt's varlen backward
    # kernels (attention_varlen_backward on that forward's out and LSE) within SDPA's error of the float32 gradients.
    g = torch.Generator(device=DEVICE).manual_seed(6)
    lengths = [300, 17, 1000]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), heads, 128, device=DEVICE, generator=g).to(DTYPE) for heads in (8, 2, 2))
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max(lengths), max(lengths),
                                                                         0.0, True, False)
    dout = torch.randn(out.shape, device=DEVICE, generator=g).to(DTYPE)
    args = (dout, q, k, v, out, lse, cu, cu, max(lengths), max(lengths), 0.0, True, seed, offset)
    theirs = torch.ops.aten._flash_attention_backward(*args)
    sdpa.register()
    sdpa.calls.clear()
    torch.nn.attention.activate_flash_attention_impl("fa2rt")
    try:
        ours = torch.ops.aten._flash_attention_backward(*args)
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    assert sdpa.calls[("_flash_attention_backward", "fa2rt")] == 1, sdpa.calls
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact_out, _ = fa2rt.reference.attention_reference_varlen(*leaves, cu, cu, causal=True)
    exact = torch.autograd.grad(exact_out, leaves, dout.double())
    for name, a, b, ref in zip(("dq", "dk", "dv"), ours, theirs, exact, strict=True):
        within_sdpa_error(a, b, ref, name)


# ---- transformers

COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=64)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
}
# Gemma2 (softcap) joins where fa2rt has softcap images for its head dim: head_dim 64 here.
try:
    from transformers import Gemma2Config, Gemma2ForCausalLM
    MODELS["gemma2"] = (Gemma2Config, Gemma2ForCausalLM, dict(sliding_window=64, head_dim=64,
                                                             attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                             query_pre_attn_scalar=64))
except ImportError:  # pragma: no cover - every transformers fa2rt supports has Gemma2
    pass
SEQ = 300


@pytest.fixture
def calls_through_fa2rt(monkeypatch):
    """Every fa2rt.attention / attention_varlen call the integration makes, with what fa2rt.explain says it runs."""
    seen = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            options = {k: v for k, v in kwargs.items() if k not in ("deterministic", "return_lse")}
            seen.append(fa2rt.explain(*args, **options))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fa2rt, "attention", recording(fa2rt.attention))
    monkeypatch.setattr(fa2rt, "attention_varlen", recording(fa2rt.attention_varlen))
    return seen


def build(name, dtype):
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **extra)).to(DEVICE, dtype)


def run(m, impl, ids, **kwargs):
    m.set_attn_implementation(impl)
    m.zero_grad()
    out = m(ids, **kwargs).logits
    out.float().square().mean().backward()
    grads = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
    return out.detach(), grads


def ids_of(batch, seq, seed=0):
    return torch.randint(0, COMMON["vocab_size"], (batch, seq), device=DEVICE,
                         generator=torch.Generator(device=DEVICE).manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_logits_and_gradients_within_sdpa_error_through_kernels(name, calls_through_fa2rt):
    tfi.register()
    ids = ids_of(2, SEQ)
    exact_logits, exact_grads = run(build(name, torch.float32), "eager", ids)
    m = build(name, DTYPE)
    sdpa_impl = "eager" if name == "gemma2" else "sdpa"  # transformers runs Gemma2's softcap only in eager
    theirs = run(m, sdpa_impl, ids)
    ours = run(m, "fa2rt", ids)
    within_sdpa_error(ours[0], theirs[0], exact_logits, "logits")
    within_sdpa_error(ours[1], theirs[1], exact_grads, "gradients")
    assert calls_through_fa2rt and all(d.path == "kernel" for d in calls_through_fa2rt), calls_through_fa2rt


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_padded_and_packed_batches_within_sdpa_error(name):
    tfi.register()
    ids = ids_of(2, SEQ, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    mask[1, -5:] = 0
    m32, m = build(name, torch.float32), build(name, DTYPE)
    sdpa_impl = "eager" if name == "gemma2" else "sdpa"
    with torch.no_grad():
        m32.set_attn_implementation("eager")
        exact_logits = m32(ids, attention_mask=mask).logits
        m.set_attn_implementation(sdpa_impl)
        theirs = m(ids, attention_mask=mask).logits
        m.set_attn_implementation("fa2rt")
        ours = m(ids, attention_mask=mask).logits
    real = mask.bool()
    within_sdpa_error(ours[real], theirs[real], exact_logits[real], "padded logits")

    lengths = [120, 7, 173]
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    flat = ids_of(1, sum(lengths), seed=2)
    with torch.no_grad():
        ours = m(flat, position_ids=positions).logits
        alone = torch.cat([m32(part).logits for part in flat.split(lengths, 1)], 1)
        m.set_attn_implementation(sdpa_impl)
        theirs = torch.cat([m(part).logits for part in flat.split(lengths, 1)], 1)
    within_sdpa_error(ours, theirs, alone, "packed logits")


def test_padded_and_packed_layers_run_varlen_kernels(calls_through_fa2rt):
    tfi.register()
    m = build("llama", DTYPE)
    m.set_attn_implementation("fa2rt")
    mask = torch.ones(2, SEQ, dtype=torch.long, device=DEVICE)
    mask[0, :50] = 0
    with torch.no_grad():
        m(ids_of(2, SEQ), attention_mask=mask)
        m(ids_of(1, 200), position_ids=torch.cat([torch.arange(80), torch.arange(120)]).to(DEVICE)[None])
    assert len(calls_through_fa2rt) == 4
    assert all(d.path == "kernel" for d in calls_through_fa2rt), calls_through_fa2rt


def _argmax_gaps(m32, m, ids, mask):
    """Greedy generation of 100 tokens by `m`; per generated token, how far its float32 logit lies below the float32
    eager model's best on the same prefix (0: it picked an argmax), and the float32 logits' std."""
    generated = m.generate(ids, attention_mask=mask, max_new_tokens=100, min_new_tokens=100, do_sample=False,
                           pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 100, dtype=mask.dtype, device=DEVICE)], 1)
    with torch.no_grad():
        logits = m32(generated, attention_mask=full_mask).logits[:, 99:-1].float()
    picked = logits.gather(-1, generated[:, 100:, None]).squeeze(-1)
    return logits.max(-1).values - picked, logits.std()


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_bf16_generation_picks_the_float32_argmax(name):
    """Greedy generation through fa2rt in bf16 (prefill and cached decode steps, left padding); every token it picks
    must be an argmax of the float32 eager model on the same prefix, up to bf16 rounding of the logits: a near-tie
    may flip, by no more than SDPA's own bf16 generation flips one (its largest gap, twice, plus 2% of the logits'
    std; measured on the H200: fa2rt 0.09 where a fixed 5% of std, 0.08, was too tight). (Whether the padded calls ran
    kernels is test_padded_and_packed_layers_run_varlen_kernels' question.)"""
    tfi.register()
    m32, m = build(name, torch.float32), build(name, DTYPE)
    m32.set_attn_implementation("eager")
    ids = ids_of(2, 100, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    m.set_attn_implementation("sdpa")
    sdpa_gap, std = _argmax_gaps(m32, m, ids, mask)
    m.set_attn_implementation("fa2rt")
    gap, _ = _argmax_gaps(m32, m, ids, mask)
    assert gap.max() <= 2 * sdpa_gap.max() + 0.02 * std, (gap.max().item(), sdpa_gap.max().item(), std.item())
    assert (gap == 0).float().mean() >= 0.9, "most tokens must be exact float32 argmaxes"


COPY_VOCAB, COPY_LEN = 64, 16  # tokens 2..63, as in tests/tiny_transformer.py's copy task


def test_training_loss_tracks_sdpa():
    """200 steps of a tiny Llama (float32 weights, bf16 autocast) on a copy task, once with fa2rt, once with SDPA,
    from the same initial weights and batches: both learn, and their smoothed losses stay close."""
    tfi.register()
    losses = {}
    for impl in ("sdpa", "fa2rt"):
        m = build("llama", torch.float32)
        m.set_attn_implementation(impl)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator(device=DEVICE).manual_seed(7)
        losses[impl] = []
        for _ in range(200):
            prefix = torch.randint(2, COPY_VOCAB, (16, COPY_LEN), device=DEVICE, generator=g)
            ids = torch.cat([prefix, torch.ones_like(prefix[:, :1]), prefix], 1)
            with torch.autocast("cuda", dtype=DTYPE):
                logits = m(ids).logits[:, COPY_LEN:-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, COPY_LEN + 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    smooth = {k: [sum(v[i:i + 10]) / 10 for i in range(0, 200, 10)] for k, v in losses.items()}
    start = smooth["sdpa"][0]
    # Both learn the task (on the CPU in float32 the loss falls from 6.1 to ~0 by step 120); the moment the loss
    # drops may shift by a few steps between bf16 implementations, so the curves are compared by their mean.
    assert smooth["sdpa"][-1] < 0.2 * start and smooth["fa2rt"][-1] < 0.2 * start, smooth
    means = {k: sum(v) / len(v) for k, v in losses.items()}
    assert abs(means["fa2rt"] - means["sdpa"]) < 0.1 * means["sdpa"], (means, smooth)
