"""The benchmark's --varlen and --decode modes and the package's command line without a GPU: the mixed-length draw,
the contenders' plumbing against fa2rt's fallback, ratios, bars and tables, whole runs of main() on the CPU with the
GPU-only parts replaced by stand-ins, and the call path never importing the benchmark."""

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch
from test_bench import cpu_as_gpu, time_each

from fa2rt import api, bench
from fa2rt.bench import cli, common, decode, varlen
from fa2rt.policy import Decision

KERNEL = Decision("kernel", image="fwd-sm90-bf16-d64-full-m128n128w8s3", mode="native", device={"arch": "sm90"})


# --- the mixed-length draw ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("total, lo, hi", [(16384, 64, 8192), (100, 10, 30), (50, 4, 12), (64, 4, 32)])
def test_draw_sums_exactly_within_bounds_and_is_reproducible(total, lo, hi):
    draws = [varlen.draw_lengths(seed, total, lo, hi) for seed in range(300)]
    for lengths in draws:
        assert sum(lengths) == total and all(lo <= n <= hi for n in lengths), lengths
    assert draws == [varlen.draw_lengths(seed, total, lo, hi) for seed in range(300)]
    assert len({tuple(d) for d in draws}) > 250  # seeds give different batches


def test_the_default_draw_is_mixed():
    lengths = varlen.draw_lengths(0, 16384, varlen.MIN_LEN, varlen.MAX_LEN)
    assert len(lengths) >= 4 and max(lengths) >= 4 * min(lengths)
    assert lengths == varlen.draw_lengths(0, 16384, 64, 8192)


class ScriptedRandom:
    """random.Random whose uniform() draws the logs of the given lengths, in order."""

    def __init__(self, lengths):
        self.values = iter(lengths)

    def __call__(self, seed):
        return self

    def uniform(self, a, b):
        value = math.log(next(self.values))
        assert a <= value <= b
        return value


@pytest.mark.parametrize("script, total, lo, hi, expected", [
    ([30, 30, 30, 40], 100, 10, 40, [30, 30, 30, 10]),  # the rest is a sequence of its own
    ([30, 35, 30, 40], 100, 10, 40, [35, 35, 30]),  # the rest (5 < 10) joins the shortest
    ([34, 34, 35], 70, 10, 35, [26, 34, 10]),  # the shortest cannot take it: the longest gives 8 to a 10
    ([40, 40], 30, 10, 40, [30]),  # one sequence: the first draw does not fit
])
def test_draw_branches(monkeypatch, script, total, lo, hi, expected):
    monkeypatch.setattr(varlen.random, "Random", ScriptedRandom(script))
    assert varlen.draw_lengths(0, total, lo, hi) == expected


@pytest.mark.parametrize("args, message", [((0, 100, 0, 30), "min_len, max_len"), ((0, 100, 10, 29), "3 * min_len"),
                                           ((0, 5, 10, 30), "total: expected at least min_len=10, got 5")])
def test_draw_refuses_bad_bounds(args, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        varlen.draw_lengths(*args)


def test_batch_helpers():
    assert varlen.cu_seqlens([3, 0, 5], "cpu").tolist() == [0, 3, 3, 8]
    assert varlen.cu_seqlens([3, 0, 5], "cpu").dtype == torch.int32
    assert varlen.with_longest_doubled([3, 9, 5, 9]) == [3, 18, 5, 9]
    assert varlen.varlen_flops([16] * 4, 8, 64, False) == common.fwd_flops(4, 8, 16, 64, False)
    assert varlen.varlen_flops([10, 30], 2, 32, True) == (4 * 2 * 32 * (100 + 900)) / 2
    packed = torch.arange(8 * 2 * 1.0).reshape(8, 2, 1)
    pad = varlen.padded(packed, [3, 5])
    assert pad.shape == (2, 5, 2, 1)
    assert torch.equal(pad[0, :3], packed[:3]) and not pad[0, 3:].any() and torch.equal(pad[1], packed[3:])
    mask = varlen.key_padding_mask([3, 5], "cpu")
    assert mask.shape == (2, 1, 1, 5) and mask[0, 0, 0].tolist() == [True] * 3 + [False] * 2 and mask[1].all()


# --- the contenders compute attention -----------------------------------------------------------------------------

def unpadded(out, lengths):
    """(total, nheads, headdim) of the real rows of a padded (batch, nheads, max_len, headdim) output."""
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("causal", [False, True])
def test_contenders_match_fa2rts_varlen_fallback(causal):
    torch.manual_seed(0)
    lengths = [5, 1, 12, 7]
    packed = tuple(torch.randn(sum(lengths), 2, 16) for _ in range(3))
    cu = varlen.cu_seqlens(lengths, "cpu")
    want = varlen.fa2rt_varlen(cu, max(lengths), causal)(*packed)()
    assert want.shape == packed[0].shape
    pad = tuple(varlen.padded(t, lengths) for t in packed)
    got = varlen.padded_sdpa(lengths, causal, "padded_math")(*pad)()
    torch.testing.assert_close(unpadded(got, lengths), want)
    if not causal:  # nested jagged tensors take no causal mask on the CPU's math backend
        got = varlen.nested_sdpa(cu, lengths, causal, "sdpa_math")(*packed)()
        torch.testing.assert_close(got.transpose(1, 2).values(), want)
    dense = tuple(t.view(4, 4, 2, 16) for t in torch.randn(3, 16, 2, 16))
    torch.testing.assert_close(varlen.fa2rt_dense(causal)(*dense)().reshape(16, 2, 16),
                               varlen.fa2rt_varlen(varlen.cu_seqlens([4] * 4, "cpu"), 4, causal)(
                                   *(t.reshape(16, 2, 16) for t in dense))())


@pytest.mark.parametrize("signature, causal, options", [
    ("is_causal", True, {"is_causal": True}), ("is_causal", False, {"is_causal": False}),
    ("window_size", True, {"window_size": (-1, 0)}), ("window_size", False, {})])
def test_torch_varlen_causal_switch_follows_the_installed_signature(monkeypatch, signature, causal, options):
    seen = []

    def entry(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        seen.append((max_q, max_k, kwargs))
        return q
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k")]
    entry.__signature__ = inspect.Signature([*params, inspect.Parameter(signature, inspect.Parameter.KEYWORD_ONLY)])
    monkeypatch.setattr(varlen, "torch_varlen_entry", lambda: entry)
    t = torch.zeros(9, 1, 8)
    varlen.torch_varlen(varlen.cu_seqlens([4, 5], "cpu"), [4, 5], causal)(t, t, t)()
    assert seen == [(5, 5, options)]


def test_mixed_contenders_build_padded_copies_only_when_asked():
    packed = tuple(torch.randn(10, 1, 8) for _ in range(3))
    some = varlen.mixed_contenders(packed, [4, 6], False, varlen.MEMORY_CONTENDERS)
    assert list(some) == ["fa2rt_varlen", "sdpa_flash"] and all(t is p for t, p in zip(some["sdpa_flash"][0], packed,
                                                                                        strict=True))
    every = varlen.mixed_contenders(packed, [4, 6], False)
    assert [n for n in varlen.MIXED_CONTENDERS if n in every] == list(every)
    assert every["padded_flash"][0][0].shape == (2, 6, 1, 8)
    assert ("torch_varlen" in every) == (varlen.torch_varlen_entry() is not None)


# --- ratios, bars, tables -----------------------------------------------------------------------------------------

def timed(ms):
    return {"ms": ms, "tflops": 1.0 / ms} if ms else {"error": "RuntimeError: refused"}


def equal(seqlen, dense, var, dense_bwd, var_bwd, head_dim=64, causal=False):
    r = {"part": "equal", "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": 16384 // seqlen,
         "fa2rt_dense": timed(dense), "fa2rt_varlen": timed(var),
         "fwd+bwd": {"fa2rt_dense": timed(dense_bwd), "fa2rt_varlen": timed(var_bwd)}}
    r["dense_over_varlen"] = {p: common.speedup(common.ms_of(r, "fa2rt_varlen", p), common.ms_of(r, "fa2rt_dense", p))
                              for p in varlen.VARLEN_PASSES}
    return r


def test_equal_ratio_bars_and_table():
    rows = [equal(512, 1.0, 1.0, 3.0, 2.9), equal(1024, 0.9, 1.0, 3.0, None), equal(2048, 1.0, 1.25, 3.0, 3.0)]
    assert rows[0]["dense_over_varlen"] == {"fwd": 1.0, "fwd+bwd": pytest.approx(3.0 / 2.9)}
    assert rows[1]["dense_over_varlen"]["fwd+bwd"] is None
    fwd, bwd, *_ = varlen.bars(rows, [], [])
    assert (fwd["n"], fwd["min"], fwd["met"]) == (3, pytest.approx(0.8), False)
    assert fwd["geomean"] == pytest.approx((1.0 * 0.9 * 0.8) ** (1 / 3))
    assert (bwd["n"], bwd["met"]) == (2, True) and bwd["min"] == pytest.approx(1.0)
    lines = varlen.equal_table(rows).splitlines()
    assert "bar >= 0.95" in lines[0] and lines[1].split()[:4] == ["d", "causal", "seqlen", "batch"]
    assert lines[2].split() == ["64", "False", "512", "32", "1.0", "1.0", "1.00", "0.3", "0.3", "1.03"]
    assert lines[3].split()[-3:] == ["0.3", "err", "-"]


def test_bar_record_and_bars_table():
    assert varlen.bar_record("x", "fwd", 1.2, [1.3, None, 1.2]) == {
        "name": "x", "pass": "fwd", "bar": 1.2, "n": 2, "geomean": pytest.approx(math.sqrt(1.3 * 1.2)),
        "min": 1.2, "met": True}
    assert varlen.bar_record("x", "fwd", 1.2, [1.3, 1.19])["met"] is False
    assert varlen.bar_record("x", "fwd", 1.2, [None])["met"] is None
    text = varlen.bars_table(varlen.bars([], [], [{"impl": "fa2rt_varlen", "linear": False}]))
    assert "fwd: geomean -, min - over 0 points (bar >= 0.95): not measured" in text
    assert text.splitlines()[-1].endswith("fwd+bwd: over 1 configurations: NOT MET")


def mem_row(impl, tokens, longest, extra, causal=False):
    return {"impl": impl, "head_dim": 64, "causal": causal, "tokens": tokens, "max_seqlen": longest,
            "out_bytes": tokens * 64, **({"extra_bytes": extra} if extra else {"error": "OOM"})}


def test_memory_growth_tells_linear_from_quadratic():
    rows = [mem_row("fa2rt_varlen", 1000, 400, 5000), mem_row("fa2rt_varlen", 1400, 800, 7000),  # x1.4 tokens
            mem_row("sdpa_flash", 1000, 400, 5000), mem_row("sdpa_flash", 1400, 800, 20000),  # x4: max_seqlen^2
            mem_row("fa2rt_varlen", 1000, 400, 5000, causal=True), mem_row("fa2rt_varlen", 1400, 800, None, True)]
    lin, quad, missing = varlen.memory_growth(rows)
    assert lin == {"impl": "fa2rt_varlen", "head_dim": 64, "causal": False, "extra_growth": pytest.approx(1.4),
                   "tokens_growth": pytest.approx(1.4), "max_seqlen_growth": 2.0, "linear": True}
    assert quad["extra_growth"] == pytest.approx(4.0) and quad["linear"] is False
    assert missing["linear"] is None
    assert varlen.bars([], [], [lin, quad, missing])[-1]["met"] is True  # only fa2rt's rows count
    text = varlen.memory_table(rows, [lin, quad, missing])
    assert "sdpa_flash d64 causal=False: extra x4.00, tokens x1.40, max_seqlen x2.00: GROWS FASTER" in text
    assert "OOM" in text


# --- whole runs of main() on the CPU ------------------------------------------------------------------------------

@pytest.fixture
def cpu_run(monkeypatch):
    """main() as on a GPU: inputs on the CPU, tiny sizes (64 tokens, hidden 512, lengths 4..32), one untimed call
    instead of do_bench, the CUDA memory counters faked. fa2rt's kernels are its fallback (which runs on the CPU);
    the returned list collects the (args, kwargs) of explain calls, made to say "kernel" by the kernel fixture."""
    cpu_as_gpu(monkeypatch)
    monkeypatch.setattr(varlen, "MIN_LEN", 4)
    monkeypatch.setattr(varlen, "MAX_LEN", 32)
    monkeypatch.setattr(decode, "COPY_BYTES", 1 << 12)
    calls = []
    time_each(monkeypatch, lambda fn: (calls.append(fn()), 2.0)[1])
    return calls


@pytest.fixture
def kernel(monkeypatch):
    seen = []

    def explain(*args, **kwargs):
        seen.append((len(args), kwargs))
        return KERNEL
    monkeypatch.setattr(api, "explain", explain)
    return seen


def test_equal_rounds_keep_each_contenders_median_round():
    def round_row(dense_ms, varlen_ms):
        return {"fa2rt_dense": {"ms": dense_ms, "tflops": 1 / dense_ms}, "fa2rt_varlen": {"ms": varlen_ms},
                "fwd+bwd": {"fa2rt_dense": {"error": "x"}, "fa2rt_varlen": {"ms": 1.0}}, "explain": varlen_ms}
    rounds = [round_row(3.0, 1.0), round_row(1.0, 5.0), round_row(2.0, 4.0)]
    row = varlen.merge_rounds(rounds, {"fa2rt_dense": None, "fa2rt_varlen": None}, ["fwd", "fwd+bwd"])
    assert row["fa2rt_dense"] == {"ms": 2.0, "tflops": 0.5, "rounds_ms": [3.0, 1.0, 2.0]}
    assert row["fa2rt_varlen"] == {"ms": 4.0, "rounds_ms": [1.0, 5.0, 4.0]}
    assert row["fwd+bwd"]["fa2rt_dense"] == {"error": "x"}  # an error in any round: the first round's result
    assert row["explain"] == 1.0 and rounds[0]["fa2rt_dense"] == {"ms": 3.0, "tflops": 1 / 3.0}


VARLEN_ARGV = ["--varlen", "--varlen-seqlen", "16,32", "--varlen-head-dim", "16", "--varlen-seeds", "0", "3",
               "--warmup-ms", "1", "--rep-ms", "1"]


def test_varlen_mode_end_to_end(cpu_run, kernel, tmp_path, capsys):
    out = tmp_path / "varlen-h200.json"
    assert bench.main([*VARLEN_ARGV, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["environment"]["device"] == "CPU stand-in" and data["environment"]["torch"] == torch.__version__
    assert {"date", "driver", "triton"} <= set(data["environment"])
    s = data["settings"]
    assert (s["tokens"], s["min_len"], s["max_len"], s["seeds"], s["passes"]) == (64, 4, 32, [0, 3], ["fwd", "fwd+bwd"])
    assert s["draw"] == varlen.DRAW_RULE

    eq = data["equal"]
    assert [(r["head_dim"], r["causal"], r["seqlen"], r["batch"], r["nheads"]) for r in eq] == [
        (16, c, s, 64 // s, 32) for c in (False, True) for s in (16, 32)]
    r = eq[0]
    assert r["fa2rt_dense_explain"]["path"] == "kernel" and "fa2rt_varlen_explain_grad" in r
    flops = common.fwd_flops(4, 32, 16, 16, False)
    assert r["fa2rt_varlen"] == {"ms": 2.0, "tflops": pytest.approx(flops / 2.0 / 1e9),
                                 "rounds_ms": [2.0] * varlen.EQUAL_ROUNDS}
    assert r["fwd+bwd"]["fa2rt_dense"]["tflops"] == pytest.approx(3.5 * flops / 2.0 / 1e9)
    assert r["dense_over_varlen"] == {"fwd": 1.0, "fwd+bwd": 1.0}
    assert (3, {"causal": False}) in kernel and (7, {"causal": False}) in kernel  # dense and varlen explains

    mixed = data["mixed"]
    assert [(r["seed"], r["causal"]) for r in mixed] == [(0, False), (0, True), (3, False), (3, True)]
    for r in mixed:
        lengths = varlen.draw_lengths(r["seed"], 64, 4, 32)
        assert r["lengths"] == lengths and r["tokens"] == 64 and r["max_seqlen"] == max(lengths)
        flops = varlen.varlen_flops(lengths, 32, 16, r["causal"])
        assert r["fa2rt_varlen"]["tflops"] == pytest.approx(flops / 2.0 / 1e9)
        assert r["fwd+bwd"]["fa2rt_varlen"]["tflops"] == pytest.approx(3.5 * flops / 2.0 / 1e9)
        assert "No viable backend" in r["sdpa_flash"]["error"]  # no nested flash on the CPU
        assert r["ratios"]["fwd"]["sdpa_flash_over_fa2rt"] is None
    assert mixed[0]["padded_flash"]["ms"] == 2.0 and mixed[0]["ratios"]["fwd"]["best_padded"] == "padded_flash"
    assert mixed[0]["ratios"]["fwd"]["best_padded_over_fa2rt"] == 1.0

    mem = data["memory"]
    assert [(r["impl"], r["batch_lengths"]) for r in mem[:4]] == [
        ("fa2rt_varlen", "drawn"), ("sdpa_flash", "drawn"), ("fa2rt_varlen", "longest doubled"),
        ("sdpa_flash", "longest doubled")]
    assert mem[2]["max_seqlen"] == 2 * mem[0]["max_seqlen"] and mem[2]["tokens"] == 64 + mem[0]["max_seqlen"]
    assert mem[0]["extra_bytes"] == 600 and mem[0]["fa2rt_varlen_explain_grad"]["path"] == "kernel"
    assert data["memory_growth"][0]["linear"] is True
    assert [(b["pass"], b["met"]) for b in data["bars"]] == [("fwd", True), ("fwd+bwd", True), ("fwd", None),
                                                            ("fwd+bwd", None), ("fwd+bwd", True)]
    assert "varlen, equal lengths" in text and "varlen, mixed lengths" in text and "varlen bars (issue 16):" in text
    assert f"seed 3: {len(mixed[2]['lengths'])} sequences" in text
    assert cpu_run and all(c is not None for c in cpu_run)


def test_varlen_mode_with_the_real_explain_times_no_fallback(cpu_run, tmp_path, capsys):
    assert bench.main([*VARLEN_ARGV, "--causal", "true", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "varlen-native.json").read_text())
    r = data["equal"][0]
    assert r["fa2rt_dense"]["fallback"] and "[not_gpu]" in r["fa2rt_varlen"]["error"]
    assert r["dense_over_varlen"] == {"fwd": None, "fwd+bwd": None}
    assert data["mixed"][0]["fa2rt_varlen_explain"]["reason"] == "not_gpu"
    assert all(b["met"] is None for b in data["bars"])


def test_varlen_mode_reports_a_raising_kernel(cpu_run, kernel, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")
    monkeypatch.setattr(api, "attention_varlen", broken)
    assert bench.main([*VARLEN_ARGV, "--varlen-seqlen", "16", "--causal", "false", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "fa2rt kernel error: equal d16 causal=False seqlen 16: fa2rt_varlen fwd: RuntimeError: CUDA_ERROR" in err
    assert "memory d16 causal=False drawn: fa2rt_varlen: RuntimeError" in err


DECODE_ARGV = ["--decode", "--decode-batch", "1", "2", "--decode-cache", "32,48", "--decode-heads", "4/2",
               "--decode-head-dim", "16", "--decode-layouts", "contiguous,paged16", "--warmup-ms", "1", "--rep-ms",
               "1"]
DECODE_FIELDS = {"batch", "cache", "nheads", "nheads_k", "head_dim", "layout", "append", "path", "image", "splits",
                 "ms", "tbps", "rounds_ms"}
SDPA_FIELDS = {f"sdpa_{n}_{u}" for n in ("flash", "efficient", "cudnn") for u in ("ms", "tbps", "rounds_ms")}


def test_decode_mode_end_to_end(cpu_run, tmp_path, capsys):
    out = tmp_path / "d" / "decode-h200.json"
    assert bench.main([*DECODE_ARGV, "--decode-append", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["copy_tbps"] == pytest.approx(2 * (1 << 12) / 2.0 / 1e9)
    assert data["environment"]["device"] == "CPU stand-in"
    rows = data["rows"]
    assert [(r["batch"], r["cache"], r["layout"]) for r in rows] == [
        (b, c, lay) for b in (1, 2) for c in (32, 48) for lay in ("contiguous", "paged16")]
    for r in rows:
        assert set(r) == DECODE_FIELDS | (SDPA_FIELDS if r["layout"] == "contiguous" else set())
        assert r["append"] and r["path"] == "fallback" and r["ms"] == 2.0 and r["rounds_ms"] == [2.0] * 3
        assert r["tbps"] == pytest.approx(decode.moved_bytes(r["batch"], r["cache"] + 1, 4, 2, 16) / 2.0 / 1e9)
    assert rows[0]["sdpa_flash_ms"] == 2.0 and rows[0]["sdpa_cudnn_ms"] is None  # no CPU cuDNN
    assert data["skipped"] == [] and data["settings"]["append"] and data["settings"]["rounds"] == decode.DECODE_ROUNDS
    assert [(b["bar"], b["met"]) for b in data["bars"]] == [(0.85, None), (1.0, True), (0.9, None), (0.7, True)]
    assert "device copy:" in text and text.count("fallback (") == 8


def test_decode_graphs_time_every_contender_as_a_replay(cpu_run, tmp_path, monkeypatch):
    captured = []

    def graphed(fn):  # no CUDA graphs on the CPU: the replay is the call, counted
        captured.append(fn)
        return lambda: fn()
    monkeypatch.setattr(common, "graphed", graphed)
    assert bench.main([*DECODE_ARGV, "--decode-batch", "1", "--decode-graphs", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode-native.json").read_text())
    assert data["settings"]["timing"] == "cuda graph replay"
    # Every fa2rt call and each SDPA backend's on the contiguous points (cuDNN, absent on the CPU, fails when run),
    # each captured once for every round.
    contiguous = sum(r["layout"] == "contiguous" for r in data["rows"])
    assert data["settings"]["rounds"] == 3 and all(len(r["rounds_ms"]) == 3 for r in data["rows"])
    assert len(captured) == len(data["rows"]) + len(decode.SDPA_BACKENDS) * contiguous == 10


def test_decode_skips_points_over_the_cap(cpu_run, tmp_path, capsys):
    cap = decode.cache_bytes(2, 32, 2, 16) / 2 ** 30  # batch 2 at cache 32 fits exactly, cache 48 does not
    assert bench.main([*DECODE_ARGV, "--decode-max-gib", str(cap), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode-native.json").read_text())
    assert [(r["batch"], r["cache"]) for r in data["rows"]][::2] == [(1, 32), (1, 48), (2, 32)]
    assert data["skipped"] == [{"batch": 2, "cache": 48, "nheads": 4, "nheads_k": 2, "head_dim": 16, "layout": lay}
                               for lay in ("contiguous", "paged16")]
    assert "skipped 2 points over" in capsys.readouterr().out


def test_decode_records_a_raising_call(cpu_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "explain_with_kvcache", lambda *a, **k: KERNEL)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")
    monkeypatch.setattr(api, "attention_with_kvcache", broken)
    assert bench.main([*DECODE_ARGV, "--decode-batch", "1", "--out", str(tmp_path)]) == 1
    row = json.loads((tmp_path / "decode-native.json").read_text())["rows"][0]
    assert row["ms"] is None and row["tbps"] is None and row["error"] == "RuntimeError: CUDA_ERROR_LAUNCH_FAILED"
    assert row["sdpa_flash_ms"] == 2.0
    assert "fa2rt decode error: b1 cache 32 contiguous" in capsys.readouterr().err


def drow(batch, cache, layout, tbps, sdpa=(None, None, None), heads=(32, 8)):
    """A fabricated decode row of one round: TB/s and SDPA flash/efficient/cuDNN times (ms = 1 / tbps)."""
    ms = 1 / tbps if tbps else None
    r = {"batch": batch, "cache": cache, "nheads": heads[0], "nheads_k": heads[1], "head_dim": 128,
         "layout": layout, "append": False, "tbps": tbps, "ms": ms, "rounds_ms": ms and [ms]}
    if layout == "contiguous":
        for n, t in zip(("flash", "efficient", "cudnn"), sdpa, strict=True):
            r |= {f"sdpa_{n}_ms": t, f"sdpa_{n}_rounds_ms": t and [t]}
    return r


def test_decode_bars():
    rows = [drow(1, 32768, "contiguous", 3.6, (0.5, None, 0.25)), drow(1, 8192, "contiguous", 1.0, (2.0, 1.0, 1.0)),
            drow(8, 8192, "contiguous", 4.0, (1.0, None, None)), drow(8, 4096, "contiguous", 2.0),
            drow(1, 32768, "paged64", 3.4), drow(1, 32768, "paged256", 3.0), drow(8, 8192, "paged16", 2.9),
            drow(8, 4096, "paged16", None), drow(1, 8192, "paged64", 1.0, heads=(32, 32))]  # no contiguous twin
    copy, sdpa, paged, paged16 = decode.bar_checks(rows, 4.0)
    assert (copy["n"], copy["min"], copy["at"], copy["met"]) == (2, pytest.approx(0.9),
                                                                 "b1 cache 32768 32/8 d128 contiguous", True)
    # fa2rt 1/3.6 ms against cuDNN's 0.25 ms; the row without SDPA times does not count
    assert sdpa["n"] == 3 and sdpa["min"] == pytest.approx(0.25 * 3.6) and sdpa["met"] is False
    assert paged["n"] == 2 and paged["min"] == pytest.approx(3.0 / 3.6) and paged["met"] is False
    assert "paged256" in paged["at"]
    assert paged16["n"] == 1 and paged16["min"] == pytest.approx(2.9 / 4.0) and paged16["met"] is True
    text = decode.bars_table([copy, sdpa, paged, paged16])
    assert "min 0.90 at b1 cache 32768 32/8 d128 contiguous over 2 points (bar >= 0.85): met" in text
    assert text.count("NOT MET") == 2
    assert all(b["met"] is None and b["n"] == 0 for b in decode.bar_checks([drow(1, 4096, "contiguous", 1.0)], 4.0)
               if b["name"] != sdpa["name"])
    # Rounds are paired: cuDNN 3% ahead in every round while the device's speed changes between rounds; the ratio
    # is taken within each round.
    row = drow(1, 4096, "contiguous", 1.0) | {"rounds_ms": [1.03, 1.133, 0.927],
                                              "sdpa_cudnn_rounds_ms": [1.0, 1.1, 0.9]}
    assert decode.bar_checks([row], 4.0)[1]["min"] == pytest.approx(1 / 1.03)


def test_decode_helpers():
    assert decode.parse_heads("32/8") == (32, 8)
    for bad in ("32", "32/0", "8/32x", "6/4"):
        with pytest.raises(ValueError, match="--decode-heads"):
            decode.parse_heads(bad)
    assert [decode.page_size(x) for x in ("contiguous", "paged16", "paged256")] == [0, 16, 256]
    for bad in ("paged", "paged8", "paged-16", "pages16"):
        with pytest.raises(ValueError, match="--decode-layouts"):
            decode.page_size(bad)
    assert decode.cache_bytes(2, 100, 8, 128) == 2 * 2 * 100 * 8 * 128 * 2
    assert decode.cache_bytes(2, 100, 8, 128, append=True) == 2 * 2 * 101 * 8 * 128 * 2
    assert decode.moved_bytes(1, 10, 4, 2, 8) == 2 * 10 * 2 * 8 * 2 + 2 * 4 * 8 * 2


# --- the command line ---------------------------------------------------------------------------------------------

def test_varlen_and_decode_defaults_and_tiers():
    a = bench.parse_args(["--varlen", "--decode"])
    assert not a.grid and a.varlen_seqlen == [512, 1024, 2048, 4096, 8192, 16384] and a.varlen_head_dim == [64, 128]
    assert a.varlen_seeds == [0]
    assert (a.decode_batch, a.decode_cache) == ([1, 8, 32, 64], [4096, 8192, 32768, 131072])
    assert (a.decode_heads, a.decode_head_dim) == (["32/8", "32/32"], [128])
    assert a.decode_layouts == ["contiguous", "paged16", "paged64", "paged256"]
    # 32/32 at batch 32 and 64 with 128k tokens holds 64 and 128 GiB of K and V: over the 48 GiB cap
    rounds = decode.DECODE_ROUNDS
    assert bench.plan(a) == {"varlen": 2 * 2 * (6 + 1) * 2, "decode": (2 * 4 * 4 * 4 - 2 * 4) * rounds}
    full = bench.parse_args(["--varlen", "--decode", "--full"])
    assert full.varlen_seeds == [0, 1, 2] and full.decode_head_dim == [128, 64] and full.seqlen == a.seqlen
    quick = bench.parse_args(["--varlen", "--decode", "--quick", "--decode-batch", "4"])
    assert quick.varlen_seqlen == [512, 2048] and quick.decode_batch == [4] and quick.decode_heads == ["32/8"]
    assert bench.plan(quick) == {"varlen": 1 * 2 * (2 + 1) * 2, "decode": 1 * 2 * 1 * 1 * 2 * rounds}
    assert bench.plan(bench.parse_args(["--decode", "--quick", "--decode-rounds", "1"])) == {"decode": 2 * 2 * 2}
    with pytest.raises(SystemExit):
        bench.parse_args(["--decode", "--decode-rounds", "0"])


def test_lists_take_commas_or_spaces():
    a = bench.parse_args(["--decode", "--decode-batch", "1,8", "64", "--decode-heads", "32/8,32/32", "--decode-layouts",
                          "contiguous", "paged64,paged16", "--varlen-seeds", "4,5"])
    assert a.decode_batch == [1, 8, 64] and a.decode_heads == ["32/8", "32/32"]
    assert a.decode_layouts == ["contiguous", "paged64", "paged16"] and a.varlen_seeds == [4, 5]


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--full"], "not allowed with argument"),
    (["--varlen", "--varlen-seqlen", "0"], "--varlen-seqlen: expected positive"),
    (["--varlen", "--varlen-seeds", "-1"], "--varlen-seeds: expected integers >= 0"),
    (["--varlen", "--varlen-head-dim", "4096"], "--varlen-head-dim: expected at most the hidden size"),
    (["--decode", "--decode-batch", "x"], "expected int values, got 'x'"),
    (["--decode", "--decode-heads", "32-8"], "--decode-heads: expected NHEADS/NHEADS_K"),
    (["--decode", "--decode-layouts", "paged10"], "--decode-layouts: expected contiguous or pagedN"),
    (["--decode", "--decode-max-gib", "0"], "expected positive numbers"),
    (["--decode", "--decode-cache", ","], "--decode-cache: expected at least one value"),
    (["--grid", "--out", "x.json"], "--out x.json: a .json file takes the results of one one-file mode"),
    (["--varlen", "--decode", "--out", "x.json"], "this run has varlen, decode: give a folder"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_result_paths():
    a = bench.parse_args(["--varlen", "--out", "docs/bench/varlen-h200.json"])
    assert str(cli.result_path(a, "varlen", "native")) == "docs/bench/varlen-h200.json"
    a = bench.parse_args(["--varlen", "--decode", "--out", "results"])
    assert str(cli.result_path(a, "decode", "sm80")) == "results/decode-sm80.json"


def test_help_lists_every_mode(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{mode}" in text for mode in cli.MODES) and "(varlen.py)" in text and "--decode-append" in text


def test_the_call_path_never_imports_the_benchmark():
    code = ("import sys, torch, fa2rt\n"
            "q = torch.randn(9, 2, 16)\n"
            "cu = torch.tensor([0, 4, 9], dtype=torch.int32)\n"
            "fa2rt.attention_varlen(q, q, q, cu, cu, 5, 5, causal=True)\n"
            "fa2rt.attention(q[None], q[None], q[None])\n"
            "fa2rt.explain(q[None], q[None], q[None])\n"
            "import fa2rt.flash_attn\n"
            "print(sorted(m for m in sys.modules if m.startswith('fa2rt.bench')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
