"""Golden tests of the C++ dispatcher over synthetic devices x dtypes x head dims x features."""

import json
import os
from pathlib import Path

import pytest
from conftest import DEVICES, problem, synthetic_image, synthetic_registry

from fa2rt import _C, builds

GOLDEN = Path(__file__).parent / "golden" / "selection.json"
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (40, 64, 96, 100, 128, 136)
FEATURES = ((), ("alibi",), ("softcap",), ("softcap", "alibi"))
LAYOUTS = ("dense", "varlen")


def outcome(device, p, registry, force_arch=""):
    sel = _C.select(p, device, registry, force_arch)
    if sel["image"]:
        return f"{sel['image']} [{sel['mode']}]"
    codes = sorted({r.code for r in sel["rejections"]})
    return "reject: " + ",".join(codes)


def current_table():
    reg = synthetic_registry()
    table = {}
    for dev_name, device in DEVICES.items():
        for dtype in DTYPES:
            for head_dim in HEAD_DIMS:
                for features in FEATURES:
                    for layout in LAYOUTS:
                        key = f"{dev_name}/{dtype}/d{head_dim}/{'+'.join(features) or 'plain'}"
                        key += "" if layout == "dense" else f"/{layout}"
                        table[key] = outcome(device, problem(dtype, head_dim, features, layout=layout), reg)
    return table


def test_selection_matches_golden():
    table = current_table()
    if os.environ.get("FA2RT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    diff = {k: (golden.get(k), v) for k, v in table.items() if golden.get(k) != v}
    assert not diff, f"selection changed (golden, now); rerun with FA2RT_UPDATE_GOLDEN=1 if intended: {diff}"


@pytest.mark.parametrize(
    "device, expected",
    [
        ("sm80", "fwd-sm80-bf16-d128-plain [native]"),
        ("sm86", "reject: arch_mismatch,dtype,features,head_dim,layout,shared_memory"),  # sm80 d128: 128 KB, A10: 99 KB
        ("sm89", "fwd-sm89-bf16-d128-plain [native]"),
        ("sm90", "fwd-sm90-bf16-d128-plain [native]"),
        ("sm100", "fwd-sm89-bf16-d128-plain [ptx-jit]"),  # newest portable PTX; sm_90a PTX is arch-specific
        ("sm75", "reject: arch_unsupported"),
        ("gfx942", "fwd-gfx942-bf16-d128-plain [native]"),
        ("gfx1100", "reject: arch_unsupported"),
        ("none", "reject: no_device"),
    ],
)
def test_key_decisions(device, expected):
    assert outcome(DEVICES[device], problem(), synthetic_registry()) == expected


def test_sm86_runs_sm80_image_when_shared_memory_fits():
    chosen = outcome(DEVICES["sm86"], problem(head_dim=64), synthetic_registry())
    assert chosen == "fwd-sm80-bf16-d64-plain [binary-compat]"


def test_layout_is_checked_like_any_property():
    # A varlen call takes the varlen image of the same bucket; dense images reject it by layout, and the other way.
    sel = _C.select(problem(layout="varlen"), DEVICES["sm90"], synthetic_registry(), "")
    assert sel["image"] == "fwd-sm90-bf16-d128-plain-varlen"
    reg = _C.Registry()
    reg.add(synthetic_image("sm90", "bf16", 128))
    sel = _C.select(problem(layout="varlen"), DEVICES["sm90"], reg, "")
    assert sel["image"] is None
    assert [(r.code, r.message) for r in sel["rejections"]] == [
        ("layout", "layout: image takes dense calls, problem is varlen")]
    reg.add(synthetic_image("sm90", "bf16", 64, layout="varlen"))
    sel = _C.select(problem(head_dim=64), DEVICES["sm90"], reg, "")
    assert sel["image"] is None and {r.code for r in sel["rejections"]} == {"head_dim", "layout"}
    # A varlen call never falls back to the dense images' codes: layout runs before dtype, head_dim and features.
    assert _C.reject_codes().index("layout") < _C.reject_codes().index("dtype")


def test_paged_prefill_layout_and_page_size_are_checked_like_any_property():
    # A paged prefill call (varlen q, K/V through a block table) takes only varlen_paged images, whose manifest rows
    # say which page sizes they take; a varlen call never takes them.
    reg = _C.Registry()
    reg.add(synthetic_image("sm90", "bf16", 128, layout="varlen"))
    paged = synthetic_image("sm90", "bf16", 128, layout="varlen_paged")
    paged.page_multiple = 16
    reg.add(paged)
    call = problem(layout="varlen_paged")
    call.page_size = 64
    assert _C.select(call, DEVICES["sm90"], reg, "")["image"] == "fwd-sm90-bf16-d128-plain-varlen_paged"
    assert _C.select(problem(layout="varlen"), DEVICES["sm90"], reg, "")["image"] == "fwd-sm90-bf16-d128-plain-varlen"
    call.page_size = 24
    sel = _C.select(call, DEVICES["sm90"], reg, "")
    assert sel["image"] is None and sorted((r.code, r.message) for r in sel["rejections"]) == [
        ("layout", "layout: image takes varlen calls, problem is varlen_paged"),
        ("page_size", "page_size: image takes pages that are multiples of 16, problem has 24")]


def test_rejection_messages_name_the_limit():
    sel = _C.select(problem(), DEVICES["sm86"], synthetic_registry(), "")
    smem = [r for r in sel["rejections"] if r.code == "shared_memory"]
    assert smem and "131072" in smem[0].message and "101376" in smem[0].message


@pytest.mark.parametrize(("head_dim", "features", "expected"), [
    (64, (), "fwd-sm90-bf16-d64-plain"),  # exact bucket: the unmasked image
    (40, (), "fwd-sm90-bf16-d64m-plain"),  # smallest bucket that holds it, tail masked
    (96, (), "fwd-sm90-bf16-d128m-plain"),
    (128, ("alibi",), "fwd-sm90-bf16-d128m-alibi"),
    (128, ("softcap",), "fwd-sm90-bf16-d128m-softcap+alibi"),  # the softcap image also carries alibi
    (64, ("softcap", "alibi"), "fwd-sm90-bf16-d64m-softcap+alibi"),
])
def test_bucket_and_feature_choice(head_dim, features, expected):
    sel = _C.select(problem(head_dim=head_dim, features=features), DEVICES["sm90"], synthetic_registry(), "")
    assert sel["image"] == expected


def test_head_dim_rejections_name_the_rule():
    sel = _C.select(problem(head_dim=100), DEVICES["sm90"], synthetic_registry(), "")
    msgs = {r.message for r in sel["rejections"] if r.code == "head_dim"}
    assert f"head_dim: image takes multiples of {_C.HEAD_DIM_MULTIPLE} up to 128, problem has 100" in msgs
    assert "head_dim: image is compiled for exactly 128, problem has 100" in msgs


def test_missing_feature_is_a_rejection():
    reg = _C.Registry()
    reg.add(synthetic_image("sm90", "bf16", 128, True, ("alibi",)))
    sel = _C.select(problem(features=("softcap",)), DEVICES["sm90"], reg, "")
    assert sel["image"] is None
    assert [r.message for r in sel["rejections"]] == ["features: image has no softcap (compiled with: alibi)"]


def test_softcap_image_never_serves_a_call_without_softcap():
    # Its scores are always capped (softcap 0 would zero them); ALiBi images may serve calls without slopes.
    reg = _C.Registry()
    reg.add(synthetic_image("sm90", "bf16", 128, True, ("softcap", "alibi")))
    reg.add(synthetic_image("sm90", "bf16", 64, True, ("alibi",)))
    sel = _C.select(problem(features=()), DEVICES["sm90"], reg, "")
    assert sel["image"] is None
    assert [r.message for r in sel["rejections"]] == ["features: image always applies softcap, problem has none",
                                                      "head_dim: image takes multiples of 8 up to 64, problem has 128"]
    assert _C.select(problem(head_dim=64), DEVICES["sm90"], reg, "")["image"] == "fwd-sm90-bf16-d64m-alibi"


def _listed_before_plain(name: str, **role) -> "_C.Registry":
    """A registry of an sm90 bf16 d128 image with a role (full_band_only, max_seqlen_k, one_split) named `name`,
    listed before the plain one: the dispatcher's first fit is the role image wherever its role admits the call."""
    first = synthetic_image("sm90", "bf16", 128)
    first.name = name
    for key, value in role.items():
        setattr(first, key, value)
    reg = _C.Registry()
    reg.add(first)
    reg.add(synthetic_image("sm90", "bf16", 128))
    return reg


def _passed_over(p, reg, message):
    sel = _C.select(p, DEVICES["sm90"], reg, "")
    assert sel["image"] == "fwd-sm90-bf16-d128-plain"
    assert [(r.code, r.message) for r in sel["rejections"]] == [("band", message)]


def test_full_band_image_serves_only_calls_without_band():
    # Listed first, it wins for a call without causal or window; a banded call passes it over for the next image.
    reg = _listed_before_plain("fwd-sm90-bf16-d128-plain-fullband", full_band_only=True)
    unbanded = problem()
    unbanded.full_band = True
    assert _C.select(unbanded, DEVICES["sm90"], reg, "")["image"] == "fwd-sm90-bf16-d128-plain-fullband"
    _passed_over(problem(), reg, "band: image's tile is tuned for calls without causal or window, problem has one")


def test_one_split_image_serves_only_calls_of_one_split():
    # Listed first, it wins for a decode call of one split; a split call passes it over for the entry's own tile.
    reg = _listed_before_plain("decode-sm90-bf16-d128-plain-kvcache-onesplit", one_split=True)
    p = problem()
    assert p.splits == 1
    assert _C.select(p, DEVICES["sm90"], reg, "")["image"] == "decode-sm90-bf16-d128-plain-kvcache-onesplit"
    p.splits = 4
    _passed_over(p, reg, "band: image's tile is tuned for decode calls of one split, problem has 4")


def test_short_image_serves_only_calls_within_its_keys():
    # Listed before the banded image, it wins for calls of at most max_seqlen_k keys; a longer call passes it over.
    reg = _listed_before_plain("fwd-sm90-bf16-d128-plain-k1024", max_seqlen_k=1024)
    short = "fwd-sm90-bf16-d128-plain-k1024"
    assert _C.select(problem(seqlen_q=1024, seqlen_k=1024), DEVICES["sm90"], reg, "")["image"] == short
    assert _C.select(problem(seqlen_q=1, seqlen_k=300), DEVICES["sm90"], reg, "")["image"] == short
    _passed_over(problem(seqlen_q=512, seqlen_k=1025), reg,
                 "band: image's schedule is tuned for calls of at most 1024 keys, problem has 1025")


def test_every_candidate_is_accounted_for():
    reg = synthetic_registry()
    sel = _C.select(problem(head_dim=260), DEVICES["sm90"], reg, "")
    cuda_images = {img.name for img in reg.images() if img.vendor == "cuda"}
    assert sel["image"] is None
    assert {r.image for r in sel["rejections"]} == cuda_images


def test_misaligned_pointers_reject_align16_images():
    sel = _C.select(problem(aligned16=False), DEVICES["sm90"], synthetic_registry(), "")
    assert sel["image"] is None
    assert any(r.code == "alignment" and "16-byte" in r.message for r in sel["rejections"])


def test_int32_index_range():
    p = problem(max_head_extent=_C.MAX_INT32_OFFSET + 1)
    sel = _C.select(p, DEVICES["sm90"], synthetic_registry(), "")
    assert any(r.code == "index_range" and str(_C.MAX_INT32_OFFSET) in r.message for r in sel["rejections"])


def test_grid_limit():
    p = problem(batch=_C.MAX_GRID_Y, nheads=2, nheads_k=2)
    sel = _C.select(p, DEVICES["sm90"], synthetic_registry(), "")
    assert sel["image"] is None and any(r.code == "grid_limit" for r in sel["rejections"])


@pytest.mark.parametrize("arch", ["sm80", "sm89"])
def test_forced_arch_runs_through_ptx(arch):
    sel = _C.select(problem(), DEVICES["sm90"], synthetic_registry(), arch)
    assert sel["image"] == f"fwd-{arch}-bf16-d128-plain" and sel["mode"] == "ptx-jit"
    assert any(r.code == "forced_out" for r in sel["rejections"])


def test_forced_arch_specific_ptx_is_refused_on_newer_arch():
    sel = _C.select(problem(), DEVICES["sm100"], synthetic_registry(), "sm90")
    assert sel["image"] is None and any(r.code == "ptx_unusable" for r in sel["rejections"])


def test_empty_build_is_a_reason():
    sel = _C.select(problem(), DEVICES["sm90"], _C.Registry(), "")
    assert [r.code for r in sel["rejections"]] == ["no_images"]


def test_duplicate_image_refused():
    reg = _C.Registry()
    reg.add(synthetic_image("sm90", "bf16", 128))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(synthetic_image("sm90", "bf16", 128))


def test_each_installed_image_is_chosen_on_its_native_device():
    """The real build: every image wins its own problem on a device of its arch (nothing unreachable): the exact
    head dim for an unmasked image, a smaller multiple of 8 for a masked one; a call without band for a full-band
    image, a banded one for the others; a call of at most max_seqlen_k keys for a short image, a longer one for the
    others; a decode call of one split for a one-split image, of two for the others."""
    build = builds.current_build()
    if build.manifest is None:
        pytest.fail(f"no installed kernel build: {build.error}")
    for img in build.registry.images():
        head_dim = img.head_dim - _C.HEAD_DIM_MULTIPLE if img.d_mask else img.head_dim
        features = ("softcap",) if "softcap" in img.features else img.features
        p = problem(img.dtype, head_dim, features, layout=img.layouts[0])
        p.op, p.full_band, p.page_size = img.op, img.full_band_only, img.page_multiple
        p.seqlen_k = img.max_seqlen_k or 1 << 16
        p.splits = 1 if img.one_split else 2
        sel = _C.select(p, DEVICES[img.arch], build.registry, "")
        assert sel["image"] == img.name, (img.name, sel)
