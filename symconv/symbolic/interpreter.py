"""The reference interpreter: a lowered index sum evaluated element by element in Python.

Slow and exact (integer index arithmetic, divisions checked); the tests hold
derived sums and compiled kernels to it.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import sympy

from ..errors import IRError
from .affine import ceil_div, integer_coefficients, integer_form
from .ir import IndexSum, accesses, index_range
from .lowering import Condition, Loop, LoopNest, loop_nests

# --- the reference interpreter -------------------------------------------------------------------

class _AffineEval:
    """Exact integer evaluation of an affine expression (its division must be exact)."""

    def __init__(self, expr):
        num, self.den = integer_form(expr)
        coefficients, self.constant = integer_coefficients(num)
        self.terms = tuple(coefficients.items())
        self.text = str(expr)

    def __call__(self, env) -> int:
        value = self.constant + sum(c * env[v] for v, c in self.terms)
        if value % self.den:
            raise IRError(f"index expression {self.text} is not an integer at {env}")
        return value // self.den


class _Test:
    """A compiled Condition."""

    def __init__(self, condition: Condition):
        self.value, self.modulus = _AffineEval(condition.expr), condition.modulus

    def __call__(self, env) -> bool:
        value = self.value(env)
        return value >= 0 if self.modulus == 0 else value % self.modulus == 0


class _CompiledLoop:
    def __init__(self, loop: Loop):
        self.index, self.step = loop.index, loop.step
        self.lower = [(_AffineEval(b.num), b.den) for b in loop.lower]
        self.upper = [(_AffineEval(b.num), b.den) for b in loop.upper]
        self.residue = _AffineEval(loop.residue)
        self.checks = [_Test(c) for c in loop.checks]

    def values(self, env) -> range:
        low = max(ceil_div(num(env), den) for num, den in self.lower)
        high = min(num(env) // den for num, den in self.upper)
        if self.step > 1:
            low += (self.residue(env) - low) % self.step
        return range(low, high + 1, self.step)


_FUNCTIONS = {"KroneckerDelta": lambda a, b: 1.0 if a == b else 0.0,
              "Heaviside": lambda x, at_zero=0.5: 1.0 if x > 0 else 0.0 if x < 0 else at_zero}


class _CompiledNest:
    """A loop nest ready to run: the body as a Python function of (array values..., indices...)."""

    def __init__(self, nest: LoopNest):
        placeholders = {a: sympy.Dummy(f"a{i}") for i, a in enumerate(accesses(nest.body))}
        self.indices = sorted((s for s in nest.body.free_symbols if isinstance(s, sympy.Idx)),
                              key=sympy.default_sort_key)
        names = {i: sympy.Dummy(str(i.label)) for i in self.indices}
        self.body = sympy.lambdify([*placeholders.values(), *names.values()],
                                   nest.body.xreplace({**placeholders, **names}),
                                   [_FUNCTIONS, "math"])
        self.reads = [(str(a.base.label), tuple(_AffineEval(e) for e in a.indices),
                       tuple(int(n) for n in a.base.shape),
                       str(a.base.label) in nest.zero_outside) for a in placeholders]
        self.guards = [_Test(g) for g in nest.guards]
        self.loops = [_CompiledLoop(loop) for loop in nest.loops]

    def run(self, env, arrays) -> float:
        if not all(guard(env) for guard in self.guards):
            return 0.0
        total = 0.0
        for point in self._points(0, dict(env)):
            values = []
            for name, positions, shape, zero_outside in self.reads:
                at = tuple(p(point) for p in positions)
                if all(0 <= i < n for i, n in zip(at, shape)):
                    values.append(float(arrays[name][at]))
                elif zero_outside:
                    values.append(0.0)
                else:
                    raise IRError(f"access {name}{list(at)} is out of bounds for shape {shape}")
            total += self.body(*values, *(point[i] for i in self.indices))
        return total

    def _points(self, depth: int, env):
        if depth == len(self.loops):
            yield env
            return
        loop = self.loops[depth]
        for value in loop.values(env):
            env[loop.index] = value
            if all(check(env) for check in loop.checks):
                yield from self._points(depth + 1, env)
        env.pop(loop.index, None)


def evaluate(fn: IndexSum, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Evaluate an index sum in float64 by walking its loop nests (slow; for small tests).

    ``arrays`` maps each input name to an array of the IR shape.  Every access
    is checked to lie inside its array, so a wrong derivation shows up as an
    error, not as a silently wrong number.
    """
    return evaluate_nests(loop_nests(fn), fn.indices, arrays)


def evaluate_nests(nests: Sequence[LoopNest], indices: Sequence[sympy.Idx],
                   arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sum of loop nests at every point of the box of ``indices`` (ranges from 0)."""
    out = np.zeros([index_range(i)[1] + 1 for i in indices])
    compiled = [_CompiledNest(nest) for nest in nests]
    for point in itertools.product(*(range(n) for n in out.shape)):
        env = dict(zip(indices, point))
        out[point] = sum(nest.run(env, arrays) for nest in compiled)
    return out


