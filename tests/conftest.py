"""Shared fixtures: one kernel cache per test session, seeded random generators."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A kernel cache private to this test session (also exported for subprocesses)."""
    path = tmp_path_factory.mktemp("symconv-cache")
    os.environ["SYMCONV_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def compile_spec(cache_dir):
    """compile_conv into the session cache."""
    from symconv.compiler import compile_conv

    def compile_(spec):
        return compile_conv(spec, cache_dir=cache_dir)
    return compile_
