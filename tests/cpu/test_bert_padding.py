"""fa2rt.flash_attn.bert_padding as code written against flash_attn.bert_padding (2.8) uses it: unpad a padded batch,
run the varlen call, pad back, and get attention over each sequence alone (gradients too); flash-attn's results and
dtypes; misuse named; unchecked indices clamped."""

import re
import warnings

import numpy as np
import pytest
import torch

import fa2rt
from fa2rt.flash_attn import bert_padding, flash_attn_varlen_func
from fa2rt.flash_attn.bert_padding import (
    index_first_axis,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)
from fa2rt.reference import attention_reference

LENGTHS = [3, 5, 0, 2]
SEQLEN = 5


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        yield


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def mask_of(lengths, seqlen, left=False):
    """(batch, seqlen) int mask of rows holding lengths[b] tokens, padded on the right (or the left)."""
    positions = torch.arange(seqlen)
    rows = [(positions >= seqlen - n) if left else (positions < n) for n in lengths]
    return torch.stack(rows).to(torch.int64)


@pytest.mark.parametrize("left", [False, True])
def test_unpad_input_gives_flash_attn_2_8_results(left):
    x = rand(len(LENGTHS), SEQLEN, 2, 3)
    mask = mask_of(LENGTHS, SEQLEN, left)
    packed, indices, cu_seqlens, longest, seqused = unpad_input(x, mask)
    expected = [b * SEQLEN + j for b in range(len(LENGTHS)) for j in range(SEQLEN) if mask[b, j]]
    assert indices.dtype == torch.int64 and indices.tolist() == expected
    assert torch.equal(packed, x.flatten(0, 1)[expected])
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 8, 8, 10]
    assert type(longest) is int and longest == 5
    assert seqused.dtype == torch.int32 and seqused.tolist() == LENGTHS
    assert torch.equal(pad_input(packed, indices, len(LENGTHS), SEQLEN), x * mask[..., None, None])


def test_unused_tokens_are_packed_but_not_counted_as_used():
    x = rand(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    packed, indices, cu_seqlens, longest, seqused = unpad_input(x, mask, unused)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6] and cu_seqlens.tolist() == [0, 3, 6] and longest == 3
    assert seqused.tolist() == [2, 1]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_padded_batch_through_varlen_is_each_sequence_alone(causal, left):
    batch, h, hk, d = len(LENGTHS), 4, 2, 16
    q, k, v = (rand(batch, SEQLEN, heads, d, seed=i, grad=True) for i, heads in enumerate((h, hk, hk)))
    mask = mask_of(LENGTHS, SEQLEN, left)
    q_u, indices, cu_seqlens, longest, _ = unpad_input(q, mask)
    k_u, v_u = (unpad_input(t, mask)[0] for t in (k, v))
    out = pad_input(flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens, cu_seqlens, longest, longest, causal=causal),
                    indices, batch, SEQLEN)
    grad_out = rand(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b in range(batch):
        rows = mask[b].bool()
        if not rows.any():
            assert out[b].eq(0).all() and all(g[b].eq(0).all() for g in grads)
            continue
        alone = [t[b:b + 1, rows].detach().double().requires_grad_() for t in (q, k, v)]
        want, _ = attention_reference(*alone, causal=causal)
        want_grads = torch.autograd.grad(want, alone, grad_out[b:b + 1, rows].double())
        torch.testing.assert_close(out[b, rows].double(), want[0], atol=1e-5, rtol=1e-5)
        assert out[b, ~rows].eq(0).all()
        for got, expected in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got[b, rows].double(), expected[0], atol=1e-4, rtol=1e-4)
            assert got[b, ~rows].eq(0).all()


def test_concatenated_sequences_attend_within_themselves():
    lengths_in_rows = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    q, k, v = (rand(3, 6, 2, 8, seed=i) for i in range(3))
    q_u, indices, cu_seqlens, longest = unpad_input_for_concatenated_sequences(q, lengths_in_rows)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16] and longest == 6
    k_u, v_u = (unpad_input_for_concatenated_sequences(t, lengths_in_rows)[0] for t in (k, v))
    out = flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens, cu_seqlens, longest, longest, causal=True)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        want, _ = attention_reference(q_u[None, start:end], k_u[None, start:end], v_u[None, start:end], causal=True)
        torch.testing.assert_close(out[start:end].double(), want[0], atol=1e-5, rtol=1e-5)


def test_index_helpers_are_gather_and_scatter_along_the_first_axis():
    x = rand(6, 2, 3, grad=True)
    rows = torch.tensor([4, 0, 5], dtype=torch.int32)
    picked = index_first_axis(x, rows)
    assert torch.equal(picked, x[rows.long()])
    put = index_put_first_axis(picked, rows, 7)
    assert put.shape == (7, 2, 3) and torch.equal(put[rows.long()], picked) and put[[1, 2, 3, 6]].eq(0).all()
    (grad,) = torch.autograd.grad(put.sum(), x)
    assert grad[rows.long()].eq(1).all() and grad[[1, 2, 3]].eq(0).all()


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def test_misuse_names_the_argument():
    x = rand(3, 5, 2)
    with raises(ValueError, "attention_mask: expected shape (3, 5) (hidden_states' batch and seqlen), got shape "
                "(3, 4)"):
        unpad_input(x, torch.ones(3, 4))
    with raises(ValueError, "unused_mask: expected shape (3, 5)"):
        unpad_input(x, torch.ones(3, 5), torch.ones(5))
    with raises(ValueError, "hidden_states: expected a tensor (batch, seqlen, ...)"):
        unpad_input(torch.ones(5), torch.ones(5))
    with raises(IndexError, "indices[1]: expected a row in [0, 15), got 15"):
        index_first_axis(x.flatten(0, 1), torch.tensor([0, 15]))
    with raises(IndexError, "indices[0]: expected a row in [0, 15), got -1"):
        pad_input(x.flatten(0, 1)[:2], torch.tensor([-1, 3]), 3, 5)
    with raises(ValueError, "indices: expected an integer tensor of shape (n,)"):
        index_first_axis(x, torch.tensor([0.0]))
    with raises(ValueError, "indices: expected shape (2,) (one row index per row of values), got shape (3,)"):
        index_put_first_axis(x[:2], torch.tensor([0, 1, 2]), 4)
    with raises(ValueError, "batch: expected an int >= 0, got '3'"):
        pad_input(x.flatten(0, 1), torch.arange(15), "3", 5)
    with raises(ValueError, "attention_mask_in_length: expected lengths >= 0 summing to at most 5 per row"):
        unpad_input_for_concatenated_sequences(x, torch.tensor([[4, 2, 0, 0, 0]] * 3))


def test_unchecked_indices_are_clamped_into_range(monkeypatch):
    # What a GPU tensor gets without FA2RT_CHECK_INDICES: no value read (no sync), no access outside the tensor.
    monkeypatch.setattr(bert_padding, "should_check_values", lambda t: False)
    x = rand(4, 3)
    assert torch.equal(index_first_axis(x, torch.tensor([-3, 1, 99])), x[[0, 1, 3]])
    put = index_put_first_axis(x[:2], torch.tensor([7, -1]), 4)
    assert torch.equal(put[[3, 0]], x[:2]) and put[1:3].eq(0).all()


def test_sizes_may_be_numpy_ints_or_traced_sizes():
    x = rand(3, 6, 4)
    mask = mask_of([4, 6, 1], 6)
    packed, indices, *_ = unpad_input(x, mask)
    assert torch.equal(pad_input(packed, indices, np.int64(3), np.int32(6)), x * mask[..., None])

    def put_back(packed, indices, x):  # batch and seqlen from x.shape: SymInts when traced with dynamic shapes
        return pad_input(packed * 2, indices, x.shape[0], x.shape[1])

    compiled = torch.compile(put_back, dynamic=True, fullgraph=True, backend="aot_eager")
    for lengths, seqlen in (([4, 6, 1], 6), ([2, 7, 7, 0, 3], 7)):
        x, mask = rand(len(lengths), seqlen, 4, seed=seqlen), mask_of(lengths, seqlen)
        packed, indices, *_ = unpad_input(x, mask)
        torch.testing.assert_close(compiled(packed, indices, x), put_back(packed, indices, x), rtol=0, atol=0)
