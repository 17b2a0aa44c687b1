"""Shared fixtures: one kernel cache per test session, seeded random generators."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _buildable_here() -> None:
    """A CPU without AVX-512 cannot run a default package's AVX-512 variant, only compile it:
    there the suite builds AVX2 alone by default ($SYMCONV_TARGET; nearly half of each
    package's C compile).  The tests that name x86-64-v4 still compile it (every shared case
    in test_codegen), and two-variant packages are tested by name."""
    from symconv.package import targets
    from symconv.kernel import cpu_features
    have = cpu_features() or set()
    if targets.default_target() == "x86-64-v4,x86-64-v3" and \
            not set(targets.TARGET_FEATURES["x86-64-v4"]) <= have:
        os.environ.setdefault(targets.TARGET_ENV, "x86-64-v3")


_buildable_here()


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
def one_target_config():
    """A build config for hand-written C: one instruction set (the default target's
    baseline), so the C file is targets.SOURCE and is compiled once."""
    from symconv.package import build, targets
    return build.build_config(targets.variants()[-1].target)


@pytest.fixture(scope="session")
def compile_spec(cache_dir):
    """compile_conv into the session cache."""
    from symconv.compiler import compile_conv

    def compile_(spec):
        return compile_conv(spec, cache_dir=cache_dir)
    return compile_


# --- slow subprocess checks started as soon as the session is collected --------------------------
# A test module may define ``BACKGROUND = {test_name: start}``: when that test is selected,
# ``start()`` (returning a subprocess.Popen) runs right after collection, so the job (e.g.
# compiling 120 specs in one process) overlaps the rest of the suite on another core; the
# test then waits for it via ``background_job(name)``.  Under pytest-xdist every worker
# collects every test and the workers already fill the cores, so there the job starts when
# its test asks for it, in the one worker that runs it.
_starters: dict[str, object] = {}
_jobs: dict[str, object] = {}


def pytest_collection_finish(session):
    for item in session.items:
        module = getattr(item, "module", None)
        starters = getattr(module, "BACKGROUND", {})
        name = getattr(item, "originalname", item.name)
        if name in starters:
            _starters[name] = starters[name]
            if name not in _jobs and "PYTEST_XDIST_WORKER" not in os.environ:
                _jobs[name] = starters[name]()


def pytest_sessionfinish(session, exitstatus):
    for job in _jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


def background_job(name: str):
    """The Popen started for test ``name`` (started now if collection did not)."""
    if name not in _jobs:
        _jobs[name] = _starters[name]()
    return _jobs[name]
