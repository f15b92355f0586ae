"""python -m fa2rt.bench: fa2rt against PyTorch SDPA's backends, side by side in one process.

Modes (any combination runs in one process; with none named, --grid runs), one module each:

--grid       (grid.py) The FA2 paper's grid: 16k tokens per batch (batch = 16384 // seqlen), hidden size 2048
             (nheads = 2048 // headdim), seqlen 512..16k, head dims 64/128/256, bf16 and fp16, causal and not.
             Per pass (--passes) writes <pass>-<tag>.json (environment, settings, rows, summary; <pass> is fwd, bwd
             or fwd_bwd) and <pass>-<tag>.png (when matplotlib is present), prints a TFLOP/s table and, at the very
             end, the fa2rt / SDPA summary per (dtype, head dim, causal) of every pass.
--memory     (memory.py) Peak GPU memory of one forward call and of one forward+backward call (each after a warm-up
             call) of fa2rt and of each SDPA backend at seqlen 8k..64k (batch 1, hidden 2048, d128, bf16, causal and
             not), minus the memory live before the call: it must grow linearly with seqlen, never with seqlen_q *
             seqlen_k. Writes memory-<tag>.json (a "pass" per row).
--crossover  (crossover.py) Short sequences (batch 1 and 8, 16 heads, d64/d128, bf16/fp16, causal and not, seqlen
             16..1024): per seqlen the geometric mean over those configurations of best_sdpa_ms / fa2rt_ms, and from
             it the short-sequence threshold of the arch of the images that ran. Forward only. Writes
             crossover-<tag>.json; --write-crossover PATH merges the threshold into a crossover.json such as
             python/fa2rt/data/crossover.json (the fallback policy's data).
--varlen     (varlen.py) fa2rt.attention_varlen, bf16, d64/d128, causal and not, forward and forward+backward: equal
             lengths packed (the grid's batches) against fa2rt's dense call; a seeded draw of lengths between 64
             and 8192 summing to 16384 tokens against SDPA's backends on nested jagged tensors, torch's varlen entry
             point (where present) and SDPA on the batch padded to its longest sequence; peak memory with the
             longest sequence doubled. Writes varlen-<tag>.json with issue 16's bars.
--decode     (decode.py) fa2rt.attention_with_kvcache, one decode step (bf16, seqlen_q 1): batch x cache length x
             GQA 32/8 and MHA 32/32 x head dim x contiguous and paged caches; TB/s of K+V read beside a device copy
             measured in the same run, and SDPA's flash, efficient and cuDNN backends. Writes decode-<tag>.json.
--routing    (routes.py) The routing table's measurements (fa2rt.routing): the grid's problems plus GQA 32/8 prefill
             at d128, forward and forward+backward, fa2rt's kernel against each SDPA backend run as a routed call
             runs it, in rounds (winner, lead, noise per class), and fa2rt as routed when the installed
             table has this arch. Writes routing-<tag>.json; --write-routing PATH puts the classes into a
             routing.json such as python/fa2rt/data/routing.json.

Passes of the grid (--passes, comma- or space-separated; default fwd):
  fwd        the forward call; FLOPs = 4*B*H*Nq*Nk*D (two matmuls), halved for causal.
  bwd        the backward only: the inputs require grad, the forward runs once untimed, then
             torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) is timed; FLOPs = 2.5x the forward's.
  fwd+bwd    forward and backward together, torch.autograd.grad(forward(), (q, k, v), dout); 3.5x the forward's.
Every SDPA backend runs its forward inside sdpa_kernel(<that backend>), so the backward timed is that backend's.
A point's contenders take turns call by call (common.time_interleaved): the device's drift lands on all alike.
A backend that raises (refuses the shape, fails in its backward, runs out of memory) gets its error recorded in
place of a time. Example, a budget run: --passes fwd+bwd --dtype bfloat16 --head-dim 64 128.

<tag> is FA2RT_FORCE_ARCH's arch (e.g. sm80: its images through PTX) or "native"; --out FILE.json names the file
instead when a single one-file mode (memory, crossover, varlen, decode or routing) runs. Times are medians of single
calls between CUDA events, each after a 256 MB read that leaves the L2 cold and clean (common.TIMING); common.py
holds the timing, the passes, the environment record (device, driver, torch, Triton, date, timing) every file
carries, and the shared table helpers.
fa2rt is timed only where fa2rt.explain() says a kernel runs (recorded per row, with the fallback reason where not:
fa2rt_explain for the forward, fa2rt_explain_grad, with the backward images, for inputs requiring grad), and with
the short-sequence rule and routing off (FA2RT_MIN_SEQLEN=0, FA2RT_ROUTING=0 while measuring): the benchmark
measures the kernels (--routing times "fa2rt as routed" separately).
Exit status: 0; 1 when an fa2rt kernel call raised, a mode crashed, or a requested crossover could not be
determined or written; 2 for bad arguments or no GPU.

The call path (fa2rt.api and what it imports) never imports this package."""

from .cli import build_parser, main, parse_args, plan

__all__ = ["build_parser", "main", "parse_args", "plan"]
