"""The derivation's recorded steps (symbolic.derive.Step, lowering.Decision) and their
narration (symconv.explain): checked structurally, and every intermediate formula
numerically against the final gather form through the IR interpreter.  No C is built."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from symconv import AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec
from symconv.compiler import compilation
from symconv.explain import gradient_steps, steps_text
from symconv.symbolic.interpreter import evaluate
from symconv.symbolic.ir import IndexSum

SPECS = {
    "stride 1": ConvSpec((2, 2, 7), (3, 2, 3), padding=1, dtype="float64"),
    "stride 2, dilation 3": ConvSpec((1, 2, 11), (2, 2, 3), stride=2, dilation=3, padding=1,
                                     dtype="float64"),
    "stride 2, dilation 2": ConvSpec((1, 2, 11), (2, 2, 3), stride=2, dilation=2, padding=1,
                                     dtype="float64"),
    "2-D grouped": ConvSpec((1, 4, 6, 5), (4, 2, 3, 2), stride=(2, 1), padding=1, groups=2,
                            dtype="float64"),
    "transposed": ConvTransposeSpec((1, 2, 5), (2, 3, 3), stride=2, padding=1,
                                    dtype="float64"),
    "reflect padding": ConvSpec((1, 2, 7), (2, 2, 3), padding=1, padding_mode="reflect",
                                dtype="float64"),
    "average pool": AvgPoolSpec((1, 2, 8), (2,), stride=2, dtype="float64"),
    "gradient of a gradient": GradientSpec(ConvSpec((1, 2, 9), (2, 2, 3), stride=2, padding=1,
                                                    dtype="float64"), "grad_input"),
    "user op": ExprSpec("Y[i] = sum(tanh(W[a] * X[2*i + a]), (a, 0, 2))",
                        shapes={"X": (9,), "W": (3,)}, dtype="float64"),
}


def derivations(name):
    return compilation(SPECS[name], "generic").derivations


def kinds(derivation) -> list[list[str]]:
    return [[step.kind for step in record] for record in derivation.steps]


def step_of(derivation, kind: str):
    return next(s for record in derivation.steps for s in record if s.kind == kind)


def test_stride_1_substitutes_every_delta():
    found = derivations("stride 1")
    assert kinds(found["grad_input"]) == [["chain rule", "substitute", "substitute",
                                           "substitute", "simplify"]]
    quotient = [s for r in found["grad_input"].steps for s in r if s.kind == "quotient"]
    assert not quotient


def test_stride_2_dilation_3_is_an_exact_quotient_under_a_congruence():
    """2·i + 3·k = j + 1: coprime coefficients, no unit one, so one index is an exact
    quotient under a congruence modulo its coefficient: the one with the larger range, the
    output position i (coefficient 2).  Lowering makes the congruence a step of 2 on the k
    loop; the schedule splits the output into the phases j mod 2."""
    grad_input = derivations("stride 2, dilation 3")["grad_input"]
    step = step_of(grad_input, "quotient")
    assert str(step.index) == "i0" and step.congruence[1] == 2
    assert [c[1] for c in step.term.congruences] == [2]
    steps = gradient_steps(grad_input)
    lowering = [s for s in steps if s.kind == "lowering: step"]
    assert len(lowering) == 1 and "the k0 loop runs in steps of 2" in lowering[0].text
    assert sum(s.kind == "stride phase" for s in steps) == 2


def test_stride_2_dilation_2_has_a_common_factor():
    """2·i + 2·k = j + 1: the coefficients share 2, which becomes the congruence
    j + 1 ≡ 0 (mod 2) before i or k is solved (then with unit coefficient)."""
    grad_input = derivations("stride 2, dilation 2")["grad_input"]
    step = step_of(grad_input, "common factor")
    assert step.congruence[1] == 2 and step.index is None
    assert kinds(grad_input)[0][-3:] == ["common factor", "substitute", "simplify"]


def test_grouped_conv_eliminates_the_group_index():
    """A grouped convolution's arrays carry a group axis g: every gradient solves g' = g by
    substitution, so no gradient sums over groups; grad_weight substitutes once per weight
    axis (g, o, c, k0, k1) and sums over the batch and positions only."""
    found = derivations("2-D grouped")
    weight = found["grad_weight"]
    assert kinds(weight) == [["chain rule"] + ["substitute"] * 5 + ["simplify"]]
    assert [str(s.index) for s in weight.steps[0][1:-1]] == ["g'", "o'", "c'", "k0'", "k1'"]
    assert [str(i) for i in weight.gather.terms[0].indices] == ["n", "i0", "i1"]
    grad_input = found["grad_input"]
    assert "g'" in [str(s.index) for s in grad_input.steps[0]]


def test_user_op_with_nonlinear_body_keeps_its_derivative():
    grad_w = derivations("user op")["grad_W"]
    chain = step_of(grad_w, "chain rule")
    assert str(chain.read) == "W[a']"      # the gradient's own a is free: the sum's is primed
    assert "tanh" in str(chain.term.body)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_intermediate_formula_is_the_same_gradient(name):
    """Each step's term, evaluated by the interpreter on random data, equals its record's
    final (gather) term; the final terms sum to the compiled gather form."""
    compiled = compilation(SPECS[name], "generic")
    rng = np.random.default_rng(7)
    arrays = {}
    for function in compiled.functions:
        for array in function.args:
            arrays.setdefault(array.name, rng.standard_normal(array.shape))
    for derivation in compiled.derivations.values():
        gather = derivation.gather
        total = np.zeros([int(n) for n in gather.output.shape])
        for record in derivation.steps:
            def value(term):
                return evaluate(IndexSum(gather.output, gather.indices, (term,)), arrays)
            final = value(record[-1].term)
            for step in record[:-1]:
                np.testing.assert_allclose(value(step.term), final, rtol=1e-12, atol=1e-12,
                                           err_msg=f"{derivation.wrt.name}: {step.kind}")
            total += final
        np.testing.assert_allclose(total, evaluate(gather, arrays), rtol=1e-12, atol=1e-12)


def test_lowering_records_where_each_constraint_went():
    """Every recorded bound is one of its loop's bounds before pruning, on the loop named."""
    from symconv.symbolic.lowering import loop_nests
    gather = derivations("stride 2, dilation 3")["grad_input"].gather
    (nest,) = loop_nests(gather)
    loops = {loop.index: loop for loop in nest.loops}
    bounds = [d for d in nest.decisions if d.kind.endswith("bound")]
    assert bounds
    for decision in bounds:
        assert decision.index in loops


def test_steps_text_numbers_every_step_of_every_gradient():
    text = steps_text(compilation(SPECS["stride 2, dilation 3"], "generic"))
    for name in ("grad_input", "grad_weight", "grad_bias"):
        assert f"== {name}: from the chain rule to the compiled loops ==" in text
    assert "  1. chain rule:" in text and "quotient:" in text and "stride phase:" in text


def test_explain_steps_on_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "symconv", "explain", "--input", "1,2,11", "--weight", "2,2,3",
         "--stride", "2", "--dilation", "3", "--padding", "1", "--steps", "--target",
         "generic"], capture_output=True, text=True, check=True)
    assert "quotient: δ(j0, 2*i0 + 3*k0 - 1): no summation index" in result.stdout
    latex = subprocess.run(
        [sys.executable, "-m", "symconv", "explain", "--input", "1,2,11", "--weight", "2,2,3",
         "--stride", "2", "--steps", "--latex", "--target", "generic"],
        capture_output=True, text=True, check=True).stdout
    assert r"\sum_" in latex.split("== grad_input: from the chain rule")[1]
