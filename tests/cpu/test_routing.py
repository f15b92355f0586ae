"""The measured routing table without a GPU: classes, the rules that keep a call on fa2rt's kernel, the policy's
routed decisions on a synthetic sm90 (the table and torch's backend check stubbed: they need a GPU), the routed call
running for real through SDPA's flash backend on the CPU, the benchmark's verdicts and the table file."""

import json

import pytest
import torch
from test_bench import cpu_stand_ins, time_each  # noqa: F401  (cpu_stand_ins: a fixture)

import fa2rt
from fa2rt import bench, calls, config, policy, routing
from fa2rt.bench import routes
from fa2rt.reference import attention_reference
from fa2rt.validate import NO_WINDOW, check_inputs

MEASURED = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cudnn": 91900, "date": "2026-12-02T16:00:00+00:00"}


def qkv(b=2, n=64, h=4, hk=4, d=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=g).to(dtype) for heads in (h, hk, hk)]


def entry(pass_name="fwd", dtype="bf16", head_dim=64, causal=True, group=1, seqlen_lo=64, winner="sdpa_flash",
          lead=1.3, noise=0.05):
    ms = {"fa2rt": 1.3, "sdpa_flash": 1.0, "sdpa_cudnn": 1.1}
    return {"class": {"pass": pass_name, "dtype": dtype, "head_dim": head_dim, "causal": causal, "group": group,
                      "seqlen_lo": seqlen_lo},
            "winner": winner, "lead": lead, "noise": noise, "ms": ms,
            "shape": {"batch": 2, "nheads": 4, "nheads_k": 4, "seqlen": seqlen_lo}}


@pytest.fixture
def table(monkeypatch, on_device):
    """A synthetic sm90 table (set its entries with table(...)), torch's backend check answering yes, and the
    policy's caches emptied around the test."""
    on_device("sm90")
    monkeypatch.delenv(config.ROUTING, raising=False)
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    monkeypatch.setattr(routing, "_takes", lambda provider, q, k, v: True)
    policy._ROUTE_CACHE.clear()

    def use(*entries):
        index = routing._index({"measured": MEASURED, "classes": list(entries)})
        monkeypatch.setattr(routing, "table", lambda arch: index if arch == "sm90" else None)
    yield use
    policy._ROUTE_CACHE.clear()


def test_classes_and_bands():
    assert routing.seqlen_band(512) == [512, 1024] and routing.seqlen_band(1023) == [512, 1024]
    assert routing.seqlen_band(1) == [1, 2]
    assert routing.class_key("fwd", "bf16", 128, True, 4, 3000) == ("fwd", "bf16", 128, True, 4, 2048)
    assert routing.describe_class(("fwd+bwd", "fp16", 64, False, 1, 512)) == (
        "fwd+bwd fp16 d64 non-causal MHA seqlen 512-1023")
    assert "GQA group 4" in routing.describe_class(("fwd", "bf16", 128, True, 4, 2048))


@pytest.mark.parametrize("options, lse, out, why", [
    ({}, False, None, ""),
    ({"causal": True}, False, None, ""),
    ({"window_size": (-1, 0)}, False, None, ""),
    ({"window_size": (8, 0)}, False, None, "a window beyond causal"),
    ({"softcap": 5.0}, False, None, "softcap"),
    ({"alibi_slopes": torch.ones(4)}, False, None, "ALiBi"),
    ({}, True, None, "the LSE asked for"),
    ({}, False, "out", "out= given"),
    ({"softmax_scale": -0.1}, False, None, "a scale that is not positive"),
])
def test_routable_rules(options, lse, out, why):
    q, k, v = qkv()
    shapes = check_inputs(q, k, v, **{"causal": False, "softmax_scale": None, **options})
    assert routing.routable(shapes, return_lse=lse, out=q if out else None) == why


def test_causal_needs_square_problem():
    q, k, v = qkv()
    shapes = check_inputs(q[:, :10], k, v, causal=True, softmax_scale=None)
    assert "top-left" in routing.routable(shapes, return_lse=False, out=None)
    # Non-causal and not square: SDPA agrees, but the class is not measured.
    shapes = check_inputs(q[:, :10], k, v, causal=False, softmax_scale=None)
    assert routing.routable(shapes, return_lse=False, out=None) == ""
    assert routing.call_class(shapes, needs_grad=False) is None


def test_explain_names_provider_and_measurement(table):
    table(entry())
    q, k, v = qkv()
    d = fa2rt.explain(q, k, v, causal=True)
    assert d.path == "routed" and d.provider == "sdpa_flash" and d.image and d.reason == ""
    text = str(d)
    for part in ("routed to sdpa_flash on sm90", "fwd bf16 d64 causal MHA seqlen 64-127", "1.30x, fastest rounds",
                 "noise 5.0%", "NVIDIA H200", "cuDNN 91900", "2026-12-02", "FA2RT_ROUTING=0",
                 f"instead of fa2rt's kernel {d.image}"):
        assert part in text, (part, text)


@pytest.mark.parametrize("case", ["lse", "noise", "fa2rt_wins", "other_class", "grad_class", "deterministic",
                                  "off", "not_taken"])
def test_calls_the_table_does_not_route(table, monkeypatch, case):
    table(entry(noise=0.35 if case == "noise" else 0.05, winner="fa2rt" if case == "fa2rt_wins" else "sdpa_flash"),
          entry(pass_name="fwd+bwd"))
    q, k, v = qkv()
    kwargs = {"causal": True}
    if case == "lse":
        kwargs["return_lse"] = True
    if case == "other_class":
        kwargs["causal"] = False
    if case in ("grad_class", "deterministic"):
        q.requires_grad_(True)
    if case == "deterministic":
        kwargs["deterministic"] = True
    if case == "off":
        monkeypatch.setenv(config.ROUTING, "0")
    if case == "not_taken":
        monkeypatch.setattr(routing, "_takes", lambda provider, q, k, v: False)
    d = fa2rt.explain(q, k, v, **kwargs)
    assert d.path == ("routed" if case == "grad_class" else "kernel"), (case, str(d))


def test_routing_switch_is_checked(monkeypatch):
    monkeypatch.setenv(config.ROUTING, "off")
    with pytest.raises(ValueError, match="FA2RT_ROUTING: expected 0 .off. or 1"):
        config.routing_enabled()


def test_routed_call_runs_the_backend_for_real(table, monkeypatch):
    # SDPA's flash backend runs on the CPU too: the runner the policy uses, against float64 (float32 inputs, whose
    # calls the policy itself sends to the fallback), with a gradient laid out unlike the output.
    q, k, v = (t.requires_grad_() for t in qkv(dtype=torch.float32, hk=2))
    ref, _ = attention_reference(*(t.double() for t in (q, k, v)), causal=True)
    out = routing.run("sdpa_flash", q, k, v, causal=True, softmax_scale=q.shape[-1] ** -0.5)
    assert out.is_contiguous() and (out.double() - ref).abs().max() < 1e-4
    dout = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout.double())
    for g, r in zip(grads, refs, strict=True):
        assert (g.double() - r).abs().max() < 1e-3
    # A routed fp16 call on the synthetic sm90 runs that runner.
    table(entry(dtype="fp16", group=2))
    h = [t.detach().half() for t in (q, k, v)]
    assert fa2rt.explain(*h, causal=True).path == "routed"
    expected = routing.run("sdpa_flash", *h, causal=True, softmax_scale=h[0].shape[-1] ** -0.5)
    assert torch.equal(fa2rt.attention(*h, causal=True), expected)
    # Repeated, the call is found by its key (window_size the default object) and runs the backend without validating
    # and deciding again.
    key, call = calls.find(*h, True, None, NO_WINDOW, 0.0, None, None, (False, False, policy.sdpa_flags()))
    assert call == routing.RoutedCall("sdpa_flash", True, h[0].shape[-1] ** -0.5)
    assert torch.equal(fa2rt.attention(*h, causal=True), expected)
    # Another environment is another key: routing off runs fa2rt's kernel path again.
    monkeypatch.setenv(config.ROUTING, "0")
    assert calls.find(*h, True, None, NO_WINDOW, 0.0, None, None, (False, False, policy.sdpa_flags()))[1] is None


def test_gqa_and_other_dtypes_are_their_own_classes(table):
    table(entry(group=2))
    assert fa2rt.explain(*qkv(hk=2), causal=True).path == "routed"
    assert fa2rt.explain(*qkv(hk=1), causal=True).path == "kernel"  # group 4: unmeasured
    assert fa2rt.explain(*qkv(hk=2, dtype=torch.float16), causal=True).path == "kernel"


def test_grad_layout_matches_output():
    x = torch.randn(2, 3, 4, 5).transpose(1, 2).requires_grad_()
    y = routing._GradLikeOutput.apply(x)
    (g,) = torch.autograd.grad(y, x, torch.randn(2, 4, 3, 5))
    assert g.stride() == x.stride()


# --- the benchmark's verdicts and the file ----------------------------------------------------------------------


def timed(ms, rounds):
    return {"ms": ms, "rounds_ms": rounds}


def test_verdict_winner_lead_noise():
    v = routes.verdict({"fa2rt": timed(2.0, [2.0, 2.1, 1.9]), "sdpa_cudnn": timed(1.0, [1.0, 1.0, 1.05]),
                        "sdpa_flash": {"error": "refused"}, "fa2rt_routed": timed(0.5, [0.5, 0.5, 0.5])})
    assert v["winner"] == "sdpa_cudnn" and v["lead"] == 1.9 and v["noise"] == pytest.approx(0.2 / 1.9)
    v = routes.verdict({"fa2rt": timed(1.0, [1.0, 1.0, 1.0]), "sdpa_cudnn": timed(1.2, [1.2, 1.2, 1.2])})
    assert v == {"winner": "fa2rt", "lead": pytest.approx(1.2), "noise": 0.0}
    # A backend with slow rounds now and then still wins on its fastest one (session 34's cuDNN fwd+bwd at d128
    # causal s512), and leads by more than fa2rt's spread.
    v = routes.verdict({"fa2rt": timed(0.63, [0.63, 0.632, 0.627]), "sdpa_cudnn": timed(0.689, [0.612, 0.73, 0.689])})
    assert v["winner"] == "sdpa_cudnn" and v["lead"] == pytest.approx(0.627 / 0.612)
    assert routing.leads(v)
    assert routes.verdict({"fa2rt": {"error": "x"}, "sdpa_cudnn": timed(1.0, [1.0])}) == {}


def test_bars_report_the_same_kernels_timed_twice():
    """Where a call was routed, the provider's contender and fa2rt as routed run the same kernels: their ratio is the
    run's resolution, reported beside the bars (session 44's check: 0.89-1.07), and points not routed add nothing."""
    def row(seqlen, provider, own, routed, sdpa):
        explain = {"path": "routed", "provider": provider} if provider else {"path": "kernel"}
        res = {"fa2rt": timed(own, [own]), "sdpa_cudnn": timed(sdpa, [sdpa]), "fa2rt_routed": timed(routed, [routed]),
               "routed_explain": explain}
        return {"dtype": "bfloat16", "head_dim": 128, "causal": False, "seqlen": seqlen, "nheads": 16, "nheads_k": 16,
                "fwd": res, "fwd+bwd": res}

    rows = [row(4096, "sdpa_cudnn", 1.2, 1.1, 1.0), row(8192, "sdpa_cudnn", 2.4, 1.9, 2.0),
            row(512, None, 1.0, 1.0, 1.1)]
    same = routes.bars(rows)["fwd"][routes.SAME_KERNELS]
    assert same == {"min": pytest.approx(1 / 1.1), "min_at": "bfloat16 d128 causal=False s4096",
                    "max": pytest.approx(2 / 1.9), "max_at": "bfloat16 d128 causal=False s8192", "n": 2}
    assert "same kernels" in routes.bars_table(routes.bars(rows))
    assert routes.SAME_KERNELS not in routes.bars(rows[2:])["fwd"]


def test_bars_pair_the_rounds():
    """A point's ratios are taken round by round (the contenders took turns within each round), then their median:
    the device 20% slower in the second round moves no ratio."""
    res = {"fa2rt": timed(1.0, [1.0, 1.2, 1.0]), "sdpa_cudnn": timed(1.2, [1.2, 1.44, 1.2]),
           "sdpa_flash": timed(1.5, [1.5, 1.8, 1.44]), "sdpa_efficient": {"error": "refused"}}
    assert routes.paired_ratio(res, routing.PROVIDERS, "fa2rt") == pytest.approx(1.2)
    # flash alone: 1.5, 1.5 and 1.44 / fa2rt's rounds
    assert routes.paired_ratio(res, ("sdpa_flash",), "fa2rt") == pytest.approx(1.5)
    assert routes.paired_ratio(res, ("sdpa_efficient",), "fa2rt") is None
    assert routes.paired_ratio(res, routing.PROVIDERS, "fa2rt_routed") is None


def test_class_entries_round_trip_through_the_file(tmp_path):
    row = {"dtype": "bfloat16", "head_dim": 128, "causal": True, "seqlen": 4096, "batch": 4, "nheads": 32,
           "nheads_k": 8, "fwd": {"fa2rt": timed(2.0, [2.0]), "sdpa_cudnn": timed(1.0, [1.0]),
                                  "winner": "sdpa_cudnn", "lead": 2.0, "noise": 0.01}}
    c = routes.class_entry(row, "fwd")
    assert c["class"] == {"pass": "fwd", "dtype": "bf16", "head_dim": 128, "causal": True, "group": 4,
                          "seqlen_lo": 4096}
    path = tmp_path / "routing.json"
    routes.merge_routing(path, "sm80", {"device": "A100"}, [])
    routes.merge_routing(path, "sm90", MEASURED, [c])
    data = json.loads(path.read_text())
    assert set(data["archs"]) == {"sm80", "sm90"} and data["schema_version"] == routing.SCHEMA
    index = routing._index(data["archs"]["sm90"])
    assert routing.leads(index["classes"][("fwd", "bf16", 128, True, 4, 4096)])


def test_update_replaces_only_the_measured_classes(tmp_path):
    def entry(head_dim, winner):
        row = {"dtype": "bfloat16", "head_dim": head_dim, "causal": False, "seqlen": 4096, "batch": 4, "nheads": 16,
               "nheads_k": 16, "fwd": {"fa2rt": timed(2.0, [2.0]), "sdpa_cudnn": timed(1.0, [1.0]),
                                       "winner": winner, "lead": 2.0, "noise": 0.01}}
        return routes.class_entry(row, "fwd")

    path = tmp_path / "routing.json"
    routes.merge_routing(path, "sm90", MEASURED | {"date": "2026-12-01"}, [entry(64, "sdpa_cudnn"),
                                                                          entry(128, "sdpa_cudnn")])
    routes.merge_routing(path, "sm90", MEASURED | {"date": "2026-12-03"}, [entry(128, "fa2rt")], update=True)
    index = routing._index(json.loads(path.read_text())["archs"]["sm90"])
    d64, d128 = (index["classes"][("fwd", "bf16", d, False, 1, 4096)] for d in (64, 128))
    assert index["measured"]["date"] == "2026-12-03" and d128["winner"] == "fa2rt" and "date" not in d128
    assert d64["winner"] == "sdpa_cudnn" and d64["date"] == "2026-12-01"  # kept, with its own date
    assert "2026-12-01" in routing.measurement_text(("fwd", "bf16", 64, False, 1, 4096), d64, index["measured"])
    routes.merge_routing(path, "sm90", MEASURED, [entry(128, "fa2rt")])  # without update: the arch's entry is replaced
    assert len(json.loads(path.read_text())["archs"]["sm90"]["classes"]) == 1


def test_committed_table_is_well_formed():
    data = json.loads(routing.ROUTING_FILE.read_text())
    assert data["schema_version"] == routing.SCHEMA
    for arch, e in data["archs"].items():
        for key in ("device", "driver", "torch", "cudnn", "date", "rule"):
            assert e["measured"].get(key), (arch, key)
        for c in e["classes"]:
            assert c["winner"] in ("fa2rt", *routing.PROVIDERS) and c["ms"]["fa2rt"] > 0 and c["noise"] >= 0
            assert c["class"]["pass"] in routes.ROUTING_PASSES
        assert routing.table(arch) is not None


def test_bench_options():
    a = bench.parse_args(["--routing", "--head-dim", "128", "--seqlen", "1024", "4096", "--dtype", "bfloat16"])
    # 2 causal x 2 seqlens (MHA) + 2 causal x 1 seqlen >= 2048 (GQA), 2 passes, ROUNDS rounds
    assert bench.plan(a) == {"routing": 6 * 2 * routes.ROUNDS}
    with pytest.raises(SystemExit):
        bench.parse_args(["--write-routing", "x.json"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--routing", "--quick", "--write-routing", "x.json"])


@pytest.mark.usefixtures("cpu_stand_ins")
def test_main_writes_the_table_from_a_run(tmp_path, monkeypatch, capsys):
    # The whole mode on CPU stand-ins: fa2rt's "kernel" is CPU SDPA, SDPA's flash backend runs on the CPU for
    # real (cuDNN's and the efficient one's refusals are recorded), every timing is scripted.
    times = iter(x for _ in range(1000) for x in (2.0, 1.0, 2.2, 0.9))
    time_each(monkeypatch, lambda fn: (fn(), next(times))[1])
    monkeypatch.setattr(routing, "table", lambda arch: None)  # no table yet: no "as routed" contender
    path = tmp_path / "routing.json"
    status = bench.main(["--routing", "--dtype", "float16", "--head-dim", "64", "--seqlen", "32", "--causal", "true",
                         "--routing-rounds", "2", "--write-routing", str(path), "--out", str(tmp_path / "r.json")])
    assert status == 0
    run = json.loads((tmp_path / "r.json").read_text())
    assert [r["seqlen"] for r in run["rows"]] == [32] and run["arch"] == "sm90"
    fwd = run["rows"][0]["fwd"]
    assert fwd["fa2rt"]["rounds_ms"] == [2.0, 2.2] and fwd["sdpa_flash"]["rounds_ms"] == [1.0, 0.9]
    assert "error" in fwd["sdpa_cudnn"] and fwd["winner"] == "sdpa_flash" and "fa2rt_routed" not in fwd
    table = json.loads(path.read_text())["archs"]["sm90"]
    assert [c["class"]["pass"] for c in table["classes"]] == ["fwd", "fwd+bwd"]
    assert table["measured"]["device"] == "CPU stand-in" and table["measured"]["rounds"] == 2
    assert "wrote 2 classes for sm90" in capsys.readouterr().out


def test_reports_state_the_routing_and_the_doctor_checks_kernels(table, monkeypatch):
    from fa2rt import doctor

    table(entry(dtype="fp16", head_dim=64, causal=False, seqlen_lo=1024))
    s = routing.summary("sm90")
    assert s == {"enabled": True, "source": "measured", "classes": 1, "routed": 1, "device": "NVIDIA H200",
                 "date": MEASURED["date"], "torch": MEASURED["torch"], "cudnn": MEASURED["cudnn"]}
    assert doctor._routing_text(s).startswith("on; 1 of 1 measured problem classes go to a faster SDPA backend")
    assert routing.summary("sm80")["source"] == "not measured"
    # The doctor's decision grid holds that class (fp16 d64 non-causal, seqlen 1024): it reports the kernel.
    rows = doctor.decisions(torch.device("cpu"))
    assert any(r["dtype"] == "float16" and r["head_dim"] == 64 and not r["causal"] for r in rows)
    assert {r["path"] for r in rows} == {"kernel"}
    monkeypatch.setenv(config.ROUTING, "0")
    assert doctor._routing_text(routing.summary("sm90")).startswith("off (FA2RT_ROUTING=0)")
