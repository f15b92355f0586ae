"""Shared helpers of the CPU suite: synthetic devices and images for selection tests."""

import pytest

from fa2rt import _C, devices, policy

# Synthetic devices: shared memory opt-in per block as the real parts report it.
DEVICES = {
    "sm75": _C.DeviceInfo("cuda", "sm75", 65536, 40, 32, "T4"),
    "sm80": _C.DeviceInfo("cuda", "sm80", 166912, 108, 32, "A100"),
    "sm86": _C.DeviceInfo("cuda", "sm86", 101376, 84, 32, "A10"),
    "sm89": _C.DeviceInfo("cuda", "sm89", 101376, 142, 32, "L40S"),
    "sm90": _C.DeviceInfo("cuda", "sm90", 232448, 132, 32, "H100"),
    "sm100": _C.DeviceInfo("cuda", "sm100", 232448, 148, 32, "B200"),
    "sm120": _C.DeviceInfo("cuda", "sm120", 101376, 170, 32, "RTX 5090"),
    "gfx90a": _C.DeviceInfo("rocm", "gfx90a", 65536, 104, 64, "MI250X", arch_raw="gfx90a:sramecc+:xnack-"),
    "gfx942": _C.DeviceInfo("rocm", "gfx942", 65536, 304, 64, "MI300X", arch_raw="gfx942:sramecc+:xnack-"),
    "gfx1100": _C.DeviceInfo("rocm", "gfx1100", 65536, 48, 32, "RX 7900 XTX"),
    "none": _C.DeviceInfo("none", "cpu"),
}

# A synthetic build shaped like the default one: shared bytes chosen so the sm80 d128 image does not fit the
# 99 KB parts (sm86/sm89) while its d64 image does.
SYNTHETIC_SHARED = {("sm80", 64): 65536, ("sm80", 128): 131072, ("sm89", 64): 49152, ("sm89", 128): 81920,
                    ("sm90", 64): 98304, ("sm90", 128): 163840, ("gfx90a", 64): 32768, ("gfx90a", 128): 49152,
                    ("gfx942", 64): 32768, ("gfx942", 128): 49152}
PTX_TARGET = {"sm80": "sm_80", "sm89": "sm_89", "sm90": "sm_90a"}


# Image kinds per bucket in preference order, as backends/kernels/variants.py builds them: (d_mask, features).
KINDS = ((False, ()), (True, ()), (True, ("alibi",)), (True, ("softcap", "alibi")))
# The kinds built for the varlen layout (variants.LAYOUT_KINDS).
VARLEN_KINDS = ((False, ()), (True, ("alibi",)), (True, ("softcap", "alibi")))


def synthetic_image(arch, dtype, head_dim, d_mask=False, features=(), shared=None, layout="dense"):
    img = _C.ImageInfo()
    img.name = f"fwd-{arch}-{dtype}-d{head_dim}{'m' if d_mask else ''}-{'+'.join(features) or 'plain'}"
    img.name += "" if layout == "dense" else f"-{layout}"
    img.layouts = [layout]
    img.op, img.arch, img.dtype, img.head_dim = "fwd", arch, dtype, head_dim
    img.d_mask, img.features = d_mask, list(features)
    img.vendor = "rocm" if arch.startswith("gfx") else "cuda"
    img.block_m, img.block_n, img.num_warps = 128, 64, 4
    img.warp_size = 64 if img.vendor == "rocm" else 32
    img.shared_bytes = SYNTHETIC_SHARED[(arch, head_dim)] if shared is None else shared
    img.align16 = True
    img.kernel_name = "attn_fwd"
    if arch in PTX_TARGET:
        img.has_ptx = True
        img.ptx.target = PTX_TARGET[arch]
        img.ptx.portable = not PTX_TARGET[arch].endswith("a")
    return img


def synthetic_registry(archs=tuple(PTX_TARGET) + ("gfx90a", "gfx942")):
    reg = _C.Registry()
    for arch in archs:
        for dtype in ("fp16", "bf16"):
            for head_dim in (64, 128):
                for layout, kinds in (("dense", KINDS), ("varlen", VARLEN_KINDS)):
                    for d_mask, features in kinds:
                        reg.add(synthetic_image(arch, dtype, head_dim, d_mask, features, layout=layout))
    return reg


def problem(dtype="bf16", head_dim=128, features=(), batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16,
            nheads_k=16, aligned16=True, max_head_extent=None, layout="dense"):
    p = _C.Problem()
    p.layout = layout
    p.dtype, p.head_dim, p.features, p.batch, p.seqlen_q, p.seqlen_k = (dtype, head_dim, list(features), batch,
                                                                         seqlen_q, seqlen_k)
    p.nheads, p.nheads_k, p.aligned16 = nheads, nheads_k, aligned16
    p.max_head_extent = max_head_extent if max_head_extent is not None else seqlen_k * nheads_k * head_dim
    return p


@pytest.fixture
def on_device(monkeypatch):
    """on_device(arch): the tensors' device described as a synthetic GPU of DEVICES (the device probe is the one part
    of the policy that needs a real one; selection runs for real against the installed build)."""
    def use(arch):
        monkeypatch.setattr(devices, "describe", lambda device: (DEVICES[arch], "", ""))
    return use


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny shapes: more threads only add synchronisation (several times slower
    on a busy 2-core machine)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def fresh_announcements():
    """Forget which fallback reasons were already announced, so a test sees the first warning."""
    policy._announced.clear()
    yield
    policy._announced.clear()
