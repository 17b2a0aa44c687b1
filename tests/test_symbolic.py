"""The symbolic layer without any C: derived index sums evaluated by the IR interpreter.

Every expected value comes from outside symconv: the NumPy convolution oracle,
hand-written NumPy definitions, or central differences of those definitions.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import sympy

from cases import CASES, make_spec
from oracle import conv_backward, conv_forward
from symconv.errors import IRError
from symconv.symbolic import define, derive, interpreter, lowering, printing
from symconv.symbolic.ir import Array, IndexSum, Term, accesses, index


def numeric_vjp(forward, arrays, wrt, cotangent, eps=1e-6):
    """Σ cotangent · forward(arrays) differentiated by central differences, element by element."""
    grad = np.zeros_like(arrays[wrt])
    for at in itertools.product(*(range(n) for n in grad.shape)):
        values = []
        for sign in (1, -1):
            moved = {k: v.copy() for k, v in arrays.items()}
            moved[wrt][at] += sign * eps
            values.append(np.vdot(cotangent, forward(moved)))
        grad[at] = (values[0] - values[1]) / (2 * eps)
    return grad


def check_all_gradients(fn, forward, arrays, rng, tolerance=1e-7):
    """The forward sum, and the scatter and gather form of every gradient, against numbers."""
    np.testing.assert_allclose(interpreter.evaluate(fn, arrays), forward(arrays), atol=1e-12)
    cotangent = rng.standard_normal(fn.output.shape)
    for wrt in fn.inputs:
        derivation = derive.vjp(fn, wrt)
        env = {**arrays, f"grad_{fn.output.name}": cotangent}
        expected = numeric_vjp(forward, arrays, wrt.name, cotangent)
        gather = interpreter.evaluate(derivation.gather, env)
        scatter = interpreter.evaluate(derivation.scatter, env)
        np.testing.assert_allclose(gather, expected, atol=tolerance, err_msg=f"gather {wrt.name}")
        np.testing.assert_allclose(scatter, expected, atol=tolerance, err_msg=f"scatter {wrt.name}")
        for term in derivation.gather.terms:
            assert not term.body.atoms(sympy.KroneckerDelta)


# --- convolutions ------------------------------------------------------------------------------

SMALL = [c for c in CASES if np.prod(c.values[0]["input_shape"]) <= 400]


@pytest.mark.parametrize("fields", SMALL)
def test_conv_sums_against_oracle(fields, rng):
    spec = make_spec(fields)
    op = define.conv(spec)
    x = rng.standard_normal(spec.input_shape)
    w = rng.standard_normal(spec.weight_shape)
    b = rng.standard_normal(spec.bias_shape) if spec.bias else None
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    y = conv_forward(x, w, b, *args)
    gy = rng.standard_normal(y.shape)
    ir_shapes = {a.name: a.shape for a in (*op.inputs, op.forward.output)}
    arrays = {"input": x.reshape(ir_shapes["input"]), "weight": w.reshape(ir_shapes["weight"]),
              "grad_output": gy.reshape(ir_shapes["output"])}
    if b is not None:
        arrays["bias"] = b.reshape(ir_shapes["bias"])
    np.testing.assert_allclose(interpreter.evaluate(op.forward, arrays).reshape(y.shape), y, atol=1e-10)
    expected = dict(zip(("input", "weight", "bias"), conv_backward(x, w, gy, *args)))
    for wrt in op.inputs:
        got = interpreter.evaluate(derive.vjp(op.forward, wrt).gather, arrays)
        np.testing.assert_allclose(got.reshape(expected[wrt.name].shape), expected[wrt.name],
                                   atol=1e-10, err_msg=wrt.name)


def test_strided_grad_input_has_no_divisibility_test_in_its_loops():
    """Stride 2, dilation 1: the derivation substitutes the kernel index (coefficient 1) and
    the stride becomes loop bounds — no congruence anywhere."""
    op = define.conv(make_spec(dict(input_shape=(1, 1, 9), weight_shape=(1, 1, 3), stride=2,
                                    padding=1, bias=False)))
    gather = derive.vjp(op.forward, op.inputs[0]).gather
    (nest,) = lowering.loop_nests(gather)
    assert all(loop.step == 1 and not loop.checks for loop in nest.loops)
    assert not nest.guards
    assert "⌈(j0 - 1)/2⌉" in printing.to_text(gather)


def test_coprime_stride_and_dilation_become_a_strided_loop():
    """Stride 2, dilation 3: 2·i + 3·k = j + p is solved for i under k ≡ j + p (mod 2): the k loop
    runs with step 2 from the right residue; nothing is tested inside it."""
    op = define.conv(make_spec(dict(input_shape=(1, 1, 13), weight_shape=(1, 1, 3), stride=2,
                                    dilation=3, padding=1, bias=False)))
    gather = derive.vjp(op.forward, op.inputs[0]).gather
    (nest,) = lowering.loop_nests(gather)
    (k_loop,) = [loop for loop in nest.loops if str(loop.index) == "k0"]
    assert k_loop.step == 2 and not k_loop.checks and not nest.guards


def test_common_factor_becomes_a_guard_on_the_output_index():
    """Stride 2, dilation 2: 2·(i + k) = j + p only has solutions for even j + p."""
    op = define.conv(make_spec(dict(input_shape=(1, 1, 9), weight_shape=(1, 1, 3), stride=2,
                                    dilation=2, padding=1, bias=False)))
    (nest,) = lowering.loop_nests(derive.vjp(op.forward, op.inputs[0]).gather)
    assert [g.modulus for g in nest.guards] == [2]


def test_derivation_does_not_use_sum_doit(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Sum.doit / summation must not be used")
    monkeypatch.setattr(sympy.Sum, "doit", refuse)
    monkeypatch.setattr(sympy, "summation", refuse)
    op = define.conv(make_spec(dict(input_shape=(1, 2, 9, 9), weight_shape=(2, 2, 3, 3),
                                    stride=2, dilation=(1, 2), padding=1)))
    for wrt in op.inputs:
        assert derive.vjp(op.forward, wrt).gather.terms


def test_derivation_size_does_not_grow_with_tensor_size():
    """A 5-D spec derives to the same loop structure at sizes 4 and 40: the work is per rank."""
    structures, seconds = [], []
    for size in (4, 40):
        spec = make_spec(dict(input_shape=(1, 2, *(size,) * 5), weight_shape=(2, 2, *(3,) * 5),
                              stride=2, padding=1))
        start = time.perf_counter()
        op = define.conv(spec)
        grads = [derive.vjp(op.forward, wrt).gather for wrt in op.inputs]
        seconds.append(time.perf_counter() - start)
        structures.append([(len(t.indices), len(t.constraints), len(t.congruences))
                           for g in grads for t in g.terms])
    assert structures[0] == structures[1]
    assert max(seconds) < 60, seconds


# --- index sums that are not convolutions --------------------------------------------------------

def test_strided_dilated_correlation(rng):
    """y[i] = Σ_k w[k] x[2i + 2k]: stride 2, dilation 2, no padding."""
    x, w, y = Array("x", (11,)), Array("w", (3,)), Array("y", (4,))
    i, k = index("i", 4), index("k", 3)
    fn = IndexSum(y, (i,), (Term((k,), w[k] * x[2 * i + 2 * k]),))

    def forward(a):
        return np.array([sum(a["w"][kk] * a["x"][2 * ii + 2 * kk] for kk in range(3))
                         for ii in range(4)])
    check_all_gradients(fn, forward, {"x": rng.standard_normal(11),
                                      "w": rng.standard_normal(3)}, rng)


def test_matrix_product(rng):
    a, b, c = Array("a", (3, 4)), Array("b", (4, 2)), Array("c", (3, 2))
    i, j, k = index("i", 3), index("j", 2), index("k", 4)
    fn = IndexSum(c, (i, j), (Term((k,), a[i, k] * b[k, j]),))
    arrays = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((4, 2))}
    check_all_gradients(fn, lambda v: v["a"] @ v["b"], arrays, rng)
    gc = rng.standard_normal((3, 2))
    grad_a = interpreter.evaluate(derive.vjp(fn, a).gather, {**arrays, "grad_c": gc})
    np.testing.assert_allclose(grad_a, gc @ arrays["b"].T, atol=1e-12)


def test_average_pooling(rng):
    """2x2 average pooling with stride 2 on a 6x4 image."""
    x, y = Array("x", (6, 4)), Array("y", (3, 2))
    i, j, p, q = index("i", 3), index("j", 2), index("p", 2), index("q", 2)
    fn = IndexSum(y, (i, j), (Term((p, q), x[2 * i + p, 2 * j + q] / 4),))

    def forward(v):
        return v["x"].reshape(3, 2, 2, 2).mean(axis=(1, 3))
    check_all_gradients(fn, forward, {"x": rng.standard_normal((6, 4))}, rng)


def test_nonlinear_body_with_two_occurrences(rng):
    """y[i] = tanh(x[i] · x[i + 1]): the chain rule gives one gather term per occurrence."""
    x, y = Array("x", (6,)), Array("y", (5,))
    i = index("i", 5)
    fn = IndexSum(y, (i,), (Term((), sympy.tanh(x[i] * x[i + 1])),))
    derivation = derive.vjp(fn, x)
    assert len(derivation.gather.terms) == 2

    def forward(v):
        return np.tanh(v["x"][:-1] * v["x"][1:])
    check_all_gradients(fn, forward, {"x": rng.standard_normal(6)}, rng, tolerance=1e-6)


def test_diagonal_gives_an_equality_guard(rng):
    """y[i] = x[i, i]: the gradient is non-zero on the diagonal only."""
    x, y = Array("x", (4, 4)), Array("y", (4,))
    i = index("i", 4)
    fn = IndexSum(y, (i,), (Term((), 3 * x[i, i]),))
    check_all_gradients(fn, lambda v: 3 * np.diag(v["x"]), {"x": rng.standard_normal((4, 4))}, rng)


def test_three_unknowns_without_unit_coefficient(rng):
    """y[i] = Σ_{a,b} x[6i + 10a + 15b]: pairwise non-coprime coefficients, no unit one."""
    x, y = Array("x", (80,)), Array("y", (3,))
    i, a, b = index("i", 3), index("a", 4), index("b", 3)
    fn = IndexSum(y, (i,), (Term((a, b), x[6 * i + 10 * a + 15 * b] * (a + 1)),))

    def forward(v):
        return np.array([sum(v["x"][6 * ii + 10 * aa + 15 * bb] * (aa + 1)
                             for aa in range(4) for bb in range(3)) for ii in range(3)])
    check_all_gradients(fn, forward, {"x": rng.standard_normal(80)}, rng)


def test_partial_matches_sympy_diff():
    """The per-occurrence chain rule equals SymPy's own derivative with Kronecker deltas."""
    x, w = sympy.IndexedBase("x"), sympy.IndexedBase("w")
    i, k, j = sympy.Idx("i"), sympy.Idx("k"), sympy.Idx("j")
    body = w[k] * sympy.tanh(x[2 * i + k - 1] * x[i])
    ours = sum(derive.partial(body, occ) * sympy.KroneckerDelta(j, occ.indices[0])
               for occ in accesses(body) if occ.base == x)
    theirs = sympy.diff(body, x[j])
    values = {x[2 * i + k - 1]: sympy.Rational(1, 3), x[i]: sympy.Rational(2, 7), w[k]: 5}
    for ii, kk, jj in itertools.product(range(3), range(3), range(6)):
        point = {i: ii, k: kk, j: jj}
        a = ours.subs(values).subs(point)
        b = theirs.subs(values).subs(point)
        assert sympy.simplify(a - b) == 0


def test_reading_out_of_bounds_is_caught_by_the_interpreter(rng):
    x, y = Array("x", (3,)), Array("y", (3,))
    i = index("i", 3)
    fn = IndexSum(y, (i,), (Term((), x[i + 1]),))       # no guard: x[3] is read
    with pytest.raises(IRError, match="out of bounds"):
        interpreter.evaluate(fn, {"x": rng.standard_normal(3)})


@pytest.mark.parametrize("body, message", [
    (lambda x, i, k: x[i * k], "not affine"),
    (lambda x, i, k: x[sympy.floor(i / 2)], "not affine"),
    (lambda x, i, k: x[i + sympy.Idx("m", (0, 2))], "unbound index m"),
])
def test_malformed_sums_name_the_problem(body, message):
    x, y = Array("x", (9,)), Array("y", (3,))
    i, k = index("i", 3), index("k", 3)
    with pytest.raises(IRError, match=message):
        IndexSum(y, (i,), (Term((k,), body(x, i, k)),))


@pytest.mark.parametrize("build", [
    lambda i, j: i + 3,
    lambda i, j: -i,
    lambda i, j: 2 * i - 5 * j + 7,
    lambda i, j: sympy.Rational(1, 2) * i - j / 3,
    lambda i, j: 2 * (i + 3) - (j - 1) / 2,            # not expanded: expand reads it
    lambda i, j: sympy.Mul(3, i + j, evaluate=False),
    lambda i, j: sympy.Integer(4),
])
def test_affine_parts_agree_with_the_expression_at_integer_points(build):
    """linear_parts reads expanded sums directly and expands the rest; either way the
    parts must give the expression's value (and integer_form a multiple of it)."""
    from symconv.symbolic.affine import integer_form, linear_parts
    i, j = sympy.Idx("i", (0, 9)), sympy.Idx("j", (0, 9))
    expr = build(i, j)
    coefficients, constant = linear_parts(expr)
    num, den = integer_form(expr)
    for a, b in itertools.product(range(-3, 4), repeat=2):
        value = expr.subs({i: a, j: b})
        assert coefficients.get(i, 0) * a + coefficients.get(j, 0) * b + constant == value
        assert num.subs({i: a, j: b}) == den * value


def test_free_index_must_cover_the_output():
    x, y = Array("x", (4,)), Array("y", (3,))
    with pytest.raises(IRError, match="expected \\(0, 2\\)"):
        IndexSum(y, (index("i", 4),), (Term((), x[index("i", 4)]),))


def test_text_and_latex_printing():
    op = define.conv(make_spec(dict(input_shape=(1, 1, 13), weight_shape=(1, 1, 3), stride=2,
                                    dilation=3, padding=1)))
    gather = derive.vjp(op.forward, op.inputs[0]).gather
    text, latex = printing.to_text(gather), printing.to_latex(gather)
    assert text.startswith("grad_input[n, c, j0] =") and "(mod 2)" in text
    assert "/2]" in text  # the exact quotient index (…)/2
    assert latex.startswith(r"\mathrm{grad\_input}_{n, c, j_{0}}") and r"\pmod{2}" in latex
    assert r"\left\lceil" in latex and r"\sum_" in latex


# --- schedules: pieces and plans, still without C --------------------------------------------------

@pytest.mark.parametrize("fields", SMALL + [
    pytest.param(dict(input_shape=(1, 2, 13, 7), weight_shape=(3, 2, 3, 2), stride=(2, 3),
                      dilation=(3, 2), padding=1), id="2d-coprime-phases"),
    pytest.param(dict(input_shape=(1, 1, 12), weight_shape=(1, 1, 4), stride=4, dilation=2,
                      padding=((3, 1),)), id="1d-stride4-dil2"),
])
def test_pieces_cover_the_output_and_sum_to_the_gradient(fields, rng):
    """Splitting into stride phases, unit steps and shifted bands changes no value: every
    output element is computed by exactly one piece, and equals the unsplit sum."""
    from symconv.codegen import schedule
    spec = make_spec(fields)
    op = define.conv(spec)
    arrays = {a.name: rng.standard_normal(a.shape) for a in op.inputs}
    arrays["grad_output"] = rng.standard_normal(op.forward.output.shape)
    for fn in (op.forward, *(derive.vjp(op.forward, a).gather for a in op.inputs)):
        expected = interpreter.evaluate(fn, arrays)
        got = np.full(expected.shape, np.nan)
        for piece in schedule.pieces(fn):
            for nest in piece.nests:
                assert all(loop.step == 1 for loop in nest.loops) or len(schedule.pieces(fn)) == 1
            values = interpreter.evaluate_nests(piece.nests, piece.indices, arrays)
            for point in itertools.product(*(range(n) for n in values.shape)):
                env = dict(zip(piece.indices, point))
                at = tuple(int(p.subs(env)) if not isinstance(p, int) else p for p in piece.position)
                assert np.isnan(got[at]), f"{fn.output.name}{at} computed twice"
                got[at] = values[point]
        np.testing.assert_allclose(got, expected, atol=1e-10, err_msg=fn.output.name)


def test_plans_for_a_strided_convolution():
    """Forward and grad_input are implicit GEMMs with lanes along the output's channels and
    rows along its last axis; the weight gradient keeps partial sums along the rows of the
    image."""
    from symconv.codegen import schedule
    op = define.conv(make_spec(dict(input_shape=(2, 8, 20, 20), weight_shape=(16, 8, 3, 3),
                                    stride=2, padding=1)))
    forward = schedule.pieces(op.forward)
    assert len(forward) == 1
    plan = schedule.plan(forward[0], 8)
    assert isinstance(plan, schedule.ChannelLanes) and str(plan.lane) == "o"
    assert str(plan.block) == "i1" and (plan.rows, plan.vectors) == (6, 2)
    # the taps' loops first, the input channels innermost; the padded rows are loop bounds
    bias, taps = plan.nests
    assert [str(loop.index) for loop in taps.loops] == ["k0", "k1", "c"]
    assert len(taps.loops[0].lower) == 2 and len(taps.loops[1].lower) == 1
    grad_input = schedule.pieces(derive.vjp(op.forward, op.inputs[0]).gather)
    assert len(grad_input) == 4                              # 2 x 2 stride phases
    plans = [schedule.plan(p, 8) for p in grad_input]
    assert all(isinstance(p, schedule.ChannelLanes) and str(p.lane) == "c" for p in plans)
    schedule_kinds = schedule.PLAN_KINDS
    try:
        schedule.PLAN_KINDS = (schedule.OutputLanes,)       # the plan that ran before
        plan = schedule.plan(forward[0], 8)
        assert isinstance(plan, schedule.OutputLanes) and str(plan.lane) == "i1"
        assert str(plan.block) == "o"
    finally:
        schedule.PLAN_KINDS = schedule_kinds
    grad_weight = schedule.pieces(derive.vjp(op.forward, op.inputs[1]).gather)
    plan = schedule.plan(grad_weight[0], 8)                  # a GEMM over every position
    assert isinstance(plan, schedule.ChannelLanes) and plan.chunking is not None
    assert (str(plan.lane), str(plan.block)) == ("o", "c")
    schedule.PLAN_KINDS = (schedule.ReductionLanes,)
    try:
        plan = schedule.plan(grad_weight[0], 8)
        assert isinstance(plan, schedule.ReductionLanes) and str(plan.lane) == "i1"
        assert {str(u) for u, _ in plan.blocks} == {"o", "c"}
    finally:
        schedule.PLAN_KINDS = schedule_kinds
