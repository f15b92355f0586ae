"""Host (CPU) time per call of fa2rt.attention's kernel path against SDPA's flash backend, on a problem small enough
that the host path decides the speed. Needs a CUDA GPU.

    python ci/host_overhead.py [--batch 1] [--seqlen 128] [--heads 8] [--head-dim 64] [--causal] [--calls 200]

Per case, after a warm-up, N calls back to back:
- host: time.perf_counter around issuing the N calls, synchronising only after them;
- gpu: the same N calls queued behind a sleep kernel long enough for the host to enqueue them all, timed by CUDA
  events: the kernels' time alone;
- wall: CUDA events around N calls issued without the sleep: the larger of the two, as a training step sees it.
"""

import argparse
import os
import time

os.environ.setdefault("FA2RT_MIN_SEQLEN", "0")  # the kernel at any length: its host path is what is measured

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fa2rt  # noqa: E402

WARMUP = 20
SLEEP_CYCLES_PER_S = 4e9  # twice a ~2 GHz clock: the sleep outlasts the host's issue time


def events_us(fn, calls, sleep_s=0.0):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if sleep_s:
        torch.cuda._sleep(int(sleep_s * SLEEP_CYCLES_PER_S))
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return host / calls * 1e6, start.elapsed_time(end) / calls * 1e3


def measure(fn, calls):
    for _ in range(WARMUP):
        fn()
    host_us, wall_us = events_us(fn, calls)
    _, gpu_us = events_us(fn, calls, sleep_s=host_us * calls / 1e6)
    return host_us, gpu_us, wall_us


def fwd_bwd(attn, q, k, v, dout):
    torch.autograd.grad(attn(q, k, v), (q, k, v), dout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()

    def make(*shape, grad=False):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)

    bshd, bhsd = (a.batch, a.seqlen, a.heads, a.head_dim), (a.batch, a.heads, a.seqlen, a.head_dim)
    fa2 = lambda q, k, v: fa2rt.attention(q, k, v, causal=a.causal)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)  # noqa: E731
    plain = {layout: [make(*layout) for _ in range(3)] for layout in (bshd, bhsd)}
    grad = {layout: [make(*layout, grad=True) for _ in range(3)] + [make(*layout)] for layout in (bshd, bhsd)}
    decision = fa2rt.explain(*grad[bshd][:3], causal=a.causal)
    assert decision.path == "kernel", decision
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 batch {a.batch}, seqlen {a.seqlen}, "
          f"heads {a.heads}, d{a.head_dim}, causal {a.causal}; {a.calls} calls; fa2rt: {decision.image}")
    cases = {"fa2rt fwd": lambda: fa2(*plain[bshd]), "fa2rt fwd+bwd": lambda: fwd_bwd(fa2, *grad[bshd]),
             "sdpa flash fwd": lambda: sdpa(*plain[bhsd]), "sdpa flash fwd+bwd": lambda: fwd_bwd(sdpa, *grad[bhsd])}
    print(f"{'case':20s} {'host us/call':>13s} {'gpu us/call':>12s} {'wall us/call':>13s}")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for name, fn in cases.items():
            host, gpu, wall = measure(fn, a.calls)
            print(f"{name:20s} {host:13.1f} {gpu:12.1f} {wall:13.1f}")


if __name__ == "__main__":
    main()
