"""--routing: the measurements behind the routing table (fa2rt.routing, DESIGN point 13), and the check of its bar.

Problems: the FA2 grid (--dtype, --head-dim, --causal, --seqlen; 16k tokens per batch, hidden 2048) and GQA 32/8
prefill at head dim 128 (the grid's seqlens from 2048 on, 16k tokens per batch), forward and forward+backward.
Contenders: fa2rt's own kernel (routing off), each SDPA backend run exactly as a routed call runs it
(fa2rt.routing.run), and, when the installed table has entries for this arch, fa2rt as routed (routing on).
The contenders take turns call by call (common.measure_together), in --routing-rounds rounds (default ROUNDS); the
rows keep each one's median round, the verdict (see RULE) compares fastest rounds: interference only adds time, and
an SDPA backend that has a slow round now and then (cuDNN's fwd+bwd at d128 causal s512: 0.50 ms in most rounds,
0.61-0.83 in some runs) would otherwise lose classes it wins in most runs.
Writes routing-<tag>.json (rows; per-pass bars: per point, the median over the rounds of best SDPA time / fa2rt's in
the same round, own and as routed); --write-routing PATH puts this arch's classes into a routing.json such as
python/fa2rt/data/routing.json (replacing that arch's entry, keeping the other archs'; with --routing-update only the
classes it measured, e.g. after one head dim's kernels changed)."""

import json
from pathlib import Path

import torch

from .. import api, config, routing
from . import common
from .common import PASSES, num

ROUNDS = 3
ROUTING_PASSES = ("fwd", "fwd+bwd")
GQA_HEADS = (32, 8)
GQA_HEAD_DIM = 128
GQA_MIN_SEQLEN = 2048
OWN, ROUTED = "fa2rt", "fa2rt_routed"
RULE = ("per class (one measured point): the contenders timed taking turns, in rounds; ms = each one's fastest "
        "round; winner = the fastest; lead = the runner-up's ms / the winner's when fa2rt wins, fa2rt's ms / the "
        "winner's otherwise; noise = (max - min) / min of fa2rt's rounds; the policy routes to an SDPA winner when "
        "lead > 1 + noise")


def routing_set(on: bool):
    """FA2RT_ROUTING for the calls inside (benchmark modes run with routing off, see common.kernel_forced)."""
    return config.overridden(config.ROUTING, "1" if on else "0")


def shapes(args) -> list[dict]:
    """The measured problems: the FA2 grid (MHA), then GQA 32/8 prefill."""
    out = []
    for dtype in args.dtype:
        for causal in args.causal:
            for head_dim in args.head_dim:
                for seqlen in args.seqlen:
                    out.append(dict(dtype=dtype, head_dim=head_dim, causal=causal, seqlen=seqlen,
                                    batch=max(1, common.TOKENS // seqlen), nheads=common.HIDDEN // head_dim,
                                    nheads_k=common.HIDDEN // head_dim))
            for seqlen in (s for s in args.seqlen if s >= GQA_MIN_SEQLEN):
                out.append(dict(dtype=dtype, head_dim=GQA_HEAD_DIM, causal=causal, seqlen=seqlen,
                                batch=max(1, common.TOKENS // seqlen), nheads=GQA_HEADS[0], nheads_k=GQA_HEADS[1]))
    return out


def forwards(q, k, v, causal, with_routed: bool) -> dict:
    scale = q.shape[-1] ** -0.5
    runs = {OWN: lambda: api.attention(q, k, v, causal=causal)}
    runs.update({name: (lambda name=name: routing.run(name, q, k, v, causal=causal, softmax_scale=scale))
                 for name in routing.PROVIDERS})
    if with_routed:
        runs[ROUTED] = routed(lambda: api.attention(q, k, v, causal=causal))
    return runs


def routed(forward):
    """forward with routing on for its calls (the other contenders run with it off)."""
    def run():
        with routing_set(True):
            return forward()
    return run


def bench_point(shape: dict, *, with_routed: bool, warmup, rep, rounds) -> dict:
    dt = getattr(torch, shape["dtype"])
    b, s, h, hk, d = (shape[key] for key in ("batch", "seqlen", "nheads", "nheads_k", "head_dim"))
    q = torch.randn(b, s, h, d, device=common.DEVICE, dtype=dt)
    k, v = (torch.randn(b, s, hk, d, device=common.DEVICE, dtype=dt) for _ in range(2))
    row = {**shape, "fa2rt_explain": common.explain_safely(q, k, v, causal=shape["causal"])}
    for pass_name in ROUTING_PASSES:
        p = PASSES[pass_name]
        inputs = p.inputs(q, k, v)
        flops = p.flop_factor * common.fwd_flops(b, h, s, d, shape["causal"])
        prepared = {name: p.timed(fn, inputs) for name, fn in forwards(*inputs, shape["causal"], with_routed).items()}
        row[pass_name] = common.merged_rounds([common.measure_together(prepared, flops, warmup, rep)
                                               for _ in range(rounds)])
        row[pass_name].update(verdict(row[pass_name]))
        with routing_set(True):
            row[pass_name]["routed_explain"] = common.explain_safely(*inputs, causal=shape["causal"])
        del inputs
    return row


def spread(ms: list[float]) -> float:
    return (max(ms) - min(ms)) / min(ms)


def verdict(results: dict) -> dict:
    """winner, lead and noise of one point (see RULE); {} when fa2rt's kernel did not run."""
    fastest = {n: min(r["rounds_ms"]) for n, r in results.items() if n in (OWN, *routing.PROVIDERS) and "ms" in r}
    if OWN not in fastest:
        return {}
    order = sorted(fastest, key=fastest.get)
    winner = order[0]
    loser = OWN if winner != OWN else (order[1] if len(order) > 1 else None)
    return {"winner": winner, "lead": None if loser is None else fastest[loser] / fastest[winner],
            "noise": spread(results[OWN]["rounds_ms"])}


def class_entry(row: dict, pass_name: str) -> dict | None:
    """The table's entry for one measured point (None when it has no verdict)."""
    res = row[pass_name]
    if "winner" not in res or res["lead"] is None:
        return None
    return {"class": {"pass": pass_name, "dtype": routing.DTYPE_NAMES[getattr(torch, row["dtype"])],
                      "head_dim": row["head_dim"], "causal": row["causal"], "group": row["nheads"] // row["nheads_k"],
                      "seqlen_lo": routing.seqlen_band(row["seqlen"])[0]},
            "winner": res["winner"], "lead": round(res["lead"], 4), "noise": round(res["noise"], 4),
            "ms": {n: round(min(r["rounds_ms"]), 5) for n, r in res.items()
                   if isinstance(r, dict) and "ms" in r and n != ROUTED},
            "shape": {key: row[key] for key in ("batch", "nheads", "nheads_k", "seqlen")}}


def paired_ratio(res: dict, theirs: tuple, mine: str) -> float | None:
    """common.paired_ratio of the contenders `theirs` against `mine` in one pass's results; None when mine or all of
    theirs have no time."""
    rounds = [res[n]["rounds_ms"] for n in theirs if "ms" in res.get(n, {})]
    if not rounds or "ms" not in res.get(mine, {}):
        return None
    return common.paired_ratio(rounds, res[mine]["rounds_ms"])


def bars(rows) -> dict:
    """Per pass: best SDPA time / fa2rt's time, own kernel and as routed (paired_ratio; geometric mean, min and
    where); and the timing's resolution (SAME_KERNELS)."""
    out = {}
    for pass_name in ROUTING_PASSES:
        out[pass_name] = {}
        for who in (OWN, ROUTED):
            pairs = []
            for r in rows:
                ratio = paired_ratio(r[pass_name], routing.PROVIDERS, who)
                if ratio is not None:
                    pairs.append((ratio, label(r)))
            if pairs:
                low, at = min(pairs)
                out[pass_name][who] = {"geomean": common.geomean([x for x, _ in pairs]), "min": low, "min_at": at,
                                       "n": len(pairs)}
        same = same_kernels(rows, pass_name)
        if same:
            (low, low_at), (high, high_at) = min(same), max(same)
            out[pass_name][SAME_KERNELS] = {"min": low, "min_at": low_at, "max": high, "max_at": high_at,
                                            "n": len(same)}
    return out


# A routed call runs the provider's kernels through the same runner as that provider's contender, so where the
# table routes, provider ms / routed ms would be 1.0 under perfect timing: its spread is what two timings of the
# same work differ by in this run, the resolution of the as-routed bar.
SAME_KERNELS = "same_kernels"


def same_kernels(rows, pass_name: str) -> list[tuple[float, str]]:
    """(the routed provider's ms / fa2rt as routed's ms, point) where the call was routed."""
    out = []
    for r in rows:
        res = r[pass_name]
        provider = res.get("routed_explain", {}).get("provider")
        ratio = paired_ratio(res, (provider,), ROUTED) if provider else None
        if ratio is not None:
            out.append((ratio, label(r)))
    return out


def label(row) -> str:
    heads = "" if row["nheads"] == row["nheads_k"] else f" {row['nheads']}/{row['nheads_k']}"
    return f"{row['dtype']} d{row['head_dim']}{heads} causal={row['causal']} s{row['seqlen']}"


def table(rows) -> str:
    names = (OWN, *routing.PROVIDERS, ROUTED)
    lines = [f"{'pass':8}{'point':44}" + "".join(f"{n.removeprefix('sdpa_'):>11}" for n in names)
             + f"{'winner':>15}{'lead':>6}{'noise':>7}"]
    for r in rows:
        for pass_name in ROUTING_PASSES:
            res = r[pass_name]
            cells = "".join(num(res.get(n, {}).get("ms"), 11, ".3f") for n in names)
            lines.append(f"{pass_name:8}{label(r):44}{cells}{res.get('winner', '-'):>15}"
                         f"{num(res.get('lead'), 6)}{num(res.get('noise'), 7, '.1%')}")
    return "\n".join(lines)


def bars_table(summary: dict) -> str:
    lines = ["best SDPA time / fa2rt's (>= 1: fa2rt at least as fast), per pass; same kernels: where routed, the "
             "provider's time / fa2rt as routed's (the same work timed twice: the resolution)"]
    for pass_name, by_who in summary.items():
        for who, s in by_who.items():
            if who == SAME_KERNELS:
                lines.append(f"  {pass_name:8}{'same kernels':14} {num(s['min'], 0)} at {s['min_at']} to "
                             f"{num(s['max'], 0)} at {s['max_at']}  ({s['n']} points)")
                continue
            lines.append(f"  {pass_name:8}{who:14} geomean {num(s['geomean'], 0)}  min {num(s['min'], 0)} at "
                         f"{s['min_at']}  ({s['n']} points)")
    return "\n".join(lines)


def merge_routing(path: Path, arch: str, measured: dict, classes: list, update: bool = False) -> dict:
    """Set archs[arch] = {"measured", "classes"} in the routing file at path (created when missing). With update,
    the arch's classes this measurement did not cover stay, each with the date it was measured on."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("schema_version", routing.SCHEMA) != routing.SCHEMA:
        raise ValueError(f"{path}: schema_version: expected {routing.SCHEMA}, got {data['schema_version']}")
    old = data.get("archs", {}).get(arch)
    if update and old:
        covered = set(routing._index({"classes": classes})["classes"])
        kept = routing._index(old)["classes"]
        classes = [*classes, *({"date": old["measured"].get("date"), **c} for key, c in kept.items()
                               if key not in covered)]
    data = {"schema_version": routing.SCHEMA, "_comment": routing.__doc__.split("\n\n")[0].replace("\n", " "),
            "archs": {**data.get("archs", {}), arch: {"measured": measured, "classes": classes}}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return data


def run(args, env, settings, path, progress=None) -> int:
    from .crossover import crossover_arch

    arch_now = env["capability"] if not config.force_arch() else config.force_arch()
    with_routed = routing.table(arch_now) is not None
    rows = []
    for shape in shapes(args):
        rows.append(bench_point(shape, with_routed=with_routed, warmup=args.warmup_ms, rep=args.rep_ms,
                                rounds=args.routing_rounds))
        if progress:
            progress(rows[-1])
    arch, mode = crossover_arch(rows)
    classes = [c for r in rows for p in ROUTING_PASSES for c in [class_entry(r, p)] if c is not None]
    summary = bars(rows)
    common.write_json(path, {"environment": env, "settings": {**settings, "rounds": args.routing_rounds}, "rule": RULE,
                             "arch": arch, "image_mode": mode, "bars": summary, "classes": classes, "rows": rows})
    print(table(rows) + "\n" + bars_table(summary), flush=True)
    status = 1 if any("error" in r[p].get(OWN, {}) for r in rows for p in ROUTING_PASSES) else 0
    if args.write_routing:
        if arch is None or mode != "native":
            print(f"not writing {args.write_routing}: the table is measured on the arch's own images ({mode})")
            return 1
        keys = ("device", "capability", "driver", "torch", "cuda", "cudnn", "triton", "date")
        measured = {**{k: env.get(k) for k in keys}, "image_mode": mode, "rounds": args.routing_rounds, "rule": RULE}
        merge_routing(args.write_routing, arch, measured, classes, update=args.routing_update)
        routed = sum(routing.leads(c) for c in classes)
        print(f"wrote {len(classes)} classes for {arch} ({routed} routed to SDPA) into {args.write_routing}")
    return status
