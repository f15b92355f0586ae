"""The GPU suites must fail, not skip, on a machine without their GPU (this one)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("suite, vendor", [("gpu", "NVIDIA"), ("rocm", "AMD")])
def test_gpu_suite_fails_without_its_gpu(suite, vendor):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / suite)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stdout[-2000:]
    assert f"needs an {vendor} GPU" in r.stdout + r.stderr
