"""The kernel path as a torch.library custom op, so torch.compile traces calls into fa2rt."""

import math

import torch

from . import _C, builds, policy
from .fallback import sdpa_attention
from .validate import Shapes

LOG2E = 1.0 / math.log(2.0)


def _kernel_args(q, k, v, out, lse, shapes: Shapes) -> dict:
    args = {"Q": q.data_ptr(), "K": k.data_ptr(), "V": v.data_ptr(), "O": out.data_ptr(), "LSE": lse.data_ptr()}
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        # Layout (batch, seqlen, nheads, headdim): the kernel takes batch, head and row strides.
        args[f"stride_{name}b"], args[f"stride_{name}h"] = t.stride(0), t.stride(2)
        args[f"stride_{name}{'m' if name in 'qo' else 'n'}"] = t.stride(1)
    args.update(nheads=shapes.nheads, head_ratio=shapes.nheads // shapes.nheads_k, seqlen_q=shapes.seqlen_q,
                seqlen_k=shapes.seqlen_k, head_dim=shapes.head_dim, qk_scale_log2=shapes.softmax_scale * LOG2E)
    return args


def run_forward(q, k, v, causal: bool, softmax_scale: float, image: str, mode: str) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Launch `image` on torch's current stream. An empty image name (calls traced by torch.compile) selects
    here, on the real tensors, and runs the announced SDPA fallback when no image fits."""
    shapes = Shapes(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device,
                    softmax_scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((shapes.batch, shapes.nheads, shapes.seqlen_q), dtype=torch.float32, device=q.device)
    problem = policy.problem_for(shapes, q, k, v, out)
    problem.causal = causal
    if not image:
        decision = policy.decide(shapes, q, k, v, causal=causal, needs_grad=False)
        if decision.path != "kernel":
            policy.announce(decision)
            return sdpa_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
        image, mode = decision.image, decision.mode
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(q.device).cuda_stream
    _C.launch(builds.current_build().registry, image, mode, index, stream, problem,
              _kernel_args(q, k, v, out, lse, shapes))
    return out, lse


@torch.library.custom_op("fa2rt::fwd", mutates_args=(), device_types="cuda")
def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float, image: str,
        mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return run_forward(q, k, v, causal, softmax_scale, image, mode)


@fwd.register_fake
def _fwd_fake(q, k, v, causal, softmax_scale, image, mode):
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse
