"""python -m fa2rt.bench: fa2rt's forward against PyTorch SDPA's backends, side by side in one process.

The FA2 paper's grid: 16k tokens per batch (batch = 16384 // seqlen), hidden size 2048 (nheads = 2048 // headdim),
seqlen 512..16k, causal and not. Times are medians of triton.testing.do_bench; forward FLOPs = 4*B*H*N*N*D, halved
for causal. Prints a TFLOP/s table, writes JSON (and a PNG plot when matplotlib is present).
"""

import argparse
import datetime
import json
import math
import platform
import subprocess
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import api, config

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def fwd_flops(batch, nheads, seqlen, head_dim, causal):
    return 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)


def environment() -> dict:
    import triton

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "force_arch": config.force_arch() or None}


def time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def contenders(q, k, v, causal):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    runs = {"fa2rt": lambda: api.attention(q, k, v, causal=causal)}
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        runs[name] = run
    return runs


def bench(dtypes, head_dims, seqlens, causals) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causals:
                for seqlen in seqlens:
                    batch, nheads = max(1, TOKENS // seqlen), HIDDEN // head_dim
                    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=dtype)
                               for _ in range(3))
                    flops = fwd_flops(batch, nheads, seqlen, head_dim, causal)
                    row = {"dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim, "causal": causal,
                           "seqlen": seqlen, "batch": batch, "nheads": nheads,
                           "fa2rt_image": api.explain(q, k, v, causal=causal).image}
                    for name, fn in contenders(q, k, v, causal).items():
                        try:
                            ms = time_ms(fn)
                            row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
                        except RuntimeError as exc:  # a backend that refuses this shape
                            row[name] = {"error": str(exc).splitlines()[0][:200]}
                    rows.append(row)
                    del q, k, v
    return rows


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def table(rows) -> str:
    names = ["fa2rt", *SDPA_BACKENDS]
    lines = [f"{'dtype':9}{'d':>4}{'causal':>7}{'seqlen':>7} " + "".join(f"{n:>15}" for n in names)
             + f"{'vs flash':>9}"]
    for r in rows:
        cells = "".join(f"{r[n].get('tflops', float('nan')):15.1f}" for n in names)
        speedup = r["fa2rt"].get("tflops", 0) / r["sdpa_flash"].get("tflops", float("nan"))
        lines.append(f"{r['dtype']:9}{r['head_dim']:>4}{r['causal']!s:>7}{r['seqlen']:>7} {cells}{speedup:9.2f}")
    ratios = [r["fa2rt"].get("tflops", 0) / r["sdpa_flash"]["tflops"] for r in rows if "tflops" in r["sdpa_flash"]]
    lines.append(f"geometric mean fa2rt / sdpa_flash: {geomean(ratios):.2f}x, min {min(ratios):.2f}x")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (dtype, d, causal) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == (dtype, d, causal)]
        for name in ["fa2rt", *SDPA_BACKENDS]:
            ax.plot([r["seqlen"] for r in sel], [r[name].get("tflops", float("nan")) for r in sel], marker="o",
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} d{d} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa2rt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"])
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlen", nargs="+", type=int, default=list(SEQLENS))
    parser.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a GPU")
    rows = bench([getattr(torch, d) for d in args.dtype], args.head_dim, args.seqlen,
                 [c == "true" for c in args.causal])
    args.out.mkdir(parents=True, exist_ok=True)
    tag = config.force_arch() or "native"
    (args.out / f"fwd-{tag}.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    plot(rows, args.out / f"fwd-{tag}.png")
    print(json.dumps(environment()))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
