"""How fast can anything read a decode step's bytes under the benchmark's timing? Issue 17 asks >= 0.85 of the
measured copy rate (a 1 GiB copy, read + write) at batch 1 with a 32k cache: 134 MB of K and V read once. torch's own
sum of those bytes reached only 0.80 of that rate (docs/bench/flush-h200.json), so this settles whether the bar is
within reach of a read at all, or whether a 134 MB read pays ramp and tail time that a 1 GiB copy amortises.

    python ci/read_ceiling.py [--rounds 3] [--out read-ceiling.json]

Per decode point (GQA 32/8 d128 contiguous: b1 32k, b8 8k, b1 128k; and 1 GiB), in the same process, in rounds in
which the cases take turns call by call, timed by fa2rt.bench.common.time_interleaved (single calls after a 256 MB
read, as the decode benchmark times; 40 ms of calls of the slowest case per round):
- copy 1 GiB (the bar's reference), and a copy moving the point's bytes (half read, half written);
- torch.sum over the point's bytes;
- a Triton read kernel over the same bytes in every configuration of READ_CONFIGS (block, warps, programs per SM,
  grid-stride or one contiguous chunk per program): each program adds its int32 words, one store per program; its
  result is checked against torch's before any timing;
- fa2rt.attention_with_kvcache and SDPA's cuDNN backend on the decode step itself.
Rates are TB/s of bytes read (or moved, for copies); the table gives each as a share of the 1 GiB copy's rate.
Needs a CUDA GPU and Triton (a ci tool: fa2rt itself does not import Triton).
"""

import argparse
import itertools
import json
import statistics

import torch
import triton
import triton.language as tl

from fa2rt import api
from fa2rt.bench import common, decode

POINTS = {"b1 32k": (1, 32768), "b8 8k": (8, 8192), "b1 128k": (1, 131072)}  # (batch, cache), GQA 32/8 d128
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GIB = 1 << 30
# (words per program per step, warps, programs per SM (0: one program per block of words), grid-stride)
READ_CONFIGS = [(block, warps, per_sm, stride) for block, warps, per_sm, stride in itertools.product(
    (2048, 4096, 8192), (4, 8), (0, 1, 2, 4, 8), (True, False)) if per_sm or stride]


@triton.jit
def _read_words(x_ptr, out_ptr, n_words, BLOCK: tl.constexpr, STRIDE: tl.constexpr):
    """Adds the int32 words this program reads into out[program] (int64: exact). STRIDE: program p reads blocks p,
    p + programs, ... (neighbours read neighbouring blocks at once); else `steps` consecutive blocks from p * steps."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    steps = tl.cdiv(tl.cdiv(n_words, BLOCK), programs)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for step in range(0, steps):
        block = step * programs + pid if STRIDE else pid * steps + step
        offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_first").to(tl.int64)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_launcher(words: torch.Tensor, config, multiprocessors: int):
    """A call reading every word of `words` (int32, 1-D) with one READ_CONFIGS entry, and its partial sums."""
    block, warps, per_sm, stride = config
    blocks = triton.cdiv(words.numel(), block)
    programs = min(blocks, multiprocessors * per_sm) if per_sm else blocks
    partial = torch.empty(programs, dtype=torch.int64, device=words.device)

    def run():
        _read_words[(programs,)](words, partial, words.numel(), BLOCK=block, STRIDE=stride, num_warps=warps)
    return run, partial


def words_sum(x: torch.Tensor) -> int:
    """The int32 words of x added, as _read_words' partials add up."""
    return int(x.view(torch.int32).sum(dtype=torch.int64))


def checked_read(words: torch.Tensor, config, multiprocessors: int, expected: int):
    """read_launcher's call, run once and its sum compared with `expected` (words_sum(words)) before any timing."""
    run, partial = read_launcher(words, config, multiprocessors)
    run()
    got = int(partial.sum())
    if got != expected:
        raise AssertionError(f"read kernel {config}: sum {got}, expected {expected}")
    return run


def contenders(name: str, multiprocessors: int) -> dict:
    """name -> (callable, bytes it reads or moves) for one point (or '1 GiB')."""
    if name == "1 GiB":
        data = torch.empty(GIB // 2, dtype=torch.bfloat16, device=common.DEVICE).normal_()
        out = {}
    else:
        batch, cache = POINTS[name]
        q, k_cache, v_cache, kw = decode.make_point(batch, cache, HEADS, KV_HEADS, HEAD_DIM, "contiguous", False)
        data = torch.cat([k_cache.flatten(), v_cache.flatten()])
        moved = decode.moved_bytes(batch, cache, HEADS, KV_HEADS, HEAD_DIM)
        out = {"fa2rt decode": (lambda: api.attention_with_kvcache(q, k_cache, v_cache, **kw), moved),
               "sdpa cudnn decode": (decode.sdpa_decode(q, k_cache, v_cache, "cudnn"), moved)}
    nbytes = data.numel() * data.element_size()
    half = data[: data.numel() // 2]
    target = torch.empty_like(half)
    whole = torch.empty_like(data)
    out |= {"copy same bytes": (lambda: target.copy_(half), nbytes), "copy all (read + write)": (
        lambda: whole.copy_(data), 2 * nbytes), "torch.sum": (lambda: data.sum(), nbytes)}
    words = data.view(torch.int32)
    expected = words_sum(words)
    for config in READ_CONFIGS:
        out[f"read {config}"] = (checked_read(words, config, multiprocessors, expected), nbytes)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="read-ceiling.json")
    a = p.parse_args()
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    env = common.environment()
    results = {}
    for name in ("1 GiB", *POINTS):
        cases = contenders(name, multiprocessors)
        times = {case: [] for case in cases}
        for _ in range(a.rounds):
            runs = {case: fn for case, (fn, _) in cases.items()}
            for case, ms in common.time_interleaved(runs, warmup=10, rep=40).items():
                times[case].append(ms)
        results[name] = {case: {"ms": statistics.median(ms), "rounds_ms": ms, "bytes": cases[case][1],
                                "tbps": cases[case][1] / statistics.median(ms) / 1e9} for case, ms in times.items()}
        del cases
        torch.cuda.empty_cache()
    reference = results["1 GiB"]["copy all (read + write)"]["tbps"]
    with open(a.out, "w") as f:
        json.dump({"environment": env, "timing": common.TIMING, "copy_1gib_tbps": reference, "configs": READ_CONFIGS,
                   "results": results}, f, indent=1)
    print(f"{env['device']}, torch {env['torch']}, Triton {env['triton']}; 1 GiB copy {reference:.2f} TB/s; "
          f"{common.TIMING}; median of {a.rounds} rounds")
    print(f"{'point':>8} {'contender':>40} {'us':>8} {'TB/s':>6} {'of copy':>7}")
    for name, cases in results.items():
        reads = {case: r for case, r in cases.items() if case.startswith("read ")}
        best = max(reads, key=lambda case: reads[case]["tbps"])
        shown = [case for case in cases if not case.startswith("read ")] + [best]
        for case in shown:
            r = cases[case]
            label = f"best {case}" if case == best else case
            print(f"{name:>8} {label:>40} {r['ms'] * 1e3:8.1f} {r['tbps']:6.2f} {r['tbps'] / reference:7.3f}")


if __name__ == "__main__":
    main()
