"""The doctor on a machine with no GPU: text and JSON output, exit codes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fa2rt import doctor, hip_probe

# This machine has no HIP runtime: hip-python, when installed (tox's cpu env pins it), imports but cannot load it.
ROCM_STATE = hip_probe.STATE_NO_RUNTIME if importlib.util.find_spec("hip") else hip_probe.STATE_NOT_INSTALLED


def run_doctor(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fa2rt.doctor", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_text_report_is_healthy_on_cpu():
    r = run_doctor()
    assert r.returncode == doctor.EXIT_HEALTHY, r.stdout + r.stderr
    for section in ("[drivers]", "[devices]", "[torch]", "[rocm]", "[build]", "[decisions]", "[numerical check]",
                    "[verdict]"):
        assert section in r.stdout
    assert "no GPU visible" in r.stdout and "SDPA fallback [not_gpu]" in r.stdout
    assert f"[rocm] (through hip-python)\n  {ROCM_STATE}: " in r.stdout
    assert "FAIL" not in r.stdout


def test_json_report():
    r = run_doctor("--json")
    assert r.returncode == doctor.EXIT_HEALTHY, r.stderr
    report = json.loads(r.stdout)
    assert report["schema_version"] == doctor.DOCTOR_SCHEMA
    assert report["verdict"] == {"exit_code": 0, "status": "healthy", "problems": []}
    assert not report["drivers"]["cuda"]["available"]
    assert report["build"]["images"] > 0 and report["build"]["bad_files"] == []
    assert report["checks"] and all(c["ok"] and c["rel_error"] < c["tolerance"] for c in report["checks"])
    assert report["rocm"]["state"] == ROCM_STATE and report["rocm"]["summary"] and report["rocm"]["devices"] == []


@pytest.mark.parametrize("vendor", ["cuda", "rocm"])
def test_require_unmet(vendor):
    r = run_doctor("--json", "--require", vendor)
    assert r.returncode == doctor.EXIT_REQUIRE_UNMET
    report = json.loads(r.stdout)
    problem = report["verdict"]["problems"][0]
    assert problem.startswith(f"--require {vendor}: no usable {vendor} GPU found")
    assert f"fa2rt's {vendor} driver probe: cannot open" in problem
    if vendor == "rocm":
        assert report["rocm"]["state"] == ROCM_STATE
        assert f"hip-python state {ROCM_STATE}: {report['rocm']['summary']}" in problem


def test_corrupt_image_fails_the_doctor(tmp_path):
    from fa2rt import builds

    src = builds.current_build().directory
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = next(p for p in tmp_path.iterdir() if p.suffix in (".cubin", ".hsaco"))
    victim.write_bytes(victim.read_bytes() + b"x")
    r = run_doctor("--json", env={"FA2RT_KERNEL_DIR": str(tmp_path)})
    report = json.loads(r.stdout)
    assert r.returncode == doctor.EXIT_CHECK_FAILED
    assert any(victim.name in bad for bad in report["build"]["bad_files"])


def test_internal_error_exit_code(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    r = run_doctor("--json", env={"FA2RT_KERNEL_DIR": str(tmp_path)})
    assert r.returncode == doctor.EXIT_INTERNAL
    assert "JSONDecodeError" in json.loads(r.stdout)["verdict"]["problems"][0]
