"""The seeded fuzz on the GPU: every case of tests/fuzz_cases.py (dense, varlen, paged prefill) and of
tests/fuzz_kvcache.py's GPU draw (KV-cache calls) through the native images and through the sm89 and sm80 images'
PTX, each checked against the float64 reference; compute-sanitizer memcheck on a sample of the cases and racecheck
on a few.

The cases run in worker processes (tests/gpu/fuzz_worker.py): a device fault kills the CUDA context, so a faulting
case is reported as a fault (its test fails) and a fresh worker carries on with the next case, instead of every later
case failing with it. FA2RT_FUZZ_REPORT=path writes every case's outcome (path, image, errors) as JSON.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fuzz_cases import all_cases
from fuzz_kvcache import gpu_cases

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
CASES = all_cases()
KV_CASES = gpu_cases()
PATHS = {"native": "", "sm89-ptx": "sm89", "sm80-ptx": "sm80"}
# Every eighth case, and every malformed one (unchecked cu_seqlens must not make a kernel leave its tensors).
MEMCHECK_SAMPLE = sorted({c.index for c in CASES[::8]} | {c.index for c in CASES if getattr(c, "malformed", None)})
KV_MEMCHECK_SAMPLE = [c.index for c in KV_CASES[::4]]
RACECHECK_SAMPLE = [c.index for c in CASES if getattr(c, "seqlen_q", 0) > 60 and getattr(c, "seqlen_k", 0) > 60][:3]
WORKER_TIMEOUT_S = 600
SANITIZER_TIMEOUT_S = 900


def _env(forced: str) -> dict:
    env = dict(os.environ, FA2RT_MIN_SEQLEN="0")  # the kernels at every length (the crossover is CPU-tested policy)
    env.pop("FA2RT_FORCE_ARCH", None)
    if forced:
        env["FA2RT_FORCE_ARCH"] = forced
    return env


def _records(stdout: str) -> list[dict]:
    return [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("FUZZ ")]


def run_isolated(forced: str, family: str = "attention", cases=CASES) -> dict:
    """case index -> outcome for every case of the family, restarting the worker after a fault or a crash. The worker
    runs the cases in their order from a position (--start), so positions, not indices, say where to go on."""
    results, position = {}, 0
    while position < len(cases):
        proc = subprocess.run([sys.executable, str(WORKER), "--family", family, "--start", str(position)],
                              env=_env(forced), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        for record in _records(proc.stdout):
            results[record["index"]] = record
        while position < len(cases) and cases[position].index in results:
            position += 1
        if position < len(cases) and proc.returncode != 0:
            # The worker died without a word on this case (a crash, not a caught fault): this case faulted.
            index = cases[position].index
            results[index] = {"index": index, "status": "fault",
                              "error": f"worker exited {proc.returncode}: {proc.stderr[-1500:]}"}
            position += 1
        elif position < len(cases):
            raise RuntimeError(f"worker exited 0 before case {cases[position].id}: {proc.stderr[-1500:]}")
    return results


def run_family(family: str, cases) -> dict:
    """path -> run_isolated's outcomes for every case of the family; each path's summary printed."""
    found = {name: run_isolated(forced, family, cases) for name, forced in PATHS.items()}
    for name, results in found.items():
        statuses = Counter(r["status"] for r in results.values())
        paths = Counter(r.get("path", "?") for r in results.values())
        copies = sum(bool(r.get("copies")) for r in results.values())
        print(f"\n{family} fuzz {name}: {len(results)} cases, {dict(statuses)}, paths {dict(paths)}, "
              f"fallback calls that copy for SDPA {copies}")
    return found


@pytest.fixture(scope="session")
def outcomes():
    found = run_family("attention", CASES)
    report = os.environ.get("FA2RT_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(found, indent=1))
    return found


@pytest.fixture(scope="session")
def kv_outcomes():
    return run_family("kvcache", KV_CASES)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case_gpu(outcomes, path, case):
    record = outcomes[path][case.index]
    assert record["status"] == "pass", record


def test_fuzz_reaches_kernels_and_fallback(outcomes):
    # The generator must exercise both sides of the dispatcher on the GPU, and the layouts that need a copy.
    native = outcomes["native"].values()
    paths = Counter(r.get("path") for r in native)
    assert paths["kernel"] >= 60 and paths["fallback"] >= 20 and paths["malformed"] >= 10, paths
    assert any(r.get("copies") for r in native), "no fallback call needed a copy: the misaligned views are not covered"


def _sanitize(tool: str, indices: list[int], extra=(), family: str = "attention") -> subprocess.CompletedProcess:
    env = _env("")
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every allocation its own, so an overrun leaves it
    cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", *extra, sys.executable, str(WORKER),
           "--family", family, "--no-check", "--only", ",".join(map(str, indices))]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S)


def _memcheck(indices: list[int], family: str = "attention") -> None:
    proc = _sanitize("memcheck", indices, family=family)
    records = _records(proc.stdout)
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr, proc.stdout[-4000:]
    assert len(records) == len(indices) and all(r["status"] == "pass" for r in records), records


def test_memcheck_sample():
    _memcheck(MEMCHECK_SAMPLE)


def test_racecheck_few():
    assert len(RACECHECK_SAMPLE) == 3
    proc = _sanitize("racecheck", RACECHECK_SAMPLE)
    records = _records(proc.stdout)
    summary = "RACECHECK SUMMARY: 0 hazards displayed (0 errors"
    assert proc.returncode == 0 and summary in proc.stdout, proc.stdout[-4000:]
    assert len(records) == len(RACECHECK_SAMPLE) and all(r["status"] == "pass" for r in records), records


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", KV_CASES, ids=[c.id for c in KV_CASES])
def test_fuzz_kvcache_case_gpu(kv_outcomes, path, case):
    record = kv_outcomes[path][case.index]
    assert record["status"] == "pass", record


def test_fuzz_kvcache_reaches_kernels_and_fallback(kv_outcomes):
    # Head dims that are multiples of 8 run the decode kernels (split or not), the others the fallback.
    native = kv_outcomes["native"].values()
    paths = Counter(r.get("path") for r in native)
    assert paths["kernel"] >= 30 and paths["fallback"] >= 5, paths
    # A kernel decision's message starts with its split count ("3 split(s)").
    assert any(r.get("path") == "kernel" and not r["message"].startswith("1 ") for r in native), "no call split"


def test_memcheck_kvcache_sample():
    _memcheck(KV_MEMCHECK_SAMPLE, "kvcache")


def test_misaligned_head_stride_falls_back_without_fault(fresh_announcements):
    # The report that started the fuzz: head stride 68 (a sliced last dim), which every image refuses (alignment);
    # the fallback must copy it for SDPA (and say so) instead of faulting, forward and backward.
    import torch

    import fa2rt
    from fa2rt.reference import attention_reference

    g = torch.Generator(device="cuda").manual_seed(15)
    q = torch.randn(2, 129, 4, 68, device="cuda", dtype=torch.float16, generator=g)[..., :64].requires_grad_()
    k, v = (torch.randn(2, 129, 4, 64, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
            for _ in range(2))
    decision = fa2rt.explain(q, k, v, causal=True)
    assert decision.path == "fallback" and [name for name, _ in decision.copies] == ["q"], decision
    assert "copies q for SDPA" in str(decision)
    with pytest.warns(fa2rt.FallbackWarning):
        out = fa2rt.attention(q, k, v, causal=True)
    grad_out = torch.randn(2, 129, 4, 72, device="cuda", dtype=torch.float16, generator=g)[..., :64]
    out.backward(grad_out)
    torch.cuda.synchronize()
    ref = attention_reference(q.detach(), k.detach(), v.detach(), causal=True)[0]
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4e-3
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
