"""--varlen: fa2rt.attention_varlen (sequences packed end to end) against fa2rt's dense call and PyTorch's SDPA.

Three parts, bf16, head dims 64/128 (--varlen-head-dim), causal and not (--causal), forward and forward+backward:

equal   the grid's batches packed: batch = 16384 // seqlen sequences of seqlen tokens (--varlen-seqlen, the grid's
        512..16k), nheads = 2048 // headdim; fa2rt's dense call on (batch, seqlen, nheads, headdim) against its
        varlen call on the same memory viewed as (batch * seqlen, nheads, headdim) with equal cu_seqlens, both
        timed in turn for EQUAL_ROUNDS rounds, each keeping its median round. Ratio: dense_ms / varlen_ms (bar:
        >= 0.95 at every point).
mixed   per seed (--varlen-seeds) a draw of sequence lengths between 64 and 8192 summing to 16384 tokens (see
        draw_lengths), nheads = 2048 // headdim. Contenders on the same packed batch: fa2rt_varlen; SDPA's flash,
        efficient and cuDNN backends through nested jagged tensors (torch.nested.nested_tensor_from_jagged over the
        packed tensors, transposed to (batch, nheads, j, headdim), each inside sdpa_kernel(<backend>)); torch's own
        varlen entry point (torch.nn.attention.varlen.varlen_attn) where the installed torch has one; and SDPA on
        the batch padded to its longest sequence (right padding; a boolean key-padding mask when not causal; when
        causal no mask is needed, since every sequence's q and k lengths are equal and padding comes last), each
        backend alone, the padded tensors being the inputs (the padding copies are not timed). FLOPs count the real
        tokens of each sequence (sum over sequences of 4 * nheads * len^2 * headdim, halved for causal), so every
        contender gets the same FLOPs. Bars: SDPA flash (nested) / fa2rt_varlen time >= 1.2 forward, >= 1.1
        forward+backward, at every point.
memory  peak memory (beyond the inputs, after a warm-up call) of one forward+backward of fa2rt_varlen and of SDPA flash
        (nested) on the first seed's batch, and on the same batch with its longest sequence doubled: an allocation
        growing with max_seqlen^2 would multiply the extra bytes by up to 4 while the tokens grow far less. Bar:
        extra-bytes growth <= 1.1 x max(token growth, max_seqlen growth).

Writes varlen-<tag>.json (environment, settings, the three parts' rows, bars) and prints the tables."""

import copy
import functools
import importlib
import inspect
import math
import random
import sys

import torch

from .. import api
from . import common
from .common import PASSES, fwd_flops, num, result, speedup

VARLEN_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
# The equal-lengths part compares two fa2rt calls a few percent apart: each point times both in turn this many
# rounds and keeps the median round of each (a drift in the device's clocks hits both alike).
EQUAL_ROUNDS = 3
VARLEN_HEAD_DIMS = (64, 128)
VARLEN_SEEDS = (0,)
VARLEN_DTYPE = "bfloat16"
VARLEN_PASSES = ("fwd", "fwd+bwd")
MIN_LEN, MAX_LEN = 64, 8192  # the mixed draw's bounds (the patchable module globals are read at call time)

NESTED_SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
PADDED_SDPA = ("padded_flash", "padded_efficient", "padded_cudnn")
MIXED_CONTENDERS = ("fa2rt_varlen", *NESTED_SDPA, "torch_varlen", *PADDED_SDPA)
MEMORY_CONTENDERS = ("fa2rt_varlen", "sdpa_flash")
# Contender passes not run, with why: each would break the rest of the run.
NOT_RUN = {("sdpa_cudnn", "fwd+bwd"): "not run: cuDNN's backward on nested jagged tensors fails ('mha_graph.execute "
                                      "... is_good()') and, unsynchronised, left an illegal address that faulted the "
                                      "next call (H200, torch 2.11.0+cu130, 2026-12-02)"}
FA2RT = ("fa2rt_dense", "fa2rt_varlen")

EQUAL_BAR = 0.95
MIXED_BARS = {"fwd": 1.2, "fwd+bwd": 1.1}
MEMORY_SLACK = 1.1
DRAW_RULE = ("lengths drawn log-uniformly in [min_len, max_len] (random.Random(seed), rounded to integers) while "
             "the next one fits below the total; the rest becomes the last sequence when it is at least min_len, "
             "else it is added to the shortest sequence if that stays within max_len, else the last sequence is "
             "min_len long and the longest gives up the difference")


# ---------------------------------------------------------------------------------------------------------------
# The batches


def draw_lengths(seed: int, total: int, min_len: int, max_len: int) -> list[int]:
    """Sequence lengths in [min_len, max_len] summing to total exactly, reproducible from seed (DRAW_RULE)."""
    if not (0 < min_len and 3 * min_len <= max_len):
        raise ValueError(f"min_len, max_len: expected 0 < min_len and 3 * min_len <= max_len, got {min_len}, "
                         f"{max_len}")
    if total < min_len:
        raise ValueError(f"total: expected at least min_len={min_len}, got {total}")
    rng = random.Random(seed)
    lengths = []
    while True:
        n = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        left = total - sum(lengths)
        if n >= left:  # left <= n <= max_len
            break
        lengths.append(n)
    if left >= min_len:
        lengths.append(left)
        return lengths
    shortest = lengths.index(min(lengths))  # lengths is not empty: total >= min_len > left
    if lengths[shortest] + left <= max_len:
        lengths[shortest] += left
        return lengths
    # Every sequence is longer than max_len - min_len >= 2 * min_len: the longest can give min_len - left away.
    longest = lengths.index(max(lengths))
    lengths[longest] -= min_len - left
    return [*lengths, min_len]


def with_longest_doubled(lengths) -> list[int]:
    longest = lengths.index(max(lengths))
    return [2 * n if i == longest else n for i, n in enumerate(lengths)]


def cu_seqlens(lengths, device) -> torch.Tensor:
    """int32 (len(lengths) + 1,): 0 and the running sums."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def varlen_flops(lengths, nheads, head_dim, causal) -> float:
    """Forward FLOPs of the real tokens: sum over sequences of fwd_flops(1, nheads, len, head_dim, causal)."""
    return sum(fwd_flops(1, nheads, n, head_dim, causal) for n in lengths)


def padded(packed, lengths) -> torch.Tensor:
    """(batch, max_len, nheads, headdim) zeros with sequence b's rows of packed at its start (right padding)."""
    out = packed.new_zeros(len(lengths), max(lengths), *packed.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = packed[start:start + n]
        start += n
    return out


def key_padding_mask(lengths, device) -> torch.Tensor:
    """bool (batch, 1, 1, max_len): True where the key is a real token (SDPA keeps the True positions)."""
    positions = torch.arange(max(lengths), device=device)
    return (positions[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# The contenders: each builds a no-argument forward from the tensors of one pass (leaves requiring grad for a
# backward pass), outside the timing


def fa2rt_dense(causal):
    return lambda q, k, v: (lambda: api.attention(q, k, v, causal=causal))


def fa2rt_varlen(cu, max_len, causal):
    return lambda q, k, v: (lambda: api.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal))


def nested_sdpa(cu, lengths, causal, backend_name):
    """SDPA on nested jagged views of the packed tensors (built once per pass; min/max given so no call syncs)."""
    from torch.nn.attention import sdpa_kernel

    backend, offsets = common.sdpa_backend(backend_name), cu.long()

    def build(q, k, v):
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min(lengths),
                                                             max_seqlen=max(lengths)).transpose(1, 2)
                      for t in (q, k, v))

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qn, kn, vn, is_causal=causal)
        return run
    return build


def torch_varlen_entry():
    """torch.nn.attention.varlen.varlen_attn where the installed torch has it, else None."""
    try:
        return importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return None


def torch_varlen(cu, lengths, causal):
    """torch's varlen entry point; its causal switch is is_causal in some releases, window_size (-1, 0) in others."""
    entry = torch_varlen_entry()
    params = inspect.signature(entry).parameters
    if "is_causal" in params:
        options = {"is_causal": causal}
    elif causal:
        options = {"window_size": (-1, 0)}
    else:
        options = {}
    max_len = max(lengths)
    return lambda q, k, v: (lambda: entry(q, k, v, cu, cu, max_len, max_len, **options))


def padded_sdpa(lengths, causal, backend_name):
    """SDPA on padded (batch, max_len, nheads, headdim) tensors: a key-padding mask unless causal."""
    from torch.nn.attention import sdpa_kernel

    backend = common.sdpa_backend(backend_name.replace("padded_", "sdpa_"))

    def build(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        mask = None if causal else key_padding_mask(lengths, q.device)

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                        is_causal=causal)
        return run
    return build


def mixed_contenders(packed, lengths, causal, names=MIXED_CONTENDERS) -> dict:
    """{name: (tensors, build)} of the mixed part's contenders among names (torch_varlen only where torch has
    it): the packed q, k, v, or their padded copies (made only when a padded contender is asked for)."""
    cu, max_len = cu_seqlens(lengths, packed[0].device), max(lengths)
    out = {"fa2rt_varlen": (packed, fa2rt_varlen(cu, max_len, causal))}
    out.update({name: (packed, nested_sdpa(cu, lengths, causal, name)) for name in NESTED_SDPA})
    if torch_varlen_entry() is not None:
        out["torch_varlen"] = (packed, torch_varlen(cu, lengths, causal))
    if any(name in PADDED_SDPA for name in names):
        padded_inputs = tuple(padded(t, lengths) for t in packed)
        out.update({name: (padded_inputs, padded_sdpa(lengths, causal, name)) for name in PADDED_SDPA})
    return {name: out[name] for name in names if name in out}


# ---------------------------------------------------------------------------------------------------------------
# Timing rows


def explain_key(contender, pass_name) -> str:
    return f"{contender}_explain" + ("_grad" if PASSES[pass_name].grad else "")


def explain_varlen(q, k, v, lengths, causal) -> dict:
    cu, max_len = cu_seqlens(lengths, q.device), max(lengths)
    return common.explain_safely(q, k, v, cu, cu, max_len, max_len, causal=causal)


def time_contenders(row, contenders, passes, flops, explains, warmup, rep) -> dict:
    """Times every contender of every pass into row; an fa2rt contender only where its explain (explains[name]:
    tensors -> explain record, stored under explain_key) says a kernel runs."""
    for pass_name in passes:
        p = PASSES[pass_name]
        prepares = {}
        for name, (tensors, build) in contenders.items():
            if (name, pass_name) in NOT_RUN:
                common.store(row, name, pass_name, {"error": NOT_RUN[name, pass_name]})
                continue
            inputs = p.inputs(*tensors)
            if name in explains:
                decision = row.setdefault(explain_key(name, pass_name), explains[name](*inputs))
                if decision["path"] != "kernel":
                    common.store(row, name, pass_name, common.not_timed(decision))
                    continue
            prepares[name] = functools.partial(_prepare, p, build, inputs)
        for name, res in common.measure_together(prepares, p.flop_factor * flops, warmup, rep).items():
            common.store(row, name, pass_name, res)
        del prepares
    return row


def _prepare(p, build, inputs):
    """The timed callable of a contender in pass p; building its forward (views, masks) is untimed, and its errors
    are the contender's (measure_together() and peak_memory() catch them)."""
    return p.prepare(build(*inputs), inputs)


def merge_rounds(rounds: list[dict], contenders, passes) -> dict:
    """One row from rounds of the same timings: per contender and pass, the result of the round with the median
    time, and every round's time under "rounds_ms" (the spread: a ratio within it is noise). The first round's
    explain records and errors stand."""
    row = copy.deepcopy(rounds[0])
    for pass_name in passes:
        for name in contenders:
            merged = common.median_round([common.result(r, name, pass_name) for r in rounds])
            if merged is not None:
                common.store(row, name, pass_name, merged)
    return row


def equal_row(head_dim, causal, seqlen, *, passes=VARLEN_PASSES, warmup=25, rep=100) -> dict:
    """One equal-lengths point: fa2rt's dense and varlen calls on the same (packed) memory."""
    batch, nheads = max(1, common.TOKENS // seqlen), common.HIDDEN // head_dim
    lengths = [seqlen] * batch
    dense = tuple(torch.randn(batch, seqlen, nheads, head_dim, device=common.DEVICE, dtype=getattr(torch, VARLEN_DTYPE))
                  for _ in range(3))
    packed = tuple(t.view(batch * seqlen, nheads, head_dim) for t in dense)  # the same memory, no copy
    cu = cu_seqlens(lengths, common.DEVICE)
    contenders = {"fa2rt_dense": (dense, fa2rt_dense(causal)),
                  "fa2rt_varlen": (packed, fa2rt_varlen(cu, seqlen, causal))}
    explains = {"fa2rt_dense": lambda q, k, v: common.explain_safely(q, k, v, causal=causal),
                "fa2rt_varlen": lambda q, k, v: explain_varlen(q, k, v, lengths, causal)}
    row = {"part": "equal", "dtype": VARLEN_DTYPE, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
           "batch": batch, "nheads": nheads, "tokens": batch * seqlen}
    flops = varlen_flops(lengths, nheads, head_dim, causal)
    rounds = [time_contenders(dict(row), contenders, passes, flops, explains, warmup, rep)
              for _ in range(EQUAL_ROUNDS)]
    row.update(merge_rounds(rounds, contenders, passes))
    for pass_name in passes:
        row.setdefault("dense_over_varlen", {})[pass_name] = speedup(
            common.ms_of(row, "fa2rt_varlen", pass_name), common.ms_of(row, "fa2rt_dense", pass_name))
    return row


def mixed_row(seed, lengths, head_dim, causal, *, passes=VARLEN_PASSES, warmup=25, rep=100) -> dict:
    """One mixed-lengths point: every contender on the same packed batch."""
    nheads, total = common.HIDDEN // head_dim, sum(lengths)
    packed = tuple(torch.randn(total, nheads, head_dim, device=common.DEVICE, dtype=getattr(torch, VARLEN_DTYPE))
                   for _ in range(3))
    contenders = mixed_contenders(packed, lengths, causal)
    explains = {"fa2rt_varlen": lambda q, k, v: explain_varlen(q, k, v, lengths, causal)}
    row = {"part": "mixed", "seed": seed, "dtype": VARLEN_DTYPE, "head_dim": head_dim, "causal": causal,
           "nheads": nheads, "batch": len(lengths), "tokens": total, "max_seqlen": max(lengths),
           "lengths": list(lengths)}
    time_contenders(row, contenders, passes, varlen_flops(lengths, nheads, head_dim, causal), explains, warmup,
                    rep)
    for pass_name in passes:
        mine = common.ms_of(row, "fa2rt_varlen", pass_name)
        padded_best = common.best_of(row, PADDED_SDPA, pass_name)
        row.setdefault("ratios", {})[pass_name] = {
            "sdpa_flash_over_fa2rt": speedup(mine, common.ms_of(row, "sdpa_flash", pass_name)),
            "best_nested_over_fa2rt": speedup(mine, common.best_of(row, NESTED_SDPA, pass_name)[1]),
            "torch_varlen_over_fa2rt": speedup(mine, common.ms_of(row, "torch_varlen", pass_name)),
            "best_padded": padded_best[0], "best_padded_over_fa2rt": speedup(mine, padded_best[1])}
    return row


def memory_rows(lengths, head_dim, causal) -> list[dict]:
    """Peak memory of one forward+backward of MEMORY_CONTENDERS at lengths and with the longest doubled."""
    rows, p = [], PASSES["fwd+bwd"]
    for label, lens in (("drawn", list(lengths)), ("longest doubled", with_longest_doubled(lengths))):
        nheads, total = common.HIDDEN // head_dim, sum(lens)
        common.recover()
        packed = tuple(torch.randn(total, nheads, head_dim, device=common.DEVICE,
                                   dtype=getattr(torch, VARLEN_DTYPE)) for _ in range(3))
        contenders = mixed_contenders(packed, lens, causal, MEMORY_CONTENDERS)
        for name in MEMORY_CONTENDERS:
            tensors, build = contenders[name]
            inputs = p.inputs(*tensors)
            row = {"batch_lengths": label, "impl": name, "dtype": VARLEN_DTYPE, "head_dim": head_dim,
                   "causal": causal, "nheads": nheads, "tokens": total, "max_seqlen": max(lens),
                   "out_bytes": packed[0].numel() * packed[0].element_size()}
            if name == "fa2rt_varlen":
                row["fa2rt_varlen_explain_grad"] = decision = explain_varlen(*inputs, lens, causal)
                if decision["path"] != "kernel":
                    rows.append({**row, **common.not_timed(decision)})
                    continue
            rows.append({**row, **common.peak_memory(functools.partial(_prepare, p, build, inputs))})
            del inputs
        del packed, contenders
    return rows


def memory_growth(rows) -> list[dict]:
    """Per (impl, head dim, causal): extra-bytes growth from the drawn batch to the longest doubled, against the
    growth of the tokens and of max_seqlen; linear: extra growth <= MEMORY_SLACK x the larger of those two."""
    out = []
    for key in dict.fromkeys((r["impl"], r["head_dim"], r["causal"]) for r in rows):
        pair = [r for r in rows if (r["impl"], r["head_dim"], r["causal"]) == key]
        first, second = (pair + [{}, {}])[:2]
        growth = {"impl": key[0], "head_dim": key[1], "causal": key[2]}
        if "extra_bytes" in first and "extra_bytes" in second and first["extra_bytes"] > 0:
            extra = second["extra_bytes"] / first["extra_bytes"]
            tokens, max_len = second["tokens"] / first["tokens"], second["max_seqlen"] / first["max_seqlen"]
            growth.update(extra_growth=extra, tokens_growth=tokens, max_seqlen_growth=max_len,
                          linear=extra <= MEMORY_SLACK * max(tokens, max_len))
        else:
            growth.update(extra_growth=None, linear=None)
        out.append(growth)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Bars and tables


def bar_record(name, pass_name, bar, values) -> dict:
    """{"name", "pass", "bar", "n", "geomean", "min", "met"}: met when every measured value reaches the bar; None
    when nothing was measured."""
    values = [x for x in values if x is not None]
    return {"name": name, "pass": pass_name, "bar": bar, "n": len(values),
            "geomean": common.geomean(values) if values else None, "min": min(values) if values else None,
            "met": min(values) >= bar if values else None}


def bars(equal, mixed, growth, passes=VARLEN_PASSES) -> list[dict]:
    out = [bar_record("equal lengths: fa2rt dense / varlen time", p, EQUAL_BAR,
                      [r["dense_over_varlen"][p] for r in equal]) for p in passes]
    out += [bar_record("mixed lengths: SDPA flash (nested) / fa2rt varlen time", p, MIXED_BARS[p],
                       [r["ratios"][p]["sdpa_flash_over_fa2rt"] for r in mixed]) for p in passes if p in MIXED_BARS]
    measured = [g["linear"] for g in growth if g["impl"] == "fa2rt_varlen" and g["linear"] is not None]
    out.append({"name": "memory: fa2rt varlen extra bytes grow at most linearly in max_seqlen", "pass": "fwd+bwd",
                "n": len(measured), "met": all(measured) if measured else None})
    return out


def _tflops(res) -> str:
    return f"{res['tflops']:8.1f}" if "tflops" in res else f"{'fallback' if res.get('fallback') else 'err':>8}"


def equal_table(rows, passes=VARLEN_PASSES) -> str:
    head = f"{'d':>4}{'causal':>7}{'seqlen':>7}{'batch':>6}" + "".join(
        f"{p + ' dense':>15}{'varlen':>8}{'ratio':>7}" for p in passes)
    lines = [f"varlen, equal lengths ({VARLEN_DTYPE}, {common.TOKENS} tokens): TFLOP/s of fa2rt's dense and varlen "
             f"calls, ratio dense_ms / varlen_ms (bar >= {EQUAL_BAR})", head]
    for r in rows:
        cells = "".join(f"{_tflops(result(r, 'fa2rt_dense', p)):>15}{_tflops(result(r, 'fa2rt_varlen', p))}"
                        f"{num(r['dense_over_varlen'][p], 7)}" for p in passes)
        lines.append(f"{r['head_dim']:>4}{r['causal']!s:>7}{r['seqlen']:>7}{r['batch']:>6}{cells}")
    return "\n".join(lines)


def mixed_table(rows, passes=VARLEN_PASSES) -> str:
    short = {"fa2rt_varlen": "fa2rt", "sdpa_flash": "flash", "sdpa_efficient": "effic", "sdpa_cudnn": "cudnn",
             "torch_varlen": "t.varlen", "padded_flash": "p.flash", "padded_efficient": "p.effic",
             "padded_cudnn": "p.cudnn"}
    lines = [f"varlen, mixed lengths ({VARLEN_DTYPE}): TFLOP/s of the real tokens; flash/effic/cudnn: SDPA on nested "
             "jagged tensors, t.varlen: torch.nn.attention.varlen, p.*: SDPA padded to the longest; ratios: time "
             f"over fa2rt's (bars: flash {', '.join(f'{p} >= {b}' for p, b in MIXED_BARS.items())})",
             f"{'seed':>4}{'d':>4}{'causal':>7}{'pass':>8}" + "".join(f"{short[n]:>9}" for n in MIXED_CONTENDERS)
             + f"{'flash/':>8}{'padded/':>8}"]
    for r in rows:
        for p in passes:
            cells = "".join(f"{_tflops(result(r, n, p)):>9}" for n in MIXED_CONTENDERS)
            ratios = r["ratios"][p]
            lines.append(f"{r['seed']:>4}{r['head_dim']:>4}{r['causal']!s:>7}{p:>8}{cells}"
                         f"{num(ratios['sdpa_flash_over_fa2rt'], 8)}{num(ratios['best_padded_over_fa2rt'], 8)}")
    for seed in dict.fromkeys(r["seed"] for r in rows):
        lengths = next(r["lengths"] for r in rows if r["seed"] == seed)
        lines.append(f"seed {seed}: {len(lengths)} sequences, longest {max(lengths)}: {lengths}")
    return "\n".join(lines)


def memory_table(rows, growth) -> str:
    mib = 2.0 ** 20
    lines = ["varlen, peak memory of one forward+backward beyond its inputs, the drawn batch and the same with its "
             "longest sequence doubled",
             f"{'impl':14}{'d':>4}{'causal':>7}{'tokens':>8}{'longest':>8}{'extra MiB':>11}{'extra/out':>10}"]
    for r in rows:
        head = f"{r['impl']:14}{r['head_dim']:>4}{r['causal']!s:>7}{r['tokens']:>8}{r['max_seqlen']:>8}"
        lines.append(f"{head}{r['extra_bytes'] / mib:11.1f}{r['extra_bytes'] / r['out_bytes']:10.2f}"
                     if "extra_bytes" in r else f"{head}  {r['error'][:90]}")
    for g in growth:
        if g["extra_growth"] is not None:
            lines.append(f"{g['impl']} d{g['head_dim']} causal={g['causal']}: extra x{g['extra_growth']:.2f}, "
                         f"tokens x{g['tokens_growth']:.2f}, max_seqlen x{g['max_seqlen_growth']:.2f}: "
                         + ("linear" if g["linear"] else "GROWS FASTER THAN LINEAR"))
    return "\n".join(lines)


def bars_table(records) -> str:
    lines = ["varlen bars (issue 16):"]
    for b in records:
        state = {True: "met", False: "NOT MET", None: "not measured"}[b["met"]]
        figures = (f" geomean {num(b['geomean'], 0)}, min {num(b['min'], 0)} over {b['n']} points (bar >= {b['bar']})"
                   if "bar" in b else f" over {b['n']} configurations")
        lines.append(f"  {b['name']}, {b['pass']}:{figures}: {state}")
    return "\n".join(lines)


def _raised(res: dict) -> bool:
    return "error" in res and not res.get("fallback") and res["error"] != "not measured"


def kernel_errors(equal, mixed, memory) -> list[str]:
    """fa2rt calls meant to run a kernel that raised instead (not the fallbacks explain() announced)."""
    out = [f"{r['part']} d{r['head_dim']} causal={r['causal']} {where}: {name} {p}: {res['error']}"
           for r in (*equal, *mixed) for where in [f"seqlen {r['seqlen']}" if "seqlen" in r else f"seed {r['seed']}"]
           for p in VARLEN_PASSES for name in FA2RT for res in [result(r, name, p)] if _raised(res)]
    out += [f"memory d{r['head_dim']} causal={r['causal']} {r['batch_lengths']}: {r['impl']}: {r['error']}"
            for r in memory if r["impl"] in FA2RT and _raised(r)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The mode


def run(args, env, settings, path) -> int:
    """Measures the three parts, writes path (varlen-<tag>.json), prints the tables; 1 when an fa2rt kernel call
    raised."""
    warmup, rep = args.warmup_ms, args.rep_ms
    equal = []
    for head_dim in args.varlen_head_dim:
        for causal in args.causal:
            for seqlen in args.varlen_seqlen:
                equal.append(equal_row(head_dim, causal, seqlen, warmup=warmup, rep=rep))
                _progress(equal[-1], "fa2rt_varlen", f"s{seqlen}")
    draws = {seed: draw_lengths(seed, common.TOKENS, MIN_LEN, MAX_LEN) for seed in args.varlen_seeds}
    mixed = []
    for seed, lengths in draws.items():
        for head_dim in args.varlen_head_dim:
            for causal in args.causal:
                mixed.append(mixed_row(seed, lengths, head_dim, causal, warmup=warmup, rep=rep))
                _progress(mixed[-1], "fa2rt_varlen", f"seed {seed}")
    first = draws[args.varlen_seeds[0]]
    mem = [r for head_dim in args.varlen_head_dim for causal in args.causal
           for r in memory_rows(first, head_dim, causal)]
    growth = memory_growth(mem)
    records = bars(equal, mixed, growth)
    common.write_json(path, {
        "environment": env,
        "settings": {**settings, "dtype": VARLEN_DTYPE, "tokens": common.TOKENS, "hidden": common.HIDDEN,
                     "head_dims": args.varlen_head_dim, "causal": args.causal, "seqlens": args.varlen_seqlen,
                     "seeds": args.varlen_seeds, "min_len": MIN_LEN, "max_len": MAX_LEN, "draw": DRAW_RULE,
                     "passes": list(VARLEN_PASSES), "torch_varlen": torch_varlen_entry() is not None},
        "equal": equal, "mixed": mixed, "memory": mem, "memory_growth": growth, "bars": records})
    print("\n\n".join((equal_table(equal), mixed_table(mixed), memory_table(mem, growth), bars_table(records))),
          flush=True)
    errors = kernel_errors(equal, mixed, mem)
    for line in errors:
        print(f"fa2rt kernel error: {line}", file=sys.stderr)
    return 1 if errors else 0


def _progress(row, contender, label) -> None:
    states = [f"{p} " + (f"{res['tflops']:.1f} TFLOP/s" if "tflops" in res else res["error"][:80])
              for p in VARLEN_PASSES for res in [result(row, contender, p)]]
    print(f"  varlen {row['part']} {label} d{row['head_dim']} causal={row['causal']}: {contender} "
          f"{', '.join(states)}", file=sys.stderr, flush=True)
