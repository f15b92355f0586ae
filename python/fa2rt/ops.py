"""The kernel path as torch.library custom ops, so torch.compile traces calls into fa2rt.

fa2rt::fwd returns a new output; fa2rt::fwd_out writes into the caller's out= tensor (a declared mutation).
"""

import math

import torch

from . import _C, builds, policy
from .fallback import sdpa_attention
from .validate import Shapes

LOG2E = 1.0 / math.log(2.0)
_zero_slopes: dict[torch.device, torch.Tensor] = {}


def _no_slopes(device: torch.device) -> torch.Tensor:
    # Images with softcap also carry ALiBi; a call without slopes reads slope 0 from this one-element tensor.
    if device not in _zero_slopes:
        _zero_slopes[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _zero_slopes[device]


def _score_params(softmax_scale: float, softcap: float) -> dict:
    # With softcap the kernel computes softcap * tanh(qk * softcap_in) and qk_scale_log2 carries softcap * log2(e).
    if softcap > 0:
        return {"qk_scale_log2": softcap * LOG2E, "softcap_in": softmax_scale / softcap}
    return {"qk_scale_log2": softmax_scale * LOG2E, "softcap_in": 0.0}


def _slope_strides(alibi) -> tuple[int, int]:
    # Slopes are (nheads,) or (batch, nheads); 1-D slopes repeat over the batch, the shared zero over everything.
    if alibi is None:
        return 0, 0
    return (alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0))


def kernel_args(q, k, v, out, lse, alibi, shapes: Shapes) -> dict:
    """The kernel's arguments by name (fwd_params in backends/kernels/fwd.py)."""
    slopes = alibi if alibi is not None else _no_slopes(q.device)
    args = {"Q": q.data_ptr(), "K": k.data_ptr(), "V": v.data_ptr(), "O": out.data_ptr(), "LSE": lse.data_ptr(),
            "ALIBI": slopes.data_ptr()}
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        # Layout (batch, seqlen, nheads, headdim): batch, head and row strides, in units of STRIDE_MULTIPLE elements
        # (the dispatcher checked they divide).
        unit = _C.STRIDE_MULTIPLE
        args[f"stride_{name}b"], args[f"stride_{name}h"] = t.stride(0) // unit, t.stride(2) // unit
        args[f"stride_{name}{'m' if name in 'qo' else 'n'}"] = t.stride(1) // unit
    args["stride_ab"], args["stride_ah"] = _slope_strides(alibi)
    left, right = shapes.window
    args.update(nheads=shapes.nheads, head_ratio=shapes.nheads // shapes.nheads_k, seqlen_q=shapes.seqlen_q,
                seqlen_k=shapes.seqlen_k, head_dim_8=shapes.head_dim // _C.HEAD_DIM_MULTIPLE,
                # "Unlimited" (-1) and over-long windows become bounds that cover every key, keeping int32 math safe.
                window_left=shapes.seqlen_k if left < 0 else min(left, shapes.seqlen_k),
                window_right=shapes.seqlen_q if right < 0 else min(right, shapes.seqlen_q),
                **_score_params(shapes.softmax_scale, shapes.softcap))
    return args


def _shapes(q, k, softmax_scale, window_left, window_right, softcap, alibi) -> Shapes:
    return Shapes(batch=q.shape[0], seqlen_q=q.shape[1], seqlen_k=k.shape[1], nheads=q.shape[2],
                  nheads_k=k.shape[2], head_dim=q.shape[3], dtype=q.dtype, device=q.device,
                  softmax_scale=softmax_scale, causal=window_right == 0, window=(window_left, window_right),
                  softcap=softcap, has_alibi=alibi is not None)


def run_forward(q, k, v, alibi, out, softmax_scale, window_left, window_right, softcap, image, mode):
    """Launch `image` on torch's current stream, writing into `out` (allocated when None). Returns (out, lse).

    An empty image name (calls traced by torch.compile) selects here, on the real tensors, and runs the announced
    SDPA fallback when no image fits."""
    shapes = _shapes(q, k, softmax_scale, window_left, window_right, softcap, alibi)
    if not image:
        decision = policy.decide(shapes, q, k, v, needs_grad=False, out=out)
        if decision.path != "kernel":
            if decision.path == "fallback":
                policy.announce(decision)
            # window_right == 0 is exactly causal; saying so lets the fallback take SDPA's causal kernels.
            res, lse = sdpa_attention(q, k, v, causal=window_right == 0, softmax_scale=softmax_scale,
                                      window_size=(window_left, window_right), softcap=softcap,
                                      alibi_slopes=alibi, return_lse=True)
            return (res if out is None else out.copy_(res)), lse
        image, mode = decision.image, decision.mode
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((shapes.batch, shapes.nheads, shapes.seqlen_q), dtype=torch.float32, device=q.device)
    problem = policy.problem_for(shapes, q, k, v, out)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(q.device).cuda_stream
    _C.launch(builds.current_build().registry, image, mode, index, stream, problem,
              kernel_args(q, k, v, out, lse, alibi, shapes))
    return out, lse


@torch.library.custom_op("fa2rt::fwd", mutates_args=(), device_types="cuda")
def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None, softmax_scale: float,
        window_left: int, window_right: int, softcap: float, image: str, mode: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return run_forward(q, k, v, alibi_slopes, None, softmax_scale, window_left, window_right, softcap, image, mode)


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, image, mode):
    return torch.empty_like(q, memory_format=torch.contiguous_format), _lse_like(q)


@torch.library.custom_op("fa2rt::fwd_out", mutates_args=("out",), device_types="cuda")
def fwd_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None,
            out: torch.Tensor, softmax_scale: float, window_left: int, window_right: int, softcap: float, image: str,
            mode: str) -> torch.Tensor:
    return run_forward(q, k, v, alibi_slopes, out, softmax_scale, window_left, window_right, softcap, image,
                       mode)[1]


@fwd_out.register_fake
def _fwd_out_fake(q, k, v, alibi_slopes, out, softmax_scale, window_left, window_right, softcap, image, mode):
    return _lse_like(q)


def _lse_like(q):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
