"""Measured routing (DESIGN point 13): a problem class in which an SDPA backend with exactly fa2rt's semantics was
measured faster than fa2rt's own image, on the arch's own hardware, runs on that backend.

The table, data/routing.json, is written by `python -m fa2rt.bench --routing --write-routing PATH`: per arch, the
measurement's environment and, per problem class, the time of fa2rt's image and of each SDPA backend, the winner,
its lead and the measurement's noise. A call is routed when all of these hold:
- it is an eager dense call whose semantics SDPA reproduces exactly (routable() below: no window beyond causal, causal
  only with seqlen_q == seqlen_k where SDPA's top-left alignment is fa2rt's bottom-right one, no softcap or ALiBi, no
  LSE asked, no out=, a positive scale, layouts SDPA's fused kernels take as they are);
- its class (pass, dtype, head dim, causal, GQA group, seqlen band) is in the table for the device's arch, and the
  winner there is an SDPA backend leading fa2rt by more than the measurement's noise (fastest timing rounds
  compared: the lead is larger than 1 + the relative spread of fa2rt's rounds);
- with deterministic gradients asked, the backend's backward is deterministic (none of SDPA's fused ones is);
- torch says the backend takes these tensors (its own checks, and the user's torch.backends.cuda.enable_*_sdp).
FA2RT_ROUTING=0 turns routing off. torch.compile graphs run fa2rt's own ops (the choice needs the device, which a
trace does not query).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import config

ROUTING_FILE = Path(__file__).parent / "data" / "routing.json"
SCHEMA = 1
# The SDPA backends a class may be routed to, by the name the benchmark and the table use.
PROVIDERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
# Providers whose backward is bitwise reproducible: flash and memory-efficient accumulate dQ with atomics, and cuDNN
# is refused by torch itself under deterministic algorithms. fa2rt's kernels always are.
DETERMINISTIC_BACKWARD: frozenset = frozenset()
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def sdpa_backend(provider: str):
    """torch's SDPBackend of a provider name (PROVIDERS)."""
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[provider]


def _can_use(provider: str):
    cuda = torch.backends.cuda
    return {"sdpa_flash": cuda.can_use_flash_attention, "sdpa_cudnn": cuda.can_use_cudnn_attention,
            "sdpa_efficient": cuda.can_use_efficient_attention}[provider]


def seqlen_band(seqlen: int) -> list[int]:
    """The power-of-two band [lo, 2 lo) holding seqlen: a class is measured at its band's lower end."""
    lo = 1 << (max(1, seqlen).bit_length() - 1)
    return [lo, 2 * lo]


def class_key(pass_name: str, dtype: str, head_dim: int, causal: bool, group: int, seqlen: int) -> tuple:
    """The problem class of a square (seqlen_q == seqlen_k) call: pass ("fwd" without gradients, "fwd+bwd" with),
    dtype name, exact head dim, causal, GQA group (nheads // nheads_k; 1 is MHA), the seqlen band's lower end."""
    return pass_name, dtype, int(head_dim), bool(causal), int(group), seqlen_band(seqlen)[0]


def describe_class(key: tuple) -> str:
    pass_name, dtype, head_dim, causal, group, lo = key
    heads = "MHA" if group == 1 else f"GQA group {group}"
    return (f"{pass_name} {dtype} d{head_dim} {'causal' if causal else 'non-causal'} {heads} "
            f"seqlen {lo}-{2 * lo - 1}")


def routable(shapes, *, return_lse: bool, out) -> str:
    """Why SDPA cannot reproduce this call exactly ("" when it can)."""
    rules = (
        (shapes.layout != "dense", "a varlen or paged call"),
        (shapes.dtype not in DTYPE_NAMES, "a dtype the table does not hold"),
        (shapes.window not in ((-1, -1), (-1, 0)), "a window beyond causal"),
        (shapes.window == (-1, 0) and shapes.seqlen_q != shapes.seqlen_k,
         "causal with seqlen_q != seqlen_k (SDPA's fused causal is top-left aligned)"),
        (shapes.softcap > 0, "softcap"),
        (shapes.has_alibi, "ALiBi"),
        (return_lse, "the LSE asked for"),
        (out is not None, "out= given"),
        (not shapes.softmax_scale > 0, "a scale that is not positive"),
    )
    return next((why for failed, why in rules if failed), "")


def call_class(shapes, needs_grad: bool) -> tuple | None:
    """The class of a routable call, None when it is not square (the table measures seqlen_q == seqlen_k)."""
    if shapes.seqlen_q != shapes.seqlen_k or shapes.nheads % shapes.nheads_k:
        return None
    return class_key("fwd+bwd" if needs_grad else "fwd", DTYPE_NAMES[shapes.dtype], shapes.head_dim,
                     shapes.window == (-1, 0), shapes.nheads // shapes.nheads_k, shapes.seqlen_k)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    if data.get("schema_version") != SCHEMA:
        raise ValueError(f"{p}: schema_version: expected {SCHEMA}, got {data.get('schema_version')!r}")
    return {arch: _index(entry) for arch, entry in data.get("archs", {}).items()}


def _index(entry: dict) -> dict:
    classes = {}
    for c in entry.get("classes", ()):
        k = c["class"]
        classes[class_key(k["pass"], k["dtype"], k["head_dim"], k["causal"], k["group"], k["seqlen_lo"])] = c
    return {"measured": entry.get("measured", {}), "classes": classes}


def table(arch: str) -> dict | None:
    """{"measured": environment of the measurement, "classes": {class key: entry}} for arch, or None."""
    return _load(str(ROUTING_FILE)).get(arch)


def summary(arch: str) -> dict:
    """The routing an arch gets, for reports: on or off, and what the table holds for it (and where it was
    measured)."""
    data = table(arch)
    enabled = config.routing_enabled()
    if data is None:
        return {"enabled": enabled, "source": "not measured", "classes": 0, "routed": 0}
    m = data["measured"]
    return {"enabled": enabled, "source": "measured", "classes": len(data["classes"]),
            "routed": sum(map(leads, data["classes"].values())),
            **{key: m[key] for key in ("device", "date", "torch", "cudnn") if key in m}}


def leads(entry: dict) -> bool:
    """Whether a measured class goes to its winner: an SDPA backend ahead of fa2rt by more than the measurement's
    noise (fastest rounds compared, lead > 1 + the spread of fa2rt's rounds)."""
    return entry["winner"] in PROVIDERS and entry["lead"] > 1.0 + entry["noise"]


def route(shapes, arch: str, tensors, *, needs_grad: bool, deterministic: bool, return_lse: bool, out):
    """(provider, the measurement as one line) when this call is routed, else None (see the module's rules)."""
    if not config.routing_enabled() or routable(shapes, return_lse=return_lse, out=out):
        return None
    key = call_class(shapes, needs_grad)
    data = table(arch)
    entry = None if key is None or data is None else data["classes"].get(key)
    if entry is None or not leads(entry):
        return None
    provider = entry["winner"]
    if needs_grad and deterministic and provider not in DETERMINISTIC_BACKWARD:
        return None
    if not _takes(provider, *tensors):
        return None
    return provider, measurement_text(key, entry, data["measured"])


def measurement_text(key: tuple, entry: dict, measured: dict) -> str:
    ms, shape, winner = entry["ms"], entry["shape"], entry["winner"]
    return (f"{describe_class(key)}: {winner} {ms[winner]:.3f} ms vs fa2rt {ms['fa2rt']:.3f} ms ({entry['lead']:.2f}x, "
            f"fastest rounds; noise {entry['noise']:.1%}) at batch {shape['batch']}, "
            f"{shape['nheads']}/{shape['nheads_k']} heads, seqlen {shape['seqlen']} on {measured.get('device', '?')}, "
            f"torch {measured.get('torch', '?')}, cuDNN {measured.get('cudnn', '?')}, "
            f"{str(entry.get('date', measured.get('date', '?')))[:10]} ({config.ROUTING}=0 turns routing off)")


def _takes(provider: str, q, k, v) -> bool:
    """Whether SDPA's backend runs these tensors as they are: torch's own check of the backend (with the user's
    enable flags), and strides its vectorised loads take (fa2rt.fallback.sdpa_layout_problem)."""
    from .fallback import sdpa_layout_problem

    if any(sdpa_layout_problem(t) for t in (q, k, v)) or not q.is_cuda:
        return False
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    params = torch.backends.cuda.SDPAParams(qt, kt, vt, None, 0.0, False, q.shape[2] != k.shape[2])
    return bool(_can_use(provider)(params, False))


@dataclass(frozen=True)
class RoutedCall:
    """A remembered routed call (fa2rt.calls): a repeated eager call with the same key runs the backend directly."""

    provider: str
    causal: bool
    softmax_scale: float

    def current(self) -> bool:
        return True  # the table and the backend check depend only on what the call's key holds

    def run(self, q, k, v):
        return run(self.provider, q, k, v, causal=self.causal, softmax_scale=self.softmax_scale)


class _GradLikeOutput(torch.autograd.Function):
    """Identity whose backward hands SDPA's backward a gradient laid out as the output it produced: cuDNN's backward
    gave wrong gradients for a grad_out whose strides differ from its output's (H200, torch 2.11)."""

    @staticmethod
    def forward(ctx, x):
        ctx.layout = x.shape, x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, stride = ctx.layout
        if grad.stride() == stride:
            return grad
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


# The backends' own ops, which F.scaled_dot_product_attention calls once it has chosen one: a routed call has chosen
# (and _takes asked torch whether the backend runs the tensors), and the sdpa_kernel context that would make SDPA
# choose it costs more host time than a short call's kernels (H200, b32 s512 d128: this runner's forward took 81 us of
# host time inside sdpa_kernel, 39 us calling the op, SDPA's own call 25-31 us).
# Each returns out first; lse is computed when a gradient will be asked (SDPA's own rule). GQA: flash and cuDNN read
# K/V with fewer heads as they are; the efficient backend has no GQA (torch refuses it, so it is never routed one).
_OPS = {
    "sdpa_flash": lambda q, k, v, causal, scale, lse: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale),
    "sdpa_cudnn": lambda q, k, v, causal, scale, lse: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, lse, 0.0, causal, False, scale=scale),
    "sdpa_efficient": lambda q, k, v, causal, scale, lse: torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, lse, 0.0, causal, scale=scale),
}


def run(provider: str, q, k, v, *, causal: bool, softmax_scale: float):
    """attention(q, k, v) on one SDPA backend: (batch, seqlen, nheads, headdim) in and out, differentiable. GPU
    tensors go to the backend's op directly; others through SDPA restricted to that backend (its CPU flash)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda:
        lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        out = _OPS[provider](qt, kt, vt, causal, softmax_scale, lse)[0]
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend(provider)):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale,
                                                 enable_gqa=q.shape[2] != k.shape[2])
    if out.requires_grad:
        out = _GradLikeOutput.apply(out)
    # fa2rt returns a contiguous output; a backend that wrote (batch, nheads, seqlen, headdim) is copied to it.
    return out.transpose(1, 2).contiguous()
