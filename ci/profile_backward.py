"""Kernel times of one backward call under torch.profiler: fa2rt's backward kernels against SDPA's flash and cuDNN
backends, on FA2-grid shapes (bf16, 16k tokens, hidden 2048). Needs a CUDA GPU; FA2RT_FORCE_ARCH=sm80 times the sm80
images through their PTX.

    python ci/profile_backward.py [--seqlen 4096] [--head-dim 64 128] [--calls 5]

Per case: each backward kernel's mean device time over the calls (no L2 flush between them), and the total.
"""

import argparse
import functools
import os

os.environ.setdefault("FA2RT_MIN_SEQLEN", "0")  # the kernel at any length
os.environ.setdefault("FA2RT_ROUTING", "0")  # fa2rt's own kernels, not the SDPA backend the routing table picks

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fa2rt  # noqa: E402

TOKENS, HIDDEN, WARMUP = 16384, 2048, 3


def kernel_times(forward, q, k, v, calls: int) -> dict[str, float]:
    """{kernel name: mean microseconds per backward call}."""
    out = forward(q, k, v)
    dout = torch.randn_like(out)
    for _ in range(WARMUP):
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / calls for e in prof.key_averages()
            if e.device_type.name == "CUDA" and e.device_time_total > 0}


def fa2rt_forward(q, k, v, causal):
    return fa2rt.attention(q, k, v, causal=causal)


def sdpa_forward(q, k, v, causal, backend):
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def report(label: str, times: dict[str, float]) -> None:
    print(f"  {label}: {sum(times.values()):.0f} us per backward")
    for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    {us:9.0f} us  {name[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    for head_dim in args.head_dim:
        for causal in (False, True):
            shape = (TOKENS // args.seqlen, args.seqlen, HIDDEN // head_dim, head_dim)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            images = [image for image, _ in fa2rt.explain(q, k, v, causal=causal).backward]
            print(f"d{head_dim} seqlen {args.seqlen} causal={causal}; fa2rt backward images: {images}")
            report("fa2rt", kernel_times(functools.partial(fa2rt_forward, causal=causal), q, k, v, args.calls))
            # SDPA takes (batch, nheads, seqlen, headdim).
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
                forward = functools.partial(sdpa_forward, causal=causal, backend=backend)
                report(f"SDPA {name}", kernel_times(forward, qt, kt, vt, args.calls))


if __name__ == "__main__":
    main()
