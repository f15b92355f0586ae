"""NVIDIA GPU suite: fails (does not skip) when no NVIDIA GPU is usable."""

import pytest

from fa2rt import config, devices, policy


def pytest_sessionstart(session):
    reasons = devices.gpu_unavailable_reasons("cuda")
    if reasons:
        pytest.exit("GPU suite needs an NVIDIA GPU: " + "; ".join(reasons), returncode=1)


@pytest.fixture
def fresh_announcements():
    policy._announced.clear()
    yield
    policy._announced.clear()


@pytest.fixture
def kernels_at_any_length(monkeypatch):
    """The kernel tests assert the kernel path for short sequences too: the measured short-sequence crossover
    (python/fa2rt/data/crossover.json, a policy the CPU suite tests) is set to 0 here, the measured routing table
    (data/routing.json; test_routing_gpu.py tests it) turned off, and a FA2RT_FORCE_ARCH from
    the environment is cleared (tests that force an arch set it themselves)."""
    monkeypatch.setenv(config.MIN_SEQLEN, "0")
    monkeypatch.setenv(config.ROUTING, "0")
    monkeypatch.delenv(config.FORCE_ARCH, raising=False)
