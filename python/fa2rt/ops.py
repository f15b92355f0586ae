"""The kernel path: launches of the kernel images, as torch.library custom ops (so torch.compile traces calls into
fa2rt) and, for eager calls, directly.

fa2rt::fwd returns a new output and is differentiable: its autograd formula calls fa2rt::bwd, the kernels of a
backward plan (policy.BACKWARD_PLANS: backends/kernels/bwd.py, bwd_ws.py). fa2rt::fwd_out writes into the caller's
out= tensor (a declared mutation; no autograd, as torch's own out= variants). Eager calls run the same EagerCall
launches through run_eager, without the custom ops' dispatch (at short sequences it cost more host time than the
kernels run); the custom ops' bodies find the EagerCall an earlier run of the same key resolved (calls.find_op).

Launches go through launch plans (_C.LaunchPlan), built once per image and call geometry: per call only the
tensors' addresses and the stream change.
"""

import dataclasses
import functools
import math
import operator

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _C, builds, calls, policy
from .fallback import gather_pages, sdpa_attention, sdpa_varlen_attention
from .validate import VARLEN_LAYOUTS, Shapes, check_varlen_paged_values, check_varlen_values

LOG2E = 1.0 / math.log(2.0)
INT32_MAX = 2**31 - 1
_zero_slopes: dict[torch.device, torch.Tensor] = {}


def _no_slopes(device: torch.device) -> torch.Tensor:
    # Images with softcap also carry ALiBi; a call without slopes reads slope 0 from this one-element tensor.
    if device not in _zero_slopes:
        _zero_slopes[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _zero_slopes[device]


def _slopes(alibi, device) -> torch.Tensor:
    return alibi if alibi is not None else _no_slopes(device)


# A forward always writes its LSE. Where the caller takes none (an inference call without return_lse) and it fits,
# the kernel writes it here instead of into a fresh allocation: one allocation less per call, which at short sequences
# is host time (~1-2 us). Kept per device for the process (1 MiB), never freed, so no kernel still writing into it on
# some stream can ever meet memory handed out again; concurrent writes are harmless, nothing reads it.
LSE_SINK_FLOATS = 1 << 18
_lse_sinks: dict[torch.device, torch.Tensor] = {}


def _lse_sink(device: torch.device) -> torch.Tensor:
    if device not in _lse_sinks:
        _lse_sinks[device] = torch.empty(LSE_SINK_FLOATS, dtype=torch.float32, device=device)
    return _lse_sinks[device]


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


# --- kernel arguments by name (fwd_params in backends/kernels/fwd.py, bwd_params in bwd.py) ---------------------------

def _stride_args(tensors: dict) -> dict:
    """(batch, row, head) strides of layout (batch, seqlen, nheads, headdim) tensors, in units of STRIDE_MULTIPLE
    elements (the dispatcher checked they divide). Packed (total, nheads, headdim) tensors have batch stride 0: the
    kernels find each sequence's first row from cu_seqlens."""
    unit, args = _C.STRIDE_MULTIPLE, {}
    for name, t in tensors.items():
        if t.dim() == 3:
            batch, (row, head) = 0, t.stride()[:2]
        else:
            batch, row, head = t.stride()[:3]
        args[f"stride_{name}b"], args[f"stride_{name}h"] = batch // unit, head // unit
        args[f"stride_{name}{_row_axis(name)}"] = row // unit
    return args


def _scalar_args(alibi, shapes: Shapes) -> dict:
    """The slope strides and scalar arguments both the forward and the backward kernels take."""
    stride_ab, stride_ah = _slope_strides(alibi)
    left, right = shapes.window
    args = dict(stride_ab=stride_ab, stride_ah=stride_ah, nheads=shapes.nheads,
                head_ratio=shapes.nheads // shapes.nheads_k, seqlen_q=shapes.seqlen_q, seqlen_k=shapes.seqlen_k,
                head_dim_8=shapes.head_dim // _C.HEAD_DIM_MULTIPLE,
                # "Unlimited" (-1) and over-long windows become bounds that cover every key, keeping int32 math safe.
                # (Varlen: seqlen_q/_k are the longest sequences', so the bounds cover every sequence.)
                window_left=shapes.seqlen_k if left < 0 else min(left, shapes.seqlen_k),
                window_right=shapes.seqlen_q if right < 0 else min(right, shapes.seqlen_q),
                **_score_params(shapes.softmax_scale, shapes.softcap))
    if shapes.layout == "varlen":
        args |= {"total_q": shapes.total_q, "total_k": shapes.total_k}
    elif shapes.layout == "varlen_paged":
        # No packed K rows to stay inside: only cu_seqlens_k's differences count (fwd.PAGED_PARAMS).
        args |= {"total_q": shapes.total_q, "total_k": INT32_MAX, "stride_bt": shapes.block_stride,
                 "page_size": shapes.page_size, "pool_blocks": shapes.total_k // shapes.page_size,
                 "max_blocks": shapes.max_blocks}
    return args


def _problem_args(alibi, shapes: Shapes, device) -> dict:
    """Slopes and the scalar arguments both the forward and the backward kernels take."""
    return {"ALIBI": _slopes(alibi, device).data_ptr()} | _scalar_args(alibi, shapes)


def _pointers(tensors: dict, buffers: dict, alibi) -> dict:
    """Every pointer argument by name: the (batch, seqlen, nheads, headdim) tensors, the buffers (LSE, ...) and the
    slopes."""
    return ({name.upper(): t for name, t in tensors.items()} | buffers
            | {"ALIBI": _slopes(alibi, tensors["q"].device)})


def _fwd_constants(tensors: dict, alibi, shapes: Shapes) -> dict:
    """The forward kernel's arguments other than pointers."""
    return _stride_args(tensors) | _scalar_args(alibi, shapes)


# The scalars the warp-specialised forward takes (fwd_ws.SCALARS in backends/kernels/fwd_ws.py), besides batch.
_WS_SCALARS = ("seqlen_q", "seqlen_k", "window_left", "window_right", "nheads", "head_ratio", "qk_scale_log2")


def _tma_strides(t: torch.Tensor) -> list[int]:
    """t's strides for a TMA descriptor, which the driver requires to be 16-byte multiples on every dim: a dim of
    size 1 never moves, so its stride (which the dispatcher does not check) becomes one unit when it is not one."""
    unit = _C.STRIDE_MULTIPLE
    return [s if size > 1 or s % unit == 0 else unit for size, s in zip(t.shape, t.stride(), strict=True)]


def _map_fields(param: str, shape, strides) -> dict:
    """A tensor map's shape and strides arguments (elements, outermost dim first), as Triton passes them."""
    args = {}
    for i, (size, stride) in enumerate(zip(shape, strides, strict=True)):
        args[f"{param}.shape{i}"], args[f"{param}.stride{i}"] = size, stride
    return args


def _map_args(tensors: dict) -> dict:
    """The shape and strides arguments of a map of each (batch, seqlen, nheads, headdim) tensor."""
    args = {}
    for name, t in tensors.items():
        args |= _map_fields(name.upper(), t.shape, _tma_strides(t))
    return args


def _fwd_ws_constants(tensors: dict, alibi, shapes: Shapes) -> dict:
    """The warp-specialised forward's arguments other than pointers (fwd_ws.params): the maps' shapes and strides,
    the scalars, batch."""
    scalars = _scalar_args(alibi, shapes)
    return _map_args(tensors) | {name: scalars[name] for name in _WS_SCALARS} | {"batch": shapes.batch}


# Per kernel family (the manifest's "family"): the forward's arguments other than pointers, and whether it takes the
# ALiBi slopes (the warp-specialised kernel has no score terms).
FWD_FAMILIES = {"triton": (_fwd_constants, True), "gluon_ws": (_fwd_ws_constants, False)}


def _bwd_constants(tensors: dict, alibi, shapes: Shapes) -> dict:
    """The backward kernels' arguments other than pointers."""
    return _stride_args(tensors) | {"sm_scale": shapes.softmax_scale} | _scalar_args(alibi, shapes)


def _acc_rows(seqlen_q: int) -> int:
    """The row length of bwd_ws's fp32 dQ accumulator: seqlen_q rounded up to 4 elements, as TMA needs every stride
    but the innermost in multiples of 16 bytes."""
    return -(-seqlen_q // 4) * 4


def _accumulator_shape(shapes: Shapes) -> tuple:
    return shapes.batch, shapes.nheads, shapes.head_dim, _acc_rows(shapes.seqlen_q)


def _dq_accumulator(shapes: Shapes) -> torch.Tensor:
    """The accumulator bwd_ws adds dQ^T into: (batch, nheads, head_dim, seqlen_q), rows _acc_rows apart. Left
    uninitialised: bwd_prep zeroes it."""
    return torch.empty(*_accumulator_shape(shapes), dtype=torch.float32, device=shapes.device)


# Where the dQ accumulator starts in a backward's fp32 scratch, after delta: a multiple of 64 floats (256 bytes), as
# torch's allocator aligns its blocks, so the accumulator's TMA base is as aligned as a tensor of its own.
_SCRATCH_ALIGN = 64


def _scratch_layout(lse_shape: tuple, shapes: Shapes, accumulator: bool) -> tuple[int, int]:
    """(floats, offset of the accumulator) of the one fp32 buffer a backward call allocates for delta (laid out as
    lse) and, for bwd_ws, the dQ accumulator after it: one allocation instead of two."""
    delta = math.prod(lse_shape)
    if not accumulator:
        return delta, 0
    offset = -(-delta // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    return offset + math.prod(_accumulator_shape(shapes)), offset


def _aux_constants(tensors: dict, alibi, shapes: Shapes) -> dict:
    """bwd_prep's and bwd_convert's arguments other than pointers (bwd.aux_params)."""
    return _stride_args(tensors) | {"nheads": shapes.nheads, "seqlen_q": shapes.seqlen_q,
                                    "acc_rows": _acc_rows(shapes.seqlen_q)}


# The scalars the warp-specialised backward takes (bwd_ws.SCALARS), from _scalar_args and sm_scale.
_WS_BWD_SCALARS = ("seqlen_q", "seqlen_k", "window_left", "window_right", "nheads", "head_ratio", "qk_scale_log2")


def _bwd_ws_constants(tensors: dict, alibi, shapes: Shapes) -> dict:
    """bwd_ws's arguments other than pointers (bwd_ws.params): the maps of the tensors and of the accumulator (the
    first seqlen_q of each row: TMA clips the reduce there), the scalars."""
    rows = _acc_rows(shapes.seqlen_q)
    acc = _map_fields("DQACC", (shapes.batch, shapes.nheads, shapes.head_dim, shapes.seqlen_q),
                      (shapes.nheads * shapes.head_dim * rows, shapes.head_dim * rows, rows, 1))
    scalars = _scalar_args(alibi, shapes)
    return (_map_args(tensors) | acc | {name: scalars[name] for name in _WS_BWD_SCALARS}
            | {"sm_scale": shapes.softmax_scale})


_GRAD_TENSORS = ("q", "k", "v", "o", "do", "dq", "dk", "dv")
_AUX_ARGS = (("o", "do", "dq"), ("DELTA", "DQACC"), _aux_constants, False)
# Per backward op (policy.BACKWARD_PLANS): the (batch, seqlen, nheads, headdim) tensors its kernel takes by short name
# (for their strides or maps, and the dispatcher's checks), its other pointer arguments, the function of its other
# arguments, and whether it takes the ALiBi slopes. A varlen call's index pointers follow the buffers.
BACKWARD_ARGS = {
    "bwd_dq": (_GRAD_TENSORS, ("LSE", "DELTA"), _bwd_constants, True),
    "bwd_dkdv": (_GRAD_TENSORS, ("LSE", "DELTA"), _bwd_constants, True),
    "bwd_prep": _AUX_ARGS,
    "bwd_ws": (("q", "k", "v", "do", "dk", "dv"), ("DQACC", "LSE", "DELTA"), _bwd_ws_constants, False),
    "bwd_convert": _AUX_ARGS,
}


def _addresses(pointers: dict) -> dict:
    return {name: t.data_ptr() for name, t in pointers.items()}


INDEX_POINTERS = ("CU_Q", "CU_K", "BLOCK_TABLE")


def _cu_buffers(cu: tuple) -> dict:
    """The index pointer arguments of a varlen call (cu = (cu_seqlens_q, cu_seqlens_k), and block_table for a paged
    one); none for dense (())."""
    return dict(zip(INDEX_POINTERS[:len(cu)], cu, strict=True))


def kernel_args(q, k, v, out, lse, alibi, shapes: Shapes, cu: tuple = ()) -> dict:
    """The forward kernel's arguments by name (fwd_params in backends/kernels/fwd.py)."""
    tensors = {"q": q, "k": k, "v": v, "o": out}
    return (_addresses(_pointers(tensors, {"LSE": lse} | _cu_buffers(cu), alibi))
            | _fwd_constants(tensors, alibi, shapes))


def bwd_kernel_args(tensors: dict, lse, delta, alibi, shapes: Shapes, cu: tuple = ()) -> dict:
    """Both backward kernels' arguments by name (bwd_params in backends/kernels/bwd.py); tensors maps
    q, k, v, o, do, dq, dk, dv to their tensors."""
    return (_addresses(_pointers(tensors, {"LSE": lse, "DELTA": delta} | _cu_buffers(cu), alibi))
            | _bwd_constants(tensors, alibi, shapes))


def _shapes(q, k, softmax_scale, window_left, window_right, softcap, alibi) -> Shapes:
    return Shapes(batch=q.shape[0], seqlen_q=q.shape[1], seqlen_k=k.shape[1], nheads=q.shape[2],
                  nheads_k=k.shape[2], head_dim=q.shape[3], dtype=q.dtype, device=q.device,
                  softmax_scale=softmax_scale, causal=window_right == 0, window=(window_left, window_right),
                  softcap=softcap, has_alibi=alibi is not None)


def _varlen_shapes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                   alibi) -> Shapes:
    return Shapes(batch=cu_seqlens_q.shape[0] - 1, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, nheads=q.shape[1],
                  nheads_k=k.shape[1], head_dim=q.shape[2], dtype=q.dtype, device=q.device,
                  softmax_scale=softmax_scale, causal=window_right == 0, window=(window_left, window_right),
                  softcap=softcap, has_alibi=alibi is not None, layout="varlen", total_q=q.shape[0],
                  total_k=k.shape[0])


def _paged_shapes(q, k, cu_seqlens_q, block_table, max_seqlen_q, max_seqlen_k, *options) -> Shapes:
    """_varlen_shapes for K/V in a page pool (num_blocks, page_size, nheads_k, headdim) read through block_table;
    options: softmax_scale, window_left, window_right, softcap, alibi."""
    num_blocks, page_size, nheads_k = k.shape[:3]
    return dataclasses.replace(_varlen_shapes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *options),
                               nheads_k=nheads_k, layout="varlen_paged", total_k=num_blocks * page_size,
                               page_size=page_size, max_blocks=block_table.shape[1],
                               block_stride=block_table.stride(0))


# --- launching --------------------------------------------------------------------------------------------------------

def empty_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor shaped like t. For a contiguous t, empty_like's default gives the same tensor ~0.4 us
    sooner than asking for the contiguous format (the per-call host path allocates several)."""
    return torch.empty_like(t) if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)


def empty_floats(like: torch.Tensor, *sizes: int) -> torch.Tensor:
    """A new float32 tensor on like's device: new_empty with the sizes as separate ints parses faster than
    torch.empty(..., device=) (1.1 against 1.4 us on a CPU)."""
    return like.new_empty(*sizes, dtype=torch.float32)


# torch's raw accessor (Triton's launcher uses it too) costs a fraction of building a torch.cuda.Stream.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def device_and_stream(device: torch.device) -> tuple[int, int]:
    """The device index the tensors live on and torch's current stream there: where kernels launch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, (_raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream)


# Launch plans by (image, mode) + KernelArgs.key: everything a plan is built from (the build, Shapes, the pointer names,
# every tensor's strides, the slopes' layout), so a plan is reused only where it would be built the same. Bounded as
# the dispatcher's caches are.
_PLANS: dict = {}


class KernelArgs:
    """One call's kernel arguments, shared by the launch plans of its kernels (the backward kernels take one
    parameter list).

    tensors: the (batch, seqlen, nheads, headdim) tensors by short name (pointers, and strides); buffers: the other
    pointer arguments by name (LSE, ...); constants(tensors, alibi, shapes): the arguments other than pointers by name,
    asked only when a launch plan is built."""

    __slots__ = ("shapes", "tensors", "alibi", "constants", "build", "pointers", "key")

    def __init__(self, shapes: Shapes, tensors: dict, buffers: dict, alibi, constants, slopes: bool = True):
        self.shapes, self.tensors, self.alibi, self.constants = shapes, tensors, alibi, constants
        self.build = builds.current_build()
        self.pointers = (_pointers(tensors, buffers, alibi) if slopes
                         else {name.upper(): t for name, t in tensors.items()} | buffers)
        strides = tuple(t.stride() for t in tensors.values())
        self.key = (id(self.build), shapes, tuple(self.pointers), strides, None if alibi is None else alibi.stride())

    def plan(self, op: str, image: str, mode: str) -> "_C.LaunchPlan":
        """The launch plan of `image` (an image of `op`) for these arguments, from _PLANS."""
        return policy.remember(_PLANS, (image, mode) + self.key, lambda: self._plan(op, image, mode))

    def _plan(self, op: str, image: str, mode: str) -> "_C.LaunchPlan":
        problem = policy.problem_for(self.shapes, self.tensors.values(), op)
        return _C.LaunchPlan(self.build.registry, image, mode, problem,
                             self.constants(self.tensors, self.alibi, self.shapes), list(self.pointers))


_data_ptr = torch.Tensor.data_ptr


def _launch(plans, device: torch.device, tensors) -> None:
    """Launch `plans` in order on torch's current stream; tensors: every pointer argument, in the plans' order."""
    index, stream = device_and_stream(device)
    addresses = list(map(_data_ptr, tensors))
    for plan in plans:
        plan.launch(index, stream, addresses)


def _kernel_ready(t: torch.Tensor) -> bool:
    # The layout rules the dispatcher checks (16-byte aligned base, strides in units of 8 where the size is not 1,
    # last dim contiguous), spelled out: every backward call checks its dO. A contiguous one (autograd's usual) has
    # them when its base is aligned: its head dim, as the kernels' (a multiple of 8), makes every stride one.
    if t.is_contiguous() and t.data_ptr() % _C.ALIGN_BYTES == 0:
        return True
    if t.dim() == 3:  # packed (varlen): no batch dim
        t = t[None]
    (batch, seqlen, nheads, _), (stride_b, stride_n, stride_h, stride_d) = t.shape, t.stride()
    unit = _C.STRIDE_MULTIPLE
    return (stride_d == 1 and t.data_ptr() % _C.ALIGN_BYTES == 0 and (batch <= 1 or stride_b % unit == 0)
            and (seqlen <= 1 or stride_n % unit == 0) and (nheads <= 1 or stride_h % unit == 0))


# Every pointer a backward kernel may take, in the order a backward call lists them; a varlen call's index pointers
# follow, then bwd_ws's accumulator where the plan has that kernel. Each kernel's plan picks its own from the list.
_BACKWARD_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "ALIBI")
_DELTA = _BACKWARD_POINTERS.index("DELTA")


def _picker(positions: list):
    """The addresses at `positions` of a list of addresses, in that order, as one C call."""
    if len(positions) == 1:
        return lambda addresses: [addresses[positions[0]]]
    return operator.itemgetter(*positions)


class _BackwardProgram:
    """The backward of an EagerCall for one backward key: the plan's kernels (policy.select_backward), whether they
    take bwd_ws's fp32 accumulator, the layout of the call's fp32 scratch (_scratch_layout), and once the first such
    call built them, each kernel's launch plan with the picker of its addresses."""

    __slots__ = ("chosen", "accumulator", "scratch_floats", "acc_bytes", "launches")

    def __init__(self, chosen: tuple, lse_shape: tuple, shapes: Shapes):
        self.chosen = chosen
        self.accumulator = any(op == "bwd_ws" for op, _, _ in chosen)
        self.scratch_floats, offset = _scratch_layout(lse_shape, shapes, self.accumulator)
        self.acc_bytes = offset * 4  # fp32
        self.launches = None

    @staticmethod
    def select(shapes: Shapes, tensors, lse_shape: tuple, deterministic: bool):
        """The program of the first plan that fits, or the fallback Decision when none does."""
        chosen = policy.select_backward(shapes, tensors, deterministic)
        return chosen if isinstance(chosen, policy.Decision) else _BackwardProgram(chosen, lse_shape, shapes)

    def names(self, cu: tuple) -> tuple:
        return _BACKWARD_POINTERS + INDEX_POINTERS[:len(cu)] + (("DQACC",) if self.accumulator else ())


class EagerCall:
    """A kernel call resolved for one layout: its Shapes, the forward image and the launch plans, so that a repeated
    call (calls.find) only allocates its outputs, reads addresses and launches.

    The forward plan is kept after the first launch: an EagerCall is reused only for calls of the same key (every
    tensor's shape and strides, the options), which give the same plan. Backward selections and plans are kept per
    layout of the incoming gradient and per selection context (the environment and the device description), which
    may change between the forward and the backward."""

    __slots__ = ("shapes", "image", "mode", "forward_args", "lse_shape", "no_slopes", "sink_fits", "plans_source",
                 "forward_plan", "backward_programs")

    def __init__(self, shapes: Shapes, image: str | None, mode: str | None):
        self.shapes, self.image, self.mode = shapes, image, mode
        self.forward_args = FWD_FAMILIES[builds.current_build().families.get(image, "triton")]
        self.lse_shape = ((shapes.nheads, shapes.total_q) if shapes.layout in VARLEN_LAYOUTS
                          else (shapes.batch, shapes.nheads, shapes.seqlen_q))
        self.no_slopes = _no_slopes(shapes.device)
        self.sink_fits = math.prod(self.lse_shape) <= LSE_SINK_FLOATS
        self.plans_source = _PLANS  # a replaced plan cache (tests record launches so) makes this call stale
        self.forward_plan = None
        self.backward_programs: dict = {}

    def current(self) -> bool:
        return self.plans_source is _PLANS

    def forward(self, q, k, v, alibi, out, cu: tuple = (), keep_lse: bool = True):
        """Launch the forward image on torch's current stream, writing into `out` (allocated when None).
        cu: (cu_seqlens_q, cu_seqlens_k) for a varlen call, then block_table for a paged one. Returns (out, lse);
        lse None when not keep_lse (it may then go to the device's sink)."""
        if out is None:
            out = empty_contiguous(q)
        lse = empty_floats(q, *self.lse_shape) if keep_lse or not self.sink_fits else _lse_sink(self.shapes.device)
        constants, slopes = self.forward_args
        if self.forward_plan is None:
            args = KernelArgs(self.shapes, {"q": q, "k": k, "v": v, "o": out}, {"LSE": lse} | _cu_buffers(cu), alibi,
                              constants, slopes)
            self.forward_plan = args.plan("fwd", self.image, self.mode)
        pointers = (q, k, v, out, lse, *cu, self._slopes(alibi)) if slopes else (q, k, v, out, lse, *cu)
        _launch((self.forward_plan,), self.shapes.device, pointers)
        return out, (lse if keep_lse else None)

    def backward(self, dout, q, k, v, out, lse, alibi, deterministic: bool, cu: tuple = ()):
        """dq, dk, dv (contiguous, in the inputs' dtype) from a backward plan's kernels (policy.BACKWARD_PLANS) on
        torch's current stream; when none fits, an announced recomputation through the SDPA fallback.
        deterministic: only plans without atomics (bitwise reproducible gradients), and a deterministic fallback;
        torch.use_deterministic_algorithms(True) in force now counts too, as for torch's own backward kernels."""
        shapes = self.shapes
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        # A copy, not .contiguous(): a contiguous view at a misaligned address would come back as it is.
        dout = dout if _kernel_ready(dout) else dout.clone(memory_format=torch.contiguous_format)
        program = policy.remember(self.backward_programs, self._backward_key(dout, deterministic),
                                  lambda: _BackwardProgram.select(shapes, (q, k, v, out, dout), self.lse_shape,
                                                                  deterministic))
        if isinstance(program, policy.Decision):
            policy.announce(program)
            return recompute_grads(dout, q, k, v, alibi, shapes, deterministic, cu)
        # The gradients are fresh contiguous allocations, which the dispatcher always takes.
        dq, dk, dv = empty_contiguous(q), empty_contiguous(k), empty_contiguous(v)
        lse = lse.contiguous()
        scratch = empty_floats(q, program.scratch_floats)
        # DELTA is the scratch's start; DQACC (bwd_ws) follows at its offset, as an address only.
        pointers = [q, k, v, out, dout, dq, dk, dv, lse, scratch, self._slopes(alibi), *cu]
        if program.launches is None:
            buffers = pointers + [scratch] if program.accumulator else pointers
            program.launches = tuple(self._backward_launch(op, image, mode, program.names(cu), buffers, alibi, cu)
                                     for op, image, mode in program.chosen)
        addresses = list(map(_data_ptr, pointers))
        if program.accumulator:
            addresses.append(addresses[_DELTA] + program.acc_bytes)
        index, stream = device_and_stream(shapes.device)
        for plan, pick in program.launches:
            plan.launch(index, stream, pick(addresses))
        return dq, dk, dv

    def _backward_launch(self, op: str, image: str, mode: str, names: tuple, pointers: list, alibi, cu) -> tuple:
        """(launch plan, the picker of its addresses from the call's) of one backward kernel, from this call's
        pointers (named by `names`)."""
        current = dict(zip(names, pointers, strict=True))
        tensor_names, buffers, constants, slopes = BACKWARD_ARGS[op]
        tensors = {name: current[name.upper()] for name in tensor_names}
        extra = {name: current[name] for name in buffers + INDEX_POINTERS[:len(cu)]}
        args = KernelArgs(self.shapes, tensors, extra, alibi, constants, slopes)
        positions = [names.index(name) for name in args.pointers]
        return args.plan(op, image, mode), _picker(positions)

    def _slopes(self, alibi) -> torch.Tensor:
        return alibi if alibi is not None else self.no_slopes

    def _backward_key(self, dout, deterministic: bool) -> tuple:
        """What the backward program can change with, given this call's inputs (q, k, v of the key's
        layout; out and lse allocated by the forward; dout kernel-ready): dout's strides, determinism and the
        selection context (the device description, FA2RT_FORCE_ARCH, the build)."""
        return dout.stride(), bool(deterministic), policy.environment_key(self.shapes.device)


def _resolved(op: tuple, q, k, v, alibi, out, options: tuple, resolve, cu: tuple = ()):
    """The EagerCall of a call made through the custom ops or attention_backward (calls.find_op): the one an earlier
    call of the same key resolved, else resolve()'s, remembered when it is an EagerCall (a Decision is returned
    as it is: the fallback, decided again on every call)."""
    key, call = calls.find_op(op, q, k, v, alibi, out, options, cu)
    if call is None:
        call = resolve()
        if isinstance(call, EagerCall):
            calls.remember(key, call, cu)
    return call


def backward(dout, q, k, v, out, lse, alibi, shapes: Shapes, deterministic: bool, cu: tuple = ()):
    """EagerCall.backward for a call given its Shapes (attention_backward)."""
    options = (shapes.softmax_scale, *shapes.window, shapes.softcap, shapes.seqlen_q, shapes.seqlen_k)
    return _backward(dout, q, k, v, out, lse, alibi, options, lambda: shapes, deterministic, cu)


def _backward(dout, q, k, v, out, lse, alibi, options: tuple, shapes, deterministic: bool, cu: tuple = ()):
    """EagerCall.backward of the call resolved for these tensors and options; shapes() gives its Shapes (built only
    when no earlier call resolved it)."""
    call = _resolved(("bwd",), q, k, v, alibi, out, options, lambda: EagerCall(shapes(), None, None), cu)
    return call.backward(dout, q, k, v, out, lse, alibi, deterministic, cu)


def recompute_grads(dout, q, k, v, alibi, shapes: Shapes, deterministic: bool, cu: tuple = ()):
    """Gradients of the SDPA fallback, recomputing its forward: for backward calls no kernel takes."""
    options = dict(causal=shapes.causal, softmax_scale=shapes.softmax_scale, window_size=shapes.window,
                   softcap=shapes.softcap, alibi_slopes=alibi, deterministic=deterministic)

    def attend(q, k, v):
        return (sdpa_varlen_attention(q, k, v, *cu, **options) if cu else sdpa_attention(q, k, v, **options))[0]

    if _autograd_records():
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)
    # Inside a custom op's kernel (fa2rt::bwd, fa2rt::varlen_bwd, as torch.compile runs them) autograd records
    # nothing, even under enable_grad(); torch.func's own transform still differentiates there.
    _, vjp = torch.func.vjp(attend, *(t.detach() for t in (q, k, v)))
    return vjp(dout)


def _autograd_records() -> bool:
    with torch.enable_grad():
        return torch.zeros((), requires_grad=True).mul(1).requires_grad


# --- eager calls ------------------------------------------------------------------------------------------------------

_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))
# What torch.jit.is_tracing() asks once it knows it is not in TorchScript (eager Python never is).
_jit_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)


def can_run_eager(*tensors) -> bool:
    """Whether a call outside torch.compile may launch directly: plain tensors (None allowed), no dispatch mode
    (FakeTensorMode, make_fx, ...), no torch.func transform and no torch.jit.trace active. Those see fa2rt as the
    custom ops instead (a trace would not record a direct launch)."""
    for t in tensors:  # a loop: ~0.2 us less than all(map(...)) for the 5 arguments of a dense call
        if type(t) not in _PLAIN_TYPES:
            return False
    return not is_in_torch_dispatch_mode() and not torch._C._are_functorch_transforms_active() and not _jit_tracing()


def _once_differentiable(backward):
    """torch's once_differentiable (a backward that refuses to be differentiated), without its no_grad block when
    grad mode is off already, as torch.autograd.grad and .backward() run a backward without create_graph: the same
    result, for ~2 us less per call."""
    refusing = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return refusing(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return wrapper


class _Attention(torch.autograd.Function):
    """An eager differentiable call: the custom ops' autograd formula (fa2rt::fwd with fa2rt::bwd) without their
    dispatch; backward() reuses the forward's EagerCall."""

    @staticmethod
    def forward(ctx, q, k, v, alibi, call, deterministic, cu):
        # lse takes no gradient, and unmaterialised autograd skips making a zero-filled one for it (an allocation
        # and a fill kernel: ~15 us of host time per backward on the H200's hosts). out is the only differentiable
        # output, so backward always gets its gradient.
        ctx.set_materialize_grads(False)
        out, lse = call.forward(q, k, v, alibi, None, cu)
        ctx.save_for_backward(q, k, v, out, lse, alibi, *cu)
        ctx.call, ctx.deterministic = call, deterministic
        ctx.mark_non_differentiable(lse)  # lse is returned for inspection; no gradient flows through it
        return out, lse

    @staticmethod
    @_once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi, *cu = ctx.saved_tensors
        dq, dk, dv = ctx.call.backward(dout, q, k, v, out, lse, alibi, ctx.deterministic, tuple(cu))
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None, None


# torch's C apply of _Attention, without autograd.Function.apply's Python layer (~2 us per call): that layer serves
# torch.func transforms, which can_run_eager keeps off this path, and unwraps dead functorch wrappers, which the
# validated path does (unwrap_dead) and a repeated call's key excludes (it reads every tensor's address).
_apply_attention = super(torch.autograd.Function, _Attention).apply


# A private helper of torch's (autograd.Function.apply calls it); a torch without it gets the tensors as they are.
_unwrap_dead_wrappers = getattr(getattr(torch._functorch, "utils", None), "unwrap_dead_wrappers", tuple)


def unwrap_dead(*tensors) -> tuple:
    """The tensors with each functorch wrapper left over from a finished transform replaced by the tensor it wraps,
    as autograd.Function.apply does: such a wrapper has no storage, so no address to launch on."""
    return _unwrap_dead_wrappers(tensors)


def run_eager(q, k, v, alibi, out, call: EagerCall, deterministic: bool, return_lse: bool, cu: tuple = ()):
    """An eager call on the kernel path (see can_run_eager): (out, lse), differentiable in q, k, v when one requires
    grad (out= is refused then, by validation); lse None when neither return_lse nor a backward needs it.
    cu: (cu_seqlens_q, cu_seqlens_k) for a varlen call."""
    if out is None and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _apply_attention(q, k, v, alibi, call, deterministic, cu)
    return call.forward(q, k, v, alibi, out, cu, return_lse)


# --- custom ops (torch.compile, dispatch modes, torch.func) -----------------------------------------------------------

def run_forward(q, k, v, alibi, out, softmax_scale, window_left, window_right, softcap, image, mode):
    """forward() for the custom ops. An empty image name (calls traced by torch.compile) selects here, on the real
    tensors, and runs the announced SDPA fallback when no image fits."""

    def fallback():
        # window_right == 0 is exactly causal; saying so lets the fallback take SDPA's causal kernels.
        res, lse = sdpa_attention(q, k, v, causal=window_right == 0, softmax_scale=softmax_scale,
                                  window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi,
                                  return_lse=True)
        return (res if out is None else out.copy_(res)), lse

    options = (softmax_scale, window_left, window_right, softcap)
    return _op_forward(image, mode, (q, k, v, out), alibi, options, lambda: _shapes(q, k, *options, alibi), (),
                       fallback)


def _op_forward(image: str, mode: str, tensors: tuple, alibi, options: tuple, shapes, cu: tuple, fallback):
    """A forward custom op's body: the EagerCall an earlier call of the same key resolved (_resolved), else one for the
    image the call names or, for an empty name, the image the policy decides on; fallback() (announced) when that
    decision is no kernel. tensors: (q, k, v, out); shapes(): the call's Shapes."""
    q, k, v, out = tensors

    def resolve():
        call_shapes = shapes()
        if image:  # an eager caller decided
            return EagerCall(call_shapes, image, mode)
        decision = policy.decide(call_shapes, q, k, v, needs_grad=False, out=out)
        return EagerCall(call_shapes, decision.image, decision.mode) if decision.path == "kernel" else decision

    call = _resolved(("fwd", image, mode), q, k, v, alibi, out, options, resolve, cu)
    if isinstance(call, EagerCall):
        return call.forward(q, k, v, alibi, out, cu)
    if call.path == "fallback":
        policy.announce(call)
    return fallback()


def run_backward(dout, q, k, v, out, lse, alibi, softmax_scale, window_left, window_right, softcap, deterministic):
    """backward() for the custom ops."""
    options = (softmax_scale, window_left, window_right, softcap)
    return _backward(dout, q, k, v, out, lse, alibi, options, lambda: _shapes(q, k, *options, alibi), deterministic)


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


# --- varlen custom ops: the same kernels and launches, packed (total, nheads, headdim) tensors with cu_seqlens -------

def run_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi, softmax_scale,
                       window_left, window_right, softcap, image, mode, deterministic):
    """varlen_fwd's body: as run_forward, for a packed call; cu_seqlens' values are checked as attention_varlen
    checks them (a traced call could not)."""
    cu = (cu_seqlens_q, cu_seqlens_k)
    check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = (softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k)

    def fallback():
        return sdpa_varlen_attention(q, k, v, *cu, causal=window_right == 0, softmax_scale=softmax_scale,
                                     window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi,
                                     return_lse=True, deterministic=deterministic)

    shapes = lambda: _varlen_op_shapes(q, k, cu, options, alibi)  # noqa: E731
    return _op_forward(image, mode, (q, k, v, None), alibi, options, shapes, cu, fallback)


def _varlen_op_shapes(q, k, cu: tuple, options: tuple, alibi) -> Shapes:
    """The Shapes of a varlen op call (cu: its index tensors, block_table third when paged; options: its scalars, as
    the varlen ops take them)."""
    softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k = options
    if len(cu) == 3:
        return _paged_shapes(q, k, cu[0], cu[2], max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                             softcap, alibi)
    return _varlen_shapes(q, k, cu[0], max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                          alibi)


def run_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi,
                        softmax_scale, window_left, window_right, softcap, deterministic):
    """varlen_bwd's body: as run_backward, for a packed call (its forward checked the cu_seqlens)."""
    options = (softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k)
    cu = (cu_seqlens_q, cu_seqlens_k)
    return _backward(dout, q, k, v, out, lse, alibi, options, lambda: _varlen_op_shapes(q, k, cu, options, alibi),
                     deterministic, cu)


# Registered for every device (unlike the dense ops): under torch.compile every varlen call runs through them, since
# the fallback reads cu_seqlens' values, which a traced graph cannot.
@torch.library.custom_op("fa2rt::varlen_fwd", mutates_args=())
def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, alibi_slopes: torch.Tensor | None,
               softmax_scale: float, window_left: int, window_right: int, softcap: float, image: str, mode: str,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return run_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                              softmax_scale, window_left, window_right, softcap, image, mode, deterministic)


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale,
                     window_left, window_right, softcap, image, mode, deterministic):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("fa2rt::varlen_bwd", mutates_args=())
def varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
               max_seqlen_k: int, alibi_slopes: torch.Tensor | None, softmax_scale: float, window_left: int,
               window_right: int, softcap: float, deterministic: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic)


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                     softmax_scale, window_left, window_right, softcap, deterministic):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, window_left, window_right, softcap = inputs[:12]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.params = (max_q, max_k, softmax_scale, window_left, window_right, softcap, inputs[-1])
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    max_q, max_k, *options = ctx.params
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi_slopes, *options)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 12


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# --- paged prefill: varlen queries, K/V from a page pool through a block table (forward only, no autograd) -----------

def run_paged_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k, alibi,
                      softmax_scale, window_left, window_right, softcap, image, mode):
    """varlen_paged_fwd's body: as run_varlen_forward; the fallback gathers the pages (fallback.gather_pages)."""
    index = (cu_seqlens_q, cu_seqlens_k, block_table)
    check_varlen_paged_values(q, k, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k)
    options = (softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k)

    shapes = lambda: _varlen_op_shapes(q, k, index, options, alibi)  # noqa: E731
    return _op_forward(image, mode, (q, k, v, None), alibi, options, shapes, index,
                       lambda: paged_fallback(q, k, v, *index, shapes(), alibi))


def paged_fallback(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, shapes: Shapes, alibi, dropout_p=0.0,
                   deterministic=False):
    """The exact fallback of a paged call: the pages gathered into packed K/V, then the varlen fallback.
    Returns (out, lse)."""
    k_packed, v_packed = gather_pages(k, v, cu_seqlens_k, block_table)
    return sdpa_varlen_attention(q, k_packed, v_packed, cu_seqlens_q, cu_seqlens_k, causal=shapes.window[1] == 0,
                                 softmax_scale=shapes.softmax_scale, window_size=shapes.window, softcap=shapes.softcap,
                                 alibi_slopes=alibi, return_lse=True, deterministic=deterministic,
                                 dropout_p=dropout_p)


# Registered for every device, as varlen_fwd: the fallback reads the index values, which a traced graph cannot. No
# autograd formula: paged prefill is inference (validation refuses inputs that require grad).
@torch.library.custom_op("fa2rt::varlen_paged_fwd", mutates_args=())
def varlen_paged_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, block_table: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     alibi_slopes: torch.Tensor | None, softmax_scale: float, window_left: int, window_right: int,
                     softcap: float, image: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return run_paged_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k,
                             alibi_slopes, softmax_scale, window_left, window_right, softcap, image, mode)


@varlen_paged_fwd.register_fake
def _varlen_paged_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k,
                           alibi_slopes, softmax_scale, window_left, window_right, softcap, image, mode):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse
