"""Warp-specialised sm90 attention forward in Gluon (FA3 style; issue 21 part 3, docs/bench/gluon-ws-notes.md). aot.py
builds the images from tiles.json's "ws" entry (the launch ABI below: params(), tensor_maps()); ci/gluon_ws.py
compiles, checks and times other schedules through Triton's launcher (forward()).

CTA tile = NUM_WG * 64 query rows of one (batch, head): NUM_WG consumer warpgroups of 64 rows each (the default
partition and a 4-warp worker) and a 1-warp loader that issues TMA loads of Q and of K and V into a STAGES-deep ring,
with ready/empty mbarriers per stage (empty counts the consumers). Consumers run FA3's intra-warpgroup schedule: QK^T
of block j+1 and PV of block j issued together as asynchronous wgmma (P from registers), the softmax of j+1 while PV
runs. PINGPONG: the consumers take turns issuing their products (a ring of mbarriers), so one's softmax runs under
the other's wgmma. Every partition walks the tiles pid, pid + nprog, ...: a grid of one CTA per SM makes the kernel
persistent (the next tile's loads run under this tile's last blocks and epilogue); a grid of every tile is the plain
launch. The output leaves through shared memory and a TMA store.

Semantics are fwd.py's without softcap and ALiBi: with shift = seqlen_k - seqlen_q, query row i sees key j iff
i + shift - left <= j <= i + shift + right (causal is right = 0; an unlimited side is passed as seqlen_q + seqlen_k);
a row that sees no key gets 0 and LSE +inf. Tensors (batch, seqlen, heads, dim) with a contiguous last dim, read
through 4-D TMA descriptors (boxes of one head's rows; TMA fills zeros past a sequence's end, so no sequence reads
another's rows). GQA: query head h reads KV head h // head_ratio.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)
LOADER_REGS = 24  # the fewest setmaxnreg allows; the loader holds only scalars
# maxnreg and registers per consumer by consumer warpgroups: (NUM_WG + 1) warpgroups share an SM's 64K registers,
# one CTA per SM with 2 consumers, two CTAs with 1; the loader's warpgroup takes LOADER_REGS.
REGISTERS = {1: (128, 232), 2: (168, 240)}


def register_split(num_wg, maxnreg=None, regs=None):
    default_max, default_regs = REGISTERS[num_wg]
    return maxnreg or default_max, regs or default_regs


# --- the launch ABI an image built from this kernel has (aot.py writes it into the manifest) ---
TENSOR_MAPS = ("Q", "K", "V", "O")  # (batch, seqlen, heads, dim) tensors read and written through TMA descriptors
RANK = 4
SCALARS = (("seqlen_q", "i32"), ("seqlen_k", "i32"), ("window_left", "i32"), ("window_right", "i32"),
           ("nheads", "i32"), ("head_ratio", "i32"), ("qk_scale_log2", "fp32"), ("batch", "i32"))


GL_DTYPES = {"bf16": gl.bfloat16, "fp16": gl.float16}


def box_layout(rows: int, head_dim: int, dtype: str):
    """The shared-memory layout of a box of `rows` rows of one head, as the kernel and its descriptors use it."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], GL_DTYPES[dtype])


def signature(dtype: str, head_dim: int, block_n: int) -> dict:
    """The compile signature: TMA descriptors with the boxes the kernel loads (64 query rows per consumer,
    block_n keys), the LSE pointer and the scalars."""
    def desc(rows):
        return f"tensordesc<{dtype}[1, {rows}, 1, {head_dim}],{box_layout(rows, head_dim, dtype)!r}>"

    return ({"Q": desc(64), "K": desc(block_n), "V": desc(block_n), "O": desc(64), "LSE": "*fp32"}
            | dict(SCALARS))


def tensor_map_params(names) -> list[tuple[str, str]]:
    """Each descriptor as Triton 3.6 passes it: the map, then its shape as i32 and its strides as i64, outermost dim
    first."""
    out = []
    for name in names:
        out += ([(name, "tensormap")] + [(f"{name}.shape{i}", "i32") for i in range(RANK)]
                + [(f"{name}.stride{i}", "i64") for i in range(RANK)])
    return out


def params() -> list[tuple[str, str]]:
    """Run-time params in launch order: the descriptors, then LSE and the scalars."""
    return tensor_map_params(TENSOR_MAPS) + [("LSE", "*fp32")] + list(SCALARS)


def constexprs(head_dim: int, tile: dict) -> dict:
    """Compile-time parameters of a schedule (a tiles.json "ws" entry: block_n, stages, pingpong, num_wg, and
    optionally maxnreg, consumer_regs, loader_regs, q_bufs, pairs, peel). Every constexpr of the kernel is named:
    one an ahead-of-time compile leaves out does not take its default."""
    _, consumer = register_split(tile["num_wg"], tile.get("maxnreg"), tile.get("consumer_regs"))
    return {"BLOCK_N": tile["block_n"], "HEAD_D": head_dim, "STAGES": tile["stages"], "PINGPONG": tile["pingpong"],
            "NUM_WG": tile["num_wg"], "CONSUMER_REGS": consumer,
            "LOADER_REGS": tile.get("loader_regs", LOADER_REGS), "Q_BUFS": tile.get("q_bufs", 1),
            "PAIRS": tile.get("pairs", False), "PEEL": tile.get("peel", True)}


def ctas_per_sm(tile: dict) -> int:
    """CTAs that fit on one SM by registers (NUM_WG consumer warpgroups and the loader's, at maxnreg)."""
    return 65536 // (register_split(tile["num_wg"], tile.get("maxnreg"))[0] * 128 * (tile["num_wg"] + 1))


def options(tile: dict) -> dict:
    """Compile options: 4 warps per consumer warpgroup, the register cap that setmaxnreg redistributes."""
    return {"num_warps": 4, "maxnreg": register_split(tile["num_wg"], tile.get("maxnreg"))[0]}


def compile_gluon(kernel, target, sig: dict, consts: dict, tile: dict):
    """A warp-specialised Gluon kernel (this one or bwd_ws's) compiled ahead of time for `target` (a GPUTarget):
    run-time params `sig`, compile-time ones `consts`, options() of the schedule `tile`."""
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = sig | {k: "constexpr" for k in consts}
    return triton.compile(GluonASTSource(kernel, sig, consts), target=target, options=options(tile))


def compile_for(target, dtype: str, head_dim: int, tile: dict):
    """The kernel compiled ahead of time for `target` (a GPUTarget) with a schedule (constexprs()'s tile)."""
    return compile_gluon(attn_fwd_ws, target, signature(dtype, head_dim, tile["block_n"]), constexprs(head_dim, tile),
                         tile)


# Triton's device-side TMA element types -> the driver's CUtensorMapDataType (backends/nvidia/driver.py's table).
TMA_DTYPE_DEVICE_TO_HOST = {8: 10, 9: 8, 10: 9}


def encoded_maps(tensordesc_meta: list[dict], names) -> list[dict]:
    """The manifest's tensor_maps of a compiled image, from Triton's metadata (one entry per descriptor, in the
    order of `names`): what the launch encodes each map with."""
    return [{"param": name, "dtype": TMA_DTYPE_DEVICE_TO_HOST.get(m["elem_type"], m["elem_type"]),
             "elem_size": m["elem_size"], "swizzle": m["swizzle"], "box": list(m["block_size"])}
            for name, m in zip(names, tensordesc_meta, strict=True)]


def tensor_maps(tensordesc_meta: list[dict]) -> list[dict]:
    return encoded_maps(tensordesc_meta, TENSOR_MAPS)


@gluon.jit
def _tile(t, n_m, nheads, band, PAIRS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t: (batch*head, batch, head, first query row, first key block, key blocks, and the keys every row of
    the tile sees: blocks inside [full_lo, full_hi) need no mask). A (batch, head)'s row blocks are consecutive, so
    they run together and share its K/V in the L2; the last rows (with a band they see the most keys) come first, or
    with PAIRS alternately from the last and the first (row blocks n_m - 1, 0, n_m - 2, 1, ...)."""
    seqlen_q, seqlen_k, left, right = band
    bh = t // n_m
    m_idx = t % n_m
    if PAIRS:
        m_idx = gl.where(m_idx % 2 == 0, m_idx // 2, n_m - 1 - m_idx // 2)
    m_lo = (n_m - 1 - m_idx) * BLOCK_M
    m_hi = gl.minimum(m_lo + BLOCK_M, seqlen_q)
    shift = seqlen_k - seqlen_q
    key_lo = gl.maximum(m_lo + shift - left, 0)
    key_hi = gl.minimum(m_hi + shift + right, seqlen_k)
    j0 = key_lo // BLOCK_N
    n_blocks = gl.maximum(gl.cdiv(key_hi, BLOCK_N) - j0, 0)
    full_lo = m_hi - 1 + shift - left
    full_hi = gl.minimum(m_lo + shift + right + 1, seqlen_k)
    return bh, bh // nheads, bh % nheads, m_lo, j0, n_blocks, full_lo, full_hi


@gluon.jit
def _walk(n_tiles, PAIRS: gl.constexpr):
    """(tiles per unit, this program's tile count). A program takes units p, p + programs, ...; a unit is one
    tile, or with PAIRS two consecutive ones (when every program gets at least two), which _tile orders so that a
    unit holds a head's row blocks m and n_m - 1 - m: with a causal band every unit is then equally long and a
    persistent walk stays balanced, while a head's row blocks still run together."""
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    per_unit = 1
    if PAIRS:
        per_unit = 1 + (n_tiles >= 2 * nprog).to(gl.int32)
    n_units = gl.cdiv(n_tiles, per_unit)
    count = (n_units // nprog + (pid < n_units % nprog).to(gl.int32)) * per_unit
    # An odd tile count leaves the last unit (its program's last) one tile short.
    count -= ((per_unit * n_units > n_tiles) & (pid == (n_units - 1) % nprog)).to(gl.int32)
    return per_unit, count


@gluon.jit
def _walk_tile(r, per_unit):
    """This program's r-th tile (see _walk)."""
    shift = per_unit - 1  # per_unit is 1 or 2: a shift and a mask instead of a division
    return ((r >> shift) * gl.num_programs(0) + gl.program_id(0)) * per_unit + (r & shift)


@gluon.jit
def _loader(loads, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_WG: gl.constexpr, PAIRS: gl.constexpr):
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, band, nheads, head_ratio, n_m, n_tiles = loads
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn = bars
    Q_BUFS: gl.constexpr = q_smem.shape[0] // NUM_WG
    it = 0
    ti = 0
    per_unit, count = _walk(n_tiles, PAIRS)
    for r in range(count):
        bh, off_b, off_h, m_lo, j0, n_blocks, full_lo, full_hi = _tile(_walk_tile(r, per_unit), n_m, nheads, band,
                                                                          PAIRS, NUM_WG * 64, BLOCK_N)
        off_hk = off_h // head_ratio
        for wg in gl.static_range(NUM_WG):
            qs = (ti % Q_BUFS) * NUM_WG + wg
            mbarrier.wait(q_empty.index(qs), ((ti // Q_BUFS) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, m_lo + wg * 64, off_h, 0], q_ready.index(qs),
                                            q_smem.index(qs))
        for i in range(n_blocks):
            s = it % STAGES
            ph = (it // STAGES) & 1
            key = (j0 + i) * BLOCK_N
            mbarrier.wait(k_empty.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [off_b, key, off_hk, 0], k_ready.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, key, off_hk, 0], v_ready.index(s), v_smem.index(s))
            it += 1
        ti += 1


@gluon.jit
def _scores(q, k_smem, k_ready, it, zero_s, STAGES: gl.constexpr):
    """Issues S = Q K^T of ring slot it % STAGES once its keys have landed."""
    mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
    k = k_smem.index(it % STAGES).reshape([zero_s.shape[1], k_smem.shape[-1]])
    return warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)


@gluon.jit
def _pv(p, v_smem, v_ready, it, acc, P_L: gl.constexpr, STAGES: gl.constexpr):
    """Issues O += P V of ring slot it % STAGES once its values have landed."""
    mbarrier.wait(v_ready.index(it % STAGES), (it // STAGES) & 1)
    v = v_smem.index(it % STAGES).reshape([v_smem.shape[2], v_smem.shape[-1]])
    return warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), P_L), v, acc, is_async=True)


@gluon.jit
def _approx(op: gl.constexpr, x):
    """A one-operand f32 PTX instruction per element of x (the MUFU approximations)."""
    return gl.inline_asm_elementwise(op + " $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softmax(sc, j, m_i, key_lo, key_hi, qk_scale, full_lo, full_hi, BLOCK_N: gl.constexpr, COL: gl.constexpr):
    """Scores of key block j: masked where the block is not wholly inside every row's band (key_lo, key_hi: each
    row's first and last key, the latter clipped to seqlen_k); returns (p, the rescale of the running sums, the new
    row maxima). One body for masked and unmasked blocks, the masks small branches in it: a causal walk alternates
    between them every tile, and with a second copy of the softmax for masked blocks its short tiles ran out of
    instruction cache (gluon-ws-notes.md, v15 and v16)."""
    # A positive scale ranks raw scores as it ranks scaled ones: scores stay raw and the scale is folded into the
    # row max and exp2's FMA (post). A negative one reverses the ranking, and 0 * -inf would be NaN: any other
    # scale is applied to the scores first (post = 1).
    pre_scaled = qk_scale <= 0.0
    if pre_scaled:
        sc = sc * qk_scale
    post = gl.where(pre_scaled, 1.0, qk_scale)
    # Each bound's mask a branch of its own, taken by the blocks that cross it (a causal band's diagonal block: one
    # compare and one select per score), the block's column offsets against each row's bound.
    cols = gl.arange(0, BLOCK_N, layout=COL)[None, :]
    first = j * BLOCK_N
    if first + BLOCK_N > full_hi:
        sc = gl.where(cols <= (key_hi - first)[:, None], sc, float("-inf"))
    if first < full_lo:
        sc = gl.where(cols >= (key_lo - first)[:, None], sc, float("-inf"))
    # Row max of the scores as they stand, the scale (post) folded into exp2's argument: one FMA per score.
    m_new = gl.maximum(m_i, gl.max(sc, 1) * post)
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(sc * post - m_shift[:, None])
    return p, gl.exp2(m_i - m_shift), m_new


@gluon.jit
def _consumer(shared, WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              NUM_WG: gl.constexpr, PAIRS: gl.constexpr, PEEL: gl.constexpr):
    q_smem, k_smem, v_smem, o_smem, bars, o_desc, LSE, band, nheads, qk_scale, n_m, n_tiles = shared
    HEAD_D: gl.constexpr = q_smem.shape[-1]
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    Q_BUFS: gl.constexpr = q_smem.shape[0] // NUM_WG
    it = 0
    ti = 0
    per_unit, count = _walk(n_tiles, PAIRS)
    for r in range(count):
        bh, off_b, off_h, m_lo, j0, n_blocks, full_lo, full_hi = _tile(_walk_tile(r, per_unit), n_m, nheads, band,
                                                                          PAIRS, NUM_WG * 64, BLOCK_N)
        qs = (ti % Q_BUFS) * NUM_WG + WG
        q = q_smem.index(qs).reshape([64, HEAD_D])
        tile = (off_b, off_h, m_lo + WG * 64, j0, n_blocks, full_lo, full_hi, it, ti // Q_BUFS, qs)
        _consumer_tile(q, k_smem, v_smem, o_smem.index(WG), bars, o_desc, LSE + bh.to(gl.int64) * band[0], band,
                       qk_scale, tile, WG, BLOCK_N, STAGES, PINGPONG, NUM_WG, S_L, O_L, P_L, PEEL)
        it += n_blocks
        ti += 1
    tma.store_wait(0)


@gluon.jit
def _consumer_tile(q, k_smem, v_smem, o_buf, bars, o_desc, LSE, band, qk_scale, tile, WG: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr,
                   S_L: gl.constexpr, O_L: gl.constexpr, P_L: gl.constexpr, PEEL: gl.constexpr):
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn = bars
    off_b, off_h, row0, j0, n_blocks, full_lo, full_hi, it, q_round, qs = tile
    HEAD_D: gl.constexpr = o_buf.shape[-1]
    ROW: gl.constexpr = gl.SliceLayout(1, S_L)
    COL: gl.constexpr = gl.SliceLayout(0, S_L)
    OROW: gl.constexpr = gl.SliceLayout(1, O_L)
    NEXT: gl.constexpr = (WG + 1) % NUM_WG
    mbarrier.wait(q_ready.index(qs), q_round & 1)
    rows = row0 + gl.arange(0, 64, layout=ROW)
    seqlen_q, seqlen_k, left, right = band
    diag = rows + (seqlen_k - seqlen_q)
    key_lo = diag - left
    key_hi = gl.minimum(diag + right, seqlen_k - 1)
    m_i = gl.full([64], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([64], gl.float32, ROW)
    acc = gl.zeros([64, HEAD_D], gl.float32, O_L)
    zero_s = gl.zeros([64, BLOCK_N], gl.float32, S_L)
    if n_blocks > 0:
        # Block 0: its scores alone. Then per block: this block's QK^T and the previous block's PV in flight
        # together, the softmax of this block while PV runs.
        if PEEL:
            if PINGPONG:
                mbarrier.wait(turn.index(WG), it & 1)
            sc = _scores(q, k_smem, k_ready, it, zero_s, STAGES)
            if PINGPONG:
                mbarrier.arrive(turn.index(NEXT), count=1)
            sc = warpgroup_mma_wait(0, deps=(sc,))
            mbarrier.arrive(k_empty.index(it % STAGES), count=1)
            p, alpha, m_i = _softmax(sc, j0, m_i, key_lo, key_hi, qk_scale, full_lo, full_hi, BLOCK_N, COL)
            l_i = gl.sum(p, 1)
        else:
            # No copy of the first block (not yet measured; gluon-ws-notes.md, v17): block 0 runs the loop's body,
            # its "previous" product zero P against block 0's own values (acc stays 0, and alpha = 0 then).
            p = gl.zeros([64, BLOCK_N], gl.float32, S_L)
        FIRST: gl.constexpr = 1 if PEEL else 0
        for i in range(FIRST, n_blocks):
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (it + i) & 1)
            sc = _scores(q, k_smem, k_ready, it + i, zero_s, STAGES)
            if PEEL:
                acc = _pv(p, v_smem, v_ready, it + i - 1, acc, P_L, STAGES)
            else:
                acc = _pv(p, v_smem, v_ready, it + gl.maximum(i - 1, 0), acc, P_L, STAGES)
            if PINGPONG:
                mbarrier.arrive(turn.index(NEXT), count=1)
            sc = warpgroup_mma_wait(1, deps=(sc,))
            mbarrier.arrive(k_empty.index((it + i) % STAGES), count=1)
            p, alpha, m_i = _softmax(sc, j0 + i, m_i, key_lo, key_hi, qk_scale, full_lo, full_hi, BLOCK_N, COL)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            if PEEL:
                mbarrier.arrive(v_empty.index((it + i - 1) % STAGES), count=1)
            elif i > 0:  # block 0's values stay for its real product
                mbarrier.arrive(v_empty.index((it + i - 1) % STAGES), count=1)
            acc = acc * gl.convert_layout(alpha, OROW)[:, None]
            l_i = l_i * alpha + gl.sum(p, 1)
        acc = _pv(p, v_smem, v_ready, it + n_blocks - 1, acc, P_L, STAGES)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index((it + n_blocks - 1) % STAGES), count=1)
    mbarrier.arrive(q_empty.index(qs), count=1)

    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    # One reciprocal per row and a multiply per element, both reciprocal and log2 the hardware's approximations
    # (l_safe >= 1, so no subnormal path; <= 1 ulp, 2^-22 relative): the epilogue runs cold from the instruction
    # cache once per tile, and IEEE division and libdevice's log2 are ~4x its code.
    out = acc * gl.convert_layout(_approx("rcp.approx.ftz.f32", l_safe), OROW)[:, None]
    lse = gl.where(empty, float("inf"), (m_i + _approx("lg2.approx.ftz.f32", l_safe)) * LN2)
    # The output through shared memory and a TMA store (rows past the sequence clipped); the previous tile's store
    # from this buffer is waited for first.
    tma.store_wait(0)
    o_buf.reshape([64, HEAD_D]).store(out.to(o_buf.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, row0, off_h, 0], o_buf)
    gl.store(LSE + rows, lse, mask=rows < band[0])


@gluon.jit
def _consumer0(shared, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr,
               PAIRS: gl.constexpr, PEEL: gl.constexpr):
    _consumer(shared, 0, BLOCK_N, STAGES, PINGPONG, NUM_WG, PAIRS, PEEL)


@gluon.jit
def _consumer1(shared, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr,
               PAIRS: gl.constexpr, PEEL: gl.constexpr):
    _consumer(shared, 1, BLOCK_N, STAGES, PINGPONG, NUM_WG, PAIRS, PEEL)


@gluon.jit
def attn_fwd_ws(Q, K, V, O, LSE, seqlen_q, seqlen_k, window_left, window_right, nheads, head_ratio,  # noqa: E741
                qk_scale_log2, batch, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                PINGPONG: gl.constexpr, NUM_WG: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                Q_BUFS: gl.constexpr = 1, PAIRS: gl.constexpr = False, PEEL: gl.constexpr = True):
    q_desc, k_desc, v_desc, o_desc, qk_scale = Q, K, V, O, qk_scale_log2
    n_m = gl.cdiv(seqlen_q, NUM_WG * 64)
    n_tiles = n_m * batch * nheads
    dtype: gl.constexpr = q_desc.dtype
    # Q_BUFS > 1: the loader fetches a persistent walk's next tile's queries while this tile runs.
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFS * NUM_WG, 1, 64, 1, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_D], v_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [NUM_WG, 1, 64, 1, HEAD_D], o_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS * NUM_WG, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS * NUM_WG, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_BUFS * NUM_WG):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        if i < NUM_WG:
            mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_WG)
        mbarrier.init(v_empty.index(i), count=NUM_WG)
    # Consumer 0 takes the first turn: its barrier's phase 0 completes at once.
    mbarrier.arrive(turn.index(0), count=1)
    fence_async_shared()
    bars = (q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn)
    band = (seqlen_q, seqlen_k, window_left, window_right)
    # Runtime values and buffers travel in tuples; constexprs are written in the calls (a tuple assigned to a name
    # turns its constexprs into tensors).
    shared = (q_smem, k_smem, v_smem, o_smem, bars, o_desc, LSE, band, nheads, qk_scale, n_m, n_tiles)
    loads = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, band, nheads, head_ratio, n_m, n_tiles)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer0, (shared, BLOCK_N, STAGES, PINGPONG, NUM_WG, PAIRS, PEEL)),
            (_consumer1, (shared, BLOCK_N, STAGES, PINGPONG, NUM_WG, PAIRS, PEEL)),
            (_loader, (loads, BLOCK_N, STAGES, NUM_WG, PAIRS)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer0, (shared, BLOCK_N, STAGES, PINGPONG, NUM_WG, PAIRS, PEEL)),
            (_loader, (loads, BLOCK_N, STAGES, NUM_WG, PAIRS)),
        ], [1], [LOADER_REGS])


def descriptors(q, k, v, o, block_n):
    """4-D TMA descriptors over (batch, seqlen, heads, dim) as given (any strides TMA takes): boxes of one head's
    rows, zero-filled past each sequence's end."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    d = q.shape[-1]
    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(q.dtype)]
    q_layout, kv_layout = box_layout(64, d, dtype), box_layout(block_n, d, dtype)
    return (TensorDescriptor.from_tensor(q, [1, 64, 1, d], q_layout),
            TensorDescriptor.from_tensor(k, [1, block_n, 1, d], kv_layout),
            TensorDescriptor.from_tensor(v, [1, block_n, 1, d], kv_layout),
            TensorDescriptor.from_tensor(o, [1, 64, 1, d], q_layout))


_SMS = {}


def forward(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, block_n=128, stages=2, pingpong=False,
            num_wg=2, persistent=False, regs=None, loader_regs=LOADER_REGS, maxnreg=None, q_bufs=1,
            pairs=False, peel=True):
    """(out, lse) of q (batch, seqlen_q, heads, dim), k and v (batch, seqlen_k, heads_k, dim), bf16 or fp16, head
    dim 64 or 128, flash-attn 2's causal/window semantics (causal folds in as right = 0)."""
    import torch
    b, seqlen_q, h, d = q.shape
    seqlen_k = k.shape[1]
    unlimited = seqlen_q + seqlen_k
    left, right = window_size
    left = unlimited if left < 0 else left
    right = 0 if causal else (unlimited if right < 0 else right)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, seqlen_q, device=q.device, dtype=torch.float32)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    qd, kd, vd, od = descriptors(q, k, v, o, block_n)
    n_tiles = triton.cdiv(seqlen_q, 64 * num_wg) * b * h
    if q.device not in _SMS:
        _SMS[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count
    maxnreg, consumer = register_split(num_wg, maxnreg, regs)
    per_sm = ctas_per_sm({"num_wg": num_wg, "maxnreg": maxnreg})
    grid = (min(n_tiles, _SMS[q.device] * per_sm) if persistent else n_tiles,)
    attn_fwd_ws[grid](qd, kd, vd, od, lse, seqlen_q, seqlen_k, left, right, h, h // k.shape[2], scale * LOG2E, b,
                      block_n, d, stages, pingpong, num_wg, consumer, loader_regs, q_bufs, pairs, peel, num_warps=4,
                      maxnreg=maxnreg)
    return o, lse
