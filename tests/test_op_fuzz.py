"""A few dozen random user ops from the grammar fuzzer (tests/op_fuzzing.py) against PyTorch;
``scripts/fuzz.py --ops`` runs thousands."""

from __future__ import annotations

import pytest

from op_fuzzing import check_op_case, op_case_from_seed

pytest.importorskip("torch")


@pytest.mark.parametrize("seed", range(36))
def test_random_user_op_against_torch(seed, cache_dir):
    case = op_case_from_seed(seed)
    check_op_case(case, cache_dir, target="x86-64-v3" if seed % 2 else "x86-64")
