"""Host (CPU) time per call of fa2rt.attention's kernel path against SDPA's flash backend, on a problem small enough
that the host path decides the speed. Needs a CUDA GPU.

    python ci/host_overhead.py [--batch 1] [--seqlen 128] [--heads 8] [--head-dim 64] [--causal] [--calls 200]
    python ci/host_overhead.py --decode [--batch 8] [--seqlen 4096] [--heads 32] [--kv-heads 8] [--head-dim 128]
    python ci/host_overhead.py --routed [--batch 32] [--seqlen 512] [--heads 16] [--head-dim 128] [--causal]

--decode measures one decode step instead (seqlen_q 1 against a KV cache of --seqlen tokens, causal):
fa2rt.attention_with_kvcache without and with appending one token, against SDPA's flash, efficient and cuDNN
backends on the same step (K/V as (batch, kv_heads, seqlen, headdim) views, enable_gqa), and an append done with
torch indexing before SDPA flash (what the same serving step costs without fa2rt).

The dense mode also times an empty Python autograd.Function (allocations only, no kernels): the host time any
differentiable op defined in Python pays, which fa2rt's autograd path is; and fa2rt's custom ops fa2rt::fwd and
fa2rt::bwd called directly (what torch.compile's forward and backward graphs call per attention), and on a GPU
forward+backward of fa2rt.attention and of SDPA flash each compiled with Inductor.

--routed measures a call the routing table sends to an SDPA backend (fa2rt.routing): fa2rt.attention as routed,
fa2rt.routing.run (the runner alone) and SDPA called directly on (batch, heads, seqlen, headdim) tensors, forward and
forward+backward.

--cpu runs fa2rt's cases (and the Function's) of the dense or --decode mode on CPU tensors that fa2rt's policy sees as
an H100 (sm90), with every launch a no-op: the Python host path alone (validation skipped by the repeated-call key, the
autograd Function, allocations, launch plans), measurable without a GPU; the driver's part (cuLaunchKernel, tensor map
encoding) and CUDA's allocator are not in it. Host time only.

The cases take turns in --rounds rounds (lent machines' hosts drift by tens of percent within a minute); each
figure is the median over the rounds. Per case and round, after a warm-up, N calls back to back:
- host: time.perf_counter around issuing the N calls, synchronising only after them;
- gpu: the same N calls queued behind a sleep kernel long enough for the host to enqueue them all, timed by CUDA
  events: the kernels' time alone;
- wall: CUDA events around N calls issued without the sleep: the larger of the two, as a training step sees it.
"""

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("FA2RT_MIN_SEQLEN", "0")  # the kernel at any length: its host path is what is measured

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fa2rt  # noqa: E402
from fa2rt import ops, routing  # noqa: E402

WARMUP = 20
_CPU_OPS = None  # --cpu: the custom ops' CPU registrations (torch.library.Library)
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


def host_us(fn, calls):
    for _ in range(WARMUP):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6, float("nan"), float("nan")


class _NoLaunch:
    """A launch plan whose launches do nothing (--cpu)."""

    def __init__(self, plan):
        self.plan = plan

    def launch(self, device, stream, addresses):
        pass

    def __getattr__(self, name):
        return getattr(self.plan, name)


def run_on_cpu_as_sm90():
    """--cpu: CPU tensors described as an sm90 GPU to the policy, launches left out."""
    from fa2rt import _C, calls, devices, kvcache_ops

    h100 = _C.DeviceInfo("cuda", "sm90", 232448, 132, 32, "H100 (CPU tensors, launches left out)")
    devices.describe = lambda device: (h100, "", "")
    ops.device_and_stream = kvcache_ops.device_and_stream = lambda device: (0, 0)
    # Index tensors on the CPU have their values checked on every call, which keeps the decode step off the
    # repeated-call path; a GPU's are not read.
    calls.should_check_values = lambda t: False
    make_plan = _C.LaunchPlan
    _C.LaunchPlan = lambda *args, **kwargs: _NoLaunch(make_plan(*args, **kwargs))
    # The dense custom ops are CUDA-only; the same bodies for CPU tensors (kept registered for the process).
    global _CPU_OPS
    _CPU_OPS = torch.library.Library("fa2rt", "IMPL")
    _CPU_OPS.impl("fwd", lambda q, k, v, a, scale, left, right, cap, image, mode, det: ops.run_forward(
        q, k, v, a, None, scale, left, right, cap, image, mode), "CPU")
    _CPU_OPS.impl("bwd", ops.run_backward, "CPU")


def measure(fn, calls):
    for _ in range(WARMUP):
        fn()
    host_us, wall_us = events_us(fn, calls)
    _, gpu_us = events_us(fn, calls, sleep_s=host_us * calls / 1e6)
    return host_us, gpu_us, wall_us


def fwd_bwd(attn, q, k, v, dout):
    torch.autograd.grad(attn(q, k, v), (q, k, v), dout)


def decode_cases(a, make):
    """The decode step's contenders, name -> (SDPA backend or None, call): seqlen_q 1 against a cache of a.seqlen
    tokens holding a.seqlen - 1."""
    batch, hk, d = a.batch, a.kv_heads, a.head_dim
    q, k_cache, v_cache = make(batch, 1, a.heads, d), make(batch, a.seqlen, hk, d), make(batch, a.seqlen, hk, d)
    k_new, v_new = make(batch, 1, hk, d), make(batch, 1, hk, d)
    seqlens = torch.full((batch,), a.seqlen - 1, dtype=torch.int32, device=q.device)
    rows = torch.arange(batch, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    decision = fa2rt.explain_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    assert decision.path == "kernel", decision

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    def append_then_sdpa():
        k_cache[rows, seqlens.long()] = k_new[:, 0]
        v_cache[rows, seqlens.long()] = v_new[:, 0]
        return sdpa()

    cases = {"fa2rt decode": (None, lambda: fa2rt.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                                         causal=True)),
             "fa2rt decode+append": (None, lambda: fa2rt.attention_with_kvcache(
                 q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)),
             "torch append+sdpa flash": (SDPBackend.FLASH_ATTENTION, append_then_sdpa)}
    cases |= {f"sdpa {name} decode": (backend, sdpa) for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION))}
    header = (f"bf16 decode batch {batch}, cache {a.seqlen}, heads {a.heads}/{hk}, d{d}; fa2rt: {decision.image} "
              f"({decision.message})")
    return header, cases


class _PythonFunctionFloor(torch.autograd.Function):
    """A differentiable op written as a Python autograd.Function, as fa2rt's must be (DESIGN point 2: the native
    module links no libtorch, so it cannot register a C++ autograd node), that allocates what fa2rt's allocates (out
    and LSE; dQ, dK, dV and delta) and launches nothing: the host time any such op pays before its own work."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        torch.empty_like(lse)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def dense_cases(a, make):
    bshd, bhsd = (a.batch, a.seqlen, a.heads, a.head_dim), (a.batch, a.heads, a.seqlen, a.head_dim)
    fa2 = lambda q, k, v: fa2rt.attention(q, k, v, causal=a.causal)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)  # noqa: E731
    plain = {layout: [make(*layout) for _ in range(3)] for layout in (bshd, bhsd)}
    grad = {layout: [make(*layout, grad=True) for _ in range(3)] + [make(*layout)] for layout in (bshd, bhsd)}
    decision = fa2rt.explain(*grad[bshd][:3], causal=a.causal)
    assert decision.path == "kernel", decision
    flash = SDPBackend.FLASH_ATTENTION
    cases = {"fa2rt fwd": (None, lambda: fa2(*plain[bshd])), "fa2rt fwd+bwd": (None, lambda: fwd_bwd(fa2, *grad[bshd])),
             "sdpa flash fwd": (flash, lambda: sdpa(*plain[bhsd])),
             "sdpa flash fwd+bwd": (flash, lambda: fwd_bwd(sdpa, *grad[bhsd])),
             "python Function fwd": (None, lambda: _PythonFunctionFloor.apply(*grad[bshd][:3])),
             "python Function fwd+bwd": (None, lambda: fwd_bwd(lambda q, k, v: _PythonFunctionFloor.apply(q, k, v)[0],
                                                                 *grad[bshd]))}
    # The custom ops a torch.compile graph calls (the image chosen when they run), without the graph around them:
    # AOTAutograd's forward graph calls fa2rt::fwd, its backward graph fa2rt::bwd.
    options = (a.head_dim**-0.5, -1, 0 if a.causal else -1, 0.0)
    q, k, v = plain[bshd]
    out, lse = ops.fwd(q, k, v, None, *options, "", "", False)
    dout = make(*bshd)
    cases |= {"fa2rt op fwd": (None, lambda: ops.fwd(q, k, v, None, *options, "", "", False)),
              "fa2rt op bwd": (None, lambda: ops.bwd(dout, q, k, v, out, lse, None, *options, False))}
    if q.is_cuda:  # compiled with Inductor (the first warm-up call compiles); CPU tensors would trace the fallback
        compiled_fa2, compiled_sdpa = torch.compile(fa2), torch.compile(sdpa)
        cases |= {"fa2rt compiled fwd+bwd": (None, lambda: fwd_bwd(compiled_fa2, *grad[bshd])),
                  "sdpa flash compiled fwd+bwd": (flash, lambda: fwd_bwd(compiled_sdpa, *grad[bhsd]))}
    header = (f"bf16 batch {a.batch}, seqlen {a.seqlen}, heads {a.heads}, d{a.head_dim}, causal {a.causal}; "
              f"fa2rt: {decision.image}")
    return header, cases


def routed_cases(a, make):
    bshd, bhsd = (a.batch, a.seqlen, a.heads, a.head_dim), (a.batch, a.heads, a.seqlen, a.head_dim)
    plain = [make(*bshd) for _ in range(3)]
    grad = [make(*bshd, grad=True) for _ in range(3)] + [make(*bshd)]
    direct = [make(*bhsd) for _ in range(3)]
    direct_grad = [make(*bhsd, grad=True) for _ in range(3)] + [make(*bhsd)]
    decision = fa2rt.explain(*grad[:3], causal=a.causal)
    assert decision.path == "routed", decision
    provider = decision.provider
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[provider]
    fa2 = lambda q, k, v: fa2rt.attention(q, k, v, causal=a.causal)  # noqa: E731
    runner = lambda q, k, v: routing.run(provider, q, k, v, causal=a.causal, softmax_scale=a.head_dim**-0.5)  # noqa
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)  # noqa: E731
    with sdpa_kernel(backend):
        raw = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in plain), is_causal=a.causal)
    cases = {"fa2rt routed fwd": (None, lambda: fa2(*plain)),
             "fa2rt routed fwd+bwd": (None, lambda: fwd_bwd(fa2, *grad)),
             "routing.run fwd": (None, lambda: runner(*plain)),
             "routing.run fwd+bwd": (None, lambda: fwd_bwd(runner, *grad)),
             f"sdpa {provider[5:]} fwd": (backend, lambda: sdpa(*direct)),
             f"sdpa {provider[5:]} fwd+bwd": (backend, lambda: fwd_bwd(sdpa, *direct_grad))}
    header = (f"bf16 batch {a.batch}, seqlen {a.seqlen}, heads {a.heads}, d{a.head_dim}, causal {a.causal}; routed to "
              f"{provider}; its output from (b, s, h, d) inputs, transposed back, contiguous: "
              f"{raw.transpose(1, 2).is_contiguous()}")
    return header, cases


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decode", action="store_true")
    p.add_argument("--routed", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="default 1 (8 with --decode)")
    p.add_argument("--seqlen", type=int, default=None, help="default 128 (the cache length, 4096, with --decode)")
    p.add_argument("--heads", type=int, default=None, help="default 8 (32 with --decode)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads of the decode step")
    p.add_argument("--head-dim", type=int, default=None, help="default 64 (128 with --decode)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--cpu", action="store_true", help="the Python host path on CPU tensors (fa2rt's cases)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    defaults = (dict(batch=8, seqlen=4096, heads=32, head_dim=128) if a.decode else
                dict(batch=32, seqlen=512, heads=16, head_dim=128) if a.routed else
                dict(batch=1, seqlen=128, heads=8, head_dim=64))
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)

    device = "cpu" if a.cpu else "cuda"
    if a.cpu:
        if a.routed:
            p.error("--cpu measures the dense and decode cases only")
        run_on_cpu_as_sm90()
        torch.set_num_threads(1)

    def make(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=grad)

    header, cases = (decode_cases if a.decode else routed_cases if a.routed else dense_cases)(a, make)
    if a.cpu:
        cases = {name: case for name, case in cases.items() if name.startswith(("fa2rt", "python"))}
    where = "CPU as sm90, launches left out" if a.cpu else torch.cuda.get_device_name()
    print(f"{where}, torch {torch.__version__}; {header}; {a.calls} calls, median of {a.rounds} rounds")
    print(f"{'case':24s} {'host us/call':>13s} {'gpu us/call':>12s} {'wall us/call':>13s}")
    results = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, (backend, fn) in cases.items():
            if isinstance(results[name], str):
                continue
            # The backend is chosen outside the timed calls: SDPA's host time is that of its call alone.
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                try:
                    results[name].append((host_us if a.cpu else measure)(fn, a.calls))
                except RuntimeError as err:  # a backend that refuses the call (SDPA's efficient/cuDNN with GQA)
                    results[name] = f"refused: {str(err).splitlines()[0][:80]}"
    for name, rounds in results.items():
        if isinstance(rounds, str):
            print(f"{name:24s} {rounds}")
            continue
        host, gpu, wall = (statistics.median(column) for column in zip(*rounds, strict=True))
        print(f"{name:24s} {host:13.1f} {gpu:12.1f} {wall:13.1f}")


if __name__ == "__main__":
    main()
