"""docs/how-autodiff-handles-convolution.md is what scripts/walkthrough.py generates today
(from real `symconv explain --steps` output), and its numeric checks all agree."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import walkthrough  # noqa: E402


def test_walkthrough_is_current_and_every_check_agrees():
    text = walkthrough.render()
    assert text == walkthrough.DOCUMENT.read_text(encoding="utf-8"), \
        "docs/how-autodiff-handles-convolution.md is out of date: python scripts/walkthrough.py"
    checks = [line for line in text.splitlines()
              if line.startswith("- ") and "finite difference" in line]
    assert len(checks) >= 2 * len(walkthrough.EXAMPLES)
    assert all(line.endswith("agree (relative tolerance 1e-6)") for line in checks)
