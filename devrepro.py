# throwaway: which contender of the varlen mixed row faults (run each in its own process)
import sys, torch
from fa2rt.bench import varlen, common
from fa2rt.bench.common import PASSES
name, causal, hd = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
lengths = varlen.draw_lengths(0, 16384, 64, 8192)
nheads = common.HIDDEN // hd
packed = tuple(torch.randn(sum(lengths), nheads, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
tensors, build = varlen.mixed_contenders(packed, lengths, causal, (name,))[name]
for pn in ("fwd", "fwd+bwd"):
    p = PASSES[pn]
    inputs = p.inputs(*tensors)
    try:
        fn = p.prepare(build(*inputs), inputs)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        print(name, pn, "ok", flush=True)
    except Exception as e:
        print(name, pn, "ERR", type(e).__name__, str(e)[:150], flush=True)
        if "illegal" in str(e):
            sys.exit(3)
