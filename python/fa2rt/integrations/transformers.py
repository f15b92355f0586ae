"""fa2rt as a transformers attention implementation: `register()`, then attn_implementation="fa2rt".

register() adds an attention function to transformers' AttentionInterface and a mask function to its
AttentionMaskInterface under the same name (transformers hands a custom attention function no padding information
unless a mask function is registered too). Nothing is registered on import.

Each layer call goes to fa2rt's public calls:
- no padding: fa2rt.attention (causal bottom-right aligned, so prefill and cached decode steps are both exact);
- a 2-D padding mask (left or right padding, with or without a cache): the real tokens are gathered into a varlen
  call (fa2rt.attention_varlen) and scattered back, padded query rows giving 0;
- packed sequences: from the cu_seq_lens_q/k and max_length_q/k kwargs transformers passes, or from position_ids
  that restart (a token whose position is not its predecessor's + 1 starts a sequence), as a varlen call;
- sliding-window layers as window_size=(w - 1, 0) (causal) or (w - 1, w - 1), softcap as softcap, the model's
  scaling as softmax_scale, GQA as it comes; float32 q/k/v under autocast (or in a half-precision model) are cast
  to the dtype transformers' own flash integration casts them to.
What no fa2rt call computes exactly (an arbitrary 4-D mask, attention dropout in training) runs PyTorch SDPA with the
equivalent mask (written-out attention where softcap is on), announced once per reason with a FallbackWarning.
"""

import torch
import torch.nn.functional as F

import fa2rt

from .. import policy
from ..flash_attn.bert_padding import index_first_axis, pad_input, unpad_input

DEFAULT_NAME = "fa2rt"
# AttentionMaskInterface (transformers.masking_utils) first shipped in 4.53; AttentionInterface is older.
MIN_TRANSFORMERS = "4.53.0"


def _interfaces():
    """transformers' (AttentionInterface, AttentionMaskInterface), or an error naming the version needed."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"fa2rt.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}: "
                          f"it is not installed ({err})") from err
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise RuntimeError(f"fa2rt.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} (its "
                           f"AttentionInterface and AttentionMaskInterface registries); installed: "
                           f"{getattr(transformers, '__version__', 'unknown')}") from err
    return AttentionInterface, AttentionMaskInterface


def register(name: str = DEFAULT_NAME) -> str:
    """Register fa2rt under `name` (attention function and mask function); returns the name. Idempotent; a name
    another implementation holds is refused."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    attention_interface, mask_interface = _interfaces()
    for interface, function in ((attention_interface, attention_forward), (mask_interface, padding_mask)):
        held = interface._global_mapping.get(name)
        if held is not None and held is not function:
            raise ValueError(f"name: expected a name no other attention implementation holds, got {name!r} "
                             f"(held by {getattr(held, '__module__', '?')}.{getattr(held, '__name__', held)!s})")
    attention_interface.register(name, attention_forward)
    mask_interface.register(name, padding_mask)
    return name


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The mask function: the (batch, kv_length) boolean padding mask of the keys this layer sees, or None when
    nothing is padded. Causal, sliding-window and packing structure reach the attention function as its own
    arguments (is_causal, sliding_window, position_ids, cu_seq_lens_*), not through the mask."""
    if attention_mask is None:
        return None
    # Sliding layers see only the last kv_length keys.
    mask = attention_mask[:, -kv_length:].bool()
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


# ---------------------------------------------------------------------------------------------------------------
# The attention function


def _target_dtype(query: torch.Tensor, module) -> torch.dtype | None:
    """The dtype float32 q/k/v are cast to (as transformers' flash integration does): the autocast dtype, else a
    quantized model's dtype, else the dtype of the module's first Linear weight; None when no cast applies."""
    if query.dtype != torch.float32:
        return None
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
    elif hasattr(module.config, "_is_quantized"):
        target = module.config.dtype
    else:
        linear = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
        target = linear.weight.dtype if linear is not None else None
    return None if target in (None, torch.float32) else target


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    # transformers' sliding mask lets query i see keys i - w + 1 ... i (and as far to the right when not causal).
    if sliding_window is None:
        return (-1, -1)
    left = int(sliding_window) - 1
    return (left, 0 if causal else left)


def _options(scaling, sliding_window, softcap, causal: bool, deterministic) -> dict:
    return dict(causal=causal, softmax_scale=scaling, window_size=_window(sliding_window, causal),
                softcap=float(softcap or 0.0), deterministic=bool(deterministic))


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function contract: query (batch, nheads, q_len, d), key/value (batch, nheads_k,
    kv_len, d), attention_mask from padding_mask (or a caller's 4-D mask); returns ((batch, q_len, nheads, d), None)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: expected None (fa2rt has no attention sinks), got a tensor")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    target = _target_dtype(query, module)
    if target is not None:
        q, k, v = (t.to(target) for t in (q, k, v))
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1]:
        # fa2rt takes one head dim for q, k and v: a narrower v (e.g. MLA) is padded and the output cropped.
        v = F.pad(v, [0, q.shape[-1] - v_dim])
    options = _options(scaling, sliding_window, softcap, causal, kwargs.get("deterministic"))
    out = _route(q, k, v, attention_mask, float(dropout or 0.0), options, kwargs)
    return out[..., :v_dim], None


def _route(q, k, v, attention_mask, dropout: float, options: dict, kwargs: dict):
    if attention_mask is not None and attention_mask.dim() == 4:
        return masked_fallback(q, k, v, attention_mask, dropout, options, "transformers_4d_mask",
                               "a 4-D attention mask (any pattern) is not an fa2rt call")
    segments = _segments(q, k, attention_mask, kwargs)
    if dropout > 0:
        mask = structure_mask(q.shape[0], q.shape[1], k.shape[1], options, attention_mask, segments)
        return masked_fallback(q, k, v, mask, dropout, options, "attention_dropout",
                               f"attention dropout (p={dropout}) in training: fa2rt has no dropout")
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, options)
    if segments is not None:
        return _packed(q, k, v, segments, options)
    return fa2rt.attention(q, k, v, **options)


# ---- padded batches


def _padded(q, k, v, mask: torch.Tensor, options: dict):
    batch, q_len = q.shape[:2]
    # A static cache holds more key slots than the mask covers: the mask speaks for the first mask.shape[1] keys.
    k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    mask = mask[:, -k.shape[1]:].bool()
    k, indices_k, cu_k, max_k, _ = unpad_input(k, mask)
    v = index_first_axis(v.flatten(0, 1), indices_k)
    if q_len == mask.shape[1]:  # the queries are the keys' tokens
        q, indices_q, cu_q, max_q = index_first_axis(q.flatten(0, 1), indices_k), indices_k, cu_k, max_k
    else:
        q, indices_q, cu_q, max_q, _ = unpad_input(q, mask[:, -q_len:])
    out = fa2rt.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    return pad_input(out, indices_q, batch, q_len)


# ---- packed sequences


def _segments(q, k, attention_mask, kwargs: dict):
    """Packed-sequence layout as (cu_seqlens_q, cu_seqlens_k, max_q, max_k) over the flattened batch, or None."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) for n in names]
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    # As transformers' masks: packing is read from position_ids only without a padding mask and without a cache.
    if position_ids is None or attention_mask is not None or q.shape[1] != k.shape[1]:
        return None
    return segments_from_positions(position_ids.expand(q.shape[0], -1))


def segments_from_positions(position_ids: torch.Tensor):
    """(cu_seqlens, cu_seqlens, max_len, max_len) of the sequences packed in (batch, length) position_ids, where a
    sequence starts at each row's first token and wherever a position is not its predecessor's + 1; None when every
    row holds one sequence."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    start_index = starts.flatten().nonzero().flatten()
    ends = torch.cat([start_index[1:], start_index.new_tensor([position_ids.numel()])])
    cu = F.pad(ends.to(torch.int32), (1, 0))
    longest = int((ends - start_index).max())
    return cu, cu, longest, longest


def _packed(q, k, v, segments, options: dict):
    cu_q, cu_k, max_q, max_k = segments
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    out = fa2rt.attention_varlen(*flat, cu_q, cu_k, max_q, max_k, **options)
    return out.view(q.shape)


# ---- what no fa2rt call computes: SDPA (or written-out attention for softcap) with the equivalent mask


def structure_mask(batch, q_len, kv_len, options: dict, padding=None, segments=None) -> torch.Tensor:
    """Boolean (batch, 1, q_len, kv_len) mask (True: attend) of what the fa2rt call would compute: the window with
    causal folded in, bottom-right aligned; padded keys and queries; packed sequences attending only within
    themselves (segments over the flattened batch, as _segments gives them)."""
    device = padding.device if padding is not None else (segments[0].device if segments else None)
    left, right = options["window_size"]
    right = 0 if options["causal"] else right
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    allowed = allowed.expand(batch, 1, q_len, kv_len)
    if padding is not None:
        padding = padding[:, -kv_len:].bool()
        allowed = allowed & padding[:, None, None, :] & padding[:, None, -q_len:, None]
    if segments is not None:
        ids = torch.zeros(batch * q_len, dtype=torch.int64, device=device)
        ids[segments[0][1:-1].long()] = 1
        ids = ids.cumsum(0).view(batch, q_len)
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    return allowed


def _announce(reason: str, message: str) -> None:
    policy.announce(fa2rt.Decision("fallback", reason, message))


def masked_fallback(q, k, v, mask, dropout: float, options: dict, reason: str, message: str):
    """Attention over (batch, seqlen, nheads, d) q/k/v with a 4-D mask (boolean True = attend, or additive), the
    scale and softcap in options, and dropout; rows that see no key give 0."""
    _announce(reason, message)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scale, softcap = options["softmax_scale"], options["softcap"]
    if softcap > 0:
        out = _written_out(qt, kt, vt, mask, scale, softcap, dropout)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             enable_gqa=qt.shape[1] != kt.shape[1])
    sees_key = (mask if mask.dtype == torch.bool else mask > float("-inf")).any(-1, keepdim=True)
    out = out.masked_fill(~sees_key, 0)
    return out.transpose(1, 2)


def _written_out(q, k, v, mask, scale, softcap: float, dropout: float):
    # SDPA has no softcap (tanh of the scores is no additive bias): scores, cap, mask, softmax in float32.
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return (probs.to(v.dtype) @ v)
