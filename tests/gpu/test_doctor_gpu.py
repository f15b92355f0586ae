"""The doctor on a GPU machine: device, chosen images and a passing numerical check."""

import json
import subprocess
import sys


def test_doctor_reports_kernels_and_passes():
    r = subprocess.run([sys.executable, "-m", "fa2rt.doctor", "--json", "--require", "cuda"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["devices"] and report["devices"][0]["vendor"] == "cuda"
    assert all(d["path"] == "kernel" for d in report["decisions"]), report["decisions"]
    kernel_checks = [c for c in report["checks"] if c["image"]]
    assert kernel_checks and all(c["ok"] for c in report["checks"])
