"""--memory: peak GPU memory of one forward call and of one forward+backward call (each after a warm-up call) of fa2rt
and of each SDPA backend at seqlen 8k..64k (batch 1, hidden 2048, d128, bf16, causal and not), minus the memory live
before the call (the inputs, and dout for the backward): it must grow linearly with seqlen, never with
seqlen_q * seqlen_k. Writes memory-<tag>.json (a "pass" per row)."""

import torch

from . import common
from .common import PASSES

MEMORY_SEQLENS = (8192, 16384, 32768, 65536)
MEMORY_BATCH, MEMORY_HEAD_DIM, MEMORY_DTYPE = 1, 128, "bfloat16"
MEMORY_PASSES = ("fwd", "fwd+bwd")


def memory_bench(seqlens, causals) -> list[dict]:
    rows = []
    nheads, dt = common.HIDDEN // MEMORY_HEAD_DIM, getattr(torch, MEMORY_DTYPE)
    for causal in causals:
        for seqlen in seqlens:
            common.recover()
            q, k, v = (torch.randn(MEMORY_BATCH, seqlen, nheads, MEMORY_HEAD_DIM, device=common.DEVICE, dtype=dt)
                       for _ in range(3))
            inputs_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
            for pass_name in MEMORY_PASSES:
                p = PASSES[pass_name]
                inputs = p.inputs(q, k, v)
                decision = common.explain_safely(*inputs, causal=causal)
                for name, prepare in p.runs(inputs, causal).items():
                    row = {"impl": name, "pass": pass_name, "dtype": MEMORY_DTYPE, "head_dim": MEMORY_HEAD_DIM,
                           "causal": causal, "seqlen": seqlen, "batch": MEMORY_BATCH, "nheads": nheads,
                           "inputs_bytes": inputs_bytes, "out_bytes": q.numel() * q.element_size()}
                    if name == "fa2rt":
                        row["fa2rt_explain"] = decision
                    row.update(common.not_timed(decision) if name == "fa2rt" and decision["path"] != "kernel"
                               else common.peak_memory(prepare))
                    rows.append(row)
                del inputs
            del q, k, v
    return rows


def memory_table(rows) -> str:
    """Extra MiB per call; extra/out stays flat when memory grows linearly with seqlen."""
    mib = 2.0 ** 20
    lines = [f"peak memory of one call (forward, or forward+backward) beyond its inputs ({MEMORY_DTYPE}, "
             f"d{MEMORY_HEAD_DIM}, batch {MEMORY_BATCH}, hidden {common.HIDDEN}); an allocation growing with "
             "seqlen_q * seqlen_k would show as extra/out doubling per seqlen doubling",
             f"{'impl':15}{'pass':>8}{'causal':>7}{'seqlen':>8}{'extra MiB':>11}{'out MiB':>9}{'extra/out':>10}"]
    for r in sorted(rows, key=lambda r: (r.get("pass", "fwd"), r["impl"], r["causal"], r["seqlen"])):
        head = f"{r['impl']:15}{r.get('pass', 'fwd'):>8}{r['causal']!s:>7}{r['seqlen']:>8}"
        if "extra_bytes" in r:
            lines.append(f"{head}{r['extra_bytes'] / mib:11.1f}{r['out_bytes'] / mib:9.1f}"
                         f"{r['extra_bytes'] / r['out_bytes']:10.2f}")
        else:
            lines.append(f"{head}  {r['error'][:90]}")
    return "\n".join(lines)


def run(args, env, path) -> int:
    """Measures, writes path (memory-<tag>.json), prints the table; 1 when an fa2rt kernel call raised."""
    mem = memory_bench(args.memory_seqlen, args.causal)
    common.write_json(path, {"environment": env, "settings": {
        "batch": MEMORY_BATCH, "hidden": common.HIDDEN, "dtype": MEMORY_DTYPE, "head_dim": MEMORY_HEAD_DIM,
        "passes": list(MEMORY_PASSES)}, "rows": mem})
    print(memory_table(mem), flush=True)
    return 1 if any(r["impl"] == "fa2rt" and "error" in r and not r.get("fallback") for r in mem) else 0
