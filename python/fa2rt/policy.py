"""Fallback policy: which calls go to a kernel and which to SDPA, and how a fallback is announced.

The rules run in the order of RULES; the first that applies decides. Every reason has a stable code, which
explain(), the doctor and the tests read.
"""

import dataclasses
import functools
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses import FakeTensor

from . import _C, builds, config, devices, packages, routing
from .validate import Shapes

log = logging.getLogger("fa2rt")

KERNEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# Backward plans, each its kernels in launch order, in preference order; a call takes the first whose every op has an
# image for it. "ws" (sm90, dense, head dim 64/128, no score terms): bwd_prep writes delta = rowsum(dO * O) and zeroes
# an fp32 dQ accumulator, bwd_ws computes dK, dV and adds dQ into it (atomically: not deterministic), bwd_convert
# writes dQ. "fa2": bwd_dq also writes delta, which bwd_dkdv reads; no atomics, so bitwise reproducible.
BACKWARD_PLANS = {"ws": ("bwd_prep", "bwd_ws", "bwd_convert"), "fa2": ("bwd_dq", "bwd_dkdv")}
DETERMINISTIC_PLANS = ("fa2",)
CROSSOVER_FILE = Path(__file__).parent / "data" / "crossover.json"


class FallbackWarning(UserWarning):
    """A call ran on the SDPA fallback instead of an fa2rt kernel (issued once per reason)."""


@dataclass(frozen=True)
class Decision:
    path: str  # "kernel", "routed" (to an SDPA backend by the measured table), "fallback", or "trivial" (empty input)
    reason: str = ""  # stable code of the fallback reason; "" on the kernel and routed paths
    message: str = ""  # routed: the measurement behind the choice
    image: str | None = None
    mode: str | None = None  # native, binary-compat or ptx-jit
    device: dict = field(default_factory=dict)
    rejections: tuple = ()  # (image, code, message) for every candidate the dispatcher turned down
    backward: tuple = ()  # (image, mode) per op of the backward plan when the inputs require grad, on the kernel path
    copies: tuple = ()  # (tensor name, why) for each input the fallback copies so SDPA's kernels can take it
    provider: str | None = None  # routed: the SDPA backend (fa2rt.routing.PROVIDERS); image: fa2rt's, not run

    def __str__(self) -> str:
        heads = {"kernel": f"kernel {self.image} ({self.mode}) on {self.device.get('arch', '?')}",
                 "routed": f"routed to {self.provider} on {self.device.get('arch', '?')} by measurement: "
                           f"{self.message}\n  instead of fa2rt's kernel {self.image} ({self.mode})"}
        head = heads.get(self.path, f"fallback to SDPA [{self.reason}]: {self.message}")
        lines = [head] + [f"  backward {img} ({mode})" for img, mode in self.backward]
        lines += [f"  copies {name} for SDPA: {why}" for name, why in self.copies]
        lines += [f"  rejected {img or '<device>'}: {msg}" for img, _, msg in self.rejections]
        return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _crossover() -> dict:
    return json.loads(CROSSOVER_FILE.read_text())["archs"]


def short_sequence_rule(arch: str) -> dict:
    """The short-sequence threshold of an arch (min_seqlen_k: shorter seqlen_k use SDPA) and where it comes from:
    the FA2RT_MIN_SEQLEN override, the measured crossover data (with the measurement's device, date and note), or
    nothing measured (0: always the kernel)."""
    override = config.min_seqlen_override()
    if override is not None:
        return {"min_seqlen_k": override, "source": config.MIN_SEQLEN}
    entry = _crossover().get(arch)
    if entry is None:
        return {"min_seqlen_k": 0, "source": "not measured"}
    measured = entry.get("measured", {})
    return {"min_seqlen_k": int(entry["min_seqlen_k"]), "source": "measured",
            **{key: measured[key] for key in ("device", "date", "image_mode", "note") if key in measured}}


def short_sequence_threshold(arch: str) -> int:
    return short_sequence_rule(arch)["min_seqlen_k"]


def _device_dict(info) -> dict:
    return {"vendor": info.vendor, "arch": info.arch, "arch_raw": info.arch_raw, "name": info.name,
            "index": info.index}


def problem_for(shapes: Shapes, tensors, op: str = "fwd") -> "_C.Problem":
    """The dispatcher's view of a call; tensors: every (batch, seqlen, nheads, headdim) tensor the kernel touches, or
    (total, nheads, headdim) for a varlen call."""
    p = _C.Problem()
    p.op = op
    p.layout = shapes.layout
    p.dtype = KERNEL_DTYPES.get(shapes.dtype, str(shapes.dtype))
    p.batch, p.seqlen_q, p.seqlen_k = shapes.batch, shapes.seqlen_q, shapes.seqlen_k
    p.nheads, p.nheads_k, p.head_dim = shapes.nheads, shapes.nheads_k, shapes.head_dim
    p.features = [name for name, needed in (("softcap", shapes.softcap > 0), ("alibi", shapes.has_alibi)) if needed]
    p.full_band = shapes.window == (-1, -1)
    tensors = [t for t in tensors if t is not None]
    p.aligned16 = _aligned(tensors)
    # A dim of size 1 only ever multiplies its stride by 0, so its stride cannot break the assumption.
    p.strides8 = all(t.shape[i] <= 1 or t.stride(i) % _C.STRIDE_MULTIPLE == 0
                     for t in tensors for i in range(t.dim() - 1))
    p.max_head_extent = max(_head_extent(shapes, t) for t in tensors)
    p.page_size = shapes.page_size
    p.multiprocessors = devices.describe(shapes.device)[0].multiprocessors
    return p


def _head_extent(shapes: Shapes, t) -> int:
    """The largest element offset a kernel computes in int32 inside one (sequence, head) slice of t: dense rows of
    one batch entry; varlen rows of one sequence, which the kernels clamp to the longest given length (the slice's
    start is an int64 offset); the rows of one page of a paged pool (4-D, as a dense tensor's batch entry)."""
    if t.dim() == 3:
        rows = min(t.shape[0], max(shapes.seqlen_q, shapes.seqlen_k))
        return (rows - 1) * t.stride(0) + t.shape[-1]
    return (t.shape[1] - 1) * t.stride(1) + t.shape[3]


def _aligned(tensors) -> bool:
    # Fake tensors (torch.compile tracing) have no address; the run-time call checks the real ones again.
    return all(_is_fake(t) or t.data_ptr() % _C.ALIGN_BYTES == 0 for t in tensors)


def _is_fake(t) -> bool:
    return t.is_meta or isinstance(t, FakeTensor)


def layout_key(tensors) -> tuple:
    """Everything problem_for reads of the tensors (shapes, strides, whether every base pointer is aligned) as a
    hashable key: with equal Shapes, equal keys give equal Problems."""
    tensors = [t for t in tensors if t is not None]
    return tuple((t.shape, t.stride()) for t in tensors), _aligned(tensors)


def _fallback(reason: str, message: str, device=None, rejections=()) -> Decision:
    return Decision("fallback", reason, message, device=_device_dict(device) if device else {},
                    rejections=tuple(rejections))


def decide(shapes: Shapes, q, k, v, *, needs_grad: bool, out=None, slopes_need_grad: bool = False,
           deterministic: bool = False, return_lse: bool = False) -> Decision:
    """Kernel, routed or fallback for one validated call, with every reason. With needs_grad the backward kernels
    must fit too; the tensors the backward allocates itself (dO aside, copied when it breaks the layout rules) always
    do. A call the kernel path serves goes to an SDPA backend instead where the measured routing table says so
    (fa2rt.routing)."""
    if config.disabled():
        return _fallback("disabled", f"{config.DISABLE} is set")
    if shapes.trivial:
        # Not a fallback: there is nothing to attend over, and the (empty or zero) result is written directly.
        return Decision("trivial", "empty_input", "an input has a zero-size dimension")
    info, code, why = devices.describe(shapes.device)
    if code:
        return _fallback(code, why)
    if shapes.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return _fallback("dtype", f"kernels take {names}; got {str(shapes.dtype).removeprefix('torch.')}", info)
    if slopes_need_grad:
        return _fallback("alibi_grad", "alibi_slopes requires grad; the kernels treat slopes as constants", info)
    # The crossover was measured against one SDPA call on a dense batch; a varlen call's fallback runs one per
    # sequence, so packed calls always take a kernel that fits.
    threshold = short_sequence_threshold(info.arch) if shapes.layout == "dense" else 0
    if shapes.seqlen_k < threshold:
        return _fallback("short_sequence", f"seqlen_k={shapes.seqlen_k} is below the crossover {threshold} "
                         f"measured for {info.arch} (override with {config.MIN_SEQLEN})", info)
    tensors = (q, k, v, out)
    key = (shapes, layout_key(tensors), needs_grad, needs_grad and deterministic, _context_key(info))
    decision = remember(_DECISION_CACHE, key, lambda: _kernel_decision(shapes, tensors, info, needs_grad,
                                                                       deterministic))
    if decision.path != "kernel" or shapes.layout != "dense":
        return decision
    flags = (deterministic, return_lse, out is None, sdpa_flags(), config.raw_values())
    routed = remember(_ROUTE_CACHE, (key, flags), lambda: _routed(decision, shapes, tensors, info, needs_grad,
                                                                  deterministic, return_lse))
    return routed or decision


# torch._C's getters that torch.backends.cuda.{flash,cudnn,mem_efficient}_sdp_enabled wrap (those where a torch has
# none): every eager call reads them, 0.1 us against 0.5-0.8 through the wrappers.
_FLASH_ON, _CUDNN_ON, _EFFICIENT_ON = (getattr(torch._C, f"_get_{name}_sdp_enabled", None)
                                       or getattr(torch.backends.cuda, f"{name}_sdp_enabled")
                                       for name in ("flash", "cudnn", "mem_efficient"))


def sdpa_flags() -> tuple:
    # The user's torch.backends.cuda.enable_*_sdp settings: a routed backend must be one they leave enabled.
    return _FLASH_ON(), _CUDNN_ON(), _EFFICIENT_ON()


def _routed(decision: Decision, shapes: Shapes, tensors, info, needs_grad, deterministic, return_lse):
    """The routed Decision for a kernel decision the routing table overrides, else False (cached, never None)."""
    q, k, v, out = tensors
    chosen = routing.route(shapes, info.arch, (q, k, v), needs_grad=needs_grad, deterministic=deterministic,
                           return_lse=return_lse, out=out)
    if chosen is None:
        return False
    provider, message = chosen
    return dataclasses.replace(decision, path="routed", provider=provider, message=message)


def _kernel_decision(shapes: Shapes, tensors, info, needs_grad: bool, deterministic: bool) -> Decision:
    q, k, v, _ = tensors
    image, mode, rejections = _select("fwd", shapes, tensors, info)
    if image is None:
        return _fallback("no_kernel", _no_image_message(info, rejections), info, rejections)
    backward = ()
    if needs_grad:
        chosen = select_backward(shapes, (q, k, v), deterministic, info)
        if isinstance(chosen, Decision):
            return chosen
        backward = tuple((image, mode) for _, image, mode in chosen)
    return Decision("kernel", image=image, mode=mode, device=_device_dict(info),
                    rejections=tuple(rejections), backward=backward)


# Selection is a pure function of the problem, the device, the build and FA2RT_FORCE_ARCH, and checking every image
# of the build costs more host time than a short kernel runs: training loops repeat the same few problems, so the
# answers are kept (bounded; cleared when full). Per call, decisions are looked up by a key of what the Problem is
# computed from (Shapes and layout_key), so a cached answer is reused only where the checks would give it again.
_SELECTION_CACHE: dict = {}
_DECISION_CACHE: dict = {}
_BACKWARD_CACHE: dict = {}
_ROUTE_CACHE: dict = {}
SELECTION_CACHE_SIZE = 1024


def remember(cache: dict, key, compute):
    """cache[key], computed on first use (never None); a full cache is cleared first, keeping memory bounded."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= SELECTION_CACHE_SIZE:
            cache.clear()
        value = cache[key] = compute()
    return value


def environment_key(device) -> tuple:
    """What a cached call or backward plan must be re-decided for: every fa2rt environment variable as set now (the
    build, FA2RT_FORCE_ARCH, the threshold, the off switch) and the device's description."""
    return config.raw_values(), devices.describe(device)


def _context_key(info) -> tuple:
    """What selection depends on besides the problem: the device, FA2RT_FORCE_ARCH and the build."""
    return info.vendor, info.index, info.arch, config.force_arch(), id(builds.current_build())


def _problem_key(p: "_C.Problem") -> tuple:
    return (p.op, p.layout, p.dtype, p.batch, p.seqlen_q, p.seqlen_k, p.nheads, p.nheads_k, p.head_dim,
            tuple(p.features), p.full_band, p.aligned16, p.strides8, p.max_head_extent, p.page_size)


def _select(op: str, shapes: Shapes, tensors, info) -> tuple:
    """(image or None, mode, rejections as (image, code, message)) for one op."""
    problem = problem_for(shapes, tensors, op)
    key = (_problem_key(problem), _context_key(info))
    return remember(_SELECTION_CACHE, key, lambda: _run_select(problem, info))


def _run_select(problem: "_C.Problem", info) -> tuple:
    sel = _C.select(problem, info, builds.current_build().registry, config.force_arch())
    return sel["image"], sel["mode"], [(r.image, r.code, r.message) for r in sel["rejections"]]


def select_backward(shapes: Shapes, tensors, deterministic: bool = False, info=None):
    """((op, image, mode) per op of the first BACKWARD_PLANS plan that serves the call, in launch order), or the
    fallback Decision saying why none does; tensors: the inputs' (batch, seqlen, nheads, headdim) tensors the
    backward reads (the buffers it allocates always fit). deterministic: only DETERMINISTIC_PLANS."""
    if config.disabled():  # also for a forward that ran before it was set, or elsewhere (attention_backward)
        return _fallback("disabled", f"{config.DISABLE} is set")
    if info is None:
        info, code, why = devices.describe(shapes.device)
        if code:
            return _fallback(code, why)
    tensors = tuple(tensors)
    key = (shapes, layout_key(tensors), bool(deterministic), _context_key(info))
    return remember(_BACKWARD_CACHE, key, lambda: _select_backward(shapes, tensors, deterministic, info))


def _select_backward(shapes: Shapes, tensors, deterministic: bool, info):
    plans = [plan for name, plan in BACKWARD_PLANS.items() if not deterministic or name in DETERMINISTIC_PLANS]
    for plan in plans:
        chosen = []
        for op in plan:
            image, mode, rejections = _select(op, shapes, tensors, info)
            if image is None:
                break
            chosen.append((op, image, mode))
        else:
            return tuple(chosen)
    # Why the last plan (the one with the widest reach) takes no call like this one.
    return _fallback("no_backward_kernel", f"{op}: {_no_image_message(info, rejections)}", info, rejections)


def _no_image_message(info, rejections) -> str:
    """Why no image serves a call: the build's error or the rejections, and, when no installed image is of an arch
    the device runs, which kernel package would serve it."""
    build = builds.current_build()
    why = build.error or _summarise(rejections)
    missing = packages.missing(info, build, builds.core_version())
    return f"{why}; {missing['text']}" if missing else why


def _summarise(rejections) -> str:
    """The most specific reasons: a device-level reason, else those of the images that passed the most checks
    (codes are ordered as the checks run, so a later code means the image matched on everything before)."""
    device_level = [msg for img, _, msg in rejections if not img]
    if device_level:
        return "; ".join(device_level)
    order = _C.reject_codes()
    furthest = max(order.index(code) for _, code, _ in rejections)
    distinct = sorted({msg for _, code, msg in rejections if order.index(code) == furthest})
    more = f" (+{len(distinct) - 4} more)" if len(distinct) > 4 else ""
    return "no image fits: " + "; ".join(distinct[:4]) + more


_announced: set[str] = set()


def announce(decision: Decision) -> None:
    """Warn once per reason code that a fallback ran; log every time at debug level."""
    log.debug("fa2rt fallback [%s]: %s", decision.reason, decision.message)
    if decision.reason in _announced:
        return
    _announced.add(decision.reason)
    warnings.warn(f"fa2rt: running PyTorch SDPA instead of an fa2rt kernel [{decision.reason}]: "
                  f"{decision.message} (fa2rt.explain(...) tells this for any call)", FallbackWarning, stacklevel=3)
