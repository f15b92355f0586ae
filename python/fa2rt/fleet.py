"""python -m fa2rt.doctor --fleet: every rank of a torch.distributed job probes itself, rank 0 compares them.

Started under torchrun, or with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK, default 0) set. fa2rt opens
no socket itself: the check-ins go through torch's TCPStore at MASTER_ADDR:MASTER_PORT (torchrun's own store when it
hosts one), the reports through a gloo process group (CPU, any vendor, no NCCL).

Steps. join: every rank checks in; rank 0 waits FA2RT_FLEET_JOIN_TIMEOUT (default 300 s) and goes on with those that
came. probe: the ranks of one host probe one at a time (decisions, the seeded numerical checks, the speed probe), so
ranks sharing a GPU or a CPU do not time each other's work. reports: rank 0 waits for the ranks' check-ins until none
has come for FA2RT_FLEET_TIMEOUT (default 120 s); the answering ranks form a gloo group (collective timeout
FA2RT_FLEET_TIMEOUT), gather their reports to rank 0 and compare their outputs across ranks; when a rank dies
there, the survivors check in once more (step retry) and exchange without it. Every rank that never joins or stops
answering is named in the report. The other ranks give up on rank 0 after twice a step's timeout without progress,
so nothing hangs (short of rank 0's own probe hanging in a driver call): the run ends at most the join timeout plus
one step timeout per rank and two more after it starts; in practice the join timeout, or the step timeout after the
last answer, past the probes.

Exit codes (EXIT_CODES, the same on every rank): 0 every rank answered, healthy, no divergence; 10 divergences;
11 an unhealthy rank (numerical check failed, --require unmet, corrupt images, a probe error); 12 a rank never joined
or stopped answering; 13 not started under a torch.distributed launcher; 4 internal error.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
import torch.distributed as dist

import fa2rt

from . import _C, builds, config, devices, doctor, packages, policy, routing
from .api import attention, explain
from .policy import FallbackWarning

FLEET_SCHEMA = 1
EXIT_UNIFORM, EXIT_DIVERGENT, EXIT_UNHEALTHY, EXIT_MISSING, EXIT_LAUNCH = 0, 10, 11, 12, 13
EXIT_CODES = {
    EXIT_UNIFORM: "every rank answered, healthy and uniform",
    EXIT_DIVERGENT: "divergences between ranks",
    EXIT_UNHEALTHY: "an unhealthy rank",
    EXIT_MISSING: "a rank never joined or stopped answering",
    EXIT_LAUNCH: "not started under a torch.distributed launcher",
    doctor.EXIT_INTERNAL: "internal error",
}
EXIT_PRECEDENCE = (EXIT_MISSING, EXIT_UNHEALTHY, EXIT_DIVERGENT)  # the most serious finding decides the exit code

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STEPS = ("join", "probe", "reports", "exchange")  # where FA2RT_FLEET_FAULT can strike
POLL_S = 0.05

# The problems every rank runs for the cross-rank comparison: (dtype, head_dim, causal, seed) on doctor.CHECK_SHAPE.
FLEET_CHECKS = ((torch.float16, 64, False, 1), (torch.bfloat16, 128, True, 2))
# A rank is a numerics outlier when its error against float64 exceeds this factor times the lowest error of the ranks
# running the same (arch, path), plus the floor: the same image on the same arch gives the same numbers.
NUMERICS_FACTOR, NUMERICS_FLOOR = 2.0, 1e-4
SPEED_OUTLIER = 0.8  # below this fraction of the median TFLOP/s of the ranks of its arch
# The speed probe: one fixed problem per device type (a GPU problem would take minutes on a CPU).
SPEED_PROBLEMS = {
    "cuda": dict(dtype=torch.bfloat16, batch=4, seqlen=2048, nheads=16, head_dim=128, causal=False),
    "cpu": dict(dtype=torch.float32, batch=1, seqlen=256, nheads=4, head_dim=64, causal=False),
}
SPEED_CALLS, SPEED_ROUNDS = 10, 5  # best of SPEED_ROUNDS rounds of SPEED_CALLS calls: interference only slows

# FA2RT_FLEET_STAND_IN: synthetic GPUs (vendor, shared opt-in bytes, SMs/CUs, warp size, name) a CPU rank can stand in
# for, so CI can give ranks different archs; selection runs for real against the installed images.
STAND_INS = {
    "sm75": ("cuda", 65536, 40, 32, "T4"),
    "sm80": ("cuda", 166912, 108, 32, "A100"),
    "sm86": ("cuda", 101376, 84, 32, "A10"),
    "sm89": ("cuda", 101376, 142, 32, "L40S"),
    "sm90": ("cuda", 232448, 132, 32, "H100"),
    "gfx90a": ("rocm", 65536, 104, 64, "MI250X"),
    "gfx942": ("rocm", 65536, 304, 64, "MI300X"),
}
# FA2RT_FLEET_FAULT: injected faults for tests, name -> what its argument is.
FAULTS = {
    "die": "exit at once (status 3) at this step: join, probe, reports or exchange",
    "hang": "sleep at this step (join, probe, reports or exchange), 600 s or the seconds given after a second colon",
    "slow": "run the speed probe's problem FACTOR times per counted call",
    "perturb": "add noise of this relative size to the outputs of the numerical checks",
}

# Why a rank falls back where ranks of its arch run kernels, and what to do about it.
FALLBACK_FIXES = {
    "disabled": f"unset {config.DISABLE}",
    "short_sequence": f"check {config.MIN_SEQLEN}",
    "driver_unavailable": "install or repair the GPU driver (fa2rt opens libcuda.so.1 / libamdhip64.so)",
    "no_kernel": f"compare the kernel packages and {config.KERNEL_DIR} / {config.FORCE_ARCH} with the other ranks",
    "not_gpu": "this rank sees no GPU: check CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES and the launcher's binding",
}


class LaunchError(ValueError):
    """The process was not started as a rank of a torch.distributed job."""


class Stopped(Exception):
    """SIGTERM arrived (torchrun stops every rank when one exits)."""


class NotAMember(Exception):
    """Rank 0 closed a step without this rank (it came after the deadline)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str = ""
    step: str = ""
    value: float = 0.0


# ---------------------------------------------------------------------------------------------------------- settings

def _int_var(environ, name: str, low: int, high: int | None = None) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value >= high):
        bound = f"an integer >= {low}" + (f" and < {high}" if high is not None else "")
        raise LaunchError(f"{name}: expected {bound}, got {raw!r}")
    return value


def launch_from_env(environ) -> Launch:
    """The rank's place in the job from the standard variables (torchrun sets them all)."""
    missing = [name for name in LAUNCH_VARS if not environ.get(name)]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: start the fleet doctor under torchrun (torchrun "
                          f"--nproc-per-node N -m fa2rt.doctor --fleet) or set {', '.join(LAUNCH_VARS)} on every rank")
    world = _int_var(environ, "WORLD_SIZE", 1)
    return Launch(rank=_int_var(environ, "RANK", 0, world), world_size=world,
                  local_rank=_int_var(dict(environ, LOCAL_RANK=environ.get("LOCAL_RANK") or "0"), "LOCAL_RANK", 0),
                  master_addr=environ["MASTER_ADDR"], master_port=_int_var(environ, "MASTER_PORT", 1, 65536),
                  agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def fault_from_env() -> Fault:
    raw = os.environ.get(config.FLEET_FAULT, "").strip()
    if not raw:
        return Fault()
    kind, _, rest = raw.partition(":")
    try:
        if kind in ("die", "hang"):
            step, _, seconds = rest.partition(":")
            if step not in STEPS:
                raise ValueError
            return Fault(kind, step, float(seconds or 600))
        if kind in ("slow", "perturb"):
            return Fault(kind, "probe", float(rest))
    except ValueError:
        pass
    forms = "; ".join(f"{name}: {what}" for name, what in FAULTS.items())
    raise ValueError(f"{config.FLEET_FAULT}: expected one of ({forms}), got {raw!r}")


def stand_in() -> "_C.DeviceInfo | None":
    arch = os.environ.get(config.FLEET_STAND_IN, "").strip()
    if not arch:
        return None
    if arch not in STAND_INS:
        raise ValueError(f"{config.FLEET_STAND_IN}: expected one of {', '.join(STAND_INS)}, got {arch!r}")
    vendor, shared, sms, warp, name = STAND_INS[arch]
    return _C.DeviceInfo(vendor, arch, shared, sms, warp, f"{name} (stand-in)")


def inject(fault: Fault, step: str) -> None:
    """Act out FA2RT_FLEET_FAULT's die/hang when this rank reaches `step`."""
    if fault.step != step or fault.kind not in ("die", "hang"):
        return
    if fault.kind == "die":
        os._exit(3)
    time.sleep(fault.value)


# ---------------------------------------------------------------------------------------------------- kernel builds

def kernel_packages() -> list[dict]:
    """The kernel images this rank sees, one entry per source (the source install's own images, each installed
    fa2rt-kernels-<arch> package, FA2RT_KERNEL_DIR), loaded or not: what the fleet compares across ranks (version
    and manifest digest per arch)."""
    entries = []
    for source in builds.current_build().sources:
        manifest = source.directory / "manifest.json"
        entries.append({**source.summary(), "error": source.reason,
                        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
                        if manifest.is_file() else None})
    return [e for e in entries if e["status"] == builds.LOADED] + [e for e in entries if e["status"] != builds.LOADED]


def install_hint(arch: str, version: str) -> str:
    """How to get images for a device arch: the package of the image arch that serves it natively or compatibly."""
    serving = [image for device, image, _ in _C.arch_compat_table() if device == arch]
    if not serving:
        return f"no fa2rt kernels exist for {arch}: this rank runs the SDPA fallback by design"
    return packages.pip_line(serving[0], version)


# ------------------------------------------------------------------------------------------------------- the probe

def rank_device(launch: Launch) -> torch.device:
    if torch.cuda.is_available():
        index = launch.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _perturbation(relative: float):
    def add_noise(out):
        gen = torch.Generator(device="cpu").manual_seed(12345)
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        scale = relative * out.double().norm() / noise.norm()
        return (out.double() + scale * noise).to(out.dtype)
    return add_noise


def check_problems(device, fault: Fault) -> tuple[list[dict], dict]:
    """FLEET_CHECKS on this rank: rows (the doctor's numerical check with its id) and the outputs on the CPU."""
    transform = _perturbation(fault.value) if fault.kind == "perturb" else None
    rows, outputs = [], {}
    for dtype, head_dim, causal, seed in FLEET_CHECKS:
        row, out = doctor.numerical_check(device, dtype, head_dim, causal, seed, transform)
        row["id"] = f"{row['dtype']} d{head_dim}{' causal' if causal else ''}"
        rows.append(row)
        outputs[row["id"]] = out.detach().cpu()
    return rows, outputs


def _timed(device, fn) -> float:
    """Seconds fn takes: wall clock on a GPU; on the CPU this process's CPU time on one thread, so that the load of
    a shared host (other ranks, other jobs) does not decide the figure."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        fn()
        return time.process_time() - start
    finally:
        torch.set_num_threads(threads)


def speed_probe(device, fault: Fault) -> dict:
    """TFLOP/s of SPEED_PROBLEMS[device type] (forward FLOPs 4 B H N^2 D, halved when causal), best of the rounds."""
    p = SPEED_PROBLEMS[device.type]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(p["batch"], p["seqlen"], p["nheads"], p["head_dim"], generator=gen).to(device, p["dtype"])
               for _ in range(3))
    repeat = int(fault.value) if fault.kind == "slow" else 1

    def calls(n):
        for _ in range(n):
            attention(q, k, v, causal=p["causal"])

    with config.overridden(config.ROUTING, "0"):  # the probe times fa2rt's own kernels
        decision = explain(q, k, v, causal=p["causal"])
        _timed(device, lambda: calls(2))  # warm-up: first loads, allocator
        best = min(_timed(device, lambda: calls(SPEED_CALLS * repeat)) for _ in range(SPEED_ROUNDS)) / SPEED_CALLS
    flops = 4 * p["batch"] * p["nheads"] * p["seqlen"] ** 2 * p["head_dim"] / (2 if p["causal"] else 1)
    name = (f"{str(p['dtype']).removeprefix('torch.')} b{p['batch']} s{p['seqlen']} h{p['nheads']} d{p['head_dim']}"
            + (" causal" if p["causal"] else ""))
    return {"problem": name, "seconds": best, "tflops": flops / best / 1e12, "clock": "wall" if device.type == "cuda"
            else "process CPU time, one thread", "path": decision.path, "image": decision.image,
            "reason": decision.reason}


class _StandIn:
    """Describe every device as the stand-in while deciding (devices.describe is what the policy asks)."""

    def __init__(self, info):
        self.info, self.saved = info, devices.describe

    def __enter__(self):
        if self.info is not None:
            devices.describe = lambda device: (self.info, "", "")

    def __exit__(self, *exc):
        devices.describe = self.saved


def _guarded(fn, *args):
    try:
        return fn(*args), ""
    except Exception as exc:  # noqa: BLE001 - a failing probe is reported as the rank's problem, not fatal
        return None, f"{type(exc).__name__}: {exc}"


def probe_rank(launch: Launch, require: str | None, fault: Fault) -> tuple[dict, dict]:
    """This rank's report (plain data) and its check outputs."""
    device = rank_device(launch)
    info = stand_in()
    errors = {}
    with warnings.catch_warnings(), _StandIn(info):
        warnings.simplefilter("ignore", FallbackWarning)
        facts, errors["device"] = _guarded(doctor.device_facts, device, info)
        decisions, errors["decisions"] = _guarded(doctor.decisions, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        checked, errors["checks"] = _guarded(check_problems, device, fault)
        speed, errors["speed"] = _guarded(speed_probe, device, fault)
    build, errors["build"] = _guarded(doctor.verify_build)
    checks, outputs = checked or ([], {})
    facts = facts or {"vendor": "none", "arch": "unknown", "name": "?"}
    facts["stand_in"] = info is not None
    report = {
        "rank": launch.rank, "local_rank": launch.local_rank, "host": platform.node(), "pid": os.getpid(),
        "fa2rt_version": fa2rt.__version__, "torch_version": torch.__version__, "torch_device": str(device),
        "device": facts, "kernel_packages": kernel_packages(),
        "bad_files": (build or {}).get("bad_files", []),
        "settings": {name: os.environ[name] for name in (*config.ENV_VARS, *config.FLEET_ENV_VARS)
                     if name in os.environ},
        "decisions": decisions or [], "checks": checks, "speed": speed,
        "short_sequence": policy.short_sequence_rule(facts["arch"]),
        "routing": routing.summary(facts["arch"]),
        "probe_errors": {layer: error for layer, error in errors.items() if error},
    }
    report["require_met"] = require is None or facts.get("vendor") == require and not facts.get("unusable")
    return report, outputs


# ---------------------------------------------------------------------------------------- check-ins through the store

class Rendezvous:
    """Store-based check-ins with deadlines: rank 0 decides who is in at each step, everyone else waits for that."""

    def __init__(self, launch: Launch, join_timeout: float, timeout: float):
        self.launch, self.join_timeout, self.timeout = launch, join_timeout, timeout
        wait = datetime.timedelta(seconds=2 * max(join_timeout, timeout) + 10)
        is_host = launch.rank == 0 and not launch.agent_store
        base = dist.TCPStore(launch.master_addr, launch.master_port, None, is_host, wait, wait_for_workers=False)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"fa2rt-fleet/{restart}", base)
        self.members = list(range(launch.world_size))

    def check_in(self, step: str, payload: dict) -> dict:
        """Arrive at `step`; returns rank 0's roster {"members": [...], "missing": [...], "payloads": {rank: ...}}."""
        rank = self.launch.rank
        self.store.set(f"{step}/rank/{rank}", json.dumps(payload))
        self.store.add(f"{step}/count", 1)
        if rank == 0:
            roster = self._close(step)
            self.store.set(f"{step}/roster", json.dumps(roster))
        else:
            patience = 2 * (self.join_timeout if step == "join" else self.timeout)
            roster = json.loads(self._wait(f"{step}/roster", patience, f"rank 0's roster of step {step}",
                                           progress=f"{step}/count"))
        if rank not in roster["members"]:
            raise NotAMember(f"rank 0 closed step {step} without rank {rank} (it came after the deadline)")
        self.members = roster["members"]
        return roster

    def _close(self, step: str) -> dict:
        """Wait for every member: at join until the join timeout; at a later step until no rank has checked in for
        the step timeout (the ranks of a host arrive one after another, as they probe in turn)."""
        counter, expected = f"{step}/count", len(self.members)
        timeout = self.join_timeout if step == "join" else self.timeout
        deadline, seen = time.monotonic() + timeout, 0
        while (count := self.store.add(counter, 0)) < expected and time.monotonic() < deadline:
            if count != seen and step != "join":
                deadline, seen = time.monotonic() + timeout, count
            time.sleep(POLL_S)
        present = [r for r in self.members if self.store.check([f"{step}/rank/{r}"])]
        payloads = {str(r): json.loads(self.store.get(f"{step}/rank/{r}")) for r in present}
        return {"members": present, "missing": [r for r in self.members if r not in present], "payloads": payloads}

    def _wait(self, key: str, timeout: float, what: str, progress: str = "") -> str:
        """The value of `key` once set; TimeoutError after `timeout` s without it (counted from the last change of
        the `progress` counter: rank 0 is still waiting for others then)."""
        deadline, seen = time.monotonic() + timeout, None
        while not self.store.check([key]):
            if progress and (count := self.store.add(progress, 0)) != seen:
                deadline, seen = time.monotonic() + timeout, count
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come within {timeout:.0f} s: rank 0 stopped answering")
            time.sleep(POLL_S)
        return self.store.get(key).decode()

    def take_turn(self, hosts: dict) -> None:
        """Wait until the previous rank of this host has probed (half the step timeout at most: it may have died)."""
        mine = hosts[str(self.launch.rank)]
        peers = sorted(int(r) for r, host in hosts.items() if host == mine)
        before = [r for r in peers if r < self.launch.rank]
        if before:
            try:
                self._wait(f"probe/done/{before[-1]}", self.timeout / 2, "the previous rank's probe")
            except TimeoutError:
                pass

    def turn_done(self) -> None:
        self.store.set(f"probe/done/{self.launch.rank}", "1")

    def finish(self, code: int) -> int:
        """Rank 0 publishes the exit code and waits (briefly) for the others to read it; they exit with it."""
        if self.launch.rank == 0:
            self.store.set("final", str(code))
            deadline = time.monotonic() + min(self.timeout, 10)
            while self.store.add("final/acks", 0) < len(self.members) - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
            return code
        code = int(self._wait("final", 2 * self.timeout, "rank 0's verdict"))
        self.store.add("final/acks", 1)
        return code


# ------------------------------------------------------------------------------------------- the exchange over gloo

def group_key(report: dict, check: dict) -> str:
    """The (arch, path) a check ran on: ranks with the same key should compute the same numbers."""
    return f"{report['device']['arch']}/{check['image'] or 'sdpa'}"


def representatives(reports: list[dict]) -> dict:
    """{check id: {group key: lowest rank of that group}}; rank 0 represents its own groups."""
    reps = defaultdict(dict)
    for report in sorted(reports, key=lambda r: r["rank"]):
        for check in report["checks"]:
            reps[check["id"]].setdefault(group_key(report, check), report["rank"])
    return dict(reps)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def exchange(members: list[int], rank: int, report: dict, outputs: dict, timeout: float, attempt: str,
             store) -> tuple[list[dict], dict] | None:
    """Over a gloo group of `members`: the reports gathered to rank 0, and every rank's output differences against
    the representative of each (arch, path) group. Returns (reports, {rank: {check id: {group: diff}}}) on rank 0."""
    me, root = members.index(rank), 0
    dist.init_process_group("gloo", store=dist.PrefixStore(f"gloo/{attempt}", store), rank=me,
                            world_size=len(members), timeout=datetime.timedelta(seconds=timeout))
    try:
        gathered = [None] * len(members) if me == root else None
        dist.gather_object(report, gathered, dst=root)
        box = [representatives(gathered) if me == root else None]
        dist.broadcast_object_list(box, src=root)
        reps = box[0]
        diffs = defaultdict(dict)
        for rep in sorted({r for groups in reps.values() for r in groups.values()}):
            theirs = [outputs if rep == rank else None]
            dist.broadcast_object_list(theirs, src=members.index(rep))
            for check_id, groups in reps.items():
                for key, owner in groups.items():
                    if owner == rep and check_id in outputs and check_id in theirs[0]:
                        diffs[check_id][key] = rel_diff(outputs[check_id], theirs[0][check_id])
        all_diffs = [None] * len(members) if me == root else None
        dist.gather_object(dict(diffs), all_diffs, dst=root)
    finally:
        dist.destroy_process_group()
    if me != root:
        return None
    return gathered, {members[i]: d for i, d in enumerate(all_diffs)}


def numerics_table(reports: list[dict], diffs: dict) -> dict:
    """Differences between the (arch, path) groups per check, and each rank's difference from rank 0."""
    reps = representatives(reports)
    pairs = []
    for check_id, groups in reps.items():
        keys = sorted(groups)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                pairs.append({"check": check_id, "a": a, "b": b,
                              "rel_diff": diffs.get(groups[a], {}).get(check_id, {}).get(b)})
    first = min(r["rank"] for r in reports)
    vs_first = {}
    for report in reports:
        values = []
        for check in report["checks"]:
            groups = reps.get(check["id"], {})
            key = next((k for k, owner in groups.items() if owner == first), None)
            value = diffs.get(report["rank"], {}).get(check["id"], {}).get(key)
            if value is not None:
                values.append(value)
        vs_first[report["rank"]] = max(values) if values else None
    return {"pairs": pairs, "vs_rank": first, "max_rel_diff_vs_rank": vs_first}


# -------------------------------------------------------------------------------------------- the divergence rules

def _ranks(reports) -> list[int]:
    return sorted(r["rank"] for r in reports)


def _divergence(kind: str, ranks, detail: str, fix: str) -> dict:
    return {"kind": kind, "ranks": sorted(ranks), "detail": detail, "fix": fix}


def _gpu_ranks(reports):
    """Ranks with a GPU (or a stand-in for one): the only ones the per-arch rules compare."""
    return [r for r in reports if r["device"].get("vendor") in ("cuda", "rocm")]


def _by_arch(reports) -> dict:
    groups = defaultdict(list)
    for report in _gpu_ranks(reports):
        groups[report["device"]["arch"]].append(report)
    return groups


def rule_missing(fleet: dict) -> list[dict]:
    out = []
    for step, ranks in fleet["missing"].items():
        if not ranks:
            continue
        if step == "join":
            detail = f"never checked in within {config.FLEET_JOIN_TIMEOUT}={fleet['timeouts']['join']:g} s"
            fix = "check the launcher's log for that rank and that it can reach MASTER_ADDR:MASTER_PORT"
        else:
            detail = (f"joined but did not answer at step {step} within {config.FLEET_TIMEOUT}="
                      f"{fleet['timeouts']['step']:g} s (died or hung)" if step != "retry" else
                      "answered until the exchange of reports, then stopped answering (died or hung)")
            fix = "look at that rank's own output; rerun with a longer timeout if its probe is only slow"
        out.append(_divergence("rank_missing", ranks, detail, fix))
    if fleet.get("error"):
        out.append(_divergence("rank_missing", [], f"the exchange between ranks failed: {fleet['error']}",
                               "a rank stopped answering during the exchange; rerun"))
    return out


def rule_fa2rt_version(fleet: dict) -> list[dict]:
    versions = Counter(r["fa2rt_version"] for r in fleet["reports"])
    if len(versions) < 2:
        return []
    common = versions.most_common(1)[0][0]
    odd = [r for r in fleet["reports"] if r["fa2rt_version"] != common]
    seen = ", ".join(f"rank {r['rank']}: {r['fa2rt_version']}" for r in odd)
    return [_divergence("fa2rt_version", _ranks(odd), f"fa2rt {common} on most ranks; {seen}",
                        f"pip install fa2rt=={common} on those ranks")]


def _loaded(source: dict) -> bool:
    # A report from a rank whose fa2rt predates per-source status lists only what it loaded.
    return source.get("status", builds.LOADED) == builds.LOADED


def _source_of(report: dict, arch: str) -> dict | None:
    return next((p for p in report["kernel_packages"] if arch in p["archs"] and _loaded(p)), None)


def rule_kernel_packages(fleet: dict) -> list[dict]:
    """Ranks that load an arch's images from a manifest other than most ranks' (archs split alike: reported once).
    The manifest's digest decides: the images, not the package's name, make the numbers."""
    splits = defaultdict(list)
    archs = sorted({a for r in fleet["reports"] for p in r["kernel_packages"] for a in p["archs"] if _loaded(p)})
    for arch in archs:
        holders = defaultdict(list)
        for report in fleet["reports"]:
            source = _source_of(report, arch)
            if source is not None:
                holders[source["manifest_sha256"]].append(report["rank"])
        if len(holders) > 1:
            splits[tuple(sorted(tuple(ranks) for ranks in holders.values()))].append(arch)
    out = []
    by_rank = {r["rank"]: r for r in fleet["reports"]}
    for split, split_archs in splits.items():
        common = max(split, key=lambda ranks: (len(ranks), -min(ranks)))
        odd = [r for ranks in split if ranks != common for r in ranks]
        seen = "; ".join(f"ranks {list(ranks)}: " + _source_text(_source_of(by_rank[ranks[0]], split_archs[0]))
                         for ranks in split)
        overridden = [r for r in odd if config.KERNEL_DIR in by_rank[r]["settings"]]
        fix = (f"unset {config.KERNEL_DIR} on ranks {overridden} or point it at the same images" if overridden else
               "install the kernel packages of ranks "
               f"{list(common)} ({_source_text(_source_of(by_rank[common[0]], split_archs[0]))}) on those ranks")
        out.append(_divergence("kernel_package_mismatch", odd, f"{', '.join(split_archs)} images differ: {seen}",
                               fix))
    return out


def _source_text(source: dict) -> str:
    return f"{source['name']} {source['version'] or ''} manifest {(source['manifest_sha256'] or 'none')[:12]}"


def rule_no_images(fleet: dict) -> list[dict]:
    out = []
    for arch, reports in sorted(_by_arch(fleet["reports"]).items()):
        bare = [r for r in reports if not r["device"].get("usable_images")]
        if bare:
            version = bare[0]["fa2rt_version"]
            out.append(_divergence("no_images", _ranks(bare), f"no installed kernel image runs on {arch}: every call "
                                   "falls back to SDPA", install_hint(arch, version)))
    return out


def _decision_map(report: dict) -> dict:
    """The doctor's decisions by problem (a layout too where the doctor gives one: dense, varlen)."""
    return {(d["dtype"], d["head_dim"], d["causal"], d.get("layout", "dense")): d for d in report["decisions"]}


def rule_fallback_where_others_run_kernels(fleet: dict) -> list[dict]:
    bare = {r for d in rule_no_images(fleet) for r in d["ranks"]}  # their fix is the pip line
    out = []
    for arch, reports in sorted(_by_arch(fleet["reports"]).items()):
        kernel_problems = {key for r in reports for key, d in _decision_map(r).items() if d["path"] == "kernel"}
        odd, reasons = [], set()
        for report in reports:
            if report["rank"] in bare:
                continue
            falls = [d for key, d in _decision_map(report).items() if key in kernel_problems and d["path"] != "kernel"]
            if falls:
                odd.append(report["rank"])
                reasons |= {d["reason"] for d in falls}
        if odd:
            fixes = "; ".join(f"[{reason}] {FALLBACK_FIXES.get(reason, 'see fa2rt.explain on that rank')}"
                              for reason in sorted(reasons))
            out.append(_divergence("fallback_where_others_run_kernels", odd, f"{arch} ranks on the SDPA fallback for "
                                   f"problems other {arch} ranks run on kernels ({', '.join(sorted(reasons))})", fixes))
    return out


def rule_image_mismatch(fleet: dict) -> list[dict]:
    """Ranks of one arch that run another image than most ranks of the arch for the same problem (ties: the lowest
    rank's choice counts as most); problems a rank falls back on are the fallback rule's."""
    out = []
    for arch, reports in sorted(_by_arch(fleet["reports"]).items()):
        maps = [(r["rank"], _decision_map(r)) for r in sorted(reports, key=lambda r: r["rank"])]
        odd = {}
        for key in sorted({k for _, m in maps for k in m}, key=str):
            images = [(rank, m[key]["image"]) for rank, m in maps if key in m and m[key]["path"] == "kernel"]
            counts = Counter(image for _, image in images)
            common = max(counts, key=lambda img: (counts[img], -min(r for r, i in images if i == img)), default=None)
            odd.update({rank: image for rank, image in images if image != common and rank not in odd})
        if not odd:
            continue
        forced = {r["rank"]: r["settings"][config.FORCE_ARCH] for r in reports
                  if r["rank"] in odd and config.FORCE_ARCH in r["settings"]}
        fix = (f"{config.FORCE_ARCH} is set on ranks {forced}: unset it" if forced else
               "compare the kernel packages of these ranks with the others")
        images = "; ".join(f"rank {rank}: {image}" for rank, image in sorted(odd.items()))
        out.append(_divergence("image_mismatch", list(odd), f"{arch} ranks run other images than most {arch} ranks "
                               f"({images})", fix))
    return out


def rule_numerics_outlier(fleet: dict) -> list[dict]:
    errors = defaultdict(list)  # (check id, group) -> [(error, rank)]
    for report in fleet["reports"]:
        for check in report["checks"]:
            errors[(check["id"], group_key(report, check))].append((check["rel_error"], report["rank"]))
    odd = defaultdict(list)
    for (check_id, key), values in errors.items():
        best = min(e for e, _ in values)
        for err, rank in values:
            if err > NUMERICS_FACTOR * best + NUMERICS_FLOOR:
                odd[rank].append(f"{check_id} on {key}: {err:.2e} vs {best:.2e}")
    if not odd:
        return []
    return [_divergence("numerics_outlier", list(odd), "error against float64 above "
                        f"{NUMERICS_FACTOR:g}x the best rank on the same arch and path + {NUMERICS_FLOOR:g}: "
                        + "; ".join(f"rank {r}: {', '.join(v)}" for r, v in sorted(odd.items())),
                        "rerun the doctor on those ranks alone; check the GPU (ECC errors, clocks) and the images")]


def rule_speed_outlier(fleet: dict) -> list[dict]:
    out = []
    for arch, reports in sorted(_by_arch(fleet["reports"]).items()):
        timed = [r for r in reports if r["speed"]]
        if len(timed) < 2:
            continue
        median = statistics.median(r["speed"]["tflops"] for r in timed)
        slow = [r for r in timed if r["speed"]["tflops"] < SPEED_OUTLIER * median]
        if slow:
            seen = ", ".join(f"rank {r['rank']}: {r['speed']['tflops']:.3g}" for r in slow)
            out.append(_divergence("speed_outlier", _ranks(slow), f"TFLOP/s more than {1 - SPEED_OUTLIER:.0%} below "
                                   f"the {arch} median {median:.3g} ({seen})",
                                   "look at these ranks' decisions (fallback, forced arch), clocks, power and "
                                   "other processes on their GPU"))
    return out


def _routing_state(report: dict) -> tuple:
    # A report from a rank whose fa2rt predates routing has none: it runs fa2rt's kernels, as routing off does.
    s = report.get("routing") or {"enabled": False}
    return (False,) if not s["enabled"] else (True, s.get("source"), s.get("routed"), s.get("classes"), s.get("date"))


def _routing_text(report: dict) -> str:
    s = report.get("routing") or {}
    if not s.get("enabled"):
        return "off"
    return f"on {s['routed']}/{s['classes']}" if s.get("source") == "measured" else "on, no table"


def rule_routing_mismatch(fleet: dict) -> list[dict]:
    """Ranks of one arch that route problems otherwise than most ranks of the arch (routing off, or another table):
    they run another backend for the same call, at another speed."""
    out = []
    for arch, reports in sorted(_by_arch(fleet["reports"]).items()):
        groups = defaultdict(list)
        for report in sorted(reports, key=lambda r: r["rank"]):
            groups[_routing_state(report)].append(report)
        if len(groups) < 2:
            continue
        common = max(groups.values(), key=lambda g: (len(g), -g[0]["rank"]))
        odd = [r for g in groups.values() if g is not common for r in g]
        switched = [r["rank"] for r in odd if r["settings"].get(config.ROUTING) == "0"]
        seen = "; ".join(f"ranks {_ranks(g)}: routing {_routing_text(g[0])}" for g in groups.values())
        fix = (f"unset {config.ROUTING} on ranks {switched}" if switched else
               "install the fa2rt of the other ranks (its routing table) on those ranks")
        out.append(_divergence("routing_mismatch", _ranks(odd), f"{arch} ranks route differently: {seen}", fix))
    return out


def rule_unhealthy(fleet: dict) -> list[dict]:
    out = []
    failed = {r["rank"]: [c["id"] for c in r["checks"] if not c["ok"]] for r in fleet["reports"]}
    failed = {rank: ids for rank, ids in failed.items() if ids}
    if failed:
        out.append(_divergence("check_failed", list(failed), "numerical check over its tolerance: " + "; ".join(
            f"rank {r}: {', '.join(ids)}" for r, ids in sorted(failed.items())),
            "run python -m fa2rt.doctor on that rank; set FA2RT_DISABLE=1 there until fixed"))
    unmet = [r for r in fleet["reports"] if not r["require_met"]]
    if unmet:
        out.append(_divergence("require_unmet", _ranks(unmet), f"--require {fleet['require']}: no usable "
                               f"{fleet['require']} GPU on these ranks", "check the rank's GPU, driver and torch"))
    corrupt = [r for r in fleet["reports"] if r["bad_files"]]
    if corrupt:
        out.append(_divergence("corrupt_images", _ranks(corrupt), "kernel files fail their sha256",
                               "reinstall the kernel packages on those ranks"))
    broken = [r for r in fleet["reports"] if r["probe_errors"]]
    if broken:
        out.append(_divergence("probe_error", _ranks(broken), "; ".join(
            f"rank {r['rank']}: {layer}: {err}" for r in broken for layer, err in r["probe_errors"].items()),
            "run python -m fa2rt.doctor on that rank"))
    return out


# The rules in report order, each with the exit code its findings give.
RULES = (
    (rule_missing, EXIT_MISSING),
    (rule_unhealthy, EXIT_UNHEALTHY),
    (rule_fa2rt_version, EXIT_DIVERGENT),
    (rule_kernel_packages, EXIT_DIVERGENT),
    (rule_no_images, EXIT_DIVERGENT),
    (rule_fallback_where_others_run_kernels, EXIT_DIVERGENT),
    (rule_image_mismatch, EXIT_DIVERGENT),
    (rule_routing_mismatch, EXIT_DIVERGENT),
    (rule_numerics_outlier, EXIT_DIVERGENT),
    (rule_speed_outlier, EXIT_DIVERGENT),
)


def judge(fleet: dict) -> tuple[list[dict], int]:
    """Every divergence the rules find, and the exit code of the most serious."""
    found, codes = [], set()
    for rule, code in RULES:
        hits = rule(fleet)
        found += [dict(d, exit_code=code) for d in hits]
        codes |= {code} if hits else set()
    return found, next((c for c in EXIT_PRECEDENCE if c in codes), EXIT_UNIFORM)


# ------------------------------------------------------------------------------------------------------- rendering

def _gib(n) -> str:
    return f"{n / 2**30:.0f}G" if n else "-"


def _decision_text(report: dict) -> str:
    rows = report["decisions"]
    kernels = [d for d in rows if d["path"] == "kernel"]
    if kernels:
        modes = ",".join(sorted({d["mode"] for d in kernels}))
        return f"kernel {len(kernels)}/{len(rows)} {modes}"
    reasons = ",".join(sorted({d["reason"] for d in rows}))
    return f"fallback {len(rows)}/{len(rows)} [{reasons}]"


def _kernels_text(report: dict) -> str:
    return "; ".join(f"{(p['manifest_sha256'] or 'none')[:8]} {'+'.join(p['archs']) or '-'}"
                     for p in report["kernel_packages"])


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (  # header, width, cell
    ("rank", 4, lambda r: str(r["rank"])),
    ("local", 5, lambda r: str(r["local_rank"])),
    ("device", 20, lambda r: r["device"].get("name") or "cpu"),
    ("arch", 6, lambda r: r["device"]["arch"]),
    ("SMs/CUs", 7, lambda r: str(r["device"].get("multiprocessors") or "-")),
    ("memory", 6, lambda r: _gib(r["device"].get("memory_bytes"))),
    ("driver", 12, lambda r: str(r["device"].get("driver_version") or "-")),
    ("torch", 14, lambda r: r["torch_version"]),
    ("fa2rt", 6, lambda r: r["fa2rt_version"]),
    ("kernels", 18, _kernels_text),
    ("decisions", 24, _decision_text),
    ("check err", 9, lambda r: _fmt(max((c["rel_error"] for c in r["checks"]), default=None), ".1e")),
    ("vs first", 8, lambda r: _fmt(r.get("max_rel_diff_vs_first"), ".1e")),
    ("TFLOP/s", 8, lambda r: _fmt((r["speed"] or {}).get("tflops"), ".3g")),
    ("short-seq", 9, lambda r: str(r["short_sequence"]["min_seqlen_k"])),
    ("routing", 11, _routing_text),
)


def render_text(result: dict) -> str:
    lines = [f"fa2rt fleet doctor: {result['world_size']} ranks, {len(result['ranks'])} reported"]
    header = "  " + " ".join(f"{name:<{width}}" for name, width, _ in COLUMNS)
    by_host = defaultdict(list)
    for report in result["ranks"]:
        by_host[report["host"]].append(report)
    for host, reports in sorted(by_host.items()):
        lines += [f"\nhost {host}", header]
        for report in sorted(reports, key=lambda r: r["rank"]):
            lines.append("  " + " ".join(f"{cell(report):<{width}}" for _, width, cell in COLUMNS))
    missing = sorted({r for ranks in result["missing"].values() for r in ranks})
    if missing:
        lines.append(f"\nnot reporting: ranks {missing}")
    lines.append(f"\nnumerics across ranks (relative difference of outputs; 'vs first' is against rank "
                 f"{result['numerics'].get('vs_rank', '-')}):")
    lines += [f"  {p['check']:<16} {p['a']} vs {p['b']}: {_fmt(p['rel_diff'], '.2e')}"
              for p in result["numerics"].get("pairs", [])] or ["  every rank ran the same (arch, path)"]
    lines.append("\ndivergences:")
    for d in result["divergences"]:
        lines += [f"  [{d['kind']}] ranks {d['ranks']}: {d['detail']}", f"      fix: {d['fix']}"]
    if not result["divergences"]:
        lines.append("  none")
    v = result["verdict"]
    lines.append(f"\n[verdict] exit {v['exit_code']}: {v['status']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main

def _on_sigterm(signum, frame):
    raise Stopped("SIGTERM (torchrun stops every rank when one exits)")


def assemble(launch: Launch, rdv: Rendezvous, require, reports, diffs, missing, error="") -> dict:
    numerics = numerics_table(reports, diffs) if reports and diffs else {"pairs": []}
    for report in reports:
        report["max_rel_diff_vs_first"] = numerics.get("max_rel_diff_vs_rank", {}).get(report["rank"])
    fleet = {"reports": reports, "missing": missing, "require": require, "error": error,
             "timeouts": {"join": rdv.join_timeout if rdv else None, "step": rdv.timeout if rdv else None}}
    divergences, code = judge(fleet)
    return {"schema_version": FLEET_SCHEMA, "world_size": launch.world_size, "timeouts": fleet["timeouts"],
            "missing": missing, "error": error, "ranks": reports, "numerics": numerics, "divergences": divergences,
            "verdict": {"exit_code": code, "status": EXIT_CODES[code]}}


def run(launch: Launch, require: str | None, fault: Fault, state: dict) -> tuple[dict | None, Rendezvous]:
    """Every step of one rank; rank 0 returns the assembled result (the others None)."""
    timeouts = (config.fleet_timeout(config.FLEET_JOIN_TIMEOUT), config.fleet_timeout(config.FLEET_TIMEOUT))
    rdv = Rendezvous(launch, *timeouts)
    state["rdv"] = rdv
    inject(fault, "join")
    state["step"] = "join"
    joined = rdv.check_in("join", {"host": platform.node(), "local_rank": launch.local_rank})
    state["missing"]["join"] = joined["missing"]
    hosts = {rank: p["host"] for rank, p in joined["payloads"].items()}
    state["step"] = "probe"
    rdv.take_turn(hosts)
    inject(fault, "probe")
    report, outputs = probe_rank(launch, require, fault)
    state["reports"] = [report]
    rdv.turn_done()
    inject(fault, "reports")
    state["step"] = "reports"
    answered = rdv.check_in("reports", {})
    state["missing"]["reports"] = answered["missing"]
    inject(fault, "exchange")
    state["step"] = "exchange"
    try:
        gathered = exchange(answered["members"], launch.rank, report, outputs, rdv.timeout, "first", rdv.store)
    except RuntimeError:
        # A rank died or hung during the exchange (gloo raised or timed out on every rank): the survivors check in
        # again, which names the lost ranks, and exchange once more among themselves.
        state["step"] = "retry"
        again = rdv.check_in("retry", {})
        state["missing"]["retry"] = again["missing"]
        state["step"] = "exchange again"
        gathered = exchange(again["members"], launch.rank, report, outputs, rdv.timeout, "retry", rdv.store)
    if launch.rank != 0:
        return None, rdv
    reports, diffs = gathered
    return assemble(launch, rdv, require, reports, diffs, state["missing"]), rdv


def main(as_json: bool = False, require: str | None = None, environ=None) -> int:
    try:
        launch = launch_from_env(os.environ if environ is None else environ)
        fault = fault_from_env()
        stand_in()
    except ValueError as exc:
        print(f"fa2rt fleet doctor: {exc}", file=sys.stderr)
        return EXIT_LAUNCH
    signal.signal(signal.SIGTERM, _on_sigterm)
    state = {"missing": {}, "reports": [], "step": "start", "rdv": None}
    try:
        result, rdv = run(launch, require, fault, state)
    except NotAMember as exc:
        print(f"fa2rt fleet doctor rank {launch.rank}: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except (Stopped, TimeoutError, RuntimeError) as exc:
        if launch.rank != 0:
            print(f"fa2rt fleet doctor rank {launch.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_MISSING
        # Rank 0 still reports what it knows: the ranks that were missing so far and its own report.
        missing = dict(state["missing"])
        result = assemble(launch, state["rdv"], require, state["reports"], {}, missing,
                          error=f"at step {state['step']}: {type(exc).__name__}: {exc}")
        rdv = state["rdv"]
    except Exception as exc:  # noqa: BLE001 - an internal error still ends with its own exit code
        print(f"fa2rt fleet doctor rank {launch.rank}: internal error: {exc}\n{traceback.format_exc()}",
              file=sys.stderr)
        return doctor.EXIT_INTERNAL
    if result is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the report is out: a launcher's stop now just ends us
        print(json.dumps(result, indent=1, default=str) if as_json else render_text(result), flush=True)
        code = result["verdict"]["exit_code"]
        try:
            return rdv.finish(code) if rdv else code
        except (TimeoutError, RuntimeError):
            return code  # the store went away with the ranks: the verdict is printed
    try:
        return rdv.finish(EXIT_UNIFORM)
    except (TimeoutError, RuntimeError) as exc:
        print(f"fa2rt fleet doctor rank {launch.rank}: {exc}", file=sys.stderr)
        return EXIT_MISSING
