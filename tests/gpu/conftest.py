"""NVIDIA GPU suite: fails (does not skip) when no NVIDIA GPU is usable."""

import pytest
import torch

from fa2rt import _C, policy


def pytest_sessionstart(session):
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif not torch.cuda.is_available():
        problems.append("torch sees no CUDA GPU")
    status = _C.backend_status("cuda")
    if not status["available"]:
        problems.append(f"fa2rt's CUDA backend is unavailable: {status['error']}")
    if problems:
        pytest.exit("GPU suite needs an NVIDIA GPU: " + "; ".join(problems), returncode=1)


@pytest.fixture
def fresh_announcements():
    policy._announced.clear()
    yield
    policy._announced.clear()
