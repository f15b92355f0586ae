"""The AOT build (backends/kernels/aot.py): images + manifest for one arch per vendor, and its static checks.

The images of sm90 + gfx942 (every variant) are those of the installed package when it was built from this tree
(tox installs it: CI compiles each image once, with the same static checks); otherwise the build runs once per module
in a subprocess, as CMake runs it (about 3 minutes on 2 cores). The check functions are also called directly with
fabricated numbers, so a check that never fails would be caught.
"""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "backends" / "kernels"
ARCHS = ["sm90", "gfx942"]

sys.path.insert(0, str(KERNELS))
import aot  # noqa: E402
import variants  # noqa: E402


def _params(op, dtype, layout="dense", family="triton"):
    if family == variants.WS_FAMILY:
        return aot.ws_module(op).params()
    # Loaded under a private name: other tests load fwd.py in the Triton interpreter.
    spec = importlib.util.spec_from_file_location("_aot_test_fwd", KERNELS / "fwd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fwd_params(dtype, layout) if op == "fwd" else aot.kernel_spec(op)[1](dtype, layout)


def _run(*args):
    return subprocess.run([sys.executable, str(KERNELS / "aot.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=1200)


def _installed_build(out: Path):
    """The ARCHS part of the installed fa2rt's images, linked into `out` with the manifest cut to ARCHS, when that
    build holds exactly this tree's variant grid for ARCHS (tox installs the package built from this tree, with the
    same static checks, so CI compiles each image once); else None."""
    try:
        import fa2rt
    except ImportError:
        return None
    directory = Path(fa2rt.__file__).parent / "kernels"
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    rows = [row for row in manifest.get("images", []) if row["arch"] in ARCHS]
    if [row["name"] for row in rows] != [v.name for v in variants.variants(ARCHS)]:
        return None
    for row in rows:
        for blob in (row["binary"], row["ptx"]):
            if blob:
                shutil.copyfile(directory / blob["file"], out / blob["file"])
    manifest = {**manifest, "archs": ARCHS, "images": rows}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """(folder, manifest, the compiler's output or None when the installed images were reused)."""
    out = tmp_path_factory.mktemp("aot")
    manifest = _installed_build(out)
    if manifest is not None:
        return out, manifest, None
    proc = _run("--archs", ",".join(ARCHS), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, json.loads((out / "manifest.json").read_text()), proc.stdout


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_header(build):
    _, manifest, _ = build
    assert manifest["schema_version"] == 6
    assert manifest["triton_version"] == "3.6.0"
    assert manifest["archs"] == ARCHS


def test_rows_match_variant_grid(build):
    _, manifest, stdout = build
    names = [r["name"] for r in manifest["images"]]
    # Variant order is the dispatcher's preference order (exact plain image first within a bucket).
    assert names == [v.name for v in variants.variants(ARCHS)] and len(set(names)) == len(names)
    for name in names if stdout is not None else ():
        assert name in stdout  # one printed line per image


def test_files_and_sha256(build):
    out, manifest, _ = build
    listed = {"manifest.json"}
    for row in manifest["images"]:
        blobs = [row["binary"]] + ([row["ptx"]] if row["ptx"] else [])
        for blob in blobs:
            assert _sha256(out / blob["file"]) == blob["sha256"], blob["file"]
            listed.add(blob["file"])
        assert row["binary"]["file"] == f"{row['name']}.{row['binary']['kind']}"
    assert {p.name for p in out.iterdir()} == listed


def test_row_fields(build):
    _, manifest, _ = build
    for row in manifest["images"]:
        (layout,) = row["layouts"]
        params = _params(row["op"], row["dtype"], layout, row["family"])
        assert row["params"] == [list(p) for p in params]
        assert (layout == "varlen") == ("-varlen-" in row["name"])
        # Varlen images take the cu_seqlens and totals last; dense ones compile without them.
        assert (row["params"][-4][0] == "CU_Q") == (layout == "varlen")
        # Paged-prefill images (forward only) take the block table, page size, pool and table sizes after those.
        assert (layout == "varlen_paged") == ("-varlen_paged-" in row["name"])
        if layout == "varlen_paged":
            assert row["op"] == "fwd" and [p[0] for p in row["params"][-9:]] == [
                "CU_Q", "CU_K", "total_q", "total_k", "BLOCK_TABLE", "stride_bt", "page_size", "pool_blocks",
                "max_blocks"]
        assert row["scratch_params"] == 2 and row["align16"] is True
        assert row["threads"] == row["num_warps"] * row["warp_size"]
        assert f"-{'+'.join(row['features']) or 'plain'}-" in row["name"]
        assert row["d_mask"] == (f"-d{row['head_dim']}m-" in row["name"])
        assert row["full_band_only"] == ("-fullband-" in row["name"])
        assert row["one_split"] == ("-onesplit-" in row["name"])
        short = re.search(r"-k(\d+)-", row["name"])
        assert row["max_seqlen_k"] == (int(short[1]) if short else 0)
        ws = row["family"] == variants.WS_FAMILY
        assert row["divisible16"] == ([] if ws else aot.divisible_params(row["op"], params))
        # Slopes, cu_seqlens, the decode kernels' index tensors, the appended keys and values (and the backward's fp32
        # row vectors, LSE and delta) may have any alignment.
        unhinted = {"ALIBI", "stride_ab", "stride_ah", "CU_Q", "CU_K", "SEQLENS", "BATCH_IDX", "LEFTPAD", "BLOCK_TABLE",
                    "K_NEW", "V_NEW"} | ({"LSE", "DELTA"} if row["op"].startswith("bwd_") else set())
        assert not unhinted & set(row["divisible16"])
        # Page-aligned decode images (each tile in one page) take pages that are multiples of their key block.
        aligned = "-aligned-" in row["name"]
        assert not aligned or (row["op"], layout) == ("decode", "paged")
        assert row["page_multiple"] == (row["block_n"] if aligned else 16 if layout in ("paged", "varlen_paged") else 0)
        assert row["optional_features"] == {"decode": ["softcap", "alibi"], "append": []}.get(row["op"], ["alibi"])
        if row["vendor"] == "cuda":
            assert row["warp_size"] == 32 and row["binary"]["kind"] == "cubin"
            assert row["ptx"]["target"] == "sm_90a" and row["ptx"]["portable"] is False
        else:
            assert row["warp_size"] == 64 and row["binary"]["kind"] == "hsaco" and row["ptx"] is None


def test_ws_rows(build):
    """The warp-specialised Gluon forward images (sm90 fwd, dense calls without score terms): persistent tile walks
    over a flat grid, at d64 and d128 one for full-band calls, one for banded calls of at most 512 (d64) or 1024
    (d128) keys, and one for other banded calls; Q/K/V/O as TMA maps with the kernel's boxes; the Triton images of a
    kind the ws images take every call of are not built."""
    _, manifest, _ = build
    rows = [row for row in manifest["images"] if row["family"] == variants.WS_FAMILY and row["op"] == "fwd"]
    assert {(row["head_dim"], row["dtype"], row["full_band_only"], row["max_seqlen_k"]) for row in rows} == {
        (hd, d, f, k) for d in ("fp16", "bf16") for hd, short in ((64, 512), (128, 1024))
        for f, k in ((True, 0), (False, short), (False, 0))}
    host_dtype = {"bf16": 9, "fp16": 6}  # CUtensorMapDataType
    for row in rows:
        assert (row["arch"], row["op"], row["layouts"], row["d_mask"], row["features"]) == (
            "sm90", "fwd", ["dense"], False, [])
        assert row["flat_grid"] is True and row["num_warps"] == 12  # 2 consumer warpgroups and the loader's
        assert row["ctas_per_sm"] == 1 and "-persistent-" in row["name"]
        # Two query buffers per consumer (tiles.json q_bufs): 2 x 2 warpgroups x 64 rows x head_dim x 2 bytes.
        assert row["shared_bytes"] >= 2 * 2 * 64 * row["head_dim"] * 2
        # Boxes are 64 elements wide at both head dims: 128 bytes, the widest swizzle's span (swizzle mode 3).
        assert [(m["param"], m["box"], m["dtype"], m["elem_size"], m["swizzle"]) for m in row["tensor_maps"]] == [
            (name, [1, rows_, 1, 64], host_dtype[row["dtype"]], 2, 3)
            for name, rows_ in (("Q", 64), ("K", 128), ("V", 128), ("O", 64))]
    others = [row for row in manifest["images"] if row["family"] == "triton"]
    assert all(not row["flat_grid"] and row["ctas_per_sm"] == 0 and row["tensor_maps"] == [] for row in others)
    plain = {row["head_dim"] for row in others
             if (row["arch"], row["op"], row["layouts"], row["d_mask"], row["features"]) == (
                 "sm90", "fwd", ["dense"], False, [])}
    assert plain and not plain & {64, 128}


def test_ws_backward_rows(build):
    """The warp-specialised Gluon backward images (sm90 bwd_ws d64/d128, dense calls without score terms): one
    program per 128 keys of a (batch, KV head) (not a flat grid), Q/K/V/dO/dK/dV as TMA maps and the fp32 dQ
    accumulator's map with the kernel's boxes, the prep and convert kernels beside them at the same head dims; the FA2
    backward images stay (deterministic calls)."""
    out, manifest, _ = build
    rows = [row for row in manifest["images"] if row["op"] == "bwd_ws"]
    assert sorted((row["dtype"], row["head_dim"]) for row in rows) == sorted(
        (d, h) for d in ("fp16", "bf16") for h in (64, 128))
    host_dtype = {"bf16": 9, "fp16": 6}  # CUtensorMapDataType; 7: float32
    for row in rows:
        assert row["family"] == variants.WS_FAMILY and row["layouts"] == ["dense"] and row["features"] == []
        assert row["flat_grid"] is False and row["ctas_per_sm"] == 0 and row["num_warps"] == 12
        assert row["block_n"] == 128 and not row["d_mask"]
        m = row["block_m"]
        assert [(t["param"], t["box"], t["dtype"], t["elem_size"]) for t in row["tensor_maps"]] == [
            (name, [1, rows_, 1, 64], host_dtype[row["dtype"]], 2)
            for name, rows_ in (("Q", m), ("K", 64), ("V", 64), ("DO", m), ("DK", 64), ("DV", 64))] + [
            ("DQACC", [1, 1, 64, 32], 7, 4)]
        ptx = (out / row["ptx"]["file"]).read_text()
        assert "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx and "setmaxnreg" in ptx
        assert [p for p, _ in row["params"][-10:]] == ["LSE", "DELTA", "seqlen_q", "seqlen_k", "window_left",
                                                       "window_right", "nheads", "head_ratio", "qk_scale_log2",
                                                       "sm_scale"]
    for op in ("bwd_prep", "bwd_convert", "bwd_dq", "bwd_dkdv"):
        assert {(row["dtype"], row["head_dim"]) for row in rows} <= {
            (row["dtype"], row["head_dim"]) for row in manifest["images"]
            if row["op"] == op and row["arch"] == "sm90" and not row["d_mask"] and row["features"] == []}, op


def test_ptx_entry_takes_the_manifest_params(build):
    """The launch ABI: every CUDA image's kernel takes exactly its manifest params and the scratch pointers, a
    tensor map as one 128-byte, 64-aligned param."""
    out, manifest, _ = build
    for row in manifest["images"]:
        if row["vendor"] != "cuda":
            continue
        ptx = (out / row["ptx"]["file"]).read_text()
        entry = re.search(r"\.entry\s+\w+\((.*?)\)", ptx, re.S)[1]
        decls = re.findall(r"\.param\s+([^,]*?)\s+\w+_param_\d+", entry)
        assert len(decls) == len(row["params"]) + row["scratch_params"], row["name"]
        maps = [i for i, (_, ty) in enumerate(row["params"]) if ty == "tensormap"]
        assert [i for i, d in enumerate(decls) if d.startswith(".align 64 .b8")] == maps, row["name"]


def _tile_of(row) -> dict:
    if row["family"] == variants.WS_FAMILY:
        return variants.ws_schedule(row["arch"], row["op"], row["head_dim"], row["full_band_only"],
                                    row["max_seqlen_k"])
    return variants.tile_config(row["arch"], row["op"], row["head_dim"], row["full_band_only"], row["layouts"][0],
                                "-aligned-" in row["name"], row["one_split"])


def test_rows_passed_static_checks(build):
    _, manifest, _ = build
    for row in manifest["images"]:
        res, limit = row["resources"], variants.arch_info(row["arch"])["max_shared_bytes"]
        assert row["shared_bytes"] <= limit
        if row["vendor"] == "cuda":
            # No spills, except up to the stack bytes a tile's tiles.json entry allows.
            tile = _tile_of(row)
            allowed = variants.stack_allowance(tile, row["layouts"][0])
            assert res["stack_bytes"] <= allowed and res["local_bytes"] == 0
            # sm90 images use wgmma (HGMMA), except a tile whose tiles.json entry names another instruction, or
            # none (null: no matrix product to check, the decode combine).
            assert res["mma_instr"] == tile.get("mma_instr", "HGMMA")
            assert res["mma_count"] > 0 or res["mma_instr"] is None
        else:
            tile = _tile_of(row)
            assert res["scratch_bytes"] == 0 and res["vgpr_spill_count"] == 0 and res["lds_bytes"] <= limit
            assert res["mfma_count"] > 0 or tile.get("mma_instr", "v_mfma") is None
            assert res["waves_per_eu"] == tile["waves_per_eu"]


def test_pdl_rows(build):
    # sm90's decode images signal their dependents (in split calls) and its merge images wait for the decode grid and
    # are launched as its dependents; no other image holds a griddepcontrol instruction (sm80/sm89 lack it, AMD has
    # no PDL).
    out, manifest, _ = build
    for row in manifest["images"]:
        pdl = row["arch"] in variants.PDL_ARCHS and row["op"] in variants.PDL_OPS
        assert row["dependent_launch"] == (pdl and row["op"] == "decode_combine"), row["name"]
        ptx = (out / row["ptx"]["file"]).read_text() if row["ptx"] else ""
        assert ("griddepcontrol.launch_dependents" in ptx) == (pdl and row["op"] == "decode"), row["name"]
        assert ("griddepcontrol.wait" in ptx) == row["dependent_launch"], row["name"]
    assert any(row["dependent_launch"] for row in manifest["images"])


def test_both_vendors_built_backward(build):
    # One arch per vendor, each with the FA2 backward kernels (and the decode kernels) beside the forward; the
    # warp-specialised backward's three kernels only on sm90 (Hopper instructions; AMD runs the FA2 plan).
    _, manifest, _ = build
    built = {(row["arch"], row["op"]) for row in manifest["images"]}
    ws_plan = ("bwd_prep", "bwd_ws", "bwd_convert")
    assert built == {(arch, op) for arch in ARCHS for op in variants.OPS if op not in ws_plan or arch == "sm90"}


def test_unknown_arch_fails_clearly(tmp_path):
    proc = _run("--archs", "sm90,sm70", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "sm70" in proc.stderr and "sm80, sm89, sm90, gfx90a, gfx942" in proc.stderr
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="known archs"):
        variants.variants(["gfx1100"])


def test_cuda_checks_reject_bad_record():
    good = {"registers": 200, "stack_bytes": 0, "local_bytes": 0, "mma_instr": "HMMA", "mma_count": 64}
    assert aot.cuda_checks(good, 98304, 0, 0, 101376) == []
    bad = good | {"stack_bytes": 16, "local_bytes": 8, "mma_count": 0}
    failures = aot.cuda_checks(bad, 114688, 256, 0, 101376)
    assert len(failures) == 5
    text = "\n".join(failures)
    for needle in ("stack_bytes (spills): measured 16, limit 0", "local_bytes (spills): measured 8",
                   "global_scratch_size: measured 256", "shared_bytes: measured 114688, limit 101376",
                   "HMMA count: measured 0"):
        assert needle in text
    # A tile's stack allowance admits spills up to it, and no more.
    assert aot.cuda_checks(good | {"stack_bytes": 64}, 98304, 0, 0, 101376, max_stack_bytes=64) == []
    assert aot.cuda_checks(good | {"stack_bytes": 72}, 98304, 0, 0, 101376, max_stack_bytes=64) == [
        "stack_bytes (spills): measured 72, limit 64"]


def test_dependent_image_without_its_wait_fails_the_build():
    assert aot.check_dependent_wait("griddepcontrol.wait; // dummy", True) is None
    assert aot.check_dependent_wait("ld.global.f32", False) is None
    assert aot.check_dependent_wait("ld.global.f32", True) == "dependent_launch image without griddepcontrol.wait"
    good = {"registers": 200, "stack_bytes": 0, "local_bytes": 0, "mma_instr": None, "mma_count": 0}
    assert aot.cuda_checks(good, 2048, 0, 0, 101376, ptx="ld.global.f32", dependent_launch=True) == [
        "dependent_launch image without griddepcontrol.wait"]


def test_rocm_checks_reject_bad_record():
    good = {"scratch_bytes": 0, "vgpr_spill_count": 0, "lds_bytes": 32768, "mfma_count": 128}
    assert aot.rocm_checks(good, 0, 65536) == []
    bad = {"scratch_bytes": 208, "vgpr_spill_count": 81, "lds_bytes": 70000, "mfma_count": 0}
    assert len(aot.rocm_checks(bad, 0, 65536)) == 4
    # An op with no matrix product (tiles.json "mma_instr": null) is not asked for one; the other checks stay.
    assert len(aot.rocm_checks(bad, 0, 65536, None)) == 3
    assert aot.check_mma(None, 0) is None and aot.check_mma("HMMA", 0) == "HMMA count: measured 0, limit >= 1"


def test_parsers():
    res_usage = (" Function attn_fwd:\n  REG:168 STACK:24 SHARED:1024 LOCAL:8 CONSTANT[0]:704 TEXTURE:0\n")
    assert aot.parse_res_usage(res_usage) == {"registers": 168, "stack_bytes": 24, "local_bytes": 8}
    sass = "  HGMMA.64x64x16.F32.BF16 R88, gdesc[UR16], RZ ;\n  HMMA.16816.F32 R4, R8, R12, R4 ;\n"
    assert aot.count_sass(sass, "HGMMA") == 1 and aot.count_sass(sass, "HMMA") == 1
    assert aot.parse_ptx_target(".version 8.7\n.target sm_90a\n") == "sm_90a"
    amdgcn = """
    ; implicit-def: $vgpr255 : SGPR spill to VGPR lane
    v_mfma_f32_32x32x8_bf16 v[80:95], v[64:65], v[96:97], 0
    v_mfma_f32_32x32x8_bf16 v[80:95], v[64:65], v[96:97], v[80:95]
    .amdhsa_private_segment_fixed_size 0
; ScratchSize: 0
  - .agpr_count:     4
    .group_segment_fixed_size: 0
    .private_segment_fixed_size: 0
    .sgpr_count:     106
    .sgpr_spill_count: 13
    .vgpr_count:     250
    .vgpr_spill_count: 0
"""
    res = aot.parse_amdgcn(amdgcn, lds_bytes=32768)
    assert res == {"vgpr_count": 250, "sgpr_count": 106, "agpr_count": 4, "scratch_bytes": 0, "lds_bytes": 32768,
                   "sgpr_spill_count": 13, "vgpr_spill_count": 0, "mfma_count": 2}
    assert aot.rocm_checks(res, 0, 65536) == []  # SGPR spills to VGPR lanes are not scratch


def test_tune_tiles_option():
    import argparse

    import tune

    assert tune.parse_tiles("32,64,4,1;64,64,4,3") == [(32, 64, 4, 1), (64, 64, 4, 3)]
    for bad in ("", "32,64,4", "32,64,4,1;x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            tune.parse_tiles(bad)
    # Given tiles replace the op's candidate list, the entry's own tile joins them; every image kind of the bucket
    # is built for each.
    own = tune._tile(variants.arch_info("sm90")["bwd_dkdv"]["64"])
    cands = tune.candidate_variants("sm90", 64, "bwd_dkdv", [(64, 64, 4, 2)])
    assert [tile for tile, _ in cands] == [(64, 64, 4, 2), own]
    assert {(v.block_m, v.block_n, v.num_warps, v.num_stages) for v in cands[0][1]} == {(64, 64, 4, 2)}
    assert len(cands[0][1]) == len(variants.KINDS)
    assert {v.max_stack_bytes for v in cands[0][1]} == {0}
    spilling = tune.candidate_variants("sm90", 128, "bwd_dkdv", [(64, 64, 4, 2)], max_stack_bytes=224)
    assert {v.max_stack_bytes for v in spilling[0][1]} == {224}
    # The own tile keeps its own allowance where the given one is smaller.
    own128 = variants.arch_info("sm90")["bwd_dkdv"]["128"]
    assert dict(tune.candidate_variants("sm90", 128, "bwd_dkdv", [(64, 64, 4, 2)]))[tune._tile(own128)][0] \
        .max_stack_bytes == own128["max_stack_bytes"]
    # AMD: every tile of a bucket takes that bucket entry's waves_per_eu (the register budget it was checked with).
    for bucket in (64, 128, 256):
        want = variants.tile_config("gfx90a", "bwd_dq", bucket)["waves_per_eu"]
        for _tile, kinds in tune.candidate_variants("gfx90a", bucket, "bwd_dq", [(64, 32, 4, 1)]):
            assert {v.waves_per_eu for v in kinds} == {want}, bucket
    assert {variants.tile_config("gfx90a", "bwd_dq", b)["waves_per_eu"] for b in (64, 128)} == {1, 2}


def test_tune_decode_points_option():
    import argparse

    import tune

    assert tune.parse_decode_points("64,4096,32,8,contiguous,1;1,32768,32,32,paged64") == [
        (64, 4096, 32, 8, "contiguous", 1), (1, 32768, 32, 32, "paged64")]
    for bad in ("1,4096,32,8", "1,4096,32,8,contiguous,1,2", "1,x,32,8,contiguous"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            tune.parse_decode_points(bad)


def test_tune_decode_builds_every_cache_layout_and_the_combine():
    import tune

    # A decode tile serves the contiguous and the paged images (page-aligned first): it must build all of them, in
    # the manifest's order; the contiguous one is timed.
    (tile, kinds), *_ = tune.candidate_variants("sm90", 128, "decode", [(16, 128, 4, 3)])
    assert tile == (16, 128, 4, 3)
    built = [v for v in variants.variants(["sm90"]) if v.op == "decode" and v.dtype == "bf16" and v.head_dim == 128]
    # The bucket's one-split image (its own tile, listed first) is not the candidate's: the candidate replaces the
    # entry's own tile.
    assert [v.one_split for v in built] == [True, False, False, False]
    assert [(v.layout, v.d_mask, v.features, v.page_aligned) for v in kinds] == [
        (v.layout, v.d_mask, v.features, v.page_aligned) for v in built[1:]]
    assert not any(v.one_split for v in kinds)
    assert [v.page_aligned for v in kinds] == [False, True, False]
    assert kinds[0].layout == "kvcache" and {v.op for v in kinds} == {"decode"}
    assert {(v.block_m, v.block_n, v.num_warps, v.num_stages) for v in kinds} == {tile}
    assert [v.op for v in tune._companions("sm90", 128, "decode")] == ["decode_combine"]
    assert all(all(v.layout == "dense" for v in ks) for _, ks in tune.candidate_variants("sm90", 64, "fwd"))
    # The merge's tiles are tuned on the same decode steps: every decode image of the bucket comes along on its
    # current tile; the candidates keep the entry's null instruction (no matrix product to check).
    (tile, kinds), *_ = tune.candidate_variants("sm90", 128, "decode_combine", [(1, 16, 4, 1)])
    assert tile == (1, 16, 4, 1) and [(v.op, v.layout, v.mma_instr) for v in kinds] == [
        ("decode_combine", "partials", None)]
    assert [(v.op, v.layout, v.page_aligned) for v in tune._companions("sm90", 128, "decode_combine")] == [
        (v.op, v.layout, v.page_aligned) for v in built]


def test_tune_full_band():
    import tune

    # Full band: the entry's own tile and its full-band tile compete with the given ones, each with its own
    # spill allowance.
    current = tune.current_tiles("sm90", 64, "bwd_dkdv")
    cfg = variants.arch_info("sm90")["bwd_dkdv"]["64"]
    assert list(current) == [tune._tile(cfg), tune._tile(cfg[variants.FULL_BAND])]
    cands = dict(tune.candidate_variants("sm90", 64, "bwd_dkdv", [(64, 64, 4, 1)], band="full"))
    assert list(cands) == [(64, 64, 4, 1), *current]
    assert [cands[t][0].max_stack_bytes for t in current] == [c.get("max_stack_bytes", 0) for c in current.values()]
    # An entry's matrix-core override (sm90 d256 dK/dV runs mma.sync) stays with its own tile only.
    d256 = variants.arch_info("sm90")["bwd_dkdv"]["256"]
    cands = dict(tune.candidate_variants("sm90", 256, "bwd_dkdv", [(64, 64, 8, 1)]))
    assert cands[tune._tile(d256)][0].mma_instr == d256["mma_instr"] == "HMMA"
    assert cands[(64, 64, 8, 1)][0].mma_instr == "HGMMA"
    assert tune.BANDS["full"] == (False,)

    def row(tile, geomean, stack=0):
        return {"tile": tile, "geomean": geomean, "stack_bytes": stack}

    own = row((32, 64, 4, 1), 100.0)
    assert tune.full_band_choice(row((32, 64, 4, 1), 100.0), own) is None
    assert tune.full_band_choice(row((64, 64, 4, 2), 100.0 * tune.FULL_BAND_MIN_GAIN - 0.1), own) is None
    assert tune.full_band_choice(row((64, 64, 4, 2), 110.0, stack=16), own) == {
        "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "max_stack_bytes": 16}
    assert tune.full_band_choice(row((64, 64, 4, 2), 90.0), None)["block_m"] == 64


def test_tune_writes_tiles(tmp_path, monkeypatch):
    import shutil

    import tune

    for vendor in ("cuda", "rocm"):
        (tmp_path / vendor).mkdir()
        shutil.copy(variants.BACKENDS_DIR / vendor / "tiles.json", tmp_path / vendor / "tiles.json")
    rocm_before = (tmp_path / "rocm" / "tiles.json").read_text()
    monkeypatch.setattr(tune.variants, "BACKENDS_DIR", tmp_path)

    def entry(arch, op, bucket):
        return json.loads((tmp_path / "cuda" / "tiles.json").read_text())["archs"][arch][op][str(bucket)]

    def row(arch, bucket, tile, stack=0, geomean=100.0):
        return {"arch": arch, "bucket": bucket, "tile": tile, "stack_bytes": stack, "geomean": geomean}

    # The same tile keeps its matrix-core override; a new tile drops it (it was checked with the arch's own).
    own = tune._tile(entry("sm90", "bwd_dkdv", 256))
    tune.write_tiles({("sm90", 256): row("sm90", 256, own, stack=8)}, "bwd_dkdv")
    assert entry("sm90", "bwd_dkdv", 256)["mma_instr"] == "HMMA"
    assert entry("sm90", "bwd_dkdv", 256)["max_stack_bytes"] == 8
    tune.write_tiles({("sm90", 256): row("sm90", 256, (64, 64, 8, 1))}, "bwd_dkdv")
    assert entry("sm90", "bwd_dkdv", 256) == {"block_m": 64, "block_n": 64, "num_warps": 8, "num_stages": 1}
    assert (tmp_path / "rocm" / "tiles.json").read_text() == rocm_before  # untouched: no winner of its archs

    # Full band: stored where it beats the own tile's timing by the margin, dropped where not.
    own64 = row("sm80", 64, tune._tile(entry("sm80", "fwd", 64)))
    better = row("sm80", 64, (64, 64, 4, 3), geomean=110.0)
    tune.write_full_band_tiles({("sm80", 64): better}, {("sm80", 64): own64}, "fwd")
    assert entry("sm80", "fwd", 64)[variants.FULL_BAND] == tune._tile_entry(better)
    tune.write_full_band_tiles({("sm80", 64): own64}, {("sm80", 64): own64}, "fwd")
    assert variants.FULL_BAND not in entry("sm80", "fwd", 64)


def test_varlen_images_take_their_own_spill_allowance():
    # Only where tiles.json gives one; otherwise the dense allowance (by default none) holds for them too.
    assert variants.stack_allowance({"max_stack_bytes": 48, variants.VARLEN_STACK_KEY: 64}, "varlen") == 64
    assert variants.stack_allowance({"max_stack_bytes": 48, variants.VARLEN_STACK_KEY: 64}, "dense") == 48
    assert variants.stack_allowance({"max_stack_bytes": 48}, "varlen") == 48
    assert variants.stack_allowance({}, "varlen") == 0
    grid = variants.variants(["sm80"])
    varlen = [v for v in grid if v.layout == "varlen"]
    assert varlen and {(v.d_mask, v.features) for v in varlen} == set(variants.LAYOUT_KINDS["varlen"])
    assert not any(v.full_band_only for v in varlen)
    for v in varlen:
        assert v.max_stack_bytes == variants.stack_allowance(variants.tile_config("sm80", v.op, v.head_dim), "varlen")
    # A full-band tile builds varlen images too, with its own varlen allowance.
    full = [v for v in variants.variants(["sm90"]) if v.layout == "varlen" and v.full_band_only]
    assert {(v.op, v.head_dim) for v in full} == {("bwd_dkdv", 64)}
    assert len(full) == len(variants.LAYOUT_KINDS["varlen"]) * len(variants.DTYPES)
    for v in full:
        assert v.max_stack_bytes == variants.tile_config("sm90", v.op, v.head_dim, True)[variants.VARLEN_STACK_KEY]


def test_paged_prefill_images_are_forward_only_at_the_serving_buckets():
    grid = variants.variants(list(variants.ARCHS))
    paged = [v for v in grid if v.layout == "varlen_paged"]
    for arch in variants.ARCHS:
        mine = [v for v in paged if v.arch == arch]
        # Three kinds x two dtypes x the buckets the decode images take: 18 per arch.
        assert len(mine) == len(variants.PAGED_PREFILL_KINDS) * len(variants.DTYPES) * len(
            variants.PAGED_PREFILL_BUCKETS) == 18
        assert {v.op for v in mine} == {"fwd"} and {v.head_dim for v in mine} == set(variants.PAGED_PREFILL_BUCKETS)
        assert {(v.d_mask, v.features) for v in mine} == set(variants.PAGED_PREFILL_KINDS)
        assert not any(v.full_band_only for v in mine)
        for v in mine:
            # The entry's "paged" tile where it has one (then no spill allowance), else the entry's own tile.
            entry = variants.tile_config(arch, "fwd", v.head_dim)
            tile = entry.get(variants.PAGED_TILE, entry)
            assert (v.block_m, v.block_n, v.num_warps, v.num_stages) == (
                tile["block_m"], tile["block_n"], tile["num_warps"], tile["num_stages"])
            assert v.max_stack_bytes == variants.stack_allowance(tile, "varlen_paged")
    assert set(variants.PAGED_PREFILL_BUCKETS) <= {int(b) for b in variants.arch_info("sm90")["decode"]}


@pytest.mark.parametrize("variant", ["bm32-s2", "bm32-s2-dq1-x2"])
def test_gluon_backward_compiles_for_sm90_without_spills(variant):
    """The harness's bwd_ws.py variants (ci/gluon_ws.py compile-bwd) still compile: wgmma fed from registers,
    warp-specialised (setmaxnreg), no stack at d128 with 32-row query blocks (LSE and delta read from shared memory,
    not held in registers); with dq1 dQ leaves by TMA reduce-add."""
    sys.path.insert(0, str(ROOT / "ci"))
    import gluon_ws

    compiled = gluon_ws.compile_bwd_variant(variant, 128)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert ("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx) == ("dq1" in variant)
    usage = gluon_ws.resource_usage(compiled)
    assert usage["stack_bytes"] == 0 and usage["local_bytes"] == 0, usage


def test_gluon_ab_loads_a_second_copy_of_the_forward(tmp_path):
    """ci/gluon_ws.py ab times fwd_ws.py against another copy of it (an older revision): that copy loads as a module
    of its own, so each kernel compiles from its own source, and it compiles for sm90 with an image's schedule."""
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(ROOT / "ci"))
    import gluon_ws

    copy = tmp_path / "fwd_ws_copy.py"
    copy.write_text((ROOT / "backends/kernels/fwd_ws.py").read_text())
    old = gluon_ws.load_source(copy)
    assert old is not gluon_ws.fwd_ws and old.attn_fwd_ws is not gluon_ws.fwd_ws.attn_fwd_ws
    tile = variants.ws_schedule("sm90", "fwd", 64, True)
    assert "wgmma.mma_async" in old.compile_for(GPUTarget("cuda", 90, 32), "bf16", 64, tile).asm["ptx"]


@pytest.mark.parametrize("op", ["fwd", "bwd_ws"])
def test_ws_images_name_every_compile_time_parameter(op):
    """Each Gluon kernel's constexpr parameters are all given by its constexprs() for an image's schedule: one left
    out of an ahead-of-time compile does not take its default (fwd_ws's PEEL = True compiled as the other branch)."""
    import bwd_ws
    import fwd_ws

    module, kernel = (fwd_ws, fwd_ws.attn_fwd_ws) if op == "fwd" else (bwd_ws, bwd_ws.attn_bwd_ws)
    for head_dim in (64, 128):
        given = module.constexprs(head_dim, variants.ws_schedule("sm90", op, head_dim, False))
        assert {p.name for p in kernel.params if p.is_constexpr} == set(given), (op, head_dim)


def test_ws_entry_that_builds_no_image_is_refused():
    """A ws entry with "banded": false builds only its full_band image: without a full_band entry it would build
    none, silently; it is refused, naming the key it lacks."""
    assert variants.ws_bands({"banded": False, "full_band": {}}) == (True,)
    assert variants.ws_bands({"full_band": {}}) == (True, False)
    assert variants.ws_bands({}) == (False,)
    with pytest.raises(ValueError, match="banded false needs a full_band entry"):
        variants.ws_bands({"banded": False})


def test_ws_short_image_sits_between_the_full_band_and_banded_ones():
    """A ws entry's short schedule builds a banded image for calls of at most its max_seqlen_k keys, listed before
    the banded image it shortcuts (the dispatcher takes the first that fits) and never without one; its schedule is
    the banded one with the short entry's keys replaced."""
    short = {"peel": False, "max_seqlen_k": 512}
    assert variants.ws_images({"full_band": {}, "short": short}) == [(True, 0), (False, 512), (False, 0)]
    assert variants.ws_images({"short": short}) == [(False, 512), (False, 0)]
    assert variants.ws_images({"banded": False, "full_band": {}, "short": short}) == [(True, 0)]
    ws = variants.arch_info("sm90")["fwd"]["64"]["ws"]
    sched = variants.ws_schedule("sm90", "fwd", 64, False, ws["short"]["max_seqlen_k"])
    assert sched["peel"] is False and sched["pairs"] == ws["pairs"]
    assert "peel" not in variants.ws_schedule("sm90", "fwd", 64, False)
