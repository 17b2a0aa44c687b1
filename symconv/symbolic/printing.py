"""Printing index sums as text and LaTeX, from their lowered loop nests."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .affine import integer_form
from .ir import IndexSum
from .lowering import Bound, Condition, Loop, LoopNest, loop_nests

# --- printing ------------------------------------------------------------------------------------

class _TextPrinter(StrPrinter):
    """Indices by name, quotients of indices as (num)/den, deltas as δ."""

    printmethod = "_symconv_text"  # not Indexed._sympystr: the methods below decide

    def _print_Idx(self, expr):
        return str(expr.label)

    def _print_Indexed(self, expr):
        return f"{expr.base.label}[{', '.join(self._index(i) for i in expr.indices)}]"

    def _print_KroneckerDelta(self, expr):
        return f"δ({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _index(self, position):
        num, den = integer_form(position)
        return self._print(num) if den == 1 else f"({self._print(num)})/{den}"


class _LatexPrinter(LatexPrinter):
    def _print_Idx(self, expr):
        return self._print(expr.label)

    def _print_Indexed(self, expr):
        name = str(expr.base.label).replace("_", r"\_")
        return rf"\mathrm{{{name}}}_{{{', '.join(self._index(i) for i in expr.indices)}}}"

    def _index(self, position):
        num, den = integer_form(position)
        return self._print(num) if den == 1 else rf"\frac{{{self._print(num)}}}{{{den}}}"


def _text(expr) -> str:
    return _TextPrinter().doprint(expr)


def _latex(expr) -> str:
    return _LatexPrinter().doprint(expr)


def show(expr, latex: bool = False) -> str:
    """An index expression or body as symconv prints it (indices by name, δ for deltas)."""
    return _latex(expr) if latex else _text(expr)


def show_bound(bound: Bound, is_lower: bool, latex: bool = False) -> str:
    """A loop bound: ⌈num/den⌉ as a lower one, ⌊num/den⌋ as an upper one."""
    show = _latex if latex else _text
    if bound.den == 1:
        return show(bound.num)
    if latex:
        fence = (r"\left\lceil", r"\right\rceil") if is_lower else (r"\left\lfloor", r"\right\rfloor")
        return rf"{fence[0]}\frac{{{show(bound.num)}}}{{{bound.den}}}{fence[1]}"
    fence = ("⌈", "⌉") if is_lower else ("⌊", "⌋")
    return f"{fence[0]}({show(bound.num)})/{bound.den}{fence[1]}"


def _bounds_text(bounds: Sequence[Bound], is_lower: bool, latex: bool) -> str:
    parts = [show_bound(b, is_lower, latex) for b in bounds]
    if len(parts) == 1:
        return parts[0]
    name = ("max" if is_lower else "min")
    if latex:
        return rf"\{name}\left({', '.join(parts)}\right)"
    return f"{name}({', '.join(parts)})"


def show_condition(condition: Condition, latex: bool = False) -> str:
    """``expr >= 0`` or ``expr ≡ 0 (mod m)``."""
    show = _latex if latex else _text
    if condition.modulus == 0:
        return f"{show(condition.expr)} \\geq 0" if latex else f"{show(condition.expr)} >= 0"
    if latex:
        return rf"{show(condition.expr)} \equiv 0 \pmod{{{condition.modulus}}}"
    return f"{show(condition.expr)} ≡ 0 (mod {condition.modulus})"


def nest_text(nest: LoopNest, latex: bool = False) -> str:
    """One lowered term as a nested sum with its bounds and conditions."""
    show = _latex if latex else _text
    sums, notes = [], []
    for loop in nest.loops:
        low = _bounds_text(loop.lower, True, latex)
        high = _bounds_text(loop.upper, False, latex)
        var = show(loop.index)
        if latex:
            sums.append(rf"\sum_{{{var}={low}}}^{{{high}}}")
        else:
            sums.append(f"Σ_{{{var}={low}..{high}}}")
        if loop.step > 1:
            notes.append(show_condition(Condition(loop.index - loop.residue, loop.step), latex))
        notes += [show_condition(c, latex) for c in loop.checks]
    notes = [show_condition(g, latex) for g in nest.guards] + notes
    for name in nest.zero_outside:
        notes.append(rf"\mathrm{{{name}}} = 0 \text{{ outside its shape}}".replace("_", r"\_")
                     if latex else f"{name} = 0 outside its shape")
    body = show(nest.body)
    if latex:
        text = " ".join(sums + [body])
        separator = r",\ "
        return text + (rf" \quad [{separator.join(notes)}]" if notes else "")
    text = " ".join(sums + [body])
    return text + (f"   where {', '.join(notes)}" if notes else "")


def _with_batch(fn: IndexSum, nests: list[LoopNest], batch) -> tuple[sympy.Expr, list[LoopNest]]:
    """The output element and nests of an item sum as the whole batch reads them: every
    array with the batch axis indexed by the batch index first, and a sum over the batch
    when the output lacks it (``Σ_{n=0..N-1}``)."""
    taken = {str(i) for i in fn.indices} | {str(loop.index) for nest in nests
                                             for loop in nest.loops}
    maps = batch.maps(fn.output.name)
    name = batch.index
    while name in taken or (name == batch.extent and not maps):   # Σ_{n'=0..n - 1}
        name += "'"
    n = sympy.Symbol(name)

    def with_n(expr):
        return expr.replace(
            lambda e: isinstance(e, sympy.Indexed) and str(e.base.label) in batch.arrays,
            lambda e: sympy.IndexedBase(e.base.label)[(n, *e.indices)])

    output = sympy.IndexedBase(fn.output.name)
    lhs = output[(n, *fn.indices)] if maps else output[fn.indices]
    over_batch = () if maps else \
        (Loop(n, (Bound(sympy.Integer(0), 1),), (Bound(sympy.Symbol(batch.extent) - 1, 1),)),)
    return lhs, [replace(nest, loops=over_batch + nest.loops, body=with_n(nest.body))
                 for nest in nests]


def to_text(fn: IndexSum, latex: bool = False, batch=None) -> str:
    """The sum in gather form: each term with loop bounds, steps and conditions; with
    ``batch`` (an ir.Batch), an item sum as the whole batch reads it."""
    show = _latex if latex else _text
    lhs, nests = fn.output[fn.indices], loop_nests(fn)
    if batch is not None:
        lhs, nests = _with_batch(fn, nests, batch)
    lhs = show(lhs)
    terms = [nest_text(nest, latex) for nest in nests]
    if latex:
        return f"{lhs} = " + (" + ".join(terms) if terms else "0")
    if not terms:
        return f"{lhs} = 0"
    if len(terms) == 1 and len(terms[0]) < 100:
        return f"{lhs} = {terms[0]}"
    return f"{lhs} =\n    " + "\n  + ".join(terms)


def to_latex(fn: IndexSum, batch=None) -> str:
    return to_text(fn, latex=True, batch=batch)
