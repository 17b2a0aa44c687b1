"""Differential fuzzing in CI: random specs, every build target, against the oracle and PyTorch.

Hypothesis draws cases from the generator in tests/fuzzing.py (rank 1-4, sizes
from 1, stride, dilation, asymmetric padding and padding modes, groups, bias,
dtype, NaN/±Inf inputs, target x86-64 / x86-64-v3 / x86-64-v4) and shrinks a
failure to a small one.  ``SYMCONV_FUZZ_EXAMPLES`` sets how many (default 30);
``scripts/fuzz.py`` runs the same generator for as long as asked.  Every bug
the fuzzers found is pinned in ``cases.REGRESSIONS`` and checked on every target.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing
from cases import REGRESSIONS, make_spec

EXAMPLES = int(os.environ.get("SYMCONV_FUZZ_EXAMPLES", "30"))


@st.composite
def cases(draw, transposed=True):
    return fuzzing.draw_case(lambda lo, hi: draw(st.integers(lo, hi)), transposed=transposed)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_random_cases_match_the_oracle_and_torch(case, cache_dir):
    from symconv.compiler import compile_conv
    kernel = compile_conv(case.kernel_spec, cache_dir=cache_dir, target=case.target)
    assert kernel.manifest["build"]["target"] == case.target
    fuzzing.check_case(kernel, case)


@pytest.mark.parametrize("target", fuzzing.available_targets())
@pytest.mark.parametrize("fields", REGRESSIONS)
def test_regressions_on_every_target(fields, target, cache_dir):
    """Each case a fuzzer once failed, in guard regions, on every target."""
    from symconv.compiler import compile_conv
    spec = make_spec(fields)
    kernel = compile_conv(spec, cache_dir=cache_dir, target=target)
    for seed in range(3):
        fuzzing.check_case(kernel, fuzzing.Case(spec, target, seed, special=seed == 2))


# --- bad input: random garbage never gets past validation with anything but ValueError ----------

_GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 6), st.integers(2**62, 2**70), st.floats(),
    st.text(max_size=4), st.sampled_from(["same", "valid", "zeros", "reflect", "float32"]),
    st.lists(st.integers(-2, 5), max_size=5).map(tuple),
    st.lists(st.tuples(st.integers(-1, 3), st.integers(-1, 3)), max_size=4).map(tuple),
    st.lists(st.one_of(st.integers(0, 4), st.text(max_size=1), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_FIELDS = ("input_shape", "weight_shape", "stride", "padding", "dilation", "groups", "bias",
           "dtype", "padding_mode")


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(base=cases(transposed=False), field=st.sampled_from(_FIELDS), value=_GARBAGE)
def test_garbage_spec_fields_raise_value_error_naming_the_field(base, field, value):
    """One field of a valid spec replaced by garbage: either a valid spec (the garbage happened
    to mean something) or a ValueError that names ConvSpec.<field> — never another exception."""
    from symconv import ConvSpec
    fields = {**base.spec.to_dict(), field: value}
    try:
        spec = ConvSpec(**fields)
    except ValueError as error:
        assert str(error).startswith("ConvSpec."), error
        return
    assert all(n > 0 for n in (*spec.input_shape, *spec.output_shape))


_TOKENS = ["--input", "--weight", "--stride", "--padding", "--dilation", "--groups", "--dtype",
           "--bias", "--no-bias", "--latex", "--c", "--scatter", "--target", "--padding-mode",
           "1,2,9", "2,2,3", "3,2,3", "1,1", "x", "-1", "0", "2", "1:2", "1:0", "3:3:3", "same",
           "valid", "float16", "float64", "reflect", "circular", "x86-64", "pentium4", "", "--",
           "1e9", "99999999999999999999", "1,,2", "\x00", "--spec", "/nonexistent.json"]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # read out each time
@given(argv=st.lists(st.sampled_from(_TOKENS), max_size=8))
def test_random_explain_arguments_never_crash(argv, capsys):
    """``symconv explain`` with random arguments: a result (0) or a one-line error (1, 2),
    never a traceback."""
    from symconv.cli import main
    try:
        code = main(["explain", *argv])
    except SystemExit as exit_:           # argparse's own --help/usage exits
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    assert "Traceback" not in err
    if code == 1 or (code == 2 and err):
        assert len(err.strip().splitlines()) == 1, err
