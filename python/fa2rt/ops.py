"""The kernel path as torch.library custom ops, so torch.compile traces calls into fa2rt.

fa2rt::fwd returns a new output and is differentiable: its autograd formula calls fa2rt::bwd, the two backward
kernels (backends/kernels/bwd.py). fa2rt::fwd_out writes into the caller's out= tensor (a declared mutation; no
autograd, as torch's own out= variants).
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


def _row_axis(name: str) -> str:
    return "n" if name in ("k", "v", "dk", "dv") else "m"


def _tensor_args(tensors: dict) -> dict:
    """Pointers and (batch, row, head) strides of layout (batch, seqlen, nheads, headdim) tensors, the strides in
    units of STRIDE_MULTIPLE elements (the dispatcher checked they divide)."""
    unit, args = _C.STRIDE_MULTIPLE, {}
    for name, t in tensors.items():
        args[name.upper()] = t.data_ptr()
        args[f"stride_{name}b"], args[f"stride_{name}h"] = t.stride(0) // unit, t.stride(2) // unit
        args[f"stride_{name}{_row_axis(name)}"] = t.stride(1) // unit
    return args


def _problem_args(alibi, shapes: Shapes, device) -> dict:
    """Slopes and the scalar arguments both the forward and the backward kernels take."""
    slopes = alibi if alibi is not None else _no_slopes(device)
    stride_ab, stride_ah = _slope_strides(alibi)
    left, right = shapes.window
    return dict(ALIBI=slopes.data_ptr(), stride_ab=stride_ab, stride_ah=stride_ah, nheads=shapes.nheads,
                head_ratio=shapes.nheads // shapes.nheads_k, seqlen_q=shapes.seqlen_q, seqlen_k=shapes.seqlen_k,
                head_dim_8=shapes.head_dim // _C.HEAD_DIM_MULTIPLE,
                # "Unlimited" (-1) and over-long windows become bounds that cover every key, keeping int32 math safe.
                window_left=shapes.seqlen_k if left < 0 else min(left, shapes.seqlen_k),
                window_right=shapes.seqlen_q if right < 0 else min(right, shapes.seqlen_q),
                **_score_params(shapes.softmax_scale, shapes.softcap))


def kernel_args(q, k, v, out, lse, alibi, shapes: Shapes) -> dict:
    """The forward kernel's arguments by name (fwd_params in backends/kernels/fwd.py)."""
    return (_tensor_args({"q": q, "k": k, "v": v, "o": out}) | {"LSE": lse.data_ptr()}
            | _problem_args(alibi, shapes, q.device))


def bwd_kernel_args(tensors: dict, lse, delta, alibi, shapes: Shapes) -> dict:
    """Both backward kernels' arguments by name (bwd_params in backends/kernels/bwd.py); tensors maps
    q, k, v, o, do, dq, dk, dv to their tensors."""
    return (_tensor_args(tensors) | {"LSE": lse.data_ptr(), "DELTA": delta.data_ptr(),
                                     "sm_scale": shapes.softmax_scale}
            | _problem_args(alibi, shapes, tensors["q"].device))


def _shapes(q, k, softmax_scale, window_left, window_right, softcap, alibi) -> Shapes:
    return Shapes(batch=q.shape[0], seqlen_q=q.shape[1], seqlen_k=k.shape[1], nheads=q.shape[2],
                  nheads_k=k.shape[2], head_dim=q.shape[3], dtype=q.dtype, device=q.device,
                  softmax_scale=softmax_scale, causal=window_right == 0, window=(window_left, window_right),
                  softcap=softcap, has_alibi=alibi is not None)


def _launch(image: str, mode: str, problem, args: dict, device: torch.device) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    _C.launch(builds.current_build().registry, image, mode, index, stream, problem, args)


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
    _launch(image, mode, policy.problem_for(shapes, (q, k, v, out)), kernel_args(q, k, v, out, lse, alibi, shapes),
            q.device)
    return out, lse


def _kernel_ready(t: torch.Tensor) -> bool:
    # The layout rules the dispatcher checks (16-byte aligned base, strides in units of 8, last dim contiguous).
    return (t.stride(3) == 1 and t.data_ptr() % _C.ALIGN_BYTES == 0
            and all(t.shape[i] <= 1 or t.stride(i) % _C.STRIDE_MULTIPLE == 0 for i in (0, 1, 2)))


def run_backward(dout, q, k, v, out, lse, alibi, softmax_scale, window_left, window_right, softcap, deterministic):
    """dq, dk, dv (contiguous, in the inputs' dtype) from the backward kernels on torch's current stream; when none
    fits, an announced recomputation through the SDPA fallback. The kernels use no atomics, so their gradients are
    bitwise deterministic whatever `deterministic` says; it only restricts the fallback."""
    shapes = _shapes(q, k, softmax_scale, window_left, window_right, softcap, alibi)
    dout = dout if _kernel_ready(dout) else dout.contiguous()
    grads = {f"d{name}": torch.empty_like(t, memory_format=torch.contiguous_format)
             for name, t in (("q", q), ("k", k), ("v", v))}
    tensors = {"q": q, "k": k, "v": v, "o": out, "do": dout} | grads
    chosen = policy.select_backward(shapes, tensors.values())
    if isinstance(chosen, policy.Decision):
        policy.announce(chosen)
        return recompute_grads(dout, q, k, v, alibi, shapes, deterministic)
    delta = torch.empty_like(lse)
    args = bwd_kernel_args(tensors, lse.contiguous(), delta, alibi, shapes)
    for problem, image, mode in chosen:
        _launch(image, mode, problem, args, q.device)
    return grads["dq"], grads["dk"], grads["dv"]


def recompute_grads(dout, q, k, v, alibi, shapes: Shapes, deterministic: bool):
    """Gradients of the SDPA fallback, recomputing its forward: for backward calls no kernel takes."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        res, _ = sdpa_attention(q, k, v, causal=shapes.causal, softmax_scale=shapes.softmax_scale,
                                window_size=shapes.window, softcap=shapes.softcap, alibi_slopes=alibi,
                                deterministic=deterministic)
        return torch.autograd.grad(res, (q, k, v), dout)


@torch.library.custom_op("fa2rt::fwd", mutates_args=(), device_types="cuda")
def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None, softmax_scale: float,
        window_left: int, window_right: int, softcap: float, image: str, mode: str, deterministic: bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return run_forward(q, k, v, alibi_slopes, None, softmax_scale, window_left, window_right, softcap, image, mode)


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, image, mode, deterministic):
    return torch.empty_like(q, memory_format=torch.contiguous_format), _lse_like(q)


@torch.library.custom_op("fa2rt::bwd", mutates_args=(), device_types="cuda")
def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        alibi_slopes: torch.Tensor | None, softmax_scale: float, window_left: int, window_right: int, softcap: float,
        deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_backward(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                        deterministic)


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, _, _, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.params = (softmax_scale, window_left, window_right, softcap, deterministic)
    ctx.mark_non_differentiable(lse)  # lse is returned for inspection; no gradient flows through it


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, alibi_slopes, *ctx.params)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 8


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


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
