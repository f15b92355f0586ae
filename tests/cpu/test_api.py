"""The public API on a CPU machine: fallbacks, their announcements, explain(), capabilities(), policy rules."""

import json
import warnings

import pytest
import torch
from conftest import DEVICES

import fa2rt
from fa2rt import builds, config, doctor, policy, report
from fa2rt.reference import attention_reference
from fa2rt.schema import MANIFEST_SCHEMA


def qkv(b=2, nq=33, nk=40, h=4, hk=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((nq, h), (nk, hk), (nk, hk))
    return [torch.randn(b, n, hh, d, generator=g, dtype=torch.float32).to(dtype) for n, hh in shapes]


def test_cpu_call_falls_back_and_says_so_once(fresh_announcements):
    q, k, v = qkv()
    with pytest.warns(fa2rt.FallbackWarning, match=r"\[not_gpu\]"):
        fa2rt.attention(q, k, v, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call for the same reason stays quiet
        fa2rt.attention(q, k, v, causal=True)


def test_fallback_matches_reference_with_lse(fresh_announcements):
    q, k, v = qkv(nq=40, nk=33)
    with pytest.warns(fa2rt.FallbackWarning):
        out, lse = fa2rt.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.equal(out[:, :7], torch.zeros_like(out[:, :7]))  # rows that see no key
    assert torch.isinf(lse[:, :, :7]).all() and torch.allclose(lse[:, :, 7:].double(), ref_lse[:, :, 7:], atol=1e-4)


def test_explain_reports_reason_every_time():
    q, k, v = qkv()
    for _ in range(2):
        d = fa2rt.explain(q, k, v)
        assert d.path == "fallback" and d.reason == "not_gpu" and "cpu" in d.message


def test_empty_input_is_trivial_not_a_fallback(fresh_announcements):
    q, k, v = qkv(nk=0)
    assert fa2rt.explain(q, k, v).path == "trivial"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = fa2rt.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isinf(lse).all()


def test_validation_errors_surface_through_attention():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k: expected dtype"):
        fa2rt.attention(q, k.half(), v)


def test_disable_env(monkeypatch):
    monkeypatch.setenv(config.DISABLE, "1")
    assert fa2rt.explain(*qkv()).reason == "disabled"


def test_min_seqlen_env_must_be_an_integer(monkeypatch):
    monkeypatch.setenv(config.MIN_SEQLEN, "abc")
    with pytest.raises(ValueError, match="FA2RT_MIN_SEQLEN: expected a non-negative integer, got 'abc'"):
        policy.short_sequence_threshold("sm90")


def test_capabilities_report_is_json_and_lists_the_build():
    report = fa2rt.capabilities()
    json.dumps(report)
    assert report["schema_version"] == 1
    assert set(report["backends"]) == {"cuda", "rocm"}
    assert not report["backends"]["cuda"]["available"] and report["backends"]["cuda"]["error"]
    assert report["devices"] == []
    names = {img["name"] for img in report["build"]["images"]}
    assert names == {row["name"] for row in builds.current_build().rows} and names


def test_bad_manifest_schema_is_a_build_error(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99, "images": []}))
    build = builds.load_build(tmp_path)
    assert f"schema_version: expected {MANIFEST_SCHEMA}, got 99" in build.error and len(build.registry) == 0


# Policy on synthetic GPUs: the device probe is the one part that cannot run here, so it is replaced by a
# synthetic description; selection runs for real against the installed build.
def test_kernel_chosen_on_sm90(on_device):
    on_device("sm90")
    d = fa2rt.explain(*qkv(dtype=torch.bfloat16, d=128))
    assert d.path == "kernel" and d.image.startswith("fwd-sm90-bf16-d128-plain-") and d.mode == "native"


def test_fp32_falls_back_on_gpu(on_device):
    on_device("sm90")
    d = fa2rt.explain(*qkv(dtype=torch.float32))
    assert (d.path, d.reason) == ("fallback", "dtype")


@pytest.mark.parametrize("head_dim", [8, 40, 96, 136, 256])
def test_every_multiple_of_8_up_to_256_has_a_kernel(on_device, head_dim):
    on_device("sm90")
    d = fa2rt.explain(*qkv(dtype=torch.float16, d=head_dim))
    assert d.path == "kernel", d


@pytest.mark.parametrize("head_dim", [20, 100, 264])
def test_unsupported_head_dim_names_the_head_dim(on_device, head_dim):
    on_device("sm90")
    d = fa2rt.explain(*qkv(dtype=torch.float16, d=head_dim))
    assert d.reason == "no_kernel" and "head_dim" in d.message and str(head_dim) in d.message
    assert len(d.rejections) == sum(
        1 for img in builds.current_build().registry.images() if img.vendor == "cuda" and img.op == "fwd")


def test_grad_selects_backward_kernels_too(on_device):
    on_device("sm90")
    q, k, v = qkv(dtype=torch.bfloat16, d=128)
    q.requires_grad_(True)
    with torch.no_grad():  # nothing will be differentiated: no backward kernels needed
        d = fa2rt.explain(q, k, v)
        assert d.path == "kernel" and d.backward == ()
    for deterministic, plan in ((False, "ws"), (True, "fa2")):
        d = fa2rt.explain(q, k, v, deterministic=deterministic)
        assert d.path == "kernel" and d.image.startswith("fwd-sm90-bf16-d128-plain-")
        assert len(d.backward) == len(policy.BACKWARD_PLANS[plan])
        for op, (image, mode) in zip(policy.BACKWARD_PLANS[plan], d.backward, strict=True):  # in launch order
            assert image.startswith(f"{op}-sm90-bf16-d128-plain-") and mode == "native"
            assert f"backward {image} (native)" in str(d)
    # The warp-specialised backward takes exact head dims without score terms only.
    assert [img.split("-")[0] for img, _ in fa2rt.explain(q, k, v, softcap=5.0).backward] == ["bwd_dq", "bwd_dkdv"]


@pytest.mark.parametrize("arch", ["gfx90a", "gfx942"])
@pytest.mark.parametrize(("head_dim", "bucket"), [(128, "d128"), (32, "d64m")])
def test_amd_grad_selects_amd_backward_kernels(on_device, arch, head_dim, bucket):
    # The AMD archs have backward images at buckets 64/128/256 (backends/rocm/tiles.json); a smaller head dim runs the
    # forward's own bucket and the d64 masked-tail backward images.
    on_device(arch)
    q, k, v = qkv(dtype=torch.bfloat16, d=head_dim)
    v.requires_grad_(True)
    d = fa2rt.explain(q, k, v)
    assert d.path == "kernel" and d.image.startswith(f"fwd-{arch}-bf16-d{head_dim}-plain-") and d.mode == "native"
    assert len(d.backward) == len(policy.BACKWARD_PLANS["fa2"]), d  # no warp-specialised kernels on AMD
    for op, (image, mode) in zip(policy.BACKWARD_PLANS["fa2"], d.backward, strict=True):
        assert image.startswith(f"{op}-{arch}-bf16-{bucket}-plain-") and mode == "native", d
    entry = report.device_entry(DEVICES[arch], builds.current_build())
    assert {image for image, _ in d.backward} <= set(entry["usable_images"])


def test_grad_falls_back_where_no_backward_kernel_exists(on_device, tmp_path, monkeypatch):
    # A build with forward images only (here: the installed manifest without its backward rows): inference runs the
    # kernel, a call whose inputs require grad falls back, naming the first backward op that has no image.
    src = builds.current_build()
    manifest = dict(src.manifest, images=[row for row in src.manifest["images"] if row["op"] == "fwd"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for row in manifest["images"]:
        for blob in (row["binary"], row["ptx"]):
            if blob:
                (tmp_path / blob["file"]).symlink_to(src.directory / blob["file"])
    monkeypatch.setenv(config.KERNEL_DIR, str(tmp_path))
    on_device("gfx942")
    q, k, v = qkv(dtype=torch.bfloat16, d=128)
    assert fa2rt.explain(q, k, v).path == "kernel"
    v.requires_grad_(True)
    d = fa2rt.explain(q, k, v)
    assert (d.path, d.reason) == ("fallback", "no_backward_kernel") and d.message.startswith("bwd_dq: "), d
    assert "no_images" in d.message, d


def test_short_sequence_threshold(on_device, monkeypatch):
    on_device("sm90")
    monkeypatch.setenv(config.MIN_SEQLEN, "64")
    d = fa2rt.explain(*qkv(dtype=torch.bfloat16, d=128, nk=40))
    assert d.reason == "short_sequence" and "40" in d.message and "64" in d.message


def test_full_band_tiles_serve_only_calls_without_band(on_device):
    # An entry's full_band tile (tiles.json) builds images the dispatcher prefers for calls without causal or window.
    on_device("sm90")
    # (The warp-specialised full-band image is one too; test_eager_path checks its selection.)
    full = [img for img in builds.current_build().registry.images()
            if img.full_band_only and img.arch == "sm90" and img.family == "triton"]
    assert full, "no full-band image in the build: test a tiles.json entry with a full_band tile"
    q, k, v = qkv(dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[full[0].dtype], d=full[0].head_dim)
    q.requires_grad_(True)
    # The same tokens as one packed batch: the varlen images have the full-band tiles too.
    cu_q, cu_k = (torch.arange(0, (q.shape[0] + 1) * n, n, dtype=torch.int32) for n in (q.shape[1], k.shape[1]))
    packed = [t.flatten(0, 1) for t in (q, k, v)] + [cu_q, cu_k, q.shape[1], k.shape[1]]

    def images(args, causal, window_size):
        # Deterministic: the FA2 backward kernels (other dense calls at sm90 d64 take the warp-specialised ones).
        d = fa2rt.explain(*args, causal=causal, window_size=window_size, deterministic=True)
        return [d.image] + [image for image, _ in d.backward]

    for args, suffix in (((q, k, v), "-fullband-m"), (packed, "-fullband-varlen-")):
        assert any(suffix in name for name in images(args, False, (-1, -1)))
        for causal, window_size in ((True, (-1, -1)), (False, (8, -1)), (False, (-1, 0))):
            assert not any("-fullband-" in name for name in images(args, causal, window_size))


def test_short_sequence_rule_names_its_source(monkeypatch):
    measured = {"device": "NVIDIA H200", "date": "2026-11-21T11:21:24+00:00", "note": "n", "rule": "r"}
    monkeypatch.setattr(policy, "_crossover", lambda: {"sm90": {"min_seqlen_k": 0, "measured": measured},
                                                       "sm89": {"min_seqlen_k": 128}})
    monkeypatch.delenv(config.MIN_SEQLEN, raising=False)
    assert policy.short_sequence_rule("sm90") == {"min_seqlen_k": 0, "source": "measured", "device": "NVIDIA H200",
                                                  "date": measured["date"], "note": "n"}
    assert policy.short_sequence_rule("sm89") == {"min_seqlen_k": 128, "source": "measured"}
    assert policy.short_sequence_rule("sm80") == {"min_seqlen_k": 0, "source": "not measured"}
    assert doctor._short_sequence_text(policy.short_sequence_rule("sm90")) == (
        "no fallback by length (measured on NVIDIA H200, 2026-11-21; the JSON report has the note)")
    assert doctor._short_sequence_text(policy.short_sequence_rule("sm89")).startswith("seqlen_k < 128 falls back")
    monkeypatch.setenv(config.MIN_SEQLEN, "32")
    assert policy.short_sequence_rule("sm90") == {"min_seqlen_k": 32, "source": config.MIN_SEQLEN}
    assert doctor._short_sequence_text(policy.short_sequence_rule("sm90")) == (
        "seqlen_k < 32 falls back to SDPA (set by FA2RT_MIN_SEQLEN)")
    entry = report.device_entry(DEVICES["sm90"], builds.current_build())
    assert entry["short_sequence"] == {"min_seqlen_k": 32, "source": config.MIN_SEQLEN}


def test_turing_falls_back_with_arch_reason(on_device):
    on_device("sm75")
    d = fa2rt.explain(*qkv(dtype=torch.float16, d=64))
    assert d.reason == "no_kernel" and "sm75" in d.message


def test_misaligned_view_is_rejected_not_miscomputed(on_device):
    on_device("sm90")
    q, k, v = qkv(dtype=torch.bfloat16, d=128)
    q_off = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view_as(q).copy_(q)  # 2-byte offset
    d = fa2rt.explain(q_off, k, v)
    assert d.reason == "no_kernel" and "aligned" in d.message


def test_dynamo_traces_attention_fullgraph(fresh_announcements):
    q, k, v = qkv(nq=40, nk=33)
    compiled = torch.compile(lambda q, k, v: fa2rt.attention(q, k, v, causal=True), fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fa2rt.FallbackWarning)
        assert torch.allclose(compiled(q, k, v), fa2rt.attention(q, k, v, causal=True), atol=1e-6)
