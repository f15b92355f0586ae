"""The benchmark program without a GPU: options, FLOPs, summaries, the crossover rule and its file, tables, and a
whole run of main() with the GPU-only parts replaced by CPU stand-ins."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fa2rt import bench, config, policy
from fa2rt.bench import common, crossover, grid
from fa2rt.policy import Decision

KERNEL = Decision("kernel", image="fwd-sm90-bf16-d64-full-m128n128w8s3", mode="native", device={"arch": "sm90"})
BACKWARD = (("bwd_dq-sm90-bf16-d64-full-m64n128w4s2", "native"), ("bwd_dkdv-sm90-bf16-d64-full-m128n64w8s2", "native"))
KERNEL_GRAD = dataclasses.replace(KERNEL, backward=BACKWARD)


# --- options ------------------------------------------------------------------------------------------------------

def test_defaults_are_the_full_grid():
    a = bench.parse_args([])
    assert a.grid and not a.memory and not a.crossover
    assert a.dtype == ["bfloat16", "float16"] and a.head_dim == [64, 128, 256]
    assert a.seqlen == [512, 1024, 2048, 4096, 8192, 16384] and a.causal == [False, True]
    assert a.memory_seqlen == [8192, 16384, 32768, 65536]
    assert a.crossover_seqlen == [16, 32, 64, 128, 256, 512, 1024]
    assert a.crossover_batch == [1, 8] and a.crossover_head_dim == [64, 128]
    assert a.passes == ["fwd"]
    assert bench.plan(a) == {"grid": 72}


def test_modes_alone_and_together():
    a = bench.parse_args(["--memory"])
    assert (a.grid, a.memory, a.crossover) == (False, True, False)
    a = bench.parse_args(["--grid", "--memory", "--crossover"])
    assert bench.plan(a) == {"grid": 72, "memory": 16, "crossover": 112}


@pytest.mark.parametrize("argv, passes", [
    (["--passes", "fwd,bwd,fwd+bwd"], ["fwd", "bwd", "fwd+bwd"]),
    (["--passes", "fwd+bwd", "fwd"], ["fwd", "fwd+bwd"]),  # space-separated too; always in PASSES' order
    (["--passes", "bwd,bwd,", "bwd"], ["bwd"]),
])
def test_passes_option(argv, passes):
    a = bench.parse_args(argv)
    assert a.passes == passes
    assert bench.plan(a) == {"grid": 72 * len(passes)}


def test_a_budget_subset_of_the_backward():
    a = bench.parse_args(["--passes", "fwd+bwd", "--dtype", "bfloat16", "--head-dim", "64", "128"])
    assert bench.plan(a) == {"grid": 1 * 2 * 2 * 6}
    a = bench.parse_args(["--quick", "--passes", "fwd,bwd,fwd+bwd"])
    assert bench.plan(a) == {"grid": 4 * 3}


def test_quick_is_tiny_and_explicit_options_win():
    a = bench.parse_args(["--quick", "--grid", "--memory", "--crossover"])
    assert a.seqlen == [512, 1024] and a.head_dim == [64] and a.dtype == ["bfloat16"]
    assert bench.plan(a) == {"grid": 4, "memory": 8, "crossover": 6}
    a = bench.parse_args(["--quick", "--head-dim", "128", "--dtype", "float16", "--causal", "true"])
    assert a.head_dim == [128] and a.dtype == ["float16"] and a.causal == [True] and a.seqlen == [512, 1024]


@pytest.mark.parametrize("argv, message", [
    (["--write-crossover", "x.json"], "needs --crossover"),
    (["--crossover", "--quick", "--write-crossover", "x.json"], "drop --quick"),
    (["--seqlen", "0"], "positive"),
    (["--crossover-batch", "-1"], "positive"),
    (["--head-dim", "4096"], "hidden"),
    (["--dtype", "float32"], "invalid choice"),
    (["--rep-ms", "0"], "positive"),
    (["--passes", "fwd,backward"], "--passes: expected names of fwd, bwd, fwd+bwd"),
    (["--passes", ","], "--passes"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_main_without_gpu_exits_with_a_clear_error(tmp_path, capsys):
    assert not torch.cuda.is_available()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fa2rt.bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr


# --- FLOPs, summaries ---------------------------------------------------------------------------------------------

def test_flops():
    assert common.fwd_flops(2, 16, 1024, 128, False) == 4 * 2 * 16 * 1024 * 1024 * 128
    assert common.fwd_flops(2, 16, 1024, 128, True) == 2 * 2 * 16 * 1024 * 1024 * 128
    assert common.fwd_flops(1, 1, 8, 64, False, seqlen_k=16) == 4 * 8 * 16 * 64
    assert common.PASSES["fwd"].flop_factor == 1.0
    assert [(p.name, p.flop_factor, p.grad, p.stem, p.explain_key) for p in common.PASSES.values()] == [
        ("fwd", 1.0, False, "fwd", "fa2rt_explain"), ("bwd", 2.5, True, "bwd", "fa2rt_explain_grad"),
        ("fwd+bwd", 3.5, True, "fwd_bwd", "fa2rt_explain_grad")]


def test_geomean():
    assert common.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert common.geomean([4.0, None, 0.0, float("nan")]) == pytest.approx(4.0)
    assert math.isnan(common.geomean([]))


def row(seqlen, fa2rt=None, flash=None, cudnn=None, efficient=None, dtype="bfloat16", head_dim=64, causal=False,
        batch=8, fallback=False, pass_name="fwd"):
    """A fabricated result row of one pass; a time of None is an errored backend."""
    r = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch, "nheads": 16,
         "fa2rt_image": None if fallback else KERNEL.image,
         "fa2rt_explain": {"path": "fallback", "reason": "head_dim", "message": "no image"} if fallback
         else {"path": "kernel", "image": KERNEL.image, "mode": "native", "arch": "sm90"}}
    for name, ms in (("fa2rt", fa2rt), ("sdpa_flash", flash), ("sdpa_cudnn", cudnn), ("sdpa_efficient", efficient)):
        r[name] = {"ms": ms, "tflops": 1.0 / ms} if ms else {"error": f"RuntimeError: {name} refused"}
    if fallback:
        r["fa2rt"] = common.not_timed(r["fa2rt_explain"])
    if pass_name != "fwd":  # a backward pass: results under r[pass_name], fa2rt's explain for inputs requiring grad
        r[pass_name] = {n: r.pop(n) for n in common.CONTENDERS}
        backward = [{"image": img, "mode": "ptx-jit", "arch": "sm80"} for img, _ in BACKWARD]
        r["fa2rt_explain_grad"] = r["fa2rt_explain"] if fallback else {**r["fa2rt_explain"], "backward": backward}
    return r


def test_summary_per_group_and_overall():
    rows = [row(512, 1.0, 2.0, 0.5, 4.0), row(1024, 1.0, 0.5, 0.5, 4.0),
            row(512, 1.0, 1.0, None, 3.0, causal=True), row(1024, 2.0, None, 1.0, 3.0, causal=True),
            row(512, None, 1.0, 1.0, 1.0, head_dim=256, fallback=True)]
    s = grid.summarize(rows)
    g0, g1, g2 = s["groups"]
    assert (g0["dtype"], g0["head_dim"], g0["causal"]) == ("bfloat16", 64, False)
    assert g0["fa2rt_over_sdpa_flash"]["geomean"] == pytest.approx(1.0)
    assert g0["fa2rt_over_sdpa_flash"]["min"] == pytest.approx(0.5)
    assert g0["fa2rt_over_sdpa_flash"]["min_seqlen"] == 1024
    assert g0["fa2rt_over_sdpa_cudnn"]["geomean"] == pytest.approx(0.5)
    assert g0["fa2rt_over_best_sdpa"]["geomean"] == pytest.approx(0.5)
    # causal: flash errored at 1024, so only 512 counts; best SDPA is cuDNN there
    assert g1["fa2rt_over_sdpa_flash"]["n"] == 1 and g1["fa2rt_over_sdpa_flash"]["geomean"] == pytest.approx(1.0)
    assert g1["fa2rt_over_best_sdpa"]["geomean"] == pytest.approx(math.sqrt(1.0 * 0.5))
    assert g2["fa2rt_timed"] == 0 and g2["fa2rt_over_sdpa_flash"]["geomean"] is None
    o = s["overall"]
    assert o["rows"] == 5 and o["fa2rt_timed"] == 4
    assert o["fa2rt_over_sdpa_flash"]["n"] == 3
    assert o["fa2rt_over_sdpa_flash"]["geomean"] == pytest.approx((2.0 * 0.5 * 1.0) ** (1 / 3))
    assert o["fa2rt_over_sdpa_flash"]["min"] == pytest.approx(0.5)
    assert s["images"] == ["sm90 native"]
    json.dumps(s)  # goes into the JSON as is


def test_tables_with_errored_and_fallback_rows():
    rows = [row(512, 1.0, 2.0, None, 4.0), row(1024, None, 1.0, 1.0, 1.0, head_dim=256, fallback=True),
            row(2048, None, None, None, None)]
    text = grid.table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["dtype", "d", "causal", "seqlen"] and "sdpa_cudnn" in lines[0]
    assert lines[1].split()[-1] == "2.00" and "err" in lines[1]
    assert "fallback" in lines[2] and lines[2].split()[-1] == "-"
    assert lines[3].split()[4:] == ["err", "err", "err", "err", "-"]
    assert "geometric mean fa2rt / sdpa_flash: 2.00x, min 2.00x over 1 rows" in text
    assert ("sdpa_cudnn bfloat16 d64 causal=False seqlen=512 (+1 more rows): RuntimeError: sdpa_cudnn refused"
            in text)
    assert "not timed: fa2rt would fall back [head_dim]" in text
    summary = grid.summary_table(grid.summarize(rows))
    assert summary.splitlines()[-2].startswith("all")
    assert "fa2rt not timed on 2 of 3 rows" in summary
    assert common.kernel_errors(rows) == ["bfloat16 d64 causal=False seqlen=2048: RuntimeError: fa2rt refused"]


def test_summary_table_with_nothing_timed():
    text = grid.summary_table(grid.summarize([row(512, None, None, None, None)]))
    assert "none ran" not in text and text.splitlines()[-2].split()[:2] == ["all", "0"]


@pytest.mark.parametrize("pass_name", ["bwd", "fwd+bwd"])
def test_backward_passes_summarize_and_tabulate_like_the_forward(pass_name):
    args = [((512, 1.0, 2.0, 0.5, 4.0), {}), ((1024, 1.0, 0.5, None, 4.0), {}),
            ((512, 2.0, 1.0, 1.0, 3.0), {"causal": True}), ((512, None, 1.0, 1.0, 1.0), {"head_dim": 256,
                                                                                          "fallback": True}),
            ((1024, None, None, None, None), {"head_dim": 256})]
    fwd = [row(*a, **kw) for a, kw in args]
    rows = [row(*a, **kw, pass_name=pass_name) for a, kw in args]
    assert "fa2rt" not in rows[0] and rows[0][pass_name]["fa2rt"]["ms"] == 1.0
    assert common.result(rows[0], "fa2rt") == {"error": "not measured"}  # no forward in these rows
    s, f = grid.summarize(rows, pass_name), grid.summarize(fwd)
    assert s["pass"] == pass_name and (s["groups"], s["overall"]) == (f["groups"], f["overall"])
    assert s["overall"]["fa2rt_timed"] == 3 and s["overall"]["fa2rt_over_sdpa_flash"]["n"] == 3
    assert s["images"] == ["sm80 ptx-jit", "sm90 native"]  # the forward's image and the backward's
    assert grid.summarize(rows)["overall"]["fa2rt_timed"] == 0
    assert grid.table(rows, pass_name) == grid.table(fwd)
    assert "not timed: fa2rt would fall back [head_dim]" in grid.table(rows, pass_name)
    text = grid.summary_table(s)
    assert f"fa2rt / SDPA, {pass_name}:" in text and "fa2rt not timed on 2 of 5 rows" in text
    assert common.kernel_errors(rows, [pass_name]) == [
        f"{pass_name} bfloat16 d256 causal=False seqlen=1024: RuntimeError: fa2rt refused"]
    assert common.kernel_errors(fwd) == ["bfloat16 d256 causal=False seqlen=1024: RuntimeError: fa2rt refused"]
    json.dumps(s)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [row(s, 1.0, 2.0, None, 4.0, head_dim=d, causal=c) for d in (64, 128) for c in (False, True)
            for s in (512, 1024)]
    assert grid.plot(rows, tmp_path / "fwd.png")
    assert (tmp_path / "fwd.png").read_bytes()[:4] == b"\x89PNG"
    rows = [row(s, 1.0, 2.0, None, 4.0, pass_name="bwd") for s in (512, 1024)]
    assert grid.plot(rows, tmp_path / "bwd.png", "bwd")


# --- measurement helpers ------------------------------------------------------------------------------------------

def test_contenders_take_turns_and_share_the_drift(monkeypatch):
    """time_interleaved on a scripted device clock: every call of a runs 1 ms, of b 2 ms, and the device slows by 1%
    per call. The calls alternate (each round starting one contender later), every contender is timed as often, and
    the drift lands on both alike: b's median stays 2x a's (timed after all of a's calls, b's would be ~2.4x)."""
    clock, log = [0.0], []

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):
            return end.t - self.t

    def call(name, ms):
        def run():
            log.append(name)
            clock[0] += ms * (1.01 ** len(log))
        return run
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(common, "_flush_buffer", lambda device: torch.ones(4, dtype=torch.int64))
    times = common.time_interleaved({"a": call("a", 1.0), "b": call("b", 2.0)}, warmup=0, rep=40)
    timed = log[5 + 5 + 2:]  # after 5 estimates and one warm-up call each
    # Rounds until the slower contender has ~rep ms of calls (its estimate: ~2.2 ms a call).
    assert len(timed) == 2 * 18 and timed[:6] == ["a", "b", "b", "a", "a", "b"]
    assert timed.count("a") == timed.count("b")
    assert times["b"] / times["a"] == pytest.approx(2.0, rel=0.02)


def test_measure_records_errors_with_warnings(monkeypatch):
    def measure(prepare, work):
        return common.measure_together({"x": prepare}, work, 1, 1)["x"]
    time_each(monkeypatch, lambda fn: (fn(), 2.0)[1])
    assert measure(lambda: lambda: None, 4e9) == {"ms": 2.0, "tflops": pytest.approx(2.0)}

    def refuse():
        import warnings

        warnings.warn("Flash attention requires q,k,v to have the same last dimension", UserWarning, stacklevel=1)
        raise RuntimeError("No available kernel. Aborting execution.\nmore")
    expected = {"error": "RuntimeError: No available kernel. Aborting execution. [Flash attention requires q,k,v "
                         "to have the same last dimension]"}
    assert measure(lambda: refuse, 1.0) == expected  # in the first call
    assert measure(refuse, 1.0) == expected  # before it (the untimed forward of a backward pass)


def test_measure_together_times_only_what_runs(monkeypatch):
    """Contenders that fail to prepare or in their first call get their error and stay out of the timing, in the
    order given; an error inside the timing is every timed contender's."""
    timed = []

    def time_interleaved(fns, warmup, rep):
        timed.append(list(fns))
        return {name: 2.0 for name in fns}
    monkeypatch.setattr(common, "time_interleaved", time_interleaved)

    def fails():
        raise RuntimeError("refused")
    prepares = {"a": lambda: lambda: None, "bad prepare": fails, "bad call": lambda: fails, "b": lambda: lambda: 1}
    results = common.measure_together(prepares, 4e9, 1, 1)
    assert list(results) == list(prepares) and timed == [["a", "b"]]
    assert results["a"] == results["b"] == {"ms": 2.0, "tflops": pytest.approx(2.0)}
    assert results["bad prepare"] == results["bad call"] == {"error": "RuntimeError: refused"}

    def broken(fns, warmup, rep):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(common, "time_interleaved", broken)
    results = common.measure_together(prepares, 4e9, 1, 1)
    assert results["a"] == results["b"] == {"error": "RuntimeError: out of memory"}


def test_kernel_forced_turns_the_short_sequence_rule_off(monkeypatch):
    monkeypatch.setenv(config.MIN_SEQLEN, "4096")
    monkeypatch.setattr(policy, "_crossover", lambda: {"sm90": {"min_seqlen_k": 512}})
    with common.kernel_forced():
        assert os.environ[config.MIN_SEQLEN] == "0"
        assert policy.short_sequence_threshold("sm90") == 0
    assert os.environ[config.MIN_SEQLEN] == "4096"
    monkeypatch.delenv(config.MIN_SEQLEN)
    with pytest.raises(KeyError), common.kernel_forced():
        raise KeyError
    assert config.MIN_SEQLEN not in os.environ
    assert policy.short_sequence_threshold("sm90") == 512


def test_explain_records():
    assert common.explain_record(KERNEL) == {"path": "kernel", "image": KERNEL.image, "mode": "native",
                                            "arch": "sm90"}
    assert common.explain_record(KERNEL_GRAD) == {
        "path": "kernel", "image": KERNEL.image, "mode": "native", "arch": "sm90",
        "backward": [{"image": BACKWARD[0][0], "mode": "native", "arch": "sm90"},
                     {"image": BACKWARD[1][0], "mode": "native", "arch": "sm90"}]}
    fb = Decision("fallback", "short_sequence", "seqlen_k=16 is below the crossover 64")
    assert common.explain_record(fb) == {"path": "fallback", "reason": "short_sequence", "message": fb.message}
    assert common.image_arch("fwd-sm80-fp16-d128-causal-m128n64w4s2") == "sm80"
    assert common.image_arch(None) is None


# --- crossover ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratios, threshold, slower", [
    ({16: 0.5, 32: 0.8, 64: 1.1, 128: 1.3, 256: 1.2}, 64, None),  # crossing inside the range
    ({16: 1.2, 32: 1.0, 64: 1.5}, 0, None),  # at least as fast from the shortest (1.0 counts): no fallback
    ({16: 0.5, 32: 0.7, 1024: 0.9}, 1025, 16),  # never faster: just above the largest measured
    ({16: 1.2, 32: 1.1, 64: 0.9, 128: 1.1}, 0, None),  # a loss after a win does not move the threshold
    ({16: 1.04, 32: 1.01, 64: 1.03, 128: 0.93, 1024: 0.8}, 0, 128),  # H200-like: SDPA faster only at long lengths
    ({16: 0.9, 32: 1.1, 64: 0.9, 128: 0.8}, 32, 64),  # a short loss, then a win, then losses at long lengths
    ({16: 0.5, 32: None, 64: float("nan"), 128: 1.1}, 128, None),  # unmeasured seqlens are ignored
    ({16: None}, None, None),
    ({}, None, None),
])
def test_crossover_threshold_rule(ratios, threshold, slower):
    assert crossover.crossover_threshold(ratios) == threshold
    assert crossover.slower_from(ratios) == slower


def test_crossover_notes():
    assert "measure longer" in crossover.crossover_note({16: 0.5, 32: 0.7}, 33)
    assert crossover.crossover_note({16: 1.5}, 0).endswith("shortest measured seqlen 16: no short-sequence fallback")
    assert "faster below seqlen 32, fa2rt from there on" in crossover.crossover_note({16: 0.5, 32: 1.5}, 32)
    note = crossover.crossover_note({16: 1.1, 32: 0.9, 64: 0.8}, 0)
    assert "no short-sequence fallback" in note and "faster from seqlen 32 on: not a short-sequence effect" in note
    assert "no threshold" in crossover.crossover_note({}, None)


def test_ratio_by_seqlen_is_a_geomean_over_configurations():
    rows = [row(16, 2.0, 1.0, 0.5, 3.0), row(16, 1.0, 4.0, None, None, batch=1),
            row(16, None, 1.0, 1.0, 1.0, head_dim=128, fallback=True), row(32, 1.0, None, None, None),
            row(64, 1.0, 2.0, 2.0, 2.0, dtype="float16")]
    for r in rows:
        r["ratio"] = common.ratio(r, "best_sdpa")
        r["best_sdpa"] = common.best_sdpa(r)[0]
    assert rows[0]["best_sdpa"] == "sdpa_cudnn" and rows[0]["ratio"] == pytest.approx(0.25)
    got = crossover.ratio_by_seqlen(rows)
    assert got[16]["n"] == 2 and got[16]["geomean"] == pytest.approx(1.0)
    assert got[16]["min"] == pytest.approx(0.25) and got[16]["max"] == pytest.approx(4.0)
    assert got[32] == {"geomean": None, "n": 0, "min": None, "max": None}
    assert got[64]["geomean"] == pytest.approx(2.0)
    assert crossover.crossover_threshold(crossover._geomeans(got)) == 0
    assert crossover.crossover_arch(rows) == ("sm90", "native")
    rows[1]["fa2rt_explain"] = {"path": "kernel", "image": "fwd-sm80-x", "mode": "ptx-jit", "arch": "sm80"}
    assert crossover.crossover_arch(rows)[0] is None
    text = crossover.crossover_table(got, 0, "sm90")
    assert "min_seqlen_k for sm90: 0 (fa2rt was at least as fast" in text
    assert [line.split() for line in text.splitlines()][3] == ["32", "0", "-", "-", "-"]


def test_merge_keeps_schema_comment_and_other_archs(tmp_path):
    path = tmp_path / "crossover.json"
    path.write_text(json.dumps({"schema_version": 1, "_comment": "keep me", "archs": {
        "sm80": {"min_seqlen_k": 128, "measured": {"device": "A100"}},
        "sm90": {"min_seqlen_k": 999}}, "extra": [1]}, indent=2))
    crossover.merge_crossover(path, "sm90", 64, {"device": "NVIDIA H200"})
    data = json.loads(path.read_text())
    assert list(data) == ["schema_version", "_comment", "archs", "extra"]
    assert data["schema_version"] == 1 and data["_comment"] == "keep me" and data["extra"] == [1]
    assert data["archs"]["sm80"] == {"min_seqlen_k": 128, "measured": {"device": "A100"}}
    assert data["archs"]["sm90"] == {"min_seqlen_k": 64, "measured": {"device": "NVIDIA H200"}}
    crossover.merge_crossover(path, "sm89", 33, {})
    assert list(json.loads(path.read_text())["archs"]) == ["sm80", "sm90", "sm89"]
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_into_the_shipped_file_is_read_by_the_policy(tmp_path, monkeypatch):
    path = tmp_path / "crossover.json"
    path.write_text(policy.CROSSOVER_FILE.read_text())
    shipped = json.loads(path.read_text())
    crossover.merge_crossover(path, "sm90", 256, {"device": "NVIDIA H200"})
    data = json.loads(path.read_text())
    assert data["schema_version"] == shipped["schema_version"] and data["_comment"] == shipped["_comment"]
    monkeypatch.delenv(config.MIN_SEQLEN, raising=False)
    monkeypatch.setattr(policy, "CROSSOVER_FILE", path)
    policy._crossover.cache_clear()
    try:
        assert policy.short_sequence_threshold("sm90") == 256
        assert policy.short_sequence_threshold("sm80") == shipped["archs"].get("sm80", {}).get("min_seqlen_k", 0)
    finally:
        monkeypatch.undo()
        policy._crossover.cache_clear()


def test_merge_creates_a_missing_file_and_refuses_other_schemas(tmp_path):
    path = tmp_path / "new.json"
    crossover.merge_crossover(path, "sm90", 64, {})
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["_comment"] == crossover.CROSSOVER_COMMENT
    assert data["archs"] == {"sm90": {"min_seqlen_k": 64, "measured": {}}}
    path.write_text(json.dumps({"schema_version": 2, "archs": {}}))
    with pytest.raises(ValueError, match="schema_version"):
        crossover.merge_crossover(path, "sm90", 64, {})
    path.write_text(json.dumps({"schema_version": 1, "archs": []}))
    with pytest.raises(ValueError, match="archs"):
        crossover.merge_crossover(path, "sm90", 64, {})


# --- a whole run of main() on the CPU ----------------------------------------------------------------------------

def time_each(monkeypatch, time_one):
    """common.time_interleaved on the CPU: time_one(fn) -> the scripted ms of each contender, in the contenders'
    order (time_ms, time_interleaved of one fn, with them)."""
    monkeypatch.setattr(common, "time_interleaved",
                        lambda fns, warmup, rep: {name: time_one(fn) for name, fn in fns.items()})


def cpu_as_gpu(monkeypatch):
    """The benchmark's GPU on the CPU: inputs there, 64 tokens of hidden 512, torch.cuda's device queries answering
    for a CPU stand-in (sm90) and its memory counters faked (1000 bytes live, a 1600-byte peak)."""
    monkeypatch.setattr(common, "DEVICE", "cpu")
    monkeypatch.setattr(common, "TOKENS", 64)
    monkeypatch.setattr(common, "HIDDEN", 512)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "CPU stand-in")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1600)


@pytest.fixture
def cpu_stand_ins(monkeypatch):
    """main() as on a GPU: inputs on the CPU, tiny shapes, fa2rt's kernel replaced by CPU SDPA (its explain says
    kernel, with backward images for inputs requiring grad, except for head dim 256), one untimed call instead of
    do_bench, and the CUDA memory counters faked. Returns the FA2RT_MIN_SEQLEN each explain call saw."""
    from fa2rt import api

    cpu_as_gpu(monkeypatch)
    monkeypatch.setattr(crossover, "CROSSOVER_NHEADS", 2)
    time_each(monkeypatch, lambda fn: (fn(), 1.0)[1])
    seen_env = []

    def explain(q, k, v, *, causal=False):
        seen_env.append(os.environ.get(config.MIN_SEQLEN))
        if q.shape[-1] == 256:
            return Decision("fallback", "head_dim", "no image for d256")
        return KERNEL_GRAD if q.requires_grad else KERNEL

    def attention(q, k, v, *, causal=False):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    monkeypatch.setattr(api, "explain", explain)
    monkeypatch.setattr(api, "attention", attention)
    monkeypatch.delenv(config.FORCE_ARCH, raising=False)
    monkeypatch.setenv(config.MIN_SEQLEN, "77")
    return seen_env


def test_main_runs_every_mode_end_to_end(cpu_stand_ins, tmp_path, capsys):
    crossover = tmp_path / "crossover.json"
    crossover.write_text(json.dumps({"schema_version": 1, "_comment": "c", "archs": {"sm80": {"min_seqlen_k": 8}}}))
    out = tmp_path / "out"
    status = bench.main(["--grid", "--memory", "--crossover", "--dtype", "float16", "--head-dim", "64", "256",
                         "--seqlen", "16", "32", "--memory-seqlen", "32", "64", "--crossover-seqlen", "16", "32",
                         "--crossover-batch", "1", "--crossover-head-dim", "64", "--warmup-ms", "1", "--rep-ms", "1",
                         "--out", str(out), "--write-crossover", str(crossover)])
    text = capsys.readouterr().out
    assert status == 0
    assert set(cpu_stand_ins) == {"0"} and os.environ[config.MIN_SEQLEN] == "77"

    fwd = json.loads((out / "fwd-native.json").read_text())
    assert fwd["environment"]["device"] == "CPU stand-in" and fwd["environment"]["capability"] == "sm90"
    assert len(fwd["rows"]) == 2 * 2 * 2
    r = fwd["rows"][0]
    assert (r["dtype"], r["head_dim"], r["causal"], r["seqlen"], r["batch"], r["nheads"]) == ("float16", 64, False,
                                                                                                 16, 4, 8)
    assert r["fa2rt_image"] == KERNEL.image and r["fa2rt_explain"]["path"] == "kernel"
    assert r["fa2rt"]["ms"] == 1.0 and r["sdpa_flash"]["ms"] == 1.0 and "error" in r["sdpa_cudnn"]
    d256 = [r for r in fwd["rows"] if r["head_dim"] == 256]
    assert all(r["fa2rt"].get("fallback") and r["fa2rt_explain"]["reason"] == "head_dim" for r in d256)
    assert fwd["summary"]["overall"]["fa2rt_over_sdpa_flash"]["geomean"] == pytest.approx(1.0)

    mem = json.loads((out / "memory-native.json").read_text())["rows"]
    assert len(mem) == 2 * 2 * 2 * 4 and {r["impl"] for r in mem} == set(common.CONTENDERS)
    assert {(r["pass"], r["impl"], r["causal"], r["seqlen"]) for r in mem} == {
        (p, n, c, s) for p in ("fwd", "fwd+bwd") for n in common.CONTENDERS for c in (False, True) for s in (32, 64)}
    assert all(r["extra_bytes"] == 600 for r in mem if r["impl"] in ("fa2rt", "sdpa_flash"))
    assert mem[0]["inputs_bytes"] == 3 * 32 * 4 * 128 * 2 and mem[0]["fa2rt_explain"]["path"] == "kernel"
    assert [r["fa2rt_explain"].get("backward") for r in mem if r["impl"] == "fa2rt"][:8] == [None, [
        {"image": img, "mode": mode, "arch": "sm90"} for img, mode in BACKWARD]] * 4
    assert ["fa2rt", "fwd+bwd", "False", "64"] in [line.split()[:4] for line in text.splitlines()]

    cross = json.loads((out / "crossover-native.json").read_text())
    assert cross["arch"] == "sm90" and cross["min_seqlen_k"] == 0 and len(cross["rows"]) == 2 * 2
    assert cross["ratio_by_seqlen"]["16"]["geomean"] == pytest.approx(1.0)
    written = json.loads(crossover.read_text())
    assert written["archs"]["sm80"] == {"min_seqlen_k": 8} and written["_comment"] == "c"
    assert written["archs"]["sm90"]["min_seqlen_k"] == 0
    measured = written["archs"]["sm90"]["measured"]
    assert measured["device"] == "CPU stand-in" and measured["slower_from"] is None
    assert measured["note"].endswith("no short-sequence fallback")

    assert not (out / "fwd-native.png").exists() or (out / "fwd-native.png").stat().st_size > 0
    assert "min_seqlen_k for sm90: 0" in text and "wrote min_seqlen_k=0 for sm90" in text
    last = text.rstrip().splitlines()
    assert last[-1].startswith("fa2rt not timed on 4 of 8 rows") and last[-2].startswith("all")
    assert last[0].startswith("{") and json.loads(last[0])["device"] == "CPU stand-in"
    assert "timed configurations (x4 contenders)" in last[1]


class BrokenBackward(torch.autograd.Function):
    """The identity whose backward raises, as cuDNN's might."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("cuDNN backward failed\ndetails")


def test_main_runs_every_pass(cpu_stand_ins, tmp_path, monkeypatch, capsys):
    sdpa_call = common.sdpa_call

    def cudnn_fails_backward(q, k, v, causal, name):  # cuDNN: the flash forward, then a backward that raises
        run = sdpa_call(q, k, v, causal, "sdpa_flash" if name == "sdpa_cudnn" else name)
        return (lambda: BrokenBackward.apply(run())) if name == "sdpa_cudnn" else run
    monkeypatch.setattr(common, "sdpa_call", cudnn_fails_backward)
    out = tmp_path / "out"
    status = bench.main(["--passes", "fwd+bwd,fwd", "bwd", "--dtype", "float16", "--head-dim", "64", "256",
                         "--seqlen", "16", "32", "--causal", "true", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0 and set(cpu_stand_ins) == {"0"}
    files = {p: json.loads((out / f"{stem}-native.json").read_text())
             for p, stem in (("fwd", "fwd"), ("bwd", "bwd"), ("fwd+bwd", "fwd_bwd"))}
    assert [(f["pass"], f["flop_factor"], f["summary"]["pass"]) for f in files.values()] == [
        ("fwd", 1.0, "fwd"), ("bwd", 2.5, "bwd"), ("fwd+bwd", 3.5, "fwd+bwd")]
    rows = files["fwd"]["rows"]
    assert all(f["rows"] == rows and f["settings"]["passes"] == ["fwd", "bwd", "fwd+bwd"] for f in files.values())
    assert len(rows) == 2 * 2
    r = rows[0]
    assert r["fa2rt_explain"] == common.explain_record(KERNEL)
    assert r["fa2rt_explain_grad"] == common.explain_record(KERNEL_GRAD)
    fwd_flops = common.fwd_flops(r["batch"], r["nheads"], r["seqlen"], r["head_dim"], True)
    assert r["sdpa_cudnn"]["ms"] == 1.0  # its forward works
    for p in ("bwd", "fwd+bwd"):
        assert r[p]["fa2rt"] == {"ms": 1.0, "tflops": pytest.approx(common.PASSES[p].flop_factor * fwd_flops / 1e9)}
        assert r[p]["sdpa_flash"]["ms"] == 1.0 and "error" in r[p]["sdpa_efficient"]  # no CPU kernel
        assert r[p]["sdpa_cudnn"] == {"error": "RuntimeError: cuDNN backward failed"}
        assert files[p]["summary"]["overall"]["fa2rt_over_sdpa_flash"]["n"] == 2
        assert files[p]["summary"]["overall"]["fa2rt_over_sdpa_cudnn"]["n"] == 0
    d256 = [r for r in rows if r["head_dim"] == 256]
    assert all(r[p]["fa2rt"]["fallback"] and r["fa2rt_explain_grad"]["reason"] == "head_dim"
               for r in d256 for p in ("bwd", "fwd+bwd"))
    assert "bwd: TFLOP/s (2.5x the forward's FLOPs)" in text and "fwd+bwd: TFLOP/s (3.5x the forward's FLOPs)" in text
    assert "sdpa_cudnn float16 d64 causal=True seqlen=16 (+3 more rows): RuntimeError: cuDNN backward failed" in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("fa2rt / SDPA")] == [
        "fa2rt / SDPA, fwd", "fa2rt / SDPA, bwd", "fa2rt / SDPA, fwd+bwd"]
    assert text.rstrip().splitlines()[-1].startswith("fa2rt not timed on 2 of 4 rows")
    assert "timed configurations (x4 contenders): {\"grid\": 12}" in text


def test_backward_passes_time_only_what_they_say(cpu_stand_ins, monkeypatch):
    from fa2rt import api

    forwards = []  # requires_grad of each fa2rt forward call
    attention = api.attention

    def counted(q, k, v, *, causal=False):
        forwards.append(q.requires_grad)
        return attention(q, k, v, causal=causal)
    monkeypatch.setattr(api, "attention", counted)
    monkeypatch.setattr(common, "SDPA_NAMES", ())  # fa2rt alone
    timed = []  # per timing: (forward calls inside it, what its last call returned)

    def time_one(fn):
        before = len(forwards)
        results = [fn() for _ in range(3)]
        timed.append((len(forwards) - before, results[-1]))
        return 1.0
    time_each(monkeypatch, time_one)
    r = grid.bench_shape("float16", 64, True, 16, 2, 2, passes=("fwd", "bwd", "fwd+bwd"), warmup=1, rep=1)
    assert [n for n, _ in timed] == [3, 0, 3]  # the backward alone calls no forward
    # Each pass calls its timed callable once untimed (measure_together: errors surface there); bwd and fwd+bwd
    # also run one untimed forward to set up.
    assert forwards == [False] * (1 + 3) + [True] * (1 + 1 + 1 + 3)
    for _, grads in timed[1:]:
        assert [g.shape for g in grads] == [torch.Size([2, 16, 2, 64])] * 3 and all(g.abs().sum() > 0 for g in grads)
    assert r["fa2rt_explain_grad"]["backward"][0]["image"] == BACKWARD[0][0]
    assert r["bwd"]["fa2rt"]["tflops"] == pytest.approx(2.5 * common.fwd_flops(2, 2, 16, 64, True) / 1e9)


def test_main_reports_kernel_errors_and_a_crossover_it_cannot_write(cpu_stand_ins, tmp_path, monkeypatch, capsys):
    from fa2rt import api

    def broken(q, k, v, *, causal=False):
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")
    monkeypatch.setattr(api, "attention", broken)
    target = tmp_path / "crossover.json"
    status = bench.main(["--crossover", "--dtype", "float16", "--causal", "false", "--crossover-seqlen", "16",
                         "--crossover-batch", "1", "--crossover-head-dim", "64", "--out", str(tmp_path),
                         "--write-crossover", str(target)])
    captured = capsys.readouterr()
    assert status == 1 and not target.exists()
    assert "not writing" in captured.err
    row = json.loads((tmp_path / "crossover-native.json").read_text())["rows"][0]
    assert row["fa2rt"]["error"] == "RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS" and row["ratio"] is None


def test_a_crashing_mode_does_not_stop_the_others(cpu_stand_ins, tmp_path, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise ZeroDivisionError("bug")
    monkeypatch.setattr(grid, "bench", crash)
    status = bench.main(["--grid", "--memory", "--memory-seqlen", "32", "--causal", "true", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 1 and "the grid mode failed" in captured.err and "ZeroDivisionError: bug" in captured.err
    assert not (tmp_path / "fwd-native.json").exists() and (tmp_path / "memory-native.json").exists()


def test_explain_raising_is_an_error_not_a_fallback(cpu_stand_ins, tmp_path, monkeypatch):
    from fa2rt import api

    def explain(q, k, v, *, causal=False):
        raise ValueError("q: expected something, got something else")
    monkeypatch.setattr(api, "explain", explain)
    status = bench.main(["--grid", "--dtype", "float16", "--head-dim", "64", "--causal", "false", "--seqlen", "16",
                         "--out", str(tmp_path)])
    r = json.loads((tmp_path / "fwd-native.json").read_text())["rows"][0]
    assert status == 1 and r["fa2rt_explain"]["path"] == "error" and r["fa2rt_image"] is None
    assert r["fa2rt"] == {"error": "not timed: fa2rt.explain() raised ValueError: q: expected something, got "
                                   "something else"}
    assert r["sdpa_flash"]["ms"] == 1.0


def test_bench_shape_with_the_real_explain_does_not_time_a_fallback(monkeypatch):
    monkeypatch.setattr(common, "DEVICE", "cpu")
    timed = []
    time_each(monkeypatch, lambda fn: (timed.append(fn), fn(), 1.0)[2])
    with common.kernel_forced():
        r = grid.bench_shape("float16", 64, True, 16, 2, 2, warmup=1, rep=1)
    assert r["fa2rt_explain"]["path"] == "fallback" and r["fa2rt_explain"]["reason"] == "not_gpu"
    assert r["fa2rt"]["fallback"] and "not timed: fa2rt would fall back [not_gpu]" in r["fa2rt"]["error"]
    # SDPA's cuDNN and efficient backends refuse CPU tensors in their first, untimed call: only flash is timed.
    assert len(timed) == 1 and r["sdpa_flash"]["ms"] == 1.0
    assert "error" in r["sdpa_cudnn"] and "error" in r["sdpa_efficient"]
    assert r["sdpa_flash"]["tflops"] == pytest.approx(common.fwd_flops(2, 2, 16, 64, True) / 1e9)
    assert common.kernel_errors([r]) == []


def test_backward_bench_shape_with_the_real_explain_does_not_time_a_fallback(monkeypatch):
    monkeypatch.setattr(common, "DEVICE", "cpu")
    grads = {}

    def time_one(fn):
        grads.setdefault(len(grads), fn())
        return 1.0
    time_each(monkeypatch, time_one)
    with common.kernel_forced():
        r = grid.bench_shape("float16", 64, False, 16, 2, 2, passes=("bwd", "fwd+bwd"), warmup=1, rep=1)
    assert "fa2rt" not in r and r["fa2rt_explain_grad"]["reason"] == "not_gpu"
    for p in ("bwd", "fwd+bwd"):
        assert r[p]["fa2rt"]["fallback"] and "not timed: fa2rt would fall back [not_gpu]" in r[p]["fa2rt"]["error"]
        assert r[p]["sdpa_flash"]["tflops"] == pytest.approx(
            common.PASSES[p].flop_factor * common.fwd_flops(2, 2, 16, 64, False) / 1e9)
    assert grads and all(len(g) == 3 and g[0].shape == (2, 16, 2, 64) for g in grads.values())
    assert common.kernel_errors([r], ["bwd", "fwd+bwd"]) == []


def test_committed_results_of_the_older_format_still_summarize():
    from pathlib import Path

    path = Path(__file__).parents[2] / "docs" / "bench" / "fwd-native.json"
    if not path.exists():
        pytest.skip("no committed results")
    rows = json.loads(path.read_text())["rows"]
    s = grid.summarize(rows)
    assert s["overall"]["fa2rt_over_sdpa_flash"]["n"] == sum(1 for r in rows if "ms" in r["fa2rt"])
    assert all(label.startswith("sm") for label in s["images"])
    assert grid.table(rows) and grid.summary_table(s)


def _host_overhead_cpu(*args) -> tuple[str, dict]:
    """ci/host_overhead.py --cpu with `args`: (its header line, {case: host us})."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "ci", "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "--cpu", *args, "--calls", "3", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    header, columns, *rows = proc.stdout.splitlines()
    return header, {line[:24].strip(): float(line[24:].split()[0]) for line in rows}


def test_host_overhead_cpu_mode_times_the_kernel_path():
    """ci/host_overhead.py --cpu: fa2rt's calls and its custom ops take the kernel path (as sm90, launches left out)
    and every case prints a host time; SDPA's cases, which would compute on the CPU, are left out."""
    header, times = _host_overhead_cpu()
    assert "CPU as sm90" in header and "fa2rt: fwd-sm90-bf16-d64-" in header
    assert set(times) == {"fa2rt fwd", "fa2rt fwd+bwd", "python Function fwd", "python Function fwd+bwd",
                          "fa2rt op fwd", "fa2rt op bwd"}
    assert all(t > 0 for t in times.values())


def test_host_overhead_cpu_mode_times_the_decode_step():
    """ci/host_overhead.py --cpu --decode: the decode step on the kernel path (as sm90, launches left out), with and
    without an appended token; SDPA's cases and torch's own append are left out."""
    header, times = _host_overhead_cpu("--decode", "--batch", "2", "--seqlen", "1024")
    assert "CPU as sm90" in header and "fa2rt: decode-sm90-bf16-d128" in header
    assert set(times) == {"fa2rt decode", "fa2rt decode+append"} and all(t > 0 for t in times.values())
