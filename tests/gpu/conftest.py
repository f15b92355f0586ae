"""NVIDIA GPU suite: fails (does not skip) when no NVIDIA GPU is usable."""

import pytest

from fa2rt import devices, policy


def pytest_sessionstart(session):
    reasons = devices.gpu_unavailable_reasons("cuda")
    if reasons:
        pytest.exit("GPU suite needs an NVIDIA GPU: " + "; ".join(reasons), returncode=1)


@pytest.fixture
def fresh_announcements():
    policy._announced.clear()
    yield
    policy._announced.clear()
