"""flash-attn 2.8's padding helpers (`flash_attn.bert_padding`), which code using the varlen calls imports beside them:
they move tokens between padded (batch, seqlen, ...) tensors with a mask and the packed (total, ...) tensors with
cu_seqlens that fa2rt.flash_attn.flash_attn_varlen_func (fa2rt.attention_varlen) takes.

Same names, parameters and results as flash-attn's; written with torch indexing ops, so autograd, torch.compile and
torch.use_deterministic_algorithms apply as to any torch op. Indices are checked as fa2rt checks index tensors
(DESIGN point 10): their values on the CPU or with FA2RT_CHECK_INDICES=1 (an error naming the entry); otherwise
clamped into range, so a malformed index gives wrong rows at worst, never a device fault.
"""

import numbers

import torch
import torch.nn.functional as F

from ..validate import _fail, should_check_values

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]


def _rows(name: str, indices, rows: int) -> torch.Tensor:
    """indices as an int64 vector of rows of a first axis of size `rows`: checked, or clamped (see the module)."""
    if not isinstance(indices, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor of row indices", type(indices).__name__)
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        _fail(ValueError, name, "an integer tensor of shape (n,)", f"{indices.dtype} of shape {tuple(indices.shape)}")
    if rows == 0 and indices.numel():
        _fail(ValueError, name, "no index (the first axis is empty)", f"{indices.numel()} indices")
    if should_check_values(indices) and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            where = int((indices == bad).nonzero()[0])
            _fail(IndexError, f"{name}[{where}]", f"a row in [0, {rows})", bad)
        return indices.long()
    return indices.long().clamp(0, max(rows - 1, 0))


def _check_size(name: str, value) -> None:
    # Integral covers numpy ints; SymInt the sizes torch.compile traces with dynamic shapes (x.shape[0]).
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or value < 0:
        _fail(ValueError, name, "an int >= 0", repr(value))


def _per_token(name: str, t, hidden_states) -> None:
    """t is a (batch, seqlen) tensor over hidden_states' first two dims."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor (batch, seqlen)", type(t).__name__)
    if t.dim() != 2 or tuple(t.shape) != tuple(hidden_states.shape[:2]):
        _fail(ValueError, name, f"shape {tuple(hidden_states.shape[:2])} (hidden_states' batch and seqlen)",
              f"shape {tuple(t.shape)}")


def _mask(name: str, mask, hidden_states) -> torch.Tensor:
    """A (batch, seqlen) mask as bool (nonzero: selected)."""
    _per_token(name, mask, hidden_states)
    return mask != 0


def _padded(name: str, hidden_states) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(hidden_states).__name__)
    if hidden_states.dim() < 2:
        _fail(ValueError, name, "a tensor (batch, seqlen, ...)", f"shape {tuple(hidden_states.shape)}")


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """input[indices] along the first axis: (len(indices), *input.shape[1:]); differentiable in input."""
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        _fail(ValueError, "input", "a tensor with a first axis", getattr(input, "shape", type(input).__name__))
    return input.index_select(0, _rows("indices", indices, input.shape[0]))


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """Zeros (first_axis_dim, *values.shape[1:]) with values[i] at row indices[i]; differentiable in values."""
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        _fail(ValueError, "values", "a tensor with a first axis", getattr(values, "shape", type(values).__name__))
    _check_size("first_axis_dim", first_axis_dim)
    rows = _rows("indices", indices, first_axis_dim)
    if rows.shape[0] != values.shape[0]:
        _fail(ValueError, "indices", f"shape ({values.shape[0]},) (one row index per row of values)",
              f"shape {tuple(indices.shape)}")
    return values.new_zeros(first_axis_dim, *values.shape[1:]).index_copy(0, rows, values)


def _packed(hidden_states, selected: torch.Tensor, lengths: torch.Tensor) -> tuple:
    """(the selected tokens packed, their flat indices, cu_seqlens int32, the longest length as an int)."""
    indices = selected.flatten().nonzero().flatten()
    packed = hidden_states.flatten(0, 1).index_select(0, indices)  # valid rows by construction: nothing to check
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max()) if lengths.numel() else 0
    return packed, indices, cu_seqlens, longest


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Packs the tokens of hidden_states (batch, seqlen, ...) that attention_mask (batch, seqlen; nonzero: a token)
    or unused_mask (allocated but unused tokens, kept in the packing) selects, row by row.

    Returns (tokens (total, ...), indices int64 (total,) into the flattened (batch * seqlen) positions, cu_seqlens
    int32 (batch + 1,), max_seqlen_in_batch int, seqused int32 (batch,): the attention_mask tokens per row)."""
    _padded("hidden_states", hidden_states)
    used = _mask("attention_mask", attention_mask, hidden_states)
    selected = used if unused_mask is None else used | _mask("unused_mask", unused_mask, hidden_states)
    packed, indices, cu_seqlens, longest = _packed(hidden_states, selected, selected.sum(-1, dtype=torch.int32))
    return packed, indices, cu_seqlens, longest, used.sum(-1, dtype=torch.int32)


def unpad_input_for_concatenated_sequences(hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor):
    """unpad_input for rows that each hold several sequences back to back: attention_mask_in_length (batch, seqlen)
    lists each row's sequence lengths in order (nonzero entries; zeros are ignored), the row's tokens being its first
    sum(lengths). Every sequence becomes its own entry of cu_seqlens.

    Returns (tokens (total, ...), indices int64 (total,), cu_seqlens int32 (sequences + 1,), max_seqlen_in_batch
    int)."""
    _padded("hidden_states", hidden_states)
    lengths_in_rows = attention_mask_in_length
    _per_token("attention_mask_in_length", lengths_in_rows, hidden_states)
    if lengths_in_rows.dtype.is_floating_point or lengths_in_rows.dtype == torch.bool:
        _fail(ValueError, "attention_mask_in_length", "an integer tensor of sequence lengths", lengths_in_rows.dtype)
    seqlen = hidden_states.shape[1]
    filled = lengths_in_rows.sum(-1)
    if should_check_values(lengths_in_rows) and lengths_in_rows.numel():
        if int(lengths_in_rows.min()) < 0 or int(filled.max()) > seqlen:
            _fail(ValueError, "attention_mask_in_length", f"lengths >= 0 summing to at most {seqlen} per row",
                  lengths_in_rows.tolist())
    positions = torch.arange(seqlen, device=filled.device)
    selected = positions[None, :] < filled[:, None]
    lengths = lengths_in_rows.flatten()
    packed, indices, cu_seqlens, longest = _packed(hidden_states, selected, lengths[lengths != 0].to(torch.int32))
    return packed, indices, cu_seqlens, longest


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: tokens (total, ...) put back at their flat positions `indices` of a zero
    (batch, seqlen, ...) tensor; differentiable in hidden_states."""
    _check_size("batch", batch)
    _check_size("seqlen", seqlen)
    return index_put_first_axis(hidden_states, indices, batch * seqlen).unflatten(0, (batch, seqlen))
