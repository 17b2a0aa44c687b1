"""Tuning: the schedule's named plan choices (no C), every candidate a tuner compiles against
the NumPy oracle, and ``compile_op(tune=True)`` / ``symconv compile --tune``: the choice and
its timings in the manifest, reused by later compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from oracle import conv_backward, conv_forward
from symconv import ConvSpec, compiler, tune
from symconv.codegen import schedule
from symconv.codegen.emit import plan_options
from symconv.errors import InternalError
from symconv.package import build
from test_kernels import assert_close, oracle_args, random_arrays

DENSE = ConvSpec((2, 16, 10, 12), (32, 16, 3, 3), padding=1)
SPECS = [
    DENSE,
    ConvSpec((2, 8, 11, 9), (16, 8, 3, 3), stride=2, padding=1, bias=False),   # phases
    ConvSpec((2, 48, 6, 6), (8, 48, 1, 1)),              # a 1x1 projection: chunked lanes
    ConvSpec((1, 16, 9, 9), (16, 1, 3, 3), padding=1, groups=16),             # depthwise
    ConvSpec((2, 16, 5, 40), (32, 16, 3, 3), padding=1),     # lane blocks in either place
]


def _pieces(spec, name):
    from symconv.codegen.c import c_namespace
    from symconv.compiler import compilation
    function = next(f for f in compilation(spec, "x86-64-v3").functions if f.name == name)
    return schedule.pieces(c_namespace(function).sum)


# --- the schedule's choices (no C) ----------------------------------------------------------------

def test_each_choice_names_a_plan_other_than_the_default():
    piece, = _pieces(DENSE, "forward")
    default = schedule.plan(piece, 8, 16)
    choices = schedule.options(piece, 8, 16)
    assert isinstance(default, schedule.ChannelLanes) and default.vectors == 2
    assert choices == ["channel-lanes-1v", "channel-lanes-3v", "output-lanes"]
    one_vector = schedule.plan(piece, 8, 16, "channel-lanes-1v")
    assert isinstance(one_vector, schedule.ChannelLanes)
    assert (one_vector.vectors, one_vector.rows) == (1, 12) != (default.vectors, default.rows)
    assert isinstance(schedule.plan(piece, 8, 16, "output-lanes"), schedule.OutputLanes)
    # a choice that does not fit a piece leaves it its default
    assert schedule.plan(piece, 8, 16, "reduction-lanes") == default
    with pytest.raises(ValueError, match="unknown plan choice 'fastest'"):
        schedule.plan(piece, 8, 16, "fastest")
    assert schedule.options(piece, None) == [] and schedule.plan(piece, None, 0, "output-lanes") \
        == schedule.Scalar()


def test_lane_blocks_inside_or_outside_the_tasks_is_a_choice():
    """Whether a task's rows or each lane block's panel should stay in cache depends on the
    caches: a tuner may put the lane blocks of a forward with no window in the other
    place."""
    piece, = _pieces(SPECS[4], "forward")
    default = schedule.plan(piece, 8, 16)
    assert "channel-lanes-reordered" in schedule.options(piece, 8, 16)
    assert schedule.plan(piece, 8, 16, "channel-lanes-reordered") == \
        replace(default, lanes_inside=not default.lanes_inside)
    windowed, = _pieces(DENSE, "forward")      # its window orders its own lane blocks
    assert schedule.plan(windowed, 8, 16).window is not None
    assert "channel-lanes-reordered" not in schedule.options(windowed, 8, 16)


def test_plan_options_cover_every_piece_of_a_function():
    from symconv.compiler import compilation
    functions = {f.name: f for f in compilation(SPECS[1], "x86-64-v3").functions}
    options = plan_options(functions["grad_weight"], "float32", "avx2")
    assert options and set(options) <= set(schedule.CHOICES)
    assert plan_options(functions["grad_weight"], "float32", None) == []


def test_staging_an_output_is_a_choice_both_ways():
    """Whether an output stays in cache between calls depends on the machine: a tuner may
    stage a small depthwise layer's output (its candidate checked against the oracle
    below), or store a large one's in place."""
    from symconv.tune import Tuning

    def functions(spec):
        return {f.name: f for f in compiler.compilation(spec, "x86-64-v4").functions}
    small = functions(SPECS[3])
    assert "staged-output" in plan_options(small["forward"], "float32", "avx512")
    assert "staged-output" in plan_options(small["grad_input"], "float32", "avx512")
    large = ConvSpec((8, 144, 56, 56), (144, 1, 3, 3), stride=2, padding=1, groups=144)
    options = plan_options(functions(large)["grad_input"], "float32", "avx512")
    assert "output-in-place" in options and "staged-output" not in options
    compiled = compiler.compilation(large, "x86-64-v4")
    assert all(c.stage is not None for _, c in compiled.plans["grad_input"])
    compiled.apply(Tuning("x86-64-v4", 1, {"grad_input": "output-in-place"}, {}))
    assert all(c.stage is None for _, c in compiled.plans["grad_input"])
    assert "sc_stream_ps(a_grad_input" not in compiled.sources["x86-64-v4"].text


# --- every candidate against the oracle -----------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.slug)
def test_every_candidate_agrees_with_the_oracle(spec, tmp_path, rng):
    compiled = compiler.compilation(spec, "x86-64-v3")
    options = tune.candidates(compiled)
    assert all(names[0] == tune.DEFAULT for names in options.values())
    functions = tune._build(compiled, options, compiled.variants[0],
                            build.build_config("x86-64-v3"), tmp_path)
    x, w, b, gy = random_arrays(spec, rng)
    arrays = {"input": x, "weight": w, "bias": b, "grad_output": gy}
    gx, gw, gb = conv_backward(x, w, gy, *oracle_args(spec))
    expected = {"forward": conv_forward(x, w, b, *oracle_args(spec)), "grad_input": gx,
                "grad_weight": gw, "grad_bias": gb}
    tried = 0
    for name, candidates in functions.items():
        for choice, function in candidates.items():
            got = function(*(arrays[a] for a in function.args), threads=2)
            assert_close(got, expected[name], spec.dtype, f"{name} by {choice}")
            tried += choice != tune.DEFAULT
    assert tried >= 1


# --- the tuner ------------------------------------------------------------------------------------

class _Fake:
    """A candidate standing in for a compiled function: it adds ``error`` to the sum."""

    args, shapes, needs_batch = ("a",), {"a": (4, 4)}, False

    def __init__(self, error):
        self.error = error

    def __call__(self, a, out=None, threads=1, batch=None):
        result = a.sum(axis=0) + self.error
        if out is not None:
            out[...] = result
        return result


def test_a_candidate_that_computes_other_values_is_a_bug_not_a_choice():
    times = tune._timed("f", {tune.DEFAULT: _Fake(0.0), "output-lanes": _Fake(0.0)},
                        "float32", 1)
    assert set(times) == {tune.DEFAULT, "output-lanes"} and all(t > 0 for t in times.values())
    with pytest.raises(InternalError, match="'output-lanes' computes other values"):
        tune._timed("f", {tune.DEFAULT: _Fake(0.0), "output-lanes": _Fake(0.5)}, "float32", 1)


def test_tuned_package_records_its_choice_and_is_reused(tmp_path, rng):
    cache = compiler.KernelCache()
    built = cache.load(DENSE, tmp_path, "x86-64-v3", tune=True)
    assert not built.cached and built.kernel.path.name.startswith(f"{DENSE.slug}_tuned_")
    tuning = built.kernel.manifest["tuning"]
    assert tuning["target"] == "x86-64-v3" and tuning["threads"] >= 1
    options = tune.candidates(built.compilation)
    assert {f: sorted(t) for f, t in tuning["seconds"].items()} == \
        {f: sorted(names) for f, names in options.items() if len(names) > 1}
    for name, choice in tuning["choices"].items():
        assert choice in options[name] and choice != tune.DEFAULT
        times = tuning["seconds"][name]
        assert times[choice] < times[tune.DEFAULT]
    assert "tune" in built.kernel.manifest["timings"]
    x, w, b, gy = random_arrays(DENSE, rng)
    assert_close(built.kernel.forward(x, w, b), conv_forward(x, w, b, *oracle_args(DENSE)),
                 "float32", "tuned forward")
    # later compiles, tuned or not, load the tuned package without building
    for again in (compiler.KernelCache().load(DENSE, tmp_path, "x86-64-v3", tune=True),
                  compiler.KernelCache().load(DENSE, tmp_path, "x86-64-v3")):
        assert again.cached and again.kernel.path == built.kernel.path


def test_tuning_choices_reach_the_c(monkeypatch):
    compiled = compiler.compilation(DENSE, "x86-64-v3")
    monkeypatch.setattr(tune, "_timed", lambda name, functions, dtype, threads: {
        choice: (0.5 if choice == "output-lanes" else 1.0) for choice in functions})
    monkeypatch.setattr(tune, "_build", lambda compiled, timed, *rest: timed)
    tuning = tune.tune(compiled, build.build_config("x86-64-v3"))
    assert tuning.choices == {"forward": "output-lanes", "grad_input": "output-lanes"}
    compiled.apply(tuning)
    forward = dict(compiled.plans)["forward"]
    assert all(isinstance(plan, schedule.OutputLanes) for _, plan in forward)
    assert compiled.manifest()["tuning"]["choices"] == tuning.choices


def test_nothing_to_tune_without_vectors_and_no_tuning_under_a_sanitizer(tmp_path):
    spec = ConvSpec((1, 2, 6), (3, 2, 3))
    kernel = compiler.KernelCache().get(spec, tmp_path, "x86-64", tune=True)
    assert kernel.manifest["tuning"]["seconds"] == {} and kernel.manifest["tuning"]["choices"] == {}
    with pytest.raises(ValueError, match="without '\\+sanitize'"):
        compiler.compilation(spec, "x86-64-v3+sanitize", tune=True)
    with pytest.raises(TypeError, match="tune must be True or False"):
        compiler.compile_op(spec, tmp_path, tune="yes")


def test_cli_compile_tune(tmp_path):
    args = [sys.executable, "-m", "symconv", "compile", "--input", "1,16,8,8", "--weight",
            "16,16,3,3", "--padding", "1", "--target", "x86-64-v3", "--out", str(tmp_path)]
    result = subprocess.run([*args, "--tune"], capture_output=True, text=True, check=True)
    assert "tuned on x86-64-v3" in result.stdout and "forward: default" in result.stdout
    package, = tmp_path.glob("*_tuned_*")
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["tuning"]["seconds"]) >= {"forward", "grad_input", "grad_weight"}
    again = subprocess.run(args, capture_output=True, text=True, check=True)
    assert str(package) in again.stdout and "tuned on" in again.stdout
