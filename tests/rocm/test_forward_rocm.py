"""The forward kernels on a real AMD GPU (gfx90a/gfx942 images), through the dispatcher, against float64."""

import json
import subprocess
import sys

import pytest
import torch

import fa2rt
from fa2rt import devices
from fa2rt.fallback import sdpa_attention
from fa2rt.reference import attention_reference

DEVICE = torch.device("cuda", 0)  # torch's ROCm build exposes HIP devices as "cuda"
SHAPES = [(2, 1024, 1024, 8, 8), (1, 257, 300, 4, 2), (1, 300, 257, 4, 1), (3, 1, 77, 2, 2)]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def test_device_arch_is_normalised():
    info = devices.probe("rocm", 0)
    assert info.arch == info.arch_raw.split(":")[0] and info.warp_size == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_matches_reference(dtype, head_dim, causal, shape):
    b, nq, nk, h, hk = shape
    q = torch.randn(b, nq, h, head_dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(b, nk, hk, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    decision = fa2rt.explain(q, k, v, causal=causal)
    assert decision.path == "kernel" and decision.mode == "native", decision
    out, lse = fa2rt.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    sdpa, _ = sdpa_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * rel_err(sdpa, ref) + 1e-4
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~seen) and (lse.double() - ref_lse)[seen].abs().max().item() < 1e-3


def test_doctor_requires_rocm_and_passes():
    r = subprocess.run([sys.executable, "-m", "fa2rt.doctor", "--json", "--require", "rocm"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(d["path"] == "kernel" for d in json.loads(r.stdout)["decisions"])
