"""Input validation for attention calls: every bad input gets an exception naming the argument,
what was expected and what was given (f"{name}: expected {expected}, got {actual}").

Which path runs (kernel or fallback, e.g. for fp32/fp64 or an unsupported head dim) is policy and is
decided elsewhere; this module only rejects inputs no path can compute.
"""

import math
import numbers
from dataclasses import dataclass

import torch

from . import config
from .reference import fold_causal

TENSOR_RANK = 4
LAYOUT = "(batch, seqlen, nheads, headdim)"
VARLEN_RANK = 3
VARLEN_LAYOUT = "(total_tokens, nheads, headdim)"
CU_SEQLENS_DTYPE = torch.int32
# Paged prefill: varlen queries, keys/values in a pool of pages addressed through a block table.
PAGED_KV_LAYOUT = "(num_blocks, page_size, nheads_k, headdim)"
BLOCK_TABLE_DTYPE = torch.int32
NO_WINDOW = (-1, -1)  # window_size's default (no window); one object, so a repeated call's key can test identity
PAGE_MULTIPLE = 16  # page sizes the paged kernels take (vLLM's 16-token blocks and multiples)
VARLEN_LAYOUTS = ("varlen", "varlen_paged")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM = 1
ALIBI_DTYPE = torch.float32


@dataclass(frozen=True)
class Shapes:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    softmax_scale: float  # resolved: head_dim**-0.5 when the caller passed None
    # Defaults keep positional construction from the first nine fields working (a call with no extra features).
    causal: bool = False  # the caller's flag; its effect is folded into window
    window: tuple[int, int] = (-1, -1)  # effective (left, right), -1 unlimited; right is 0 when causal
    softcap: float = 0.0  # 0 means off
    has_alibi: bool = False
    # "dense" (batch, seqlen, nheads, headdim), or "varlen": (total, nheads, headdim) tensors holding `batch`
    # sequences laid end to end (cu_seqlens); seqlen_q/seqlen_k are then the callers' max_seqlen_q/max_seqlen_k.
    # "varlen_paged": varlen q, k/v a pool (num_blocks, page_size, nheads_k, headdim) read through block_table.
    layout: str = "dense"
    total_q: int = 0  # varlen: q's and k's token counts (varlen_paged: total_k counts the pool's rows)
    total_k: int = 0
    page_size: int = 0  # varlen_paged: rows per page, the block table's width and its row stride
    max_blocks: int = 0
    block_stride: int = 0

    @property
    def trivial(self) -> bool:
        """No attention to compute: the output is empty, or seqlen_k == 0 (output zeros, lse +inf)."""
        sizes = (self.batch, self.seqlen_q, self.nheads, self.seqlen_k)
        return 0 in (sizes + (self.total_q, self.total_k) if self.layout in VARLEN_LAYOUTS else sizes)


def _fail(exc, name, expected, actual):
    raise exc(f"{name}: expected {expected}, got {actual}")


def _dtype_names():
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def _check_tensor(name, t, rank=TENSOR_RANK, layout=LAYOUT):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
    if t.layout != torch.strided:
        _fail(ValueError, name, "a dense (strided) tensor", f"layout {t.layout}")
    if t.dim() != rank:
        _fail(ValueError, name, f"a {rank}-D tensor {layout}", f"shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(ValueError, name, f"dtype in ({_dtype_names()})", t.dtype)
    # Strides of empty tensors are meaningless (and often odd), so they are not checked.
    if t.numel() > 0 and t.stride(-1) != 1:
        _fail(ValueError, name, "a contiguous last dimension (stride(-1) == 1; call .contiguous())",
              f"stride {tuple(t.stride())} for shape {tuple(t.shape)}")


def _same_as_q(name, t, q):
    if t.dtype != q.dtype:
        _fail(ValueError, name, f"dtype {q.dtype} (same as q)", t.dtype)
    if t.device != q.device:
        _fail(ValueError, name, f"device {q.device} (same as q)", t.device)


def _check_out(out, q, k, v, rank=TENSOR_RANK, layout=LAYOUT):
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        _fail(TypeError, "out", "None or a torch.Tensor", type(out).__name__)
    if out.shape != q.shape:
        _fail(ValueError, "out", f"shape {tuple(q.shape)} (same as q)", f"shape {tuple(out.shape)}")
    _same_as_q("out", out, q)
    _check_tensor("out", out, rank, layout)
    # Writing into a caller's tensor cannot be recorded by autograd (as in flash-attn, out= is forward-only).
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        _fail(ValueError, "out", "None when q, k or v requires grad (out= does not support autograd)",
              "a tensor")


def check_backward_inputs(dout, out, lse, q, shapes: "Shapes") -> None:
    """dout and out of attention_backward / attention_varlen_backward: shaped like q, in its dtype and device, last
    dim contiguous; lse: the forward's float32 (batch, nheads, seqlen_q), varlen (nheads, total_q), on q's device."""
    varlen = shapes.layout in VARLEN_LAYOUTS
    for name, t in (("dout", dout), ("out", out)):
        _check_tensor(name, t, *((VARLEN_RANK, VARLEN_LAYOUT) if varlen else (TENSOR_RANK, LAYOUT)))
        if t.shape != q.shape:
            _fail(ValueError, name, f"shape {tuple(q.shape)} (same as q)", f"shape {tuple(t.shape)}")
        _same_as_q(name, t, q)
    expected = (shapes.nheads, shapes.total_q) if varlen else (shapes.batch, shapes.nheads, shapes.seqlen_q)
    if not isinstance(lse, torch.Tensor):
        _fail(TypeError, "lse", f"a float32 tensor of shape {expected}", type(lse).__name__)
    if tuple(lse.shape) != expected or lse.dtype != torch.float32 or lse.layout != torch.strided:
        _fail(ValueError, "lse", f"a dense float32 tensor of shape {expected} (attention's return_lse=True)",
              f"{lse.layout} {lse.dtype} of shape {tuple(lse.shape)}")
    if lse.device != q.device:
        _fail(ValueError, "lse", f"device {q.device} (same as q)", lse.device)


def _check_scale(softmax_scale, head_dim) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    return _finite_real("softmax_scale", softmax_scale, "None or a finite real number")


def _finite_real(name, value, expected) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(TypeError, name, expected, f"{value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        _fail(ValueError, name, expected, repr(value))
    return value


def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1): the probability of zeroing each attention probability (training)."""
    expected = "a real number in [0, 1) (0 disables attention dropout)"
    value = _finite_real("dropout_p", dropout_p, expected)
    if not 0 <= value < 1:
        _fail(ValueError, "dropout_p", expected, repr(value))
    return value


def _check_softcap(softcap) -> float:
    expected = "a finite real number >= 0 (0 disables it)"
    value = _finite_real("softcap", softcap, expected)
    if value < 0:
        _fail(ValueError, "softcap", expected, repr(value))
    return value


def _check_window(window_size, causal) -> tuple[int, int]:
    """The effective (left, right) window: causal is the window's right edge at the diagonal (right = 0)."""
    expected = "a (left, right) tuple or list of two ints, -1 meaning unlimited"
    if not isinstance(window_size, (tuple, list)):
        _fail(TypeError, "window_size", expected, f"{window_size!r} ({type(window_size).__name__})")
    if len(window_size) != 2:
        _fail(ValueError, "window_size", expected, f"{window_size!r} (length {len(window_size)})")
    for index, side in enumerate(window_size):
        name = f"window_size[{index}]"
        # bool is an int subclass, but True/False as a window size is surely a mistake.
        if isinstance(side, bool) or not isinstance(side, int):
            _fail(TypeError, name, "an int >= -1 (-1 = unlimited)", f"{side!r} ({type(side).__name__})")
        if side < -1:
            _fail(ValueError, name, "an int >= -1 (-1 = unlimited)", side)
    return fold_causal(tuple(int(side) for side in window_size), causal)


def _check_alibi(alibi_slopes, q, batch, nheads) -> bool:
    if alibi_slopes is None:
        return False
    name = "alibi_slopes"
    if not isinstance(alibi_slopes, torch.Tensor):
        _fail(TypeError, name, "None or a torch.Tensor", type(alibi_slopes).__name__)
    if alibi_slopes.layout != torch.strided:
        _fail(ValueError, name, "a dense (strided) tensor", f"layout {alibi_slopes.layout}")
    # flash-attn reads the slopes as fp32 whatever q's dtype; converting silently would hide a wrong input.
    if alibi_slopes.dtype != ALIBI_DTYPE:
        _fail(ValueError, name, f"dtype {ALIBI_DTYPE}", alibi_slopes.dtype)
    shapes = ((nheads,), (batch, nheads))
    if tuple(alibi_slopes.shape) not in shapes:
        _fail(ValueError, name, f"shape {shapes[0]} or {shapes[1]} ((nheads,) or (batch, nheads))",
              f"shape {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        _fail(ValueError, name, f"device {q.device} (same as q)", alibi_slopes.device)
    return True


def _check_qkv(q, k, v, rank, layout, batched=False, kv_rank=None, kv_layout=None):
    """q, k, v as tensors of one dtype and device, `rank` dims ending in (nheads, headdim) (k and v: kv_rank dims
    in kv_layout when given); k and v of one shape, k with q's head dim, q's batch size when `batched`, and a head
    count dividing q's (checked before v's shape, so a wrong k is named as k)."""
    _check_tensor("q", q, rank, layout)
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, kv_rank or rank, kv_layout or layout)
    _same_as_q("k", k, q)
    _same_as_q("v", v, q)
    nheads, head_dim = q.shape[-2:]
    nheads_k = k.shape[-2]
    if head_dim < MIN_HEAD_DIM:
        _fail(ValueError, "q", f"head dim >= {MIN_HEAD_DIM}", f"{head_dim} (shape {tuple(q.shape)})")
    if k.shape[-1] != head_dim:
        _fail(ValueError, "k", f"head dim {head_dim} (same as q)", f"{k.shape[-1]} (shape {tuple(k.shape)})")
    if batched and k.shape[0] != q.shape[0]:
        _fail(ValueError, "k", f"batch size {q.shape[0]} (same as q)", f"{k.shape[0]} (shape {tuple(k.shape)})")
    if v.shape != k.shape:
        _fail(ValueError, "v", f"shape {tuple(k.shape)} (same as k)", f"shape {tuple(v.shape)}")
    if nheads_k == 0 and nheads != 0 or nheads_k != 0 and nheads % nheads_k != 0:
        _fail(ValueError, "k", f"a number of heads that divides q's nheads={nheads} (MQA/GQA)",
              f"nheads_k={nheads_k}")


def _check_causal(causal):
    if not isinstance(causal, bool):
        _fail(TypeError, "causal", "a bool", f"{causal!r} ({type(causal).__name__})")


def check_inputs(q, k, v, *, causal, softmax_scale, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                 out=None) -> Shapes:
    """Validate q, k, v, the options and out for attention and return their resolved Shapes.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), identical shapes.
    Raises TypeError when an argument has the wrong Python type (not a tensor, causal not a bool,
    softmax_scale not a real number, ...) and ValueError for everything else (dtype, device, shape, stride, values).

    Empty inputs are valid: batch, seqlen_q, seqlen_k and nheads may be 0 (nheads_k may be 0 only when nheads
    is 0, since nheads_k must divide nheads). The caller returns an empty output for them, and for
    seqlen_k == 0 an all-zero output with lse +inf for every row (see Shapes.trivial). head_dim 0 is rejected:
    the default scale headdim**-0.5 is undefined for it.

    softmax_scale: None (meaning headdim**-0.5) or any finite real number, including 0 and negatives
    (flash-attn accepts them); NaN, inf, bools and non-numbers are rejected.
    window_size: (left, right) ints >= -1, -1 unlimited; row i sees key j iff j >= i + seqlen_k - seqlen_q - left
    and j <= i + seqlen_k - seqlen_q + right. causal=True sets right to 0 (Shapes.window is the effective one).
    softcap: finite real >= 0, 0 off; scores become softcap * tanh(scores / softcap).
    alibi_slopes: None or float32 (nheads,) or (batch, nheads) on q's device.
    out: None or a tensor like q (shape, dtype, device, contiguous last dim); not allowed when q, k or v
    requires grad with grad mode on.
    """
    _check_qkv(q, k, v, TENSOR_RANK, LAYOUT, batched=True)
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    _check_out(out, q, k, v)
    _check_causal(causal)

    return Shapes(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads, nheads_k=nheads_k,
                  head_dim=head_dim, dtype=q.dtype, device=q.device,
                  softmax_scale=_check_scale(softmax_scale, head_dim), causal=causal,
                  window=_check_window(window_size, causal), softcap=_check_softcap(softcap),
                  has_alibi=_check_alibi(alibi_slopes, q, batch, nheads))


# --- variable-length (packed) sequences ------------------------------------------------------------------------------

def _check_cu_seqlens(name, cu, q):
    expected = f"a 1-D contiguous {CU_SEQLENS_DTYPE} tensor (batch + 1,) on q's device"
    if not isinstance(cu, torch.Tensor):
        _fail(TypeError, name, expected, type(cu).__name__)
    if cu.layout != torch.strided or cu.dim() != 1 or cu.numel() < 1:
        _fail(ValueError, name, expected + " holding at least one entry (0)",
              f"shape {tuple(cu.shape)}, layout {cu.layout}")
    if cu.dtype != CU_SEQLENS_DTYPE:
        _fail(ValueError, name, f"dtype {CU_SEQLENS_DTYPE}", cu.dtype)
    if cu.device != q.device:
        _fail(ValueError, name, f"device {q.device} (same as q)", cu.device)
    if cu.numel() > 1 and cu.stride(0) != 1:
        _fail(ValueError, name, "a contiguous tensor (stride 1; call .contiguous())", f"stride {cu.stride(0)}")


def _check_max_seqlen(name, value) -> int:
    # torch.compile may hand an int argument over as a SymInt.
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        _fail(TypeError, name, "a Python int >= 0", f"{value!r} ({type(value).__name__})")
    if value < 0:
        _fail(ValueError, name, "a Python int >= 0", value)
    return value


def check_cu_seqlens_values(name, bounds, total, max_seqlen, max_name):
    """bounds (cu_seqlens as a list): starts at 0, never decreases, ends at `total` (the packed tensor's first dim),
    and no sequence is longer than `max_seqlen` (the caller's `max_name`)."""
    if bounds[0] != 0:
        _fail(ValueError, name, "first entry 0", bounds[0])
    for i in range(len(bounds) - 1):
        length = bounds[i + 1] - bounds[i]
        if length < 0:
            _fail(ValueError, name, "non-decreasing entries",
                  f"{name}[{i + 1}]={bounds[i + 1]} < {name}[{i}]={bounds[i]}")
        if length > max_seqlen:
            _fail(ValueError, max_name, f">= every sequence's length ({name}[{i + 1}] - {name}[{i}] = {length})",
                  max_seqlen)
    if bounds[-1] != total:
        _fail(ValueError, name, f"last entry {total} (the total number of tokens, dim 0 of the packed tensor)",
              bounds[-1])


def should_check_values(cu) -> bool:
    """The values of an index tensor are read where that costs no device sync (on the CPU), or when
    FA2RT_CHECK_INDICES asks for it."""
    # Under torch.compile the tensors are fakes, whose values are unknown until the graph runs.
    return (cu.device.type == "cpu" or config.check_indices()) and not torch.compiler.is_compiling()


def _check_varlen_indices(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """The cu_seqlens tensors (not their values) and the max_seqlen ints of a varlen call: (max_q, max_k)."""
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        _fail(ValueError, "cu_seqlens_k", f"shape ({cu_seqlens_q.numel()},) (same as cu_seqlens_q: one entry per "
              "sequence plus one)", f"shape {tuple(cu_seqlens_k.shape)}")
    return _check_max_seqlen("max_seqlen_q", max_seqlen_q), _check_max_seqlen("max_seqlen_k", max_seqlen_k)


def _check_cu_values(side: str, cu, total: int, max_len: int) -> None:
    """cu_seqlens_<side>'s values against its tokens and max_seqlen_<side>, where should_check_values allows."""
    if should_check_values(cu):
        check_cu_seqlens_values(f"cu_seqlens_{side}", cu.tolist(), total, max_len, f"max_seqlen_{side}")


def check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k) -> None:
    """cu_seqlens' values where should_check_values allows; the varlen op runs it too, as tracing cannot read them."""
    _check_cu_values("q", cu_seqlens_q, q.shape[0], max_q)
    _check_cu_values("k", cu_seqlens_k, k.shape[0], max_k)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                        softmax_scale, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, out=None,
                        block_table=None) -> Shapes:
    """Validate a variable-length call (see fa2rt.attention_varlen) and return its Shapes (layout "varlen": batch
    is the number of sequences, seqlen_q/seqlen_k the given max_seqlen_q/max_seqlen_k).

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q/_k int32 (batch + 1,) on q's
    device, the same length. Their values (start 0, non-decreasing, end at the total, no sequence longer than its
    max_seqlen) are checked when they are on the CPU or config.CHECK_INDICES is set (a device sync); otherwise the
    kernels keep every access inside the tensors, so malformed values give wrong numbers, never a fault.
    The options follow check_inputs; alibi_slopes is (nheads,) or (batch, nheads), indexed by sequence.
    With block_table (paged prefill, layout "varlen_paged"): see check_paged_inputs.
    """
    if block_table is not None:
        return check_paged_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                  causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                  softcap=softcap, alibi_slopes=alibi_slopes, out=out)
    _check_qkv(q, k, v, VARLEN_RANK, VARLEN_LAYOUT)
    max_q, max_k = _check_varlen_indices(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    total_q, nheads, head_dim = q.shape
    total_k, nheads_k = k.shape[0], k.shape[1]
    check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    _check_out(out, q, k, v, VARLEN_RANK, VARLEN_LAYOUT)
    _check_causal(causal)
    batch = cu_seqlens_q.numel() - 1
    return Shapes(batch=batch, seqlen_q=max_q, seqlen_k=max_k, nheads=nheads, nheads_k=nheads_k,
                  head_dim=head_dim, dtype=q.dtype, device=q.device,
                  softmax_scale=_check_scale(softmax_scale, head_dim), causal=causal,
                  window=_check_window(window_size, causal), softcap=_check_softcap(softcap),
                  has_alibi=_check_alibi(alibi_slopes, q, batch, nheads), layout="varlen",
                  total_q=total_q, total_k=total_k)


# --- paged prefill: varlen queries, K/V read from a page pool through a block table ---------------------------------

def _check_block_table(block_table, q, batch) -> None:
    expected = f"a 2-D {BLOCK_TABLE_DTYPE} tensor (batch, max_blocks) with batch={batch} on q's device"
    if not isinstance(block_table, torch.Tensor):
        _fail(TypeError, "block_table", "None or " + expected, type(block_table).__name__)
    if block_table.layout != torch.strided or block_table.dim() != 2 or block_table.shape[0] != batch:
        _fail(ValueError, "block_table", expected + " (one row per sequence of cu_seqlens_q)",
              f"shape {tuple(block_table.shape)}, layout {block_table.layout}")
    if block_table.dtype != BLOCK_TABLE_DTYPE:
        _fail(ValueError, "block_table", f"dtype {BLOCK_TABLE_DTYPE}", block_table.dtype)
    if block_table.device != q.device:
        _fail(ValueError, "block_table", f"device {q.device} (same as q)", block_table.device)
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        _fail(ValueError, "block_table", "a contiguous last dimension (stride(-1) == 1; call .contiguous())",
              f"stride {tuple(block_table.stride())}")


def check_block_table_values(table, lengths, page_size, num_blocks) -> None:
    """Every page a sequence reads lies in the pool: table (a CPU tensor (batch, max_blocks)) holds blocks in
    [0, num_blocks) in the first ceil(lengths[b] / page_size) entries of row b."""
    for b, length in enumerate(lengths):
        pages = table[b, :-(-length // page_size)]
        bad = ((pages < 0) | (pages >= num_blocks)).nonzero()
        if len(bad):
            j = int(bad[0, 0])
            _fail(ValueError, f"block_table[{b}, {j}]", f"a block of the pool in [0, {num_blocks}) (sequence {b} "
                  f"reads {length} keys through {len(pages)} pages)", int(pages[j]))


def check_paged_values(cu_seqlens_k, block_table, max_seqlen_k, page_size, num_blocks) -> tuple[list, torch.Tensor]:
    """cu_seqlens_k (start 0, non-decreasing, no sequence longer than max_seqlen_k, or than the total for None; its
    last entry is the keys' total, which no tensor's shape gives) and the block table's entries, read to the host.
    Returns what was read: each sequence's key count and the table as a CPU tensor."""
    bounds = cu_seqlens_k.tolist()
    max_len = bounds[-1] if max_seqlen_k is None else max_seqlen_k
    check_cu_seqlens_values("cu_seqlens_k", bounds, bounds[-1], max_len, "max_seqlen_k")
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    table = block_table.cpu()
    check_block_table_values(table, lengths, page_size, num_blocks)
    return lengths, table


def check_varlen_paged_values(q, k, cu_seqlens_q, cu_seqlens_k, block_table, max_q, max_k) -> None:
    """As check_varlen_values, for a paged call (k the pool): cu_seqlens_q, then cu_seqlens_k and the table's pages."""
    _check_cu_values("q", cu_seqlens_q, q.shape[0], max_q)
    if should_check_values(cu_seqlens_k) or should_check_values(block_table):
        check_paged_values(cu_seqlens_k, block_table, max_k, k.shape[1], k.shape[0])


def _check_no_grad(q, k, v, alibi_slopes) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, alibi_slopes)):
        _fail(ValueError, "block_table", "None when q, k, v or alibi_slopes requires grad (paged K/V is "
              "inference-only: no backward; run under torch.no_grad() or pass packed k, v)", "a tensor")


def check_paged_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, *, causal,
                       softmax_scale, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, out=None) -> Shapes:
    """Validate a paged prefill call (attention_varlen with block_table) and return its Shapes (layout
    "varlen_paged").

    q: (total_q, nheads, headdim); k, v: the pool (num_blocks, page_size, nheads_k, headdim), page_size a positive
    multiple of 16; block_table int32 (batch, max_blocks) on q's device, contiguous last dim, with
    max_blocks * page_size >= max_seqlen_k. cu_seqlens_k gives each sequence's key count (its differences; keys
    0..n-1 of sequence b sit in page block_table[b, j // page_size], row j % page_size). Values (cu_seqlens as in
    check_varlen_inputs, but cu_seqlens_k may end anywhere; the pages each sequence reads inside the pool) are
    checked on the CPU or with config.CHECK_INDICES; the kernels clamp them otherwise. No input may require grad.
    """
    _check_qkv(q, k, v, VARLEN_RANK, VARLEN_LAYOUT, kv_rank=TENSOR_RANK, kv_layout=PAGED_KV_LAYOUT)
    max_q, max_k = _check_varlen_indices(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    total_q, nheads, head_dim = q.shape
    num_blocks, page_size, nheads_k = k.shape[:3]
    if page_size == 0 or page_size % PAGE_MULTIPLE:
        _fail(ValueError, "k", f"a page size (dim 1 of a paged k/v {PAGED_KV_LAYOUT}) that is a positive multiple "
              f"of {PAGE_MULTIPLE}", f"{page_size} (shape {tuple(k.shape)})")
    batch = cu_seqlens_q.numel() - 1
    _check_block_table(block_table, q, batch)
    max_blocks = block_table.shape[1]
    if max_blocks * page_size < max_k:
        _fail(ValueError, "block_table", f"max_blocks * page_size >= max_seqlen_k={max_k} (room in each row for "
              f"the longest sequence's keys)", f"{max_blocks} blocks of {page_size} = {max_blocks * page_size}")
    check_varlen_paged_values(q, k, cu_seqlens_q, cu_seqlens_k, block_table, max_q, max_k)
    _check_out(out, q, k, v, VARLEN_RANK, VARLEN_LAYOUT)
    _check_causal(causal)
    _check_no_grad(q, k, v, alibi_slopes)
    return Shapes(batch=batch, seqlen_q=max_q, seqlen_k=max_k, nheads=nheads, nheads_k=nheads_k,
                  head_dim=head_dim, dtype=q.dtype, device=q.device,
                  softmax_scale=_check_scale(softmax_scale, head_dim), causal=causal,
                  window=_check_window(window_size, causal), softcap=_check_softcap(softcap),
                  has_alibi=_check_alibi(alibi_slopes, q, batch, nheads), layout="varlen_paged",
                  total_q=total_q, total_k=num_blocks * page_size, page_size=page_size, max_blocks=max_blocks,
                  block_stride=block_table.stride(0))
