"""The command line of python -m fa2rt.bench: options, their per-mode defaults (--quick, default, --full), the plan,
and main(), which runs the modes named and dispatches to their modules."""

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

from .. import config
from . import common, crossover, decode, grid, memory, routes, varlen
from .common import DTYPES, PASSES

# Each list option's value when not given: DEFAULTS, or QUICK's under --quick (a smoke run), or FULL's (falling back
# to DEFAULTS) under --full.
DEFAULTS = {"seqlen": list(grid.SEQLENS), "head_dim": list(grid.HEAD_DIMS), "dtype": list(DTYPES),
            "memory_seqlen": list(memory.MEMORY_SEQLENS), "crossover_seqlen": list(crossover.CROSSOVER_SEQLENS),
            "crossover_batch": list(crossover.CROSSOVER_BATCHES),
            "crossover_head_dim": list(crossover.CROSSOVER_HEAD_DIMS),
            "varlen_seqlen": list(varlen.VARLEN_SEQLENS), "varlen_head_dim": list(varlen.VARLEN_HEAD_DIMS),
            "varlen_seeds": list(varlen.VARLEN_SEEDS),
            "decode_batch": list(decode.DECODE_BATCHES), "decode_cache": list(decode.DECODE_CACHES),
            "decode_heads": list(decode.DECODE_HEADS), "decode_head_dim": list(decode.DECODE_HEAD_DIMS),
            "decode_layouts": list(decode.DECODE_LAYOUTS)}
QUICK = {"seqlen": [512, 1024], "head_dim": [64], "dtype": ["bfloat16"], "memory_seqlen": [8192, 16384],
         "crossover_seqlen": [64, 256, 1024], "crossover_batch": [8], "crossover_head_dim": [64],
         "varlen_seqlen": [512, 2048], "varlen_head_dim": [64], "varlen_seeds": [0],
         "decode_batch": [1, 8], "decode_cache": [4096, 32768], "decode_heads": ["32/8"], "decode_head_dim": [128],
         "decode_layouts": ["contiguous", "paged64"]}
FULL = {"varlen_seeds": [0, 1, 2], "decode_head_dim": [128, 64]}
POSITIVE = ("seqlen", "head_dim", "memory_seqlen", "crossover_seqlen", "crossover_batch", "crossover_head_dim",
            "varlen_seqlen", "varlen_head_dim", "decode_batch", "decode_cache", "decode_head_dim")
MODES = ("grid", "memory", "crossover", "varlen", "decode", "routing")
ONE_FILE_MODES = ("memory", "crossover", "varlen", "decode", "routing")  # one JSON each: --out FILE.json can name it


def _listed(kind):
    """An argparse type taking one or more comma-separated values (nargs="+" gives a list of lists; parse_args
    flattens it), so `--decode-batch 1,8,64` and `--decode-batch 1 8 64` both work."""
    def convert(text):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} values, got {text!r}") from None
    convert.__name__ = kind.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fa2rt.bench", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_argument_group("modes (with none named, --grid runs)")
    modes.add_argument("--grid", action="store_true", help="the FA2 paper grid (<pass>-<tag>.json, .png per pass)")
    modes.add_argument("--memory", action="store_true", help="peak memory at long seqlen (memory-<tag>.json)")
    modes.add_argument("--crossover", action="store_true", help="short-sequence crossover (crossover-<tag>.json)")
    modes.add_argument("--varlen", action="store_true",
                       help="packed sequences: equal lengths vs dense, mixed lengths vs SDPA, memory "
                       "(varlen-<tag>.json)")
    modes.add_argument("--decode", action="store_true", help="decode steps against a KV cache (decode-<tag>.json)")
    modes.add_argument("--routing", action="store_true",
                       help="the routing table's measurements: fa2rt's kernel, SDPA's backends and fa2rt as routed on "
                       "the grid and GQA 32/8 prefill, forward and forward+backward (routing-<tag>.json)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smoke run: each list option not given takes a tiny value (" +
                      ", ".join(f"{k.replace('_', '-')} {' '.join(map(str, v))}" for k, v in QUICK.items()) + ")")
    size.add_argument("--full", action="store_true",
                      help="the larger grids where a mode has one (" +
                      ", ".join(f"{k.replace('_', '-')} {' '.join(map(str, v))}" for k, v in FULL.items()) + ")")
    p.add_argument("--passes", nargs="+", default=["fwd"], metavar="PASS",
                   help=f"grid: the passes to time, comma- or space-separated, of {', '.join(PASSES)} (default fwd; "
                   "e.g. --passes fwd,bwd,fwd+bwd)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="grid, crossover and routing (default: both)")
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"],
                   help="grid, memory, crossover, varlen and routing (default: both)")
    p.add_argument("--head-dim", nargs="+", type=int, help="grid and routing (default 64 128 256)")
    p.add_argument("--seqlen", nargs="+", type=int, help="grid and routing (default 512 .. 16384)")
    p.add_argument("--memory-seqlen", nargs="+", type=int, help="memory (default 8192 16384 32768 65536)")
    p.add_argument("--crossover-seqlen", nargs="+", type=int, help="crossover (default 16 32 .. 1024)")
    p.add_argument("--crossover-batch", nargs="+", type=int, help="crossover (default 1 8)")
    p.add_argument("--crossover-head-dim", nargs="+", type=int, help="crossover (default 64 128)")
    p.add_argument("--write-crossover", type=Path, metavar="PATH",
                   help="merge the measured threshold into this crossover.json (needs --crossover, not --quick)")
    p.add_argument("--write-routing", type=Path, metavar="PATH",
                   help="put the measured classes into this routing.json (needs --routing, not --quick)")
    p.add_argument("--routing-update", action="store_true",
                   help="with --write-routing: replace only the measured classes, keep the arch's others (each "
                   "keeps its own measurement date)")
    p.add_argument("--routing-rounds", type=int, default=routes.ROUNDS,
                   help=f"routing: alternating timing rounds per contender (default {routes.ROUNDS})")
    p.add_argument("--varlen-seqlen", nargs="+", type=_listed(int),
                   help="varlen, equal lengths: the sequence length (default 512 .. 16384)")
    p.add_argument("--varlen-head-dim", nargs="+", type=_listed(int), help="varlen (default 64 128)")
    p.add_argument("--varlen-seeds", nargs="+", type=_listed(int),
                   help="varlen, mixed lengths: the draws' seeds (default 0; --full 0 1 2)")
    p.add_argument("--decode-batch", nargs="+", type=_listed(int), help="decode (default 1 8 32 64)")
    p.add_argument("--decode-cache", nargs="+", type=_listed(int),
                   help="decode: tokens in each sequence's cache (default 4096 8192 32768 131072)")
    p.add_argument("--decode-heads", nargs="+", type=_listed(str), metavar="H/HK",
                   help="decode: nheads/nheads_k pairs (default 32/8 32/32)")
    p.add_argument("--decode-head-dim", nargs="+", type=_listed(int), help="decode (default 128; --full 128 64)")
    p.add_argument("--decode-layouts", nargs="+", type=_listed(str),
                   help="decode: contiguous and/or pagedN, N the page size (default contiguous paged16 paged64 "
                   "paged256)")
    p.add_argument("--decode-append", action="store_true",
                   help="decode: append one token per sequence in each fa2rt call")
    p.add_argument("--decode-graphs", action="store_true",
                   help="decode: time every contender as a CUDA graph replay of its call (no host time)")
    p.add_argument("--decode-rounds", type=int, default=decode.DECODE_ROUNDS,
                   help=f"decode: timing rounds per point, contenders taking turns (default {decode.DECODE_ROUNDS})")
    p.add_argument("--decode-max-gib", type=float, default=decode.DECODE_MAX_GIB,
                   help=f"decode: skip points whose K and V exceed this many GiB (default {decode.DECODE_MAX_GIB})")
    p.add_argument("--warmup-ms", type=float, default=25, help="untimed calls per timing, in ms (default 25)")
    p.add_argument("--rep-ms", type=float, default=100,
                   help="timed calls per timing, in ms, of the grid, varlen, decode and routing (default 100)")
    p.add_argument("--crossover-rep-ms", type=float, default=crossover.CROSSOVER_REP_MS,
                   help=f"the same for the crossover (default {crossover.CROSSOVER_REP_MS})")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for JSON and PNG (default bench-results); a path ending in .json names the result "
                   "file of a run of one one-file mode (memory, crossover, varlen, decode or routing)")
    return p


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """Parsed options with the list defaults resolved (--quick's or --full's where given) and checked."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    tier = QUICK if args.quick else {**DEFAULTS, **FULL} if args.full else DEFAULTS
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is None:
            setattr(args, key, list(tier[key]))
        elif value and isinstance(value[0], list):
            setattr(args, key, [x for item in value for x in item])
    if not any(getattr(args, mode) for mode in MODES):
        args.grid = True
    args.causal = [c == "true" for c in dict.fromkeys(args.causal)]
    named = [name for item in args.passes for name in item.split(",") if name]
    unknown = [name for name in named if name not in PASSES]
    if unknown or not named:
        parser.error(f"--passes: expected names of {', '.join(PASSES)}, got {','.join(args.passes)!r}")
    args.passes = [name for name in PASSES if name in named]
    for key in DEFAULTS:
        if not getattr(args, key):
            parser.error(f"--{key.replace('_', '-')}: expected at least one value")
    for key in POSITIVE:
        if any(v <= 0 for v in getattr(args, key)):
            parser.error(f"--{key.replace('_', '-')}: expected positive integers, got {getattr(args, key)}")
    if any(v < 0 for v in args.varlen_seeds):
        parser.error(f"--varlen-seeds: expected integers >= 0, got {args.varlen_seeds}")
    for key in ("head_dim", "varlen_head_dim"):
        if any(d > common.HIDDEN for d in getattr(args, key)):
            parser.error(f"--{key.replace('_', '-')}: expected at most the hidden size {common.HIDDEN}, got "
                         f"{getattr(args, key)}")
    try:
        for heads in args.decode_heads:
            decode.parse_heads(heads)
        for layout in args.decode_layouts:
            decode.page_size(layout)
    except ValueError as exc:
        parser.error(str(exc))
    if args.write_crossover and not args.crossover:
        parser.error("--write-crossover needs --crossover")
    if args.write_crossover and args.quick:
        parser.error("--write-crossover takes a full crossover measurement; drop --quick")
    for name in ("routing_rounds", "decode_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.write_routing and not args.routing:
        parser.error("--write-routing needs --routing")
    if args.routing_update and not args.write_routing:
        parser.error("--routing-update needs --write-routing")
    if args.write_routing and args.quick:
        parser.error("--write-routing takes a full measurement; drop --quick")
    if min(args.warmup_ms, args.rep_ms, args.crossover_rep_ms, args.decode_max_gib) <= 0:
        parser.error("--warmup-ms, --rep-ms, --crossover-rep-ms, --decode-max-gib: expected positive numbers")
    running = [mode for mode in MODES if getattr(args, mode)]
    if args.out.suffix == ".json" and (len(running) != 1 or running[0] not in ONE_FILE_MODES):
        parser.error(f"--out {args.out}: a .json file takes the results of one one-file mode "
                     f"({', '.join(ONE_FILE_MODES)}); this run has {', '.join(running)}: give a folder")
    return args


def result_path(args, mode: str, tag: str) -> Path:
    """Where a one-file mode writes: --out when it names a .json file, else <out>/<mode>-<tag>.json."""
    return args.out if args.out.suffix == ".json" else args.out / f"{mode}-{tag}.json"


def plan(args) -> dict:
    """Measured configurations per mode (the grid counts a configuration once per pass, varlen once per pass of its
    equal and mixed points, decode once per point and round), for the time budget."""
    n = {}
    if args.grid:
        n["grid"] = len(args.dtype) * len(args.head_dim) * len(args.causal) * len(args.seqlen) * len(args.passes)
    if args.memory:
        n["memory"] = len(args.causal) * len(args.memory_seqlen) * len(memory.MEMORY_PASSES)
    if args.crossover:
        n["crossover"] = (len(args.crossover_batch) * len(args.dtype) * len(args.crossover_head_dim)
                          * len(args.causal) * len(args.crossover_seqlen))
    if args.varlen:
        n["varlen"] = (len(args.varlen_head_dim) * len(args.causal) * (len(args.varlen_seqlen)
                       + len(args.varlen_seeds)) * len(varlen.VARLEN_PASSES))
    if args.decode:
        n["decode"] = len(decode.points(args)[0]) * args.decode_rounds
    if args.routing:
        n["routing"] = len(routes.shapes(args)) * len(routes.ROUTING_PASSES) * args.routing_rounds
    return n


def _progress(label, passes=("fwd",)):
    def report(row):
        states = []
        for p in passes:
            res = common.result(row, "fa2rt", p)
            states.append(f"{p} " + (f"{res['tflops']:.1f} TFLOP/s" if "tflops" in res else res["error"][:80]))
        print(f"  {label} {row['dtype']} d{row['head_dim']} causal={row['causal']} b{row['batch']} "
              f"s{row['seqlen']}: fa2rt {', '.join(states)}", file=sys.stderr, flush=True)
    return report


def _progress_routing(row):
    verdicts = ", ".join(f"{p} {row[p].get('winner', '-')}" for p in routes.ROUTING_PASSES)
    print(f"  routing {routes.label(row)}: {verdicts}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if not torch.cuda.is_available():
        parser.error(f"the benchmark needs a GPU: torch {torch.__version__} sees none "
                     "(torch.cuda.is_available() is False)")
    env = common.environment()
    tag = config.force_arch() or "native"
    (args.out.parent if args.out.suffix == ".json" else args.out).mkdir(parents=True, exist_ok=True)
    settings = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "quick": args.quick, "full": args.full,
                "passes": args.passes}
    print(json.dumps(env))
    print(f"timed configurations (x{len(common.CONTENDERS)} contenders): {json.dumps(plan(args))}", flush=True)
    status, summaries = 0, None
    with common.kernel_forced():
        if args.grid:
            summaries, code = _guarded("grid", grid.run, args, env, tag, settings, _progress("grid", args.passes))
            status = max(status, code)
        if args.memory:
            status = max(status, _guarded("memory", memory.run, args, env, result_path(args, "memory", tag))[1])
        if args.crossover:
            status = max(status, _guarded("crossover", crossover.run, args, env, settings,
                                          result_path(args, "crossover", tag), _progress("crossover"))[1])
        if args.varlen:
            status = max(status, _guarded("varlen", varlen.run, args, env, settings,
                                          result_path(args, "varlen", tag))[1])
        if args.decode:
            status = max(status, _guarded("decode", decode.run, args, env, settings,
                                          result_path(args, "decode", tag))[1])
        if args.routing:
            status = max(status, _guarded("routing", routes.run, args, env, settings,
                                          result_path(args, "routing", tag), _progress_routing)[1])
    if summaries is not None:
        print("\n\n".join(map(grid.summary_table, summaries)))
    return status


def _guarded(mode, fn, *args):
    """(value, status) of one mode; a mode that crashes is reported (traceback, status 1) and the others still
    run, since a device run is one shot."""
    try:
        value = fn(*args)
    except Exception:
        traceback.print_exc()
        print(f"the {mode} mode failed (traceback above)", file=sys.stderr, flush=True)
        return None, 1
    return value if isinstance(value, tuple) else (None, value)
