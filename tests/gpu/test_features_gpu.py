"""Every forward feature on a real NVIDIA GPU, against a float64 reference (error bound: see gpu_helpers).

Head dims 8..256, windows, softcap, ALiBi, GQA/MQA with each of them, out=, 128k tokens, tiny shapes, the fallback for
head dims no kernel takes, CUDA graphs, any GPU index, threads and streams. The native images run every case; the
sm80 and sm89 images, forced through their PTX (each image one driver JIT: 0.1-0.4 s on an H200), a subset.
The whole file took about 10 s on one H200 (2026-11-21, torch 2.11.0+cu130, Triton 3.6.0).
"""

import threading
import warnings

import pytest
import torch
from gpu_helpers import (
    DEVICE,
    PATHS,
    Case,
    check_attention,
    emulate,
    expect_path,
    make,
    poison_allocator,
    rel_err,
    run_case,
    seed_of,
    use_path,
)

import fa2rt
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

pytestmark = pytest.mark.usefixtures("kernels_at_any_length")

BF16, FP16 = torch.bfloat16, torch.float16
DTYPES = (BF16, FP16)
NATIVE_PATH, SM89_PATH, SM80_PATH = PATHS
MIB = 1 << 20
SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s of GPU time at H100/H200 clocks


def on_path(path, cases):
    return [pytest.param(path, case, id=f"{path[1]}-{path[2]}-{case.id}") for case in cases]


def run_on(monkeypatch, path, case, test, **kw):
    use_path(monkeypatch, path[0])
    return run_case(case, seed_of(test, case.id, path), arch=path[1], mode=path[2], **kw)


# ---- head dims: every multiple of 8 from 8 to 256 has a kernel (buckets 16..256, tail masked) --------------------

HEAD_DIMS = [8, 16, 24, 40, 64, 72, 96, 128, 136, 160, 192, 200, 224, 256]
RAGGED = [(2, 77, 133, 4, 2), (2, 133, 77, 4, 1)]  # seqlen_q < seqlen_k and >, GQA and MQA
HEAD_DIM_CASES = on_path(NATIVE_PATH, [
    Case(RAGGED[(i + causal) % 2], d, dtype, causal=bool(causal))
    for i, d in enumerate(HEAD_DIMS) for dtype in DTYPES for causal in (0, 1)])
HEAD_DIM_CASES += on_path(SM80_PATH, [
    Case(RAGGED[1], 8, BF16, causal=True), Case(RAGGED[0], 40, FP16),
    Case(RAGGED[0], 136, BF16), Case(RAGGED[1], 256, FP16, causal=True)])
HEAD_DIM_CASES += on_path(SM89_PATH, [
    Case(RAGGED[1], 24, FP16, causal=True), Case(RAGGED[0], 72, BF16),
    Case(RAGGED[0], 200, FP16), Case(RAGGED[1], 256, BF16, causal=True)])


@pytest.mark.parametrize("path, case", HEAD_DIM_CASES)
def test_head_dims(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "head_dims")


# ---- head dims no kernel takes: the announced SDPA fallback, still right ------------------------------------------

FALLBACK_CASES = [
    Case((2, 77, 133, 4, 2), 20, FP16, causal=True),
    Case((1, 133, 77, 4, 4), 100, BF16, out="strided"),
    Case((2, 77, 133, 4, 2), 264, BF16),
    Case((2, 133, 77, 8, 2), 20, BF16, causal=True, window=(32, 8), softcap=10.0, alibi="bh", amp=3.0),
    Case((1, 77, 133, 8, 1), 264, FP16, window=(16, 16), alibi="h"),
]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=[c.id for c in FALLBACK_CASES])
def test_head_dims_without_kernel_fall_back(fresh_announcements, case):
    seed = seed_of("fallback", case.id)
    with pytest.warns(fa2rt.FallbackWarning, match="no_kernel"):
        run_case(case, seed, path="fallback", reason="no_kernel")
    q, k, v, opts = case.inputs(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fa2rt.attention(q, k, v, **opts)
    assert not [w for w in caught if issubclass(w.category, fa2rt.FallbackWarning)], "warned twice for one reason"


# ---- local (sliding window) attention ------------------------------------------------------------------------------

WINDOWS = [(16, 0), (0, 16), (32, 32), (-1, 8), (8, -1), (0, 0), (150, 150)]  # (150, 150) covers every key
WINDOW_CASES = [
    Case(shape, (64, 128, 96)[(wi + si) % 3], DTYPES[(wi + si + causal) % 2], causal=bool(causal), window=w)
    for wi, w in enumerate(WINDOWS) for causal in (0, 1) for si, shape in enumerate(RAGGED)]
# Longer sequences: the window spans several key blocks and whole blocks fall outside it.
LONG_WINDOWS = [(128, 0), (100, 50), (-1, 256), (300, -1)]
WINDOW_CASES += [
    Case(shape, (128, 64)[si], DTYPES[(wi + causal) % 2], causal=bool(causal), window=w)
    for wi, w in enumerate(LONG_WINDOWS) for causal in (0, 1)
    for si, shape in enumerate([(1, 900, 1537, 4, 2), (1, 1537, 900, 4, 4)])]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, WINDOW_CASES))
def test_windows(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "windows")


EMPTY_ROW_CASES = [  # (case, rows at the top that see no key)
    (Case((2, 133, 77, 4, 2), 64, BF16, window=(0, 0), out="contig"), 56),
    (Case((2, 133, 77, 4, 4), 128, FP16, window=(-1, 8)), 48),
    (Case((1, 300, 100, 8, 2), 128, BF16, causal=True, window=(16, 0), out="strided"), 200),
    (Case((2, 300, 100, 4, 1), 64, FP16, causal=True, window=(16, 32), softcap=10.0, alibi="bh"), 200),
]


@pytest.mark.parametrize("case, n_empty", EMPTY_ROW_CASES, ids=[c.id for c, _ in EMPTY_ROW_CASES])
def test_rows_without_keys_give_zero_and_inf_lse(monkeypatch, case, n_empty):
    r = run_on(monkeypatch, NATIVE_PATH, case, "empty_rows")
    out, lse, q, v = r.out, r.lse, r.q, r.v
    _, _, has_key = emulate(r.q, r.k, r.v, **r.opts)
    assert has_key.logical_not().nonzero().flatten().tolist() == list(range(n_empty))
    assert (out[:, :n_empty] == 0).all() and torch.isposinf(lse[..., :n_empty]).all()
    assert torch.isfinite(lse[..., n_empty:]).all()
    if case.window == (0, 0):  # every other row sees exactly one key: its output is that key's value, exactly
        v_heads = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        assert torch.equal(out[:, n_empty:], v_heads[:, : q.shape[1] - n_empty])


# ---- softcap --------------------------------------------------------------------------------------------------------

SOFTCAP_CASES = [  # amp: scores of std ~amp before the cap, so the cap bends them (0: the same scores, no cap)
    Case((2, 300, 257, 8, 8) if causal else (2, 257, 300, 8, 8), (64, 128)[causal], dtype, causal=bool(causal),
         softcap=cap, amp=amp)
    for cap, amp in ((0.0, 3.0), (5.0, 3.0), (30.0, 8.0)) for dtype in DTYPES for causal in (0, 1)]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, SOFTCAP_CASES))
def test_softcap(monkeypatch, path, case):
    r = run_on(monkeypatch, path, case, "softcap")
    if case.softcap:  # the cap must matter far beyond the tolerance, or a kernel ignoring it would pass
        uncapped, _ = attention_reference(r.q, r.k, r.v, **{**r.opts, "softcap": 0.0})
        assert rel_err(r.out, uncapped) > 10 * r.bound


# ---- ALiBi ---------------------------------------------------------------------------------------------------------

ALIBI_CASES = [
    Case(shape, (64, 128)[si], DTYPES[(ki + causal) % 2], causal=bool(causal), alibi=kind)
    for ki, kind in enumerate(("h", "bh")) for causal in (0, 1)
    for si, shape in enumerate([(2, 300, 257, 8, 8), (2, 257, 300, 8, 4)])]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, ALIBI_CASES))
def test_alibi(monkeypatch, path, case):
    r = run_on(monkeypatch, path, case, "alibi")
    without = {key: val for key, val in r.opts.items() if key != "alibi_slopes"}
    assert rel_err(r.out, attention_reference(r.q, r.k, r.v, **without)[0]) > 10 * r.bound
    slopes = r.opts["alibi_slopes"]
    if slopes.dim() == 2:  # per-batch slopes must be read per batch entry, not row 0 for all
        row0 = {**r.opts, "alibi_slopes": slopes[:1].expand_as(slopes).contiguous()}
        assert rel_err(r.out, attention_reference(r.q, r.k, r.v, **row0)[0]) > 10 * r.bound


# ---- GQA / MQA with every feature, and all features at once ---------------------------------------------------------

GQA_FEATURES = [
    {"causal": True},
    {"window": (32, 8)},
    {"softcap": 10.0, "amp": 3.0},
    {"alibi": "h", "causal": True},
    {"alibi": "bh", "softcap": 20.0, "amp": 4.0, "window": (64, -1), "causal": True},
]
GQA_CASES = [
    Case((2, 200, 333, 8, hk), (128, 64)[(fi + hi) % 2], DTYPES[(fi + hi) % 2], **features)
    for fi, features in enumerate(GQA_FEATURES) for hi, hk in enumerate((2, 1))]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, GQA_CASES))
def test_gqa_with_features(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "gqa")


ALL_FEATURES = {"causal": True, "window": (48, 0), "softcap": 20.0, "alibi": "bh", "amp": 4.0}
COMBINED_CASES = on_path(NATIVE_PATH, [
    Case((2, 300, 257, 8, 2), 128, BF16, **ALL_FEATURES),
    Case((2, 257, 300, 8, 1), 72, FP16, **ALL_FEATURES),
    Case((1, 600, 600, 8, 2), 256, BF16, **ALL_FEATURES),
    Case((2, 300, 257, 8, 4), 40, FP16, **ALL_FEATURES)])
# The older archs' images through PTX: one case per feature, then all at once, then a strided out=.
for _path, _dtypes in ((SM80_PATH, (BF16, FP16)), (SM89_PATH, (FP16, BF16))):
    COMBINED_CASES += on_path(_path, [
        Case((2, 133, 77, 4, 2), 64, _dtypes[0], causal=True, window=(16, 0)),
        Case((2, 300, 257, 8, 8), 128, _dtypes[1], softcap=5.0, amp=3.0),
        Case((2, 257, 300, 8, 4), 64, _dtypes[0], alibi="bh"),
        Case((2, 300, 257, 8, 2), 128, _dtypes[0], **ALL_FEATURES),
        Case((2, 77, 133, 4, 2), 96, _dtypes[1], window=(32, 32), out="strided")])


@pytest.mark.parametrize("path, case", COMBINED_CASES)
def test_features_combined(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "combined")


def _peak_extra_bytes(call):
    """call()'s result and the peak memory it allocated beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_gqa_reads_kv_in_place():
    """K/V are read where they are: the call allocates its outputs and next to nothing else, while a copy of K or
    V (or of them repeated per query head, or a materialised bias) would be 16 MiB or more."""
    case = Case((1, 256, 65536, 8, 1), 128, BF16, **ALL_FEATURES)
    seed = seed_of("gqa_memory")
    q, k, v, opts = case.inputs(seed)
    expect_path(fa2rt.explain(q, k, v, **opts))
    fa2rt.attention(q, k, v, **opts, return_lse=True)  # warm-up: module load
    (out, lse), extra = _peak_extra_bytes(lambda: fa2rt.attention(q, k, v, **opts, return_lse=True))
    slack = 4 * MIB  # allocator rounding, small temporaries
    kv_bytes = k.numel() * k.element_size()
    assert kv_bytes >= 4 * slack
    assert extra <= _nbytes(out, lse) + slack, (extra, kv_bytes)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rows = torch.randint(0, q.shape[1], (32,), device=DEVICE, generator=g).unique()
    check_attention(out, lse, q, k, v, rows=rows, **opts)


# ---- out= ----------------------------------------------------------------------------------------------------------

OUT_CASES = [
    Case((2, 77, 133, 4, 2), 64, BF16, out="contig"),
    Case((2, 133, 77, 8, 2), 128, FP16, causal=True, out="strided"),
    Case((1, 300, 257, 4, 4), 72, BF16, window=(16, 16), softcap=10.0, alibi="h", amp=3.0, out="strided"),
    Case((2, 257, 300, 8, 1), 256, FP16, causal=True, alibi="bh", out="contig"),
]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, OUT_CASES))
def test_out_is_written_and_returned(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "out")  # checks `result is out` and the untouched rest of a strided buffer


def test_out_without_lse_returns_out_itself():
    q, k, v = make((1, 200, 200, 4, 2), 64, BF16, seed_of("out_only"))
    out = torch.full_like(q, float("nan"))
    expect_path(fa2rt.explain(q, k, v, causal=True, out=out))
    assert fa2rt.attention(q, k, v, causal=True, out=out) is out
    torch.cuda.synchronize()
    check_attention(out, fa2rt.attention(q, k, v, causal=True, return_lse=True)[1], q, k, v, causal=True)


# ---- long sequences and tiny shapes --------------------------------------------------------------------------------

def test_128k_tokens_causal():
    """131072 tokens, causal, MQA: checked on a random subset of query rows (plus the edges of the first and last
    key blocks) against float64, and no allocation beyond the outputs (nothing grows with seqlen_q x seqlen_k)."""
    n = 131072
    case = Case((1, n, n, 2, 1), 64, BF16, causal=True)
    seed = seed_of("128k")
    q, k, v, opts = case.inputs(seed)
    expect_path(fa2rt.explain(q, k, v, **opts))
    poison_allocator()
    (out, lse), extra = _peak_extra_bytes(lambda: fa2rt.attention(q, k, v, **opts, return_lse=True))
    assert extra <= _nbytes(out, lse) + 8 * MIB, extra
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    edges = torch.tensor([0, 1, 63, 64, 127, 128, 255, 256, n // 2, n - 257, n - 129, n - 128, n - 1], device=DEVICE)
    rows = torch.cat([edges, torch.randint(0, n, (51,), device=DEVICE, generator=g)]).unique()
    check_attention(out, lse, q, k, v, rows=rows, **opts)


TINY_SHAPES = [(1, 1, 1, 1, 1), (1, 1, 300, 1, 1), (1, 300, 1, 1, 1), (3, 1, 77, 8, 1), (1, 77, 1, 8, 8),
               (4, 64, 64, 1, 1)]
TINY_FEATURES = [{}, {"window": (4, 0), "softcap": 10.0, "alibi": "bh", "amp": 3.0}]
TINY_CASES = [
    Case(shape, (64, 40, 128)[si % 3], DTYPES[(si + fi + causal) % 2], causal=bool(causal), **features)
    for si, shape in enumerate(TINY_SHAPES) for causal in (0, 1) for fi, features in enumerate(TINY_FEATURES)]


@pytest.mark.parametrize("path, case", on_path(NATIVE_PATH, TINY_CASES))
def test_tiny_shapes(monkeypatch, path, case):
    run_on(monkeypatch, path, case, "tiny")


# ---- the yardstick: the FA2-precision emulation errs like SDPA where both apply ------------------------------------

CALIBRATION_CASES = [
    Case((2, 1024, 1024, 8, 8), 64, BF16),
    Case((2, 1024, 1024, 8, 8), 128, FP16, causal=True),
    Case((2, 300, 257, 8, 2), 96, BF16, causal=True),
    Case((1, 512, 700, 4, 4), 256, FP16),
]


@pytest.mark.parametrize("case", CALIBRATION_CASES, ids=[c.id for c in CALIBRATION_CASES])
def test_emulated_precision_matches_sdpa(case):
    q, k, v, opts = case.inputs(seed_of("calibration", case.id))
    ref, _ = attention_reference(q, k, v, **opts)
    emulated = rel_err(emulate(q, k, v, lowp=True, **opts)[0], ref)
    sdpa = rel_err(sdpa_attention(q, k, v, causal=case.causal)[0], ref)
    assert sdpa / 3 <= emulated <= 3 * sdpa, (emulated, sdpa)


# ---- CUDA graphs ---------------------------------------------------------------------------------------------------

GRAPH_CASES = [
    Case((2, 512, 512, 8, 2), 128, BF16, causal=True),
    Case((2, 300, 257, 8, 2), 64, FP16, out="contig", **ALL_FEATURES),
]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c.id for c in GRAPH_CASES])
def test_cuda_graph_capture_and_replay(case):
    seed = seed_of("graph", case.id)
    q, k, v, opts = case.inputs(seed)
    static = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    static_opts = dict(opts)
    if "alibi_slopes" in opts:
        static_opts["alibi_slopes"] = opts["alibi_slopes"].clone()
    out_kw = {"out": torch.empty_like(q)} if case.out else {}
    expect_path(fa2rt.explain(static["q"], static["k"], static["v"], **static_opts, **out_kw))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
        for _ in range(2):
            fa2rt.attention(static["q"], static["k"], static["v"], **static_opts, **out_kw, return_lse=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = fa2rt.attention(static["q"], static["k"], static["v"], **static_opts, **out_kw,
                                       return_lse=True)
    if out_kw:
        assert g_out is out_kw["out"]

    for round_ in range(2):  # new values each time: the replay must read the static inputs, not captured copies
        q2, k2, v2 = make(case.shape, case.head_dim, case.dtype, seed + 1 + round_)
        opts2 = dict(opts)
        for name, new in (("q", q2), ("k", k2), ("v", v2)):
            static[name].copy_(new)
        if "alibi_slopes" in opts:
            opts2["alibi_slopes"] = opts["alibi_slopes"] * (0.5 + round_)
            static_opts["alibi_slopes"].copy_(opts2["alibi_slopes"])
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_lse = fa2rt.attention(q2, k2, v2, **opts2, return_lse=True)
        torch.cuda.synchronize()
        assert torch.equal(g_out, eager_out) and torch.equal(g_lse, eager_lse), f"replay {round_} != eager"
        check_attention(g_out, g_lse, q2, k2, v2, **opts2)


# ---- devices, threads, streams -------------------------------------------------------------------------------------

DEVICE_CASE = Case((2, 300, 257, 8, 2), 128, BF16, causal=True, window=(64, 0), alibi="bh")


def test_last_gpu_while_gpu0_is_current():
    """The tensors' device decides, not the current device (on a one-GPU machine both are cuda:0)."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    previous = torch.cuda.current_device()
    torch.cuda.set_device(0)
    try:
        out = run_case(DEVICE_CASE, seed_of("last_gpu"), device=device).out
        assert out.device == device and torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_device(previous)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 GPUs: computes on cuda:1, on cuda:1's current stream, while cuda:0 is current")
def test_second_gpu_on_its_current_stream_while_gpu0_is_current():
    device = torch.device("cuda", 1)
    previous = torch.cuda.current_device()
    case = Case((2, 300, 257, 8, 2), 128, BF16, causal=True, window=(64, 0), softcap=10.0, amp=3.0)
    q_new, k, v, opts = case.inputs(seed_of("second_gpu"), device)
    q = torch.zeros_like(q_new)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        torch.cuda.set_device(0)
        decision = fa2rt.explain(q, k, v, **opts)
        expect_path(decision)
        assert decision.device.get("index") == 1, decision
        with torch.cuda.stream(stream):
            torch.cuda.set_device(0)  # entering the stream context made cuda:1 current; cuda:1 keeps `stream`
            assert torch.cuda.current_stream(device) == stream
            fa2rt.attention(q, k, v, **opts)  # warm-up: module load on cuda:1
            with torch.cuda.device(device):
                torch.cuda._sleep(SLEEP_CYCLES)
            q.copy_(q_new)  # the real input arrives on `stream` only after the sleep
            out, lse = fa2rt.attention(q, k, v, **opts, return_lse=True)
            assert torch.cuda.current_device() == 0
        stream.synchronize()
        assert out.device == device
        check_attention(out, lse, q_new, k, v, **opts)
    finally:
        torch.cuda.set_device(previous)


THREAD_CASES = [
    Case((2, 256, 256, 8, 8), 64, BF16, causal=True),
    Case((1, 300, 257, 8, 2), 128, FP16, window=(32, 8)),
    Case((2, 129, 200, 4, 1), 96, BF16, softcap=10.0, amp=3.0),
    Case((1, 513, 513, 8, 4), 64, FP16, causal=True, alibi="bh"),
    Case((2, 77, 133, 4, 2), 40, BF16),
    Case((1, 1000, 1000, 2, 2), 128, BF16, causal=True, window=(64, 0)),
    Case((3, 1, 77, 2, 2), 64, FP16),
    Case((1, 200, 333, 8, 2), 256, BF16, causal=True, window=(48, -1), softcap=20.0, alibi="h", amp=4.0),
]


def test_threads_on_two_streams_match_eager():
    """8 threads, each its own shape and features, on 2 streams at once, 3 calls each: every result equals the
    same call made alone afterwards (and that one is right)."""
    inputs = [case.inputs(seed_of("threads", case.id)) for case in THREAD_CASES]
    for q, k, v, opts in inputs:
        expect_path(fa2rt.explain(q, k, v, **opts))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results = [[] for _ in THREAD_CASES]
    errors = []
    start = threading.Barrier(len(THREAD_CASES), timeout=60)

    def worker(i):
        try:
            q, k, v, opts = inputs[i]
            with torch.cuda.stream(streams[i % 2]):
                start.wait()
                for _ in range(3):
                    results[i].append(fa2rt.attention(q, k, v, **opts, return_lse=True))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append((THREAD_CASES[i].id, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(THREAD_CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    torch.cuda.synchronize()
    assert not errors, errors
    for case, (q, k, v, opts), got in zip(THREAD_CASES, inputs, results, strict=True):
        eager_out, eager_lse = fa2rt.attention(q, k, v, **opts, return_lse=True)
        torch.cuda.synchronize()
        assert len(got) == 3 and all(torch.equal(o, eager_out) and torch.equal(lse, eager_lse) for o, lse in got), (
            case.id)
        check_attention(eager_out, eager_lse, q, k, v, **opts)


@pytest.mark.parametrize("case", [Case((2, 512, 700, 8, 2), 128, BF16, causal=True),
                                  Case((2, 300, 257, 8, 2), 64, FP16, **ALL_FEATURES)],
                         ids=["plain", "all-features"])
def test_work_is_ordered_on_the_current_stream(case):
    """On a side stream the input is written only after a ~0.1 s sleep: a kernel launched on any other stream
    (or before the write) would read the stale zeros."""
    q_new, k, v, opts = case.inputs(seed_of("stream", case.id))
    q = torch.zeros_like(q_new)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fa2rt.attention(q, k, v, **opts)  # warm-up: module load
        torch.cuda._sleep(SLEEP_CYCLES)
        q.copy_(q_new)
        out, lse = fa2rt.attention(q, k, v, **opts, return_lse=True)
    side.synchronize()
    check_attention(out, lse, q_new, k, v, **opts)


def test_does_not_wait_for_other_streams():
    """A call on a side stream neither runs on nor waits for the (busy) default stream."""
    q, k, v = make((2, 512, 512, 8, 2), 128, BF16, seed_of("no_wait"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fa2rt.attention(q, k, v, causal=True, return_lse=True)  # warm-up: module load, allocator blocks
    side.synchronize()
    torch.cuda._sleep(5 * SLEEP_CYCLES)  # the default stream is busy for ~0.5 s
    with torch.cuda.stream(side):
        out, lse = fa2rt.attention(q, k, v, causal=True, return_lse=True)
    side.synchronize()
    default_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert default_busy, "the call waited for the default stream (or synchronised the device)"
    check_attention(out, lse, q, k, v, causal=True)

