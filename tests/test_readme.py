"""Every code block of the README runs as written, each in a fresh process in an empty folder.

Two shell blocks are not run here, and the test says why: the set-up block is what CI
itself runs (it installs packages), and the training scripts take minutes
(``tests/test_training.py`` trains the same networks on less data).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN_HERE = {
    "pip install -e . && symconv demo": "the set-up: CI runs it on a fresh machine",
    "python scripts/train_digits.py": "training runs take minutes; see test_training.py",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def _run(command: list[str], cwd: Path, text: str | None = None) -> str:
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    bin_dir = str(Path(sys.executable).parent)            # `symconv`, `python` of this venv
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    result = subprocess.run(command, cwd=cwd, input=text, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_readme_has_the_blocks_this_test_expects():
    assert len(blocks("python")) >= 5 and len(blocks("sh")) >= 4
    skipped = [b for b in blocks("sh") if any(k in b for k in NOT_RUN_HERE)]
    assert len(skipped) == len(NOT_RUN_HERE)


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_python_block_runs(number, tmp_path, cache_dir):
    pytest.importorskip("torch")
    pytest.importorskip("dask")
    _run([sys.executable, "-"], tmp_path, blocks("python")[number])


@pytest.mark.parametrize("number", range(len(blocks("sh"))))
def test_shell_block_runs(number, tmp_path, cache_dir):
    block = blocks("sh")[number]
    for key, reason in NOT_RUN_HERE.items():
        if key in block:
            pytest.skip(reason)
    out = _run(["bash", "-euo", "pipefail", "-c", block], tmp_path)
    assert out.strip()
