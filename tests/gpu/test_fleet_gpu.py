"""The fleet doctor on one GPU machine: ranks sharing the GPU through gloo on localhost.

Mixed: rank 0 runs the native images, rank 1 has FA2RT_FORCE_ARCH=sm80 (the sm80 images through PTX, standing in for
an A100 node's kernels), rank 2 sees no GPU (CUDA_VISIBLE_DEVICES=""). Uniform: two ranks on the native images.
Run with -s to see the reports (the closing note quotes them):
    python -m pytest tests/gpu/test_fleet_gpu.py -q -s
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from fa2rt import config, fleet


def run_fleet(rank_envs, timeout_s=600):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("FA2RT_")}
    # gloo on the loopback interface: every rank is on this machine.
    base.update({config.FLEET_TIMEOUT: "120", config.FLEET_JOIN_TIMEOUT: "120", "GLOO_SOCKET_IFNAME": "lo"})
    procs = [subprocess.Popen([sys.executable, "-m", "fa2rt.doctor", "--fleet", "--json"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(base, RANK=str(rank), WORLD_SIZE=str(len(rank_envs)), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), LOCAL_RANK=str(rank), **extra))
             for rank, extra in enumerate(rank_envs)]
    try:
        outs = [p.communicate(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def mixed():
    codes, outs = run_fleet([{}, {config.FORCE_ARCH: "sm80"}, {"CUDA_VISIBLE_DEVICES": ""}])
    assert outs[0][0], outs[0][1][-4000:]
    result = json.loads(outs[0][0])
    print("\n" + fleet.render_text(result))
    print("speed:", [(r["rank"], r["speed"]) for r in result["ranks"]])
    print("pairs:", json.dumps(result["numerics"], indent=1))
    return codes, result


def test_mixed_fleet_report(mixed):
    codes, result = mixed
    assert codes == [fleet.EXIT_DIVERGENT] * 3, (codes, result["divergences"])
    ranks = {r["rank"]: r for r in result["ranks"]}
    assert ranks[0]["device"]["vendor"] == ranks[1]["device"]["vendor"] == "cuda"
    assert ranks[0]["device"]["arch"] == ranks[1]["device"]["arch"]
    assert ranks[0]["device"]["memory_bytes"] > 0 and ranks[0]["device"]["driver_version"]
    assert ranks[2]["device"]["vendor"] == "none" and ranks[2]["torch_device"] == "cpu"
    assert {d["mode"] for d in ranks[0]["decisions"]} == {"native"}
    assert {d["mode"] for d in ranks[1]["decisions"]} == {"ptx-jit"}
    assert all(c["ok"] for r in result["ranks"] for c in r["checks"])
    assert all(c["path"] == "kernel" for r in (ranks[0], ranks[1]) for c in r["checks"])
    found = {d["kind"]: d for d in result["divergences"]}
    assert found["image_mismatch"]["ranks"] == [1] and config.FORCE_ARCH in found["image_mismatch"]["fix"]
    assert set(found) <= {"image_mismatch", "speed_outlier"}, found
    # The sm80 images through PTX are slower on an sm90 part than its own (README: about 0.7x at d128).
    assert ranks[1]["speed"]["tflops"] < ranks[0]["speed"]["tflops"]
    # Across ranks every pair of (arch, path) agrees to within the dtype's tolerance of the float64 check.
    for pair in result["numerics"]["pairs"]:
        assert pair["rel_diff"] is not None and pair["rel_diff"] < 3e-2, pair


def test_uniform_gpu_fleet_exits_0():
    codes, outs = run_fleet([{}, {}])
    result = json.loads(outs[0][0])
    print("\n" + fleet.render_text(result))
    assert codes == [fleet.EXIT_UNIFORM] * 2, result["divergences"]
    assert result["numerics"]["max_rel_diff_vs_rank"]["1"] == 0.0  # same image, same GPU: the same bits
