"""Shared by every suite: makes the modules in tests/ (tiny_transformer) importable from tests/cpu, tests/gpu and
tests/rocm, whatever pytest's import mode."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
