"""AMD GPU suite: fails (does not skip) when no AMD GPU is usable. Not yet run: no AMD GPU has been available."""

import pytest

from fa2rt import devices


def pytest_sessionstart(session):
    reasons = devices.gpu_unavailable_reasons("rocm")
    if reasons:
        pytest.exit("ROCm suite needs an AMD GPU: " + "; ".join(reasons), returncode=1)
