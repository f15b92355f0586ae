"""fa2rt.integrations on the CPU: transformers models with attn_implementation="fa2rt" against eager attention
(logits, padded batches, packed sequences, greedy generation), the unpadding/packing/mask logic, and the SDPA registry
overrides driven through the aten ops (on the CPU dispatch key, where fa2rt runs its own SDPA fallback)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface

import fa2rt
from fa2rt.integrations import sdpa
from fa2rt.integrations import transformers as tfi

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
# Windows of 5 tokens over 12-token prompts, so the sliding layers differ from full attention.
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=5)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(sliding_window=5, head_dim=8, attn_logit_softcapping=5.0,
                                                     final_logit_softcapping=3.0, query_pre_attn_scalar=6)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
}
ATOL = 1e-5  # fp32 logits: eager and fa2rt's fallback order their sums differently


@pytest.fixture(autouse=True)
def _quiet_cpu_fallback():
    # fa2rt's calls run its SDPA fallback on the CPU; that announcement is tested in test_api.py.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\[not_gpu\]", category=fa2rt.FallbackWarning)
        yield


@pytest.fixture(scope="module")
def registered():
    return tfi.register()


def model(name, registered):
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **extra)).eval()


def tokens(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(m, impl, *args, **kwargs):
    m.set_attn_implementation(impl)
    with torch.no_grad():
        return m(*args, **kwargs).logits


# ---- registration


def test_register_is_idempotent_and_fills_both_registries(registered):
    assert tfi.register() == registered == "fa2rt"
    assert AttentionInterface._global_mapping["fa2rt"] is tfi.attention_forward
    assert AttentionMaskInterface._global_mapping["fa2rt"] is tfi.padding_mask


def test_register_refuses_a_name_held_by_another_implementation():
    with pytest.raises(ValueError, match="name: expected a name no other attention implementation holds, got 'sdpa'"):
        tfi.register("sdpa")


def test_register_names_the_minimum_version_when_registries_are_missing(monkeypatch):
    monkeypatch.delattr(transformers.masking_utils, "AttentionMaskInterface")
    with pytest.raises(RuntimeError, match=rf"transformers >= {tfi.MIN_TRANSFORMERS}.*installed: "):
        tfi.register()


# ---- models against eager attention


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_logits_padded_packed_and_generation_match_eager(name, registered):
    m = model(name, registered)
    ids = tokens(2, 12)
    assert torch.allclose(logits(m, "fa2rt", ids), logits(m, "eager", ids), atol=ATOL)

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    ours, theirs = logits(m, "fa2rt", ids, attention_mask=mask), logits(m, "eager", ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=ATOL)

    a, b = tokens(1, 7, seed=1), tokens(1, 5, seed=2)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    packed = logits(m, "fa2rt", torch.cat([a, b], 1), position_ids=positions)
    alone = torch.cat([logits(m, "eager", a), logits(m, "eager", b)], 1)
    assert torch.allclose(packed, alone, atol=ATOL)

    generated = {}
    for impl in ("eager", "fa2rt"):
        m.set_attn_implementation(impl)
        generated[impl] = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated["fa2rt"], generated["eager"])


def test_a_4d_mask_runs_sdpa_with_it_announced_once(registered, fresh_announcements):
    m = model("llama", registered)
    ids = tokens(2, 10)
    keep = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(3)) > 0.3
    keep |= torch.eye(10, dtype=torch.bool)  # every row sees a key
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[transformers_4d_mask\]"):
        ours = logits(m, "fa2rt", ids, attention_mask=additive)
    assert torch.allclose(ours, logits(m, "eager", ids, attention_mask=additive), atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa2rt.FallbackWarning)
        logits(m, "fa2rt", ids, attention_mask=additive)


def test_attention_dropout_in_training_runs_sdpa_announced(registered, fresh_announcements):
    config_cls, model_cls, _ = MODELS["llama"]
    torch.manual_seed(0)
    m = model_cls(config_cls(**COMMON, attention_dropout=0.5)).train()
    m.set_attn_implementation("fa2rt")
    ids = tokens(2, 10)
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[attention_dropout\]"):
        out = m(ids).logits
    out.sum().backward()
    m.eval()
    with torch.no_grad():
        assert not torch.allclose(out, m(ids).logits, atol=1e-3)  # dropout did act


# ---- the attention function's routes, unit by unit


class _Module(torch.nn.Module):
    """The attributes transformers' attention function reads: is_causal, config, a Linear for the cast dtype."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.is_causal = True
        self.config = LlamaConfig(**COMMON)
        self.proj = torch.nn.Linear(4, 4, dtype=dtype)


def heads(b, h, n, d=8, seed=0):
    return torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed))


def test_packing_kwargs_give_a_varlen_call_per_sequence():
    q, k, v = heads(1, 4, 9, seed=1), heads(1, 2, 9, seed=2), heads(1, 2, 9, seed=3)
    cu = torch.tensor([0, 4, 9])
    out, _ = tfi.attention_forward(_Module(), q, k, v, None, scaling=0.4, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                   max_length_q=5, max_length_k=5)
    for start, stop in ((0, 4), (4, 9)):
        part = [t[:, :, start:stop].transpose(1, 2) for t in (q, k, v)]
        assert torch.allclose(out[:, start:stop], fa2rt.attention(*part, causal=True, softmax_scale=0.4), atol=1e-6)


def test_decode_step_with_cache_is_bottom_right_causal():
    q, k, v = heads(2, 4, 1, seed=1), heads(2, 2, 7, seed=2), heads(2, 2, 7, seed=3)
    out, _ = tfi.attention_forward(_Module(), q, k, v, None, sliding_window=4)
    ref, _ = fa2rt.reference.attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), causal=True,
                                                 window_size=(3, 0))
    assert torch.allclose(out.double(), ref, atol=1e-6)


def test_float32_inputs_are_cast_to_the_dtype_transformers_flash_casts_to():
    q = heads(1, 2, 5)
    assert tfi._target_dtype(q, _Module()) is None
    assert tfi._target_dtype(q, _Module(torch.bfloat16)) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tfi._target_dtype(q, _Module()) == torch.bfloat16
        out, _ = tfi.attention_forward(_Module(), q, q, q, None)
    assert out.dtype == torch.bfloat16


def test_segments_from_positions():
    assert tfi.segments_from_positions(torch.arange(6)[None].expand(2, -1)) is None
    cu, cu_k, longest, _ = tfi.segments_from_positions(torch.tensor([[0, 1, 2, 0, 1, 5], [3, 4, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 6, 8, 12] and cu_k is cu and longest == 4


def test_padding_mask_is_none_without_padding_and_sliced_for_sliding_layers():
    full = torch.ones(2, 6, dtype=torch.long)
    assert tfi.padding_mask(2, 6, 6, attention_mask=full) is None
    full[0, 0] = 0
    assert tfi.padding_mask(2, 6, 6, attention_mask=full).shape == (2, 6)
    assert tfi.padding_mask(2, 6, 4, attention_mask=full) is None  # the padded key is outside the window's keys


@pytest.mark.parametrize("window,causal", [((-1, -1), True), ((2, 0), True), ((2, 2), False)])
def test_structure_mask_reproduces_the_padded_varlen_call(window, causal, fresh_announcements):
    q, k, v = (t.transpose(1, 2) for t in (heads(2, 4, 7, seed=1), heads(2, 2, 7, seed=2), heads(2, 2, 7, seed=3)))
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :3] = False
    options = dict(causal=causal, softmax_scale=None, window_size=window, softcap=0.0, deterministic=False)
    mask = tfi.structure_mask(2, 7, 7, options, padding)
    with pytest.warns(fa2rt.FallbackWarning, match="test_reason"):
        masked = tfi.masked_fallback(q, k, v, mask, 0.0, options, "test_reason", "checking")
    assert torch.allclose(masked, tfi._padded(q, k, v, padding, options), atol=1e-6)


# ---- the SDPA registry


@pytest.fixture
def cpu_overrides(monkeypatch):
    """The overrides on the CPU dispatch key, with fa2rt taking every fp32 call (fa2rt.explain says "fallback" on a
    CPU, where the GPU suite has kernels)."""
    monkeypatch.setattr(sdpa, "DISPATCH_KEY", "CPU")
    monkeypatch.setattr(sdpa, "KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(sdpa, "_kernel_decision", lambda *args, **kwargs: None)
    sdpa.calls.clear()
    handle = sdpa.activate()
    yield
    handle.remove()


def test_sdpa_register_lists_fa2rt_without_activating_it():
    assert torch.nn.attention.current_flash_attention_impl() is None
    assert sdpa.register() == "fa2rt"
    assert "fa2rt" in torch.nn.attention.list_flash_attention_impls()
    assert torch.nn.attention.current_flash_attention_impl() is None


def test_sdpa_register_names_the_torch_version_needed(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    with pytest.raises(RuntimeError, match=rf"torch >= {sdpa.MIN_TORCH}.*lacks register_flash_attention_impl"):
        sdpa.register()


def test_activation_through_torch_registry_and_restore(monkeypatch):
    monkeypatch.setattr(sdpa, "DISPATCH_KEY", "CPU")
    monkeypatch.setattr(sdpa, "KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(sdpa, "_kernel_decision", lambda *args, **kwargs: None)
    sdpa.register()
    q = heads(1, 2, 5)
    torch.nn.attention.activate_flash_attention_impl("fa2rt")
    try:
        assert torch.nn.attention.current_flash_attention_impl() == "fa2rt"
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q)[0]
        assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-6)
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    with pytest.raises(NotImplementedError):  # no CPU kernel of torch's own: the override is gone
        torch.ops.aten._scaled_dot_product_flash_attention(q, q, q)


def test_sdpa_dense_forward_and_backward_match_sdpa(cpu_overrides):
    q = heads(2, 4, 9, d=16, seed=1).requires_grad_()
    k, v = heads(2, 2, 9, d=16, seed=2).requires_grad_(), heads(2, 2, 9, d=16, seed=3).requires_grad_()
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=0.3)
    out, lse = result[0], result[1]
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6) and out.stride() == q.stride()
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (2, 4, 9) and torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)  # natural log
    grad = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))
    assert sdpa.calls[("_scaled_dot_product_flash_attention_backward", "fa2rt")] == 1


def test_sdpa_backward_declines_what_fa2rt_backward_cannot_read(cpu_overrides):
    # An LSE of another shape (a torch kernel's padded one, say) goes to torch's own kernel, with the reason.
    q = heads(1, 2, 5, seed=4)
    out, lse = q.clone(), torch.zeros(1, 2, 6)
    declined = sdpa.sdpa_flash_backward(q, q, q, q, out, lse, None, None, 5, 5, 0.0, False, None, None)
    assert isinstance(declined, sdpa._Decline) and "lse: expected a dense float32 tensor of shape (1, 2, 5)" in declined


def test_sdpa_varlen_forward_backward_and_inplace_match_fa2rt(cpu_overrides):
    q = torch.randn(10, 4, 16, requires_grad=True)
    k, v = torch.randn(12, 2, 16, requires_grad=True), torch.randn(12, 2, 16, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 3, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    options = dict(causal=True, window_size=(3, 0))
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 7, 7, 0.0, True, False,
                                                           window_size_left=3, window_size_right=0)
    ref, ref_lse = fa2rt.attention_varlen(q, k, v, cu_q, cu_k, 7, 7, return_lse=True, **options)
    assert torch.allclose(out, ref) and torch.allclose(lse, ref_lse) and lse.shape == (4, 10)
    grad = torch.randn_like(out)
    grads = torch.ops.aten._flash_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, 7, 7, 0.0, True,
                                                     torch.zeros(2), torch.zeros(()), window_size_left=3,
                                                     window_size_right=0)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected, strict=True))
    if hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace"):
        written = torch.empty_like(q)
        inplace_lse = torch.ops.aten._flash_attention_forward_no_dropout_inplace(
            written, q.detach(), k.detach(), v.detach(), cu_q, cu_k, 7, 7, 0.0, True, False, window_size_left=3,
            window_size_right=0)
        assert torch.allclose(written, ref) and torch.allclose(inplace_lse, ref_lse)


SDPA_FLASH = torch.ops.aten._scaled_dot_product_flash_attention


@pytest.mark.parametrize("call,reason", [
    (lambda q: SDPA_FLASH(q, q, q, 0.5), "dropout_p=0.5"),
    (lambda q: SDPA_FLASH(q, q, q, 0.0, False, True), "return_debug_mask"),
    (lambda q: SDPA_FLASH(q[:, :, :3], q, q, 0.0, True), "seqlen_q != seqlen_k"),
    (lambda q: SDPA_FLASH(q.double(), q.double(), q.double()), "dtype"),
])
def test_sdpa_declines_what_fa2rt_cannot_take_to_the_original_kernel(cpu_overrides, call, reason):
    # No CPU kernel of torch's own exists to hand the call to, so the override says why it declined.
    with pytest.raises(RuntimeError, match=rf"fa2rt cannot take this aten::\S+ call \(.*{reason}"):
        call(heads(1, 2, 5))
    assert sdpa.calls[("_scaled_dot_product_flash_attention", "original")] == 1


def test_a_declined_call_reaches_the_captured_original_kernel_with_its_keyword_arguments():
    # The override machinery on an op that has a CPU kernel of torch's own: a declining implementation must hand
    # the call, keyword arguments included, to the kernel captured before the override replaced it.
    op = "_scaled_dot_product_flash_attention_for_cpu"
    q = heads(1, 2, 6, seed=4)
    expected = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True, scale=0.7)
    original = sdpa._original(op, "CPU")
    seen = []
    library = torch.library.Library("aten", "IMPL", "CPU")
    library.impl(op, sdpa._Override(op, lambda *a, **kw: seen.append(kw) or sdpa._Decline("test"), original), "CPU",
                 with_keyset=True)
    try:
        got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True, scale=0.7)
    finally:
        library._destroy()
    assert seen == [{"scale": 0.7}]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_unknown_set_arguments_of_a_newer_torch_are_declined(cpu_overrides):
    q = heads(1, 2, 5)
    assert isinstance(sdpa.sdpa_flash_forward(q, q, q, future_option=True), sdpa._Decline)
    assert not isinstance(sdpa.sdpa_flash_forward(q, q, q, future_option=None), sdpa._Decline)
