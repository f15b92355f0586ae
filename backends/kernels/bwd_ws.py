"""Warp-specialised sm90 attention backward in Gluon (issue 21 part 3; docs/bench/gluon-ws-notes.md, "bwd v1", "v2"):
dK and dV, and with DQACC dQ added into an fp32 accumulator by TMA reduce (not deterministic: the adds land in no
fixed order). Its images (op bwd_ws) run between bwd.py's attn_bwd_prep (delta, the accumulator zeroed) and
attn_bwd_convert (dQ from the accumulator), for calls that do not ask for deterministic gradients; the harness
(ci/gluon_ws.py) runs it alone through launcher().

CTA = NUM_WG * 64 keys of one (batch, KV head): NUM_WG consumer warpgroups of 64 keys each (the default partition and
a 4-warp worker), each holding its keys' K and V in shared memory and its dK, dV in registers, and a 1-warp loader
that issues TMA loads of K and V once and then of the query blocks (BLOCK_M rows of Q and dO, with their LSE and
delta rows, which it loads and stores itself) into a STAGES-deep ring, over every query head that shares the KV
head (GQA: their sum, in a fixed order, so the result is deterministic) and every row block whose rows see one of
the CTA's keys. Per query block, on transposed scores (keys x rows):
    S^T = K Q^T,  P^T = exp(S^T - lse),  dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q
with P^T and dS^T fed to wgmma from registers. dK is scaled once at the end; both leave through shared memory (the
consumer's own K/V buffers, no longer read) and a TMA store that clips rows past seqlen_k.

Semantics are fwd_ws.py's: with shift = seqlen_k - seqlen_q, row i sees key j iff
i + shift - left <= j <= i + shift + right (causal is right = 0; an unlimited side is passed as seqlen_q + seqlen_k).
LSE (natural log, +inf for rows without keys) and DELTA = rowsum(dO * O) are (batch, heads, seqlen_q) float32.
"""

import triton
from fwd_ws import LOADER_REGS, LOG2E, box_layout, compile_gluon, encoded_maps, register_split, tensor_map_params
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E_C = gl.constexpr(LOG2E)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Adds the shared tile `src` into global memory at `coord` by TMA (cp.reduce.async.bulk.tensor; waited like a
    store). Triton 3.6 builds the op but its Gluon exposes no Hopper wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


TENSOR_MAPS = ("Q", "K", "V", "DO", "DK", "DV")  # (batch, seqlen, heads, dim), boxes of 64 rows of one head
ACC_MAP = "DQACC"  # the fp32 dQ^T accumulator (batch, heads, head_dim, seqlen_q), rows 16-byte aligned
SCALARS = (("seqlen_q", "i32"), ("seqlen_k", "i32"), ("window_left", "i32"), ("window_right", "i32"),
           ("nheads", "i32"), ("head_ratio", "i32"), ("qk_scale_log2", "fp32"), ("sm_scale", "fp32"))


def dq_box(head_dim: int, tile: dict) -> list[int]:
    """A consumer's fp32 dQ^T tile, a box of the (batch, heads, head_dim, seqlen_q) accumulator: every head dim, or
    with dq_split its share of them."""
    return [1, 1, head_dim // tile.get("dq_split", 1), tile["block_m"]]


def dq_layout(box: list[int]):
    """The shared layout of that tile, as the kernel and the accumulator's descriptor use it."""
    return gl.NVMMASharedLayout.get_default_for(box, gl.float32)


def signature(dtype: str, head_dim: int, tile: dict) -> dict:
    """Q and dO in boxes of block_m rows, K, V, dK and dV of 64 (a consumer's keys); with dq, the fp32 dQ^T
    accumulator in dq_box()es, else DQACC is None."""
    def desc(rows):
        return f"tensordesc<{dtype}[1, {rows}, 1, {head_dim}],{box_layout(rows, head_dim, dtype)!r}>"

    maps = {name: desc(tile["block_m"] if name in ("Q", "DO") else 64) for name in TENSOR_MAPS}
    box = dq_box(head_dim, tile)
    maps[ACC_MAP] = f"tensordesc<fp32{box},{dq_layout(box)!r}>" if tile.get("dq") else "constexpr"
    return maps | {"LSE": "*fp32", "DELTA": "*fp32"} | dict(SCALARS)


def constexprs(head_dim: int, tile: dict) -> dict:
    """Compile-time parameters of a schedule: block_m (query rows per block: the N of the transposed scores),
    stages (query-block ring), num_wg (consumers of 64 keys), and optionally maxnreg, consumer_regs, loader_regs,
    dq_split (1: each consumer adds dQ over its own keys; num_wg: over all the CTA's keys, for its share of the head
    dims: half the reduce traffic, for a barrier between the consumers per block)."""
    _, consumer = register_split(tile["num_wg"], tile.get("maxnreg"), tile.get("consumer_regs"))
    return {"BLOCK_M": tile["block_m"], "HEAD_D": head_dim, "STAGES": tile["stages"], "NUM_WG": tile["num_wg"],
            "CONSUMER_REGS": consumer, "LOADER_REGS": tile.get("loader_regs", LOADER_REGS),
            "DQ_SPLIT": tile.get("dq_split", 1)}


def compile_for(target, dtype: str, head_dim: int, tile: dict):
    """The kernel compiled ahead of time for `target` (a GPUTarget) with a schedule (constexprs()'s tile)."""
    consts = constexprs(head_dim, tile) | ({} if tile.get("dq") else {ACC_MAP: None})
    return compile_gluon(attn_bwd_ws, target, signature(dtype, head_dim, tile), consts, tile)


def params() -> list[tuple[str, str]]:
    """Run-time params of an image (built with dq) in launch order, as fwd_ws.params(): each map, its shape and
    strides, then LSE, DELTA and the scalars."""
    return tensor_map_params(TENSOR_MAPS + (ACC_MAP,)) + [("LSE", "*fp32"), ("DELTA", "*fp32")] + list(SCALARS)


def tensor_maps(tensordesc_meta: list[dict]) -> list[dict]:
    """The manifest's tensor_maps of an image, in params() order."""
    return encoded_maps(tensordesc_meta, TENSOR_MAPS + (ACC_MAP,))


@gluon.jit
def _rows_seen(n_lo, n_hi, band, ROWS: gl.constexpr):
    """The query blocks whose rows see one of keys [n_lo, n_hi): (first block, block count)."""
    seqlen_q, seqlen_k, left, right = band
    shift = seqlen_k - seqlen_q
    row_lo = gl.maximum(n_lo - shift - right, 0)
    row_hi = gl.minimum(n_hi - 1 - shift + left + 1, seqlen_q)
    m0 = row_lo // ROWS
    return m0, gl.maximum(gl.cdiv(row_hi, ROWS) - m0, 0)


@gluon.jit
def _loader(loads, STAGES: gl.constexpr, NUM_WG: gl.constexpr):
    q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, bars, band, off_b, off_hk, n_lo, n_hi, \
        head_ratio, LSE, DELTA, nheads, lse_smem, delta_smem = loads
    kv_ready, ready, empty = bars
    for wg in gl.static_range(NUM_WG):
        mbarrier.expect(kv_ready.index(wg), 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, n_lo + wg * 64, off_hk, 0], kv_ready.index(wg),
                                        k_smem.index(wg))
        tma.async_copy_global_to_shared(v_desc, [off_b, n_lo + wg * 64, off_hk, 0], kv_ready.index(wg),
                                        v_smem.index(wg))
    ROWS: gl.constexpr = q_smem.shape[2]
    m0, n_blocks = _rows_seen(n_lo, n_hi, band, ROWS)
    seqlen_q = band[0]
    L1: gl.constexpr = gl.BlockedLayout([ROWS // 32], [32], [1], [0])
    it = 0
    for g in range(head_ratio):
        off_h = off_hk * head_ratio + g
        bh = (off_b * nheads + off_h).to(gl.int64) * seqlen_q
        for i in range(n_blocks):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            row = (m0 + i) * ROWS
            rows = row + gl.arange(0, ROWS, layout=L1)
            # Rows past seqlen_q: lse +inf makes their probabilities 0 (their Q and dO are TMA's zero fill).
            lse_smem.index(s).store(gl.load(LSE + bh + rows, mask=rows < seqlen_q, other=float("inf")) * LOG2E_C)
            delta_smem.index(s).store(gl.load(DELTA + bh + rows, mask=rows < seqlen_q, other=0.0))
            gl.thread_barrier()  # every lane's rows are stored before the arrive below publishes them
            mbarrier.expect(ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, row, off_h, 0], ready.index(s), q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [off_b, row, off_h, 0], ready.index(s), do_smem.index(s))
            it += 1


@gluon.jit
def _consumer(shared, WG: gl.constexpr, STAGES: gl.constexpr, NUM_WG: gl.constexpr, DQ_SPLIT: gl.constexpr):
    k_smem, v_smem, q_smem, do_smem, bars, dk_desc, dv_desc, band, off_b, off_hk, n_lo, n_hi, head_ratio, qk_scale, \
        sm_scale, dq_desc, ds_smem, dq_smem, ds_ready, lse_smem, delta_smem = shared
    kv_ready, ready, empty = bars
    seqlen_q, seqlen_k, left, right = band
    HEAD_D: gl.constexpr = k_smem.shape[-1]
    ROWS: gl.constexpr = q_smem.shape[2]
    # Transposed scores: 64 keys (M) x 64 rows (N); dK, dV: 64 keys x HEAD_D.
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16])
    A_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=A_L, k_width=2)
    KEY: gl.constexpr = gl.SliceLayout(1, S_L)
    ROW: gl.constexpr = gl.SliceLayout(0, S_L)
    k = k_smem.index(WG).reshape([64, HEAD_D])
    v = v_smem.index(WG).reshape([64, HEAD_D])
    k0 = n_lo + WG * 64
    keys = k0 + gl.arange(0, 64, layout=KEY)
    shift = seqlen_k - seqlen_q
    dk = gl.zeros([64, HEAD_D], gl.float32, A_L)
    dv = gl.zeros([64, HEAD_D], gl.float32, A_L)
    zero_s = gl.zeros([64, ROWS], gl.float32, S_L)
    if dq_desc is not None:
        DQ_ROWS: gl.constexpr = HEAD_D // DQ_SPLIT
        dq_tile = dq_smem.index(WG)
        zero_dq = gl.zeros([DQ_ROWS, ROWS], gl.float32, S_L)
    m0, n_blocks = _rows_seen(n_lo, n_hi, band, ROWS)
    mbarrier.wait(kv_ready.index(WG), 0)
    it = 0
    for g in range(head_ratio):
        off_h = off_hk * head_ratio + g
        for i in range(n_blocks):
            s = it % STAGES
            r0 = (m0 + i) * ROWS
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            q = q_smem.index(s).reshape([ROWS, HEAD_D])
            do = do_smem.index(s).reshape([ROWS, HEAD_D])
            st = warpgroup_mma(k, q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dpt = warpgroup_mma(v, do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=(st,))
            st = st * qk_scale
            # The band mask only where the block is not wholly inside every row's band.
            if (k0 < r0 + ROWS - 1 + shift - left) | (k0 + 63 > r0 + shift + right):
                rows = r0 + gl.arange(0, ROWS, layout=ROW)
                diag = rows[None, :] + shift
                keep = (keys[:, None] >= diag - left) & (keys[:, None] <= diag + right)
                st = gl.where(keep, st, float("-inf"))
            pt = gl.exp2(st - lse_smem.index(s).load(ROW)[None, :])
            dv = warpgroup_mma(gl.convert_layout(pt.to(do.dtype), P_L), do, dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt,))
            dst = (pt * (dpt - delta_smem.index(s).load(ROW)[None, :])).to(q.dtype)
            dk = warpgroup_mma(gl.convert_layout(dst, P_L), q, dk, is_async=True)
            if dq_desc is not None:
                # dQ^T = K^T dS^T, added into the fp32 accumulator by TMA: over this consumer's keys, or (DQ_SPLIT)
                # over every consumer's keys for this consumer's share of the head dims.
                buf = ((it % 2) if DQ_SPLIT > 1 else 0) * NUM_WG  # this block's dS^T: ds_smem[buf + consumer]
                ds_smem.index(buf + WG).store(dst)
                fence_async_shared()
                gl.thread_barrier()  # every thread's dS^T is in place before wgmma (or the other consumer) reads it
                # P^T's and dS^T's registers free before dQ^T's accumulator is live: bm64 at d128 fits in 240
                # registers without serialised wgmma.
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                if DQ_SPLIT > 1:
                    mbarrier.arrive(ds_ready.index(it % 2), count=1)
                    mbarrier.wait(ds_ready.index(it % 2), (it // 2) & 1)
                    dqt = zero_dq
                    for j in gl.static_range(NUM_WG):
                        kj = k_smem.index(j).reshape([64, HEAD_D]).slice(WG * DQ_ROWS, DQ_ROWS, dim=1)
                        dqt = warpgroup_mma(kj.permute((1, 0)), ds_smem.index(buf + j), dqt, use_acc=j > 0,
                                            is_async=True)
                else:
                    dqt = warpgroup_mma(k.permute((1, 0)), ds_smem.index(WG), zero_dq, use_acc=False, is_async=True)
                dv, dk, dqt = warpgroup_mma_wait(0, deps=(dv, dk, dqt))
                mbarrier.arrive(empty.index(s), count=1)
                tma.store_wait(0)  # the previous block's reduce has read dq_tile
                dq_tile.reshape([DQ_ROWS, ROWS]).store(dqt * sm_scale)
                fence_async_shared()
                tma_reduce_add(dq_desc, [off_b, off_h, (WG * DQ_ROWS) if DQ_SPLIT > 1 else 0, r0], dq_tile)
            else:
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                mbarrier.arrive(empty.index(s), count=1)
            it += 1
    # Epilogue through this consumer's own K and V buffers (their last reads are the waited products above; with
    # DQ_SPLIT, the other consumers' too, which read this K: the epilogue waits for them).
    if dq_desc is not None:
        if DQ_SPLIT > 1:
            mbarrier.arrive(ds_ready.index(2), count=1)
            mbarrier.wait(ds_ready.index(2), 0)
    k.store((dk * sm_scale).to(k.dtype))
    v.store(dv.to(v.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [off_b, k0, off_hk, 0], k_smem.index(WG))
    tma.async_copy_shared_to_global(dv_desc, [off_b, k0, off_hk, 0], v_smem.index(WG))
    tma.store_wait(0)


@gluon.jit
def _consumer0(shared, STAGES: gl.constexpr, NUM_WG: gl.constexpr, DQ_SPLIT: gl.constexpr):
    _consumer(shared, 0, STAGES, NUM_WG, DQ_SPLIT)


@gluon.jit
def _consumer1(shared, STAGES: gl.constexpr, NUM_WG: gl.constexpr, DQ_SPLIT: gl.constexpr):
    _consumer(shared, 1, STAGES, NUM_WG, DQ_SPLIT)


@gluon.jit
def attn_bwd_ws(Q, K, V, DO, DK, DV, DQACC, LSE, DELTA, seqlen_q, seqlen_k, window_left, window_right, nheads,
                     head_ratio, qk_scale_log2, sm_scale, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                STAGES: gl.constexpr, NUM_WG: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                DQ_SPLIT: gl.constexpr):
    # Key blocks in launch order: with a causal band the first keys see the most rows, so the heaviest go first.
    n_lo = gl.program_id(0) * (NUM_WG * 64)
    n_hi = gl.minimum(n_lo + NUM_WG * 64, seqlen_k)
    off_b = gl.program_id(1) // (nheads // head_ratio)
    off_hk = gl.program_id(1) % (nheads // head_ratio)
    dtype: gl.constexpr = Q.dtype
    k_smem = gl.allocate_shared_memory(dtype, [NUM_WG, 1, 64, 1, HEAD_D], K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_WG, 1, 64, 1, HEAD_D], V.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_D], Q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_D], DO.layout)
    # Each query block's lse (times log2 e) and delta, stored by the loader beside its Q and dO: the consumers read
    # them where they use them instead of holding them in registers across the products (at bm64 d128 those
    # registers were spilled).
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], ROW_SMEM)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], ROW_SMEM)
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_WG):
        mbarrier.init(kv_ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NUM_WG)
    if DQACC is not None:
        # dS^T of each consumer (bf16, keys x rows); shared between consumers, double-buffered by block parity.
        ds_smem = gl.allocate_shared_memory(dtype, [(2 if DQ_SPLIT > 1 else 1) * NUM_WG, 64, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], dtype))
        dq_smem = gl.allocate_shared_memory(gl.float32, [NUM_WG, 1, 1, HEAD_D // DQ_SPLIT, BLOCK_M], DQACC.layout)
        # ds_ready: per dS buffer (0, 1) and once before the epilogue (2), every consumer arrives.
        ds_ready = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(3):
            mbarrier.init(ds_ready.index(i), count=NUM_WG)
    else:
        ds_smem: gl.constexpr = None
        dq_smem: gl.constexpr = None
        ds_ready: gl.constexpr = None
    fence_async_shared()
    bars = (kv_ready, ready, empty)
    band = (seqlen_q, seqlen_k, window_left, window_right)
    shared = (k_smem, v_smem, q_smem, do_smem, bars, DK, DV, band, off_b, off_hk, n_lo, n_hi, head_ratio,
              qk_scale_log2, sm_scale, DQACC, ds_smem, dq_smem, ds_ready, lse_smem, delta_smem)
    loads = (Q, K, V, DO, k_smem, v_smem, q_smem, do_smem, bars, band, off_b, off_hk, n_lo, n_hi, head_ratio, LSE,
             DELTA, nheads, lse_smem, delta_smem)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer0, (shared, STAGES, NUM_WG, DQ_SPLIT)),
            (_consumer1, (shared, STAGES, NUM_WG, DQ_SPLIT)),
            (_loader, (loads, STAGES, NUM_WG)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer0, (shared, STAGES, NUM_WG, DQ_SPLIT)),
            (_loader, (loads, STAGES, NUM_WG)),
        ], [1], [LOADER_REGS])


def launcher(q, k, v, out, dout, lse, causal=False, window_size=(-1, -1), softmax_scale=None, block_m=64, stages=2,
             num_wg=2, regs=None, loader_regs=LOADER_REGS, maxnreg=None, dq=False, dq_split=1):
    """(launch, finish): launch() runs the kernel alone on buffers prepared here (delta, dK, dV and, with dq, the
    zeroed fp32 dQ accumulator); finish() returns (dq, dk, dv) with dq converted to q's dtype (None unless asked)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    b, seqlen_q, h, d = q.shape
    seqlen_k, hk = k.shape[1], k.shape[2]
    unlimited = seqlen_q + seqlen_k
    left, right = window_size
    left = unlimited if left < 0 else left
    right = 0 if causal else (unlimited if right < 0 else right)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}[q.dtype]
    descs = [TensorDescriptor.from_tensor(t, [1, rows, 1, d], box_layout(rows, d, dtype))
             for t, rows in zip((q, k, v, dout, dk, dv), (block_m, 64, 64, block_m, 64, 64), strict=True)]
    acc = None
    if dq:
        # (batch, heads, head_dim, seqlen_q) with rows padded to 16 bytes, as TMA needs its strides.
        acc = torch.zeros(b, h, d, -(-seqlen_q // 4) * 4, device=q.device, dtype=torch.float32)[..., :seqlen_q]
        box = dq_box(d, {"block_m": block_m, "dq_split": dq_split})
        descs.append(TensorDescriptor.from_tensor(acc, box, dq_layout(box)))
    else:
        descs.append(None)
    maxnreg, consumer = register_split(num_wg, maxnreg, regs)
    grid = (triton.cdiv(seqlen_k, 64 * num_wg), b * hk)

    def launch():
        attn_bwd_ws[grid](*descs, lse, delta, seqlen_q, seqlen_k, left, right, h, h // hk, scale * LOG2E, scale,
                          block_m, d, stages, num_wg, consumer, loader_regs, dq_split, num_warps=4, maxnreg=maxnreg)

    def finish():
        return acc.permute(0, 3, 1, 2).to(q.dtype) if dq else None, dk, dv

    return launch, finish


def backward(*args, **kw):
    """(dq, dk, dv) of attention(q, k, v) (batch, seqlen, heads, dim; bf16 or fp16; head dim 64 or 128) given its
    output, the output's gradient and its LSE (batch, heads, seqlen_q) as fa2rt's forward returns it: launcher()'s
    arguments. dq is None unless asked: then the kernel adds it into an fp32 accumulator (in no fixed order: not
    deterministic)."""
    launch, finish = launcher(*args, **kw)
    launch()
    return finish()
