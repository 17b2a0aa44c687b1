"""A grammar fuzzer of user ops: random index sums written as text, checked against PyTorch.

A case is drawn as a structure (arrays, indices, reads, functions) and written out as the
text ``symconv.op`` parses.  The reference evaluates the same structure with PyTorch, on a
grid of every index at once (reads outside a zero-padded array read zero), and PyTorch's
autograd gives the gradients: no symconv parsing, IR or interpreter is involved.

Names are drawn from a pool of awkward ones: C keywords, Python keywords, names SymPy reads
as constants or functions, names like the generator's own C variables.  Reads use strides,
offsets, dilations and floor division; bodies apply the functions a body supports (those
undefined at zero only to arrays that are never padded).  ``tests/test_op_fuzz.py`` runs a
few dozen seeds; ``scripts/fuzz.py --ops`` runs as many as asked.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

NAMES = ("I", "E", "S", "N", "O", "Q", "pi", "int", "for", "lambda", "if", "restrict", "main",
         "sc_acc", "sc_a0", "sc_threads", "a", "q0", "exp", "sum", "gamma", "beta", "X", "W",
         "k", "i", "j", "n", "x1", "memcpy")

# (text template, torch function of the read's value): defined and smooth at zero
AT_ZERO = [("exp({})", "exp"), ("sin({})", "sin"), ("cos({})", "cos"), ("tanh({})", "tanh"),
           ("atan({})", "atan"), ("erf({})", "erf"), ("sinh({})", "sinh"), ("({})**2", "square"),
           ("asinh({})", "asinh"), ("Abs({} - 0.5)", "abs_shift"), ("erfc({})", "erfc"),
           ("sign({} - 0.5)", "sign_shift"), ("Heaviside({} + 0.5)", "heaviside_shift")]
# only on reads that are never padded (their data lies in (0.2, 0.8))
POSITIVE = [("log({})", "log"), ("sqrt({})", "sqrt"), ("asin({})", "asin"), ("acos({})", "acos"),
            ("atanh({})", "atanh"), ("acosh({} + 2)", "acosh2"), ("({})**1.5", "pow15"),
            ("floor(3*{})", "floor3"), ("ceiling(3*{})", "ceil3"), ("tan({})", "tan")]
BINARY = [("Max({}, {})", "maximum"), ("Min({}, {})", "minimum"), ("atan2({}, {})", "atan2")]
PADDED_BINARY = ("atan2({}, {} + 1)", "atan2_shift")        # no ties, defined at zeros


@dataclass(frozen=True)
class Position:
    """floor((Σ coefficient·index + constant) / divisor) along one dimension of a read."""

    terms: tuple[tuple[str, int], ...]
    constant: int
    divisor: int = 1

    def text(self) -> str:
        parts = [f"{c}*{name}" if c != 1 else name for name, c in self.terms]
        inner = " + ".join(parts) if parts else "0"
        inner += f" + {self.constant}" if self.constant > 0 else \
            f" - {-self.constant}" if self.constant < 0 else ""
        return f"({inner}) // {self.divisor}" if self.divisor > 1 else inner


@dataclass(frozen=True)
class Read:
    array: str
    positions: tuple[Position, ...]

    def text(self) -> str:
        return f"{self.array}[{', '.join(p.text() for p in self.positions)}]"


@dataclass(frozen=True)
class Factor:
    """A read, a function of one read, or a function of two reads."""

    template: str
    function: str | None
    reads: tuple[Read, ...]

    def text(self) -> str:
        return self.template.format(*(r.text() for r in self.reads))


@dataclass(frozen=True)
class OpCase:
    output: str
    free: tuple[tuple[str, int], ...]            # output indices and their extents
    summed: tuple[tuple[str, int, int], ...]     # (index, first, last)
    factors: tuple[Factor, ...]
    scale: float
    shapes: tuple[tuple[str, tuple[int, ...]], ...]   # inputs in call order
    zero_outside: tuple[str, ...]
    dtype: str
    seed: int

    @property
    def text(self) -> str:
        body = " * ".join(f.text() for f in self.factors)
        body = f"{self.scale} * {body}" if self.scale != 1 else body
        if self.summed:
            limits = ", ".join(f"({name}, {lo}, {hi})" for name, lo, hi in self.summed)
            body = f"sum({body}, {limits})"
        return f"{self.output}[{', '.join(name for name, _ in self.free)}] = {body}"

    def describe(self) -> str:
        return (f"{self.text}  shapes {dict(self.shapes)}  zero_outside {self.zero_outside}  "
                f"{self.dtype}; data seed {self.seed}")


def _range_of(position: Position, ranges: dict[str, tuple[int, int]]) -> tuple[int, int]:
    low = high = position.constant
    for name, c in position.terms:
        lo, hi = ranges[name]
        low, high = low + min(c * lo, c * hi), high + max(c * lo, c * hi)
    return low // position.divisor, high // position.divisor


def draw_op(rng: random.Random) -> OpCase:
    """A random op: 1-2 output indices, 0-2 summation indices, 1-3 input arrays of rank
    1-2, each read once or twice."""
    names = rng.sample(NAMES, 12)
    free = tuple((names.pop(), rng.randint(1, 5)) for _ in range(rng.randint(1, 2)))
    summed = []
    for _ in range(rng.randint(0, 2)):
        first = rng.randint(-1, 1)
        summed.append((names.pop(), first, first + rng.randint(0, 2)))
    ranges = {name: (0, n - 1) for name, n in free}
    ranges.update({name: (lo, hi) for name, lo, hi in summed})
    indices = list(ranges)
    output = names.pop()
    arrays = [names.pop() for _ in range(rng.randint(1, 3))]
    padded = {a for a in arrays if rng.random() < 0.4}

    def position() -> Position:
        used = rng.sample(indices, rng.randint(0, min(2, len(indices))))
        terms = tuple((name, rng.choice((1, 1, 1, 2, 3, -1))) for name in used)
        return Position(terms, rng.randint(-2, 2), rng.choice((1, 1, 1, 1, 2, 3)))

    reads: dict[str, list[tuple[Position, ...]]] = {a: [] for a in arrays}
    ranks = {a: rng.randint(1, 2) for a in arrays}
    wanted = arrays + [rng.choice(arrays) for _ in range(rng.randint(0, 2))]
    for array in wanted:
        reads[array].append(tuple(position() for _ in range(ranks[array])))
    shapes, final_reads = [], {}
    for array in arrays:
        extents, shifted = [], [list(r) for r in reads[array]]
        for dim in range(ranks[array]):
            spans = [_range_of(r[dim], ranges) for r in reads[array]]
            low, high = min(s[0] for s in spans), max(s[1] for s in spans)
            if array in padded:         # reads may leave it on both sides
                extents.append(max(1, high - low + 1 - rng.randint(0, 2)))
            else:                       # shift every read of this dimension inside
                for r in shifted:
                    p = r[dim]
                    r[dim] = Position(p.terms, p.constant - low * p.divisor, p.divisor)
                extents.append(high - low + 1 + rng.randint(0, 1))
        shapes.append((array, tuple(extents)))
        final_reads[array] = [Read(array, tuple(r)) for r in shifted]
    factors = []
    for array in wanted:
        read = final_reads[array].pop(0)
        choice = rng.random()
        if choice < 0.3:
            factors.append(Factor("{}", None, (read,)))
        elif choice < 0.85 or len(arrays) == 1:
            pool = AT_ZERO + ([] if array in padded else POSITIVE)
            template, function = rng.choice(pool)
            factors.append(Factor(template, function, (read,)))
        else:
            other = rng.choice([a for a in arrays if a != array and a not in padded] or [array])
            partner = Read(other, final_reads[other][0].positions) if final_reads[other] else \
                Read(other, tuple(Position((), 0) for _ in range(ranks[other])))
            template, function = PADDED_BINARY if array in padded or other in padded else \
                rng.choice(BINARY)
            factors.append(Factor(template, function, (read, partner)))
    return OpCase(output, free, tuple(summed), tuple(factors), rng.choice((1, 0.5, 3)),
                  tuple(shapes), tuple(sorted(padded)), rng.choice(("float32", "float64")),
                  rng.randrange(2 ** 32))


def op_case_from_seed(seed: int) -> OpCase:
    return draw_op(random.Random(seed))


def case_arrays(case: OpCase) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    return {name: rng.uniform(0.2, 0.8, shape) for name, shape in case.shapes}


def _torch_function(torch, name: str):
    return {
        "exp": torch.exp, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
        "atan": torch.atan, "erf": torch.erf, "sinh": torch.sinh, "square": torch.square,
        "asinh": torch.asinh, "erfc": torch.erfc, "abs_shift": lambda v: torch.abs(v - 0.5),
        "sign_shift": lambda v: torch.sign(v - 0.5),
        "heaviside_shift": lambda v: (v + 0.5 > 0).to(v.dtype),
        "log": torch.log, "sqrt": torch.sqrt, "asin": torch.asin, "acos": torch.acos,
        "atanh": torch.atanh, "acosh2": lambda v: torch.acosh(v + 2),
        "pow15": lambda v: v ** 1.5, "floor3": lambda v: torch.floor(3 * v),
        "ceil3": lambda v: torch.ceil(3 * v), "tan": torch.tan,
        "maximum": torch.maximum, "minimum": torch.minimum, "atan2": torch.atan2,
        "atan2_shift": lambda a, b: torch.atan2(a, b + 1),
    }[name]


def reference(case: OpCase, arrays: dict[str, np.ndarray], cotangent: np.ndarray):
    """(output, {array: gradient of <cotangent, output>}) by PyTorch in float64."""
    import torch
    tensors = {name: torch.tensor(a, dtype=torch.float64, requires_grad=True)
               for name, a in arrays.items()}
    axes = [(name, 0, n - 1) for name, n in case.free] + list(case.summed)
    grid = {}
    for axis, (name, lo, hi) in enumerate(axes):
        shape = [1] * len(axes)
        shape[axis] = hi - lo + 1
        grid[name] = torch.arange(lo, hi + 1).reshape(shape)

    def value(read: Read):
        array = tensors[read.array]
        at, inside = [], torch.ones((), dtype=torch.bool)
        for position, extent in zip(read.positions, array.shape):
            total = torch.full((), position.constant)
            for name, c in position.terms:
                total = total + c * grid[name]
            index = torch.div(total, position.divisor, rounding_mode="floor")
            inside = inside & (index >= 0) & (index < extent)
            at.append(index)
        at = torch.broadcast_tensors(*at, inside)
        mask = at[-1]
        safe = [torch.where(mask, i, torch.zeros_like(i)) for i in at[:-1]]
        return torch.where(mask, array[tuple(safe)], torch.zeros((), dtype=torch.float64))

    body = torch.full((), float(case.scale), dtype=torch.float64)
    for factor in case.factors:
        values = [value(r) for r in factor.reads]
        if factor.function is None:
            body = body * values[0]
        else:
            body = body * _torch_function(torch, factor.function)(*values)
    body = body.expand(*[hi - lo + 1 for _, lo, hi in axes])
    output = body.sum(dim=tuple(range(len(case.free), len(axes)))) if case.summed else body
    if output.requires_grad:            # else no input reaches the output differentiably
        output.backward(torch.tensor(cotangent, dtype=torch.float64))
    return output.detach().numpy(), {name: (t.grad if t.grad is not None else
                                            torch.zeros_like(t)).numpy()
                                     for name, t in tensors.items()}


def check_op_case(case: OpCase, cache_dir=None, target: str | None = None) -> None:
    """Compile the case's op and compare its output and every gradient with PyTorch's."""
    from symconv import ExprSpec
    from symconv.compiler import compile_op
    shapes = dict(case.shapes)
    shapes[case.output] = tuple(n for _, n in case.free)
    spec = ExprSpec(case.text, shapes, dtype=case.dtype, zero_outside=case.zero_outside)
    kernel = compile_op(spec, cache_dir=cache_dir, target=target)
    arrays = case_arrays(case)
    cotangent = np.random.default_rng(case.seed + 1).standard_normal(shapes[case.output])
    expected, gradients = reference(case, arrays, cotangent)
    dtype = np.dtype(case.dtype)
    tolerance = 1e-10 if dtype == np.float64 else 2e-4
    got = kernel.forward(*(arrays[name].astype(dtype) for name in kernel.inputs))
    _close("forward", got, expected, tolerance)
    given = {**arrays, kernel.record.cotangent: cotangent}
    results = kernel.backward(*(given[name].astype(dtype) for name in kernel.record.backward_args))
    for name, result in zip(kernel.gradients, results):
        _close(f"grad_{name}", result, gradients[name], tolerance)
    for name in set(arrays) - set(kernel.differentiable):
        _close(f"grad_{name} (not differentiable)", np.zeros_like(arrays[name]),
               gradients[name], tolerance)


def _close(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    error = float(np.abs(got - expected).max(initial=0))
    if not (math.isfinite(error) and error <= tolerance * scale * 10):
        raise AssertionError(f"{what}: max error {error:.3g} (scale {scale:.3g})\n"
                             f"got {got}\nexpected {expected}")
