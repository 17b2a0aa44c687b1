"""The derivation narrated (``symconv explain --steps``).

For each gradient of a compiled op, in order: the chain rule's scatter term, each Kronecker
delta eliminated (which index, and why: a unit coefficient is substituted, a common factor
becomes a congruence, otherwise an exact quotient under a congruence), each eliminated
index's range turned into constraints, then how lowering placed every constraint and
congruence (loop bounds, steps and residues, guards) and the stride phases the schedule splits
the output into.  Each step comes with the formula after it: a sum that evaluates to the same
gradient (the tests check that numerically).  The steps are data recorded by
``symbolic.derive`` and ``symbolic.lowering`` as they work; this module only words them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .codegen.schedule import pieces
from .symbolic.derive import Derivation, Step
from .symbolic.affine import integer_form
from .symbolic.ir import IndexSum, index_range
from .symbolic.lowering import Decision, loop_nests
from .symbolic.printing import nest_text, show, show_bound, show_condition, to_text


@dataclass(frozen=True)
class Narrated:
    """One numbered step: what was done and why, and the formula after it ('' if none)."""

    number: int
    kind: str
    text: str
    formula: str = ""


def _value(expr) -> str:
    """An affine expression, a quotient shown as (numerator)/denominator."""
    num, den = integer_form(expr)
    return show(num) if den == 1 else f"({show(num)})/{den}"


def _delta(step: Step) -> str:
    j, e = step.delta
    return f"δ({show(j)}, {show(e)})"


def _range(step: Step) -> str:
    lo, hi = index_range(step.index)
    value = _value(step.value)
    return (f"its range {lo} ≤ {show(step.index)} ≤ {hi} becomes the constraints "
            f"{lo} ≤ {value} ≤ {hi}")


def describe_step(step: Step, wrt: str) -> str:
    """What a derivation step did and why, in words."""
    kind = step.kind
    if kind == "chain rule":
        return (f"the cotangent times the derivative of the body with respect "
                f"to the read {show(step.read)}, and one Kronecker delta per axis of "
                f"{wrt} tying that read to the gradient's element (the scatter form)")
    if kind == "substitute":
        return (f"{_delta(step)}: {show(step.index)} has coefficient ±1, so it is "
                f"substituted, {show(step.index)} = {_value(step.value)}; "
                f"{_range(step)}")
    if kind == "quotient":
        congruence, modulus = step.congruence
        return (f"{_delta(step)}: no summation index has coefficient ±1; "
                f"{show(step.index)} = {_value(step.value)} is an integer exactly "
                f"when {show(congruence)} ≡ 0 (mod {modulus}), which becomes a "
                f"congruence of the term; {_range(step)}")
    if kind == "common factor":
        congruence, modulus = step.congruence
        return (f"{_delta(step)}: the coefficients of its summation indices share the factor "
                f"{modulus}, so the rest must be a multiple of it: "
                f"{show(congruence)} ≡ 0 (mod {modulus})")
    if kind == "equality":
        return (f"{_delta(step)} has no summation index left: an equation between free "
                f"indices, kept as two constraints")
    if kind == "always":
        return f"{_delta(step)} holds for every term: dropped"
    if kind == "never":
        return f"{_delta(step)} never holds: this term of the gradient is zero"
    if kind == "simplify":
        return ("the constraints in normal form (coprime integer coefficients), duplicates "
                "and those that always hold dropped: the gather form, one output element at "
                "a time with no delta left")
    raise ValueError(f"unknown step kind {kind!r}")


def describe_decision(decision: Decision) -> str:
    """Where lowering put one constraint or congruence, in words."""
    condition = show_condition(decision.condition)
    index = show(decision.index) if decision.index is not None else ""
    kind = decision.kind
    if kind == "fixed":
        return f"{index} has a single value: {condition.replace(' >= 0', ' = 0')}, substituted"
    if kind in ("lower bound", "upper bound"):
        is_lower = kind == "lower bound"
        relation = "≥" if is_lower else "≤"
        return (f"{condition}: {kind} of the {index} loop, the innermost it involves: "
                f"{index} {relation} {show_bound(decision.bound, is_lower)}")
    if kind == "guard":
        return f"{condition}: free indices only, tested once per output element"
    if kind == "step":
        return (f"{condition}: the {index} loop runs in steps of {decision.step} from the "
                f"residue {show(decision.residue)}; no divisibility test in the loop")
    if kind == "check":
        return f"{condition}: the {index} loop has a step already, tested in its body"
    if kind == "split":
        return (f"{condition}: {index}'s coefficient shares the factor {decision.step} with "
                f"the modulus, leaving a congruence on the outer indices")
    raise ValueError(f"unknown decision kind {kind!r}")


def _formula(output, indices, term, latex: bool) -> str:
    return to_text(IndexSum(output, indices, (term,)), latex=latex)


def gradient_steps(derivation: Derivation, latex: bool = False) -> list[Narrated]:
    """The numbered steps of one gradient: derivation (per scatter term), lowering, phases."""
    gather, wrt = derivation.gather, derivation.wrt.name
    steps: list[Narrated] = []

    def add(kind: str, text: str, formula: str = "") -> None:
        steps.append(Narrated(len(steps) + 1, kind, text, formula))

    for term_steps in derivation.steps:
        for step in term_steps:
            add(step.kind, describe_step(step, wrt),
                _formula(gather.output, gather.indices, step.term, latex))
    for nest in loop_nests(gather):
        dropped = [d for d in nest.decisions if d.kind == "always" and
                   not d.condition.expr.is_Number]      # 0 >= 0: nothing to say
        for decision in nest.decisions:
            if decision.kind != "always":
                add(f"lowering: {decision.kind}", describe_decision(decision))
        if dropped:
            add("lowering: always", ", ".join(show_condition(d.condition) for d in dropped) +
                ": hold over every index's whole range, dropped")
        if nest.decisions:
            steps[-1] = Narrated(steps[-1].number, steps[-1].kind, steps[-1].text,
                                 nest_text(nest, latex))
    phases = [p for p in pieces(gather) if p.note]
    if phases:
        primed = {i: sympy.Idx(f"{str(i.label)[3:-6]}'", (i.lower, i.upper))
                  for p in phases for i in p.indices if str(i.label).startswith("sc_")}
        for piece in phases:
            position = ", ".join(f"{show(f)} = {show(e.xreplace(primed))}"
                                 for f, e in zip(gather.indices, piece.position) if e != f)
            element = show(gather.output[tuple(e.xreplace(primed) for e in piece.position)],
                           latex)
            terms = " + ".join(nest_text(nest, latex) for nest in piece.nests) or "0"
            terms = f"{element} = {terms}"
            add("stride phase",
                f"the output elements with {position}: in this phase every quotient is exact "
                f"and every congruence fixes a residue, so the loops run with unit steps",
                _renamed_phase(terms, primed))
    return steps


def _renamed_phase(text: str, primed: dict) -> str:
    for old, new in primed.items():
        text = text.replace(str(old.label), str(new.label))
    return text


def steps_text(compilation, latex: bool = False) -> str:
    """Every gradient's steps as numbered text, each with the formula after it."""
    blocks = []
    for name, derivation in compilation.derivations.items():
        lines = [f"== {name}: from the chain rule to the compiled loops =="]
        for step in gradient_steps(derivation, latex):
            lines.append(f"{step.number:>3}. {step.kind}: {step.text}")
            if step.formula:
                lines.extend("       " + line for line in step.formula.splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
