"""Differential fuzzing: random convolutions against the NumPy oracle (and PyTorch).

One generator of random cases drives both the Hypothesis suite
(tests/test_property.py, which shrinks a failure to a small case) and
``scripts/fuzz.py`` (which runs for as long as asked and prints the seed of
every case, so ``scripts/fuzz.py --seed N`` reproduces one).  A case is a
spec, a build target, a data seed and a flag that plants NaN and ±Inf in the
inputs.  ``check_case`` runs forward and every gradient of a loaded kernel:

* inputs sit inside NaN-filled guard regions at an odd element offset (a
  read past either end turns a result into NaN; no 32-byte alignment can be
  assumed), or, with ``exact=True`` (the sanitizer run), in allocations of
  exactly their size so that AddressSanitizer's red zones border them;
* every function writes once into a fresh array and once into ``out=`` inside
  guard regions whose bytes must be unchanged afterwards;
* finite results must match the float64 oracle elementwise within a bound
  scaled by the same sum taken over absolute values; NaN and ±Inf must sit
  exactly where the oracle has them;
* inputs are never written.

This module imports no SymPy and no compiler: the sanitizer subprocess uses
it on packages that were built beforehand.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from oracle import conv_backward, conv_backward_mode, conv_forward, conv_forward_mode
from symconv import ConvSpec, ConvTransposeSpec

ALL_TARGETS = ("x86-64", "x86-64-v3", "x86-64-v4")
# per dtype: allowed error relative to the sum of |terms| of each element
RELATIVE = {"float32": 1e-4, "float64": 1e-12}
GUARD = 19            # guard elements on each side: odd, so the data is not 32-byte aligned
NAMES = ("forward", "grad_input", "grad_weight", "grad_bias")


def available_targets() -> tuple[str, ...]:
    """The build targets this CPU runs: plain C, AVX2 and (where present) AVX-512."""
    from symconv.kernel import cpu_features
    have = cpu_features() or set()
    found = ["x86-64"]
    if {"avx2", "fma", "bmi2", "movbe"} <= have:
        found.append("x86-64-v3")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= have:
        found.append("x86-64-v4")
    return tuple(found)


@dataclass(frozen=True)
class Case:
    spec: ConvSpec | ConvTransposeSpec
    target: str
    seed: int
    special: bool = False        # plant NaN and ±Inf in the inputs
    open_batch: bool = False     # run through a package whose batch is left to run time

    @property
    def kernel_spec(self):
        """The spec the kernel is compiled from: the case's, or its batch-open twin."""
        return self.spec.with_batch(None) if self.open_batch else self.spec

    def describe(self) -> str:
        return (f"{self.spec.describe()}; target {self.target}; data seed {self.seed}; "
                f"special values {self.special}; batch-open package {self.open_batch}")


def draw_case(draw: Callable[[int, int], int], targets=None, max_rank: int = 4,
              transposed: bool = True, wide: bool = False) -> Case:
    """A random case from ``draw(lo, hi)``, an integer in [lo, hi] (Hypothesis's
    ``integers`` or ``random.Random.randint``).  Sizes start at 1 everywhere; the total
    work stays small enough for thousands of cases.  With ``transposed``, one case in five
    is a transposed convolution made from the same draws (plus its output padding).  One
    in three runs through a batch-open package (the batch size given at run time).  With
    ``wide``, 4 to 24 channels per group (rank 1 and 2 only), enough to fill the vectors of
    the channel-lane plans."""
    targets = targets or available_targets()
    rank = draw(1, 2 if wide else max_rank)
    groups = draw(1, 3)
    c_group, o_group = (draw(4, 24), draw(4, 24)) if wide else (draw(1, 3), draw(1, 3))
    mode = ("zeros", "zeros", "zeros", "reflect", "replicate", "circular")[draw(0, 5)]
    small = rank >= 3          # keep rank 3-4 volumes small
    kernel, stride, dilation, padding, spatial = [], [], [], [], []
    for _ in range(rank):
        k = draw(1, 3 if small else 4)
        d = draw(1, 2 if small else 3)
        lo, hi = draw(0, 2 if small else 3), draw(0, 2 if small else 3)
        reach = d * (k - 1) + 1
        least = max(1, reach - lo - hi)
        if mode == "reflect":
            least = max(least, lo + 1, hi + 1)
        elif mode == "circular":
            least = max(least, lo, hi)
        spatial.append(draw(least, least + (3 if small else 6)))
        kernel.append(k), dilation.append(d), padding.append((lo, hi))
        stride.append(draw(1, 3 if small else 4))
    padding_field = tuple(padding)
    if draw(0, 7) == 0:
        padding_field = "same" if mode != "reflect" else padding_field
    fields = dict(input_shape=(draw(1, 2), groups * c_group, *spatial),
                  weight_shape=(groups * o_group, c_group, *kernel), stride=tuple(stride),
                  padding=padding_field, dilation=tuple(dilation), groups=groups,
                  bias=bool(draw(0, 1)), dtype=("float32", "float64")[draw(0, 1)])
    if mode != "zeros":
        fields["padding_mode"] = mode
    try:
        spec = ConvSpec(**fields)
    except ValueError:          # "same" made a pad the mode cannot take: use the pairs drawn
        fields["padding"] = tuple(padding)
        spec = ConvSpec(**fields)
    target = targets[draw(0, len(targets) - 1)]
    seed, special = draw(0, 2**32 - 1), draw(0, 4) == 0
    if transposed and draw(0, 4) == 0:
        # finite values only: where NaN and ±Inf go depends on whether the zeros outside a
        # transposed convolution's output take part in its input gradient (the oracle's
        # padded convolution: yes; the scatter definition symconv derives from: no)
        spec, special = _transposed(draw, fields, padding), False
    return Case(spec, target, seed, special, open_batch=draw(0, 2) == 0)


def _transposed(draw, fields, padding) -> ConvTransposeSpec:
    """A transposed convolution from a convolution's draws: its input is the convolution's
    (channels split into the same groups), each output padding below its stride."""
    n, channels, *spatial = fields["input_shape"]
    o_group = fields["weight_shape"][0] // fields["groups"]
    stride = fields["stride"]
    transposed = dict(input_shape=(n, channels, *(min(size, 5) for size in spatial)),
                      weight_shape=(channels, o_group, *fields["weight_shape"][2:]),
                      stride=stride, padding=padding, dilation=fields["dilation"],
                      output_padding=tuple(draw(0, s - 1) for s in stride),
                      groups=fields["groups"], bias=fields["bias"], dtype=fields["dtype"])
    try:
        return ConvTransposeSpec(**transposed)
    except ValueError:          # the padding leaves no output
        return ConvTransposeSpec(**{**transposed, "padding": 0})


def case_from_seed(seed: int, targets=None, max_rank: int = 4, wide: bool = False) -> Case:
    """The case ``scripts/fuzz.py`` runs for ``seed`` (``--wide``: with ``wide``)."""
    rng = random.Random(seed)
    return draw_case(rng.randint, targets, max_rank, wide=wide)


# --- arrays -----------------------------------------------------------------------------------

def _fill_pattern(dtype) -> np.ndarray:
    """Guard filler: a quiet NaN with a payload that no arithmetic produces."""
    bits = np.array([0x7FC0BEEF], np.uint32) if np.dtype(dtype) == np.float32 else \
        np.array([0x7FF8_0000_DEAD_BEEF], np.uint64)
    return bits.view(dtype)[0]


class Guarded:
    """An array inside a larger buffer of NaN guards: ``array`` is the view to use."""

    def __init__(self, shape, dtype, values=None):
        size = int(np.prod(shape))
        self.buffer = np.full(size + 2 * GUARD, _fill_pattern(dtype), dtype)
        self.array = self.buffer[GUARD:GUARD + size].reshape(shape)
        if values is not None:
            self.array[...] = values
        assert self.array.flags.c_contiguous and self.array.ctypes.data % 32 != 0

    def guards_intact(self) -> bool:
        pattern = np.full(GUARD, _fill_pattern(self.buffer.dtype)).view(np.uint8)
        ends = (self.buffer[:GUARD], self.buffer[-GUARD:])
        return all(np.array_equal(end.view(np.uint8), pattern) for end in ends)


def _exact(values) -> np.ndarray:
    """A copy in an allocation of exactly its size (AddressSanitizer borders it)."""
    out = np.empty(values.shape, values.dtype)
    out[...] = values
    return out


def case_arrays(case: Case) -> dict[str, np.ndarray | None]:
    spec, rng = case.spec, np.random.default_rng(case.seed)
    arrays = {
        "input": rng.standard_normal(spec.input_shape),
        "weight": rng.standard_normal(spec.weight_shape),
        "bias": rng.standard_normal(spec.bias_shape) if spec.bias else None,
        "grad_output": rng.standard_normal(spec.output_shape),
    }
    if case.special:
        for name, array in arrays.items():
            if array is None:
                continue
            flat = array.reshape(-1)
            count = rng.integers(0, 3)
            for at in rng.choice(flat.size, size=min(count, flat.size), replace=False):
                flat[at] = rng.choice([np.nan, np.inf, -np.inf])
    return {k: (v.astype(spec.dtype) if v is not None else None) for k, v in arrays.items()}


# --- the oracle -------------------------------------------------------------------------------

def _transposed_oracle(spec: ConvTransposeSpec, x, w, b, gy):
    """A transposed convolution by its definition, the input gradient of its adjoint
    convolution: forward = that gradient of x (plus the bias), grad_input = the adjoint's
    forward of grad_output, grad_weight = the adjoint's weight gradient with the roles of x
    and grad_output exchanged."""
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    y = conv_backward(np.zeros(spec.output_shape), w, x, *args)[0]
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, -1) + (1,) * spec.rank)
    gx = conv_forward(gy, w, None, *args)
    gw = conv_backward(gy, w, x, *args)[1]
    gb = np.asarray(gy, np.float64).sum(axis=(0, *range(2, gy.ndim)))
    return y, gx, gw, gb


def expected(spec, arrays) -> dict[str, np.ndarray]:
    """Oracle results, each with a bound on the sum of |terms| of every element."""
    x, w, b, gy = (arrays[k] for k in ("input", "weight", "bias", "grad_output"))

    def run(x, w, b, gy):
        with np.errstate(invalid="ignore", over="ignore"):
            if isinstance(spec, ConvTransposeSpec):
                return dict(zip(NAMES, _transposed_oracle(spec, x, w, b, gy)))
            args = (spec.stride, spec.padding, spec.dilation, spec.groups, spec.padding_mode)
            y = conv_forward_mode(x, w, b, *args)
            gx, gw, gb = conv_backward_mode(x, w, gy, *args)
        return dict(zip(NAMES, (y, gx, gw, gb)))

    exact = run(x, w, b, gy)
    finite = [np.where(np.isfinite(a), np.abs(a), 0) if a is not None else None
              for a in (x, w, b, gy)]
    magnitude = run(*finite)
    if not spec.bias:
        del exact["grad_bias"], magnitude["grad_bias"]
    return {name: (exact[name], magnitude[name]) for name in exact}


def torch_expected(spec: ConvSpec, arrays) -> dict[str, np.ndarray] | None:
    """PyTorch's results for ranks 1-3 (None where PyTorch has no such convolution)."""
    try:
        import torch
    except ImportError:
        return None
    transposed = isinstance(spec, ConvTransposeSpec)
    if spec.rank > 3 or (transposed and any(lo != hi for lo, hi in spec.padding)):
        return None         # torch has no 4-D convolution, no asymmetric transposed padding
    functional = torch.nn.functional
    x, w, b, gy = (arrays[k] for k in ("input", "weight", "bias", "grad_output"))
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else None
    if transposed:
        ty = getattr(functional, f"conv_transpose{spec.rank}d")(
            tx, tw, tb, stride=spec.stride, padding=tuple(lo for lo, _ in spec.padding),
            output_padding=spec.output_padding, groups=spec.groups, dilation=spec.dilation)
    else:
        pads = [p for lo_hi in reversed(spec.padding) for p in lo_hi]
        mode = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect",
                "circular": "circular"}[spec.padding_mode]
        padded = functional.pad(tx, pads, mode=mode) if any(pads) else tx
        ty = getattr(functional, f"conv{spec.rank}d")(padded, tw, tb, stride=spec.stride,
                                                      dilation=spec.dilation,
                                                      groups=spec.groups)
    ty.backward(torch.tensor(gy))
    found = {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy(),
             "grad_weight": tw.grad.numpy()}
    if tb is not None:
        found["grad_bias"] = tb.grad.numpy()
    return found


class Mismatch(AssertionError):
    pass


def compare(name: str, got: np.ndarray, reference: np.ndarray, magnitude: np.ndarray,
            dtype: str, what: str = "oracle", slack: float = 1.0) -> None:
    """Finite elements within the bound, NaN and ±Inf exactly where the reference has them."""
    got = np.asarray(got, np.float64)
    reference = np.asarray(reference, np.float64)
    if got.shape != reference.shape:
        raise Mismatch(f"{name}: shape {got.shape}, {what} {reference.shape}")
    for test in (np.isnan, np.isposinf, np.isneginf):
        where = test(got) != test(reference)
        if where.any():
            at = tuple(int(i) for i in np.argwhere(where)[0])
            raise Mismatch(f"{name}: {test.__name__} differs from the {what} at {at}: got "
                           f"{got[at]!r}, expected {reference[at]!r} ({int(where.sum())} elements)")
    finite = np.isfinite(reference)
    with np.errstate(invalid="ignore"):
        error = np.abs(np.where(finite, got - reference, 0))
    bound = slack * RELATIVE[dtype] * (np.abs(magnitude) + 1e-30) + 1e-300
    worst = np.argmax(error / bound)
    if error.flat[worst] > bound.flat[worst]:
        at = np.unravel_index(worst, got.shape)
        raise Mismatch(f"{name}: differs from the {what} at {tuple(int(i) for i in at)}: got "
                       f"{got[at]!r}, expected {reference[at]!r} (bound {bound[at]:.3g}; "
                       f"{int((error > bound).sum())} of {got.size} elements off)")


# --- one case ---------------------------------------------------------------------------------

def check_case(kernel, case: Case, exact: bool = False, torch_too: bool = True) -> int:
    """Run every function of ``kernel`` on the case's data and compare; returns the number of
    function calls checked.  Raises Mismatch (an AssertionError) naming what differs."""
    spec = case.spec
    arrays = case_arrays(case)
    if exact:
        placed = {k: _exact(v) if v is not None else None for k, v in arrays.items()}
        holders = {}
    else:
        holders = {k: Guarded(v.shape, v.dtype, v) for k, v in arrays.items() if v is not None}
        placed = {k: holders[k].array if k in holders else None for k in arrays}
    before = {k: v.copy() for k, v in placed.items() if v is not None}
    reference = expected(spec, arrays)
    torch_reference = torch_expected(spec, arrays) if torch_too else None

    functions = kernel.functions
    calls = {
        "forward": [placed[a] for a in functions["forward"].args],
        "grad_input": [placed[a] for a in functions["grad_input"].args],
        "grad_weight": [placed[a] for a in functions["grad_weight"].args],
    }
    if spec.bias:
        calls["grad_bias"] = [placed[a] for a in functions["grad_bias"].args]
    checked = 0
    for name, args in calls.items():
        function = functions[name]
        fresh = function(*args)
        shape, dtype = function.output_shape(*args), function.dtype
        out = Guarded(shape, dtype)
        if function(*args, out=out.array) is not out.array:
            raise Mismatch(f"{name}: out= was not returned")
        if not out.guards_intact():
            raise Mismatch(f"{name}: wrote outside its output array (guard region changed)")
        if not np.array_equal(fresh, out.array, equal_nan=True):
            raise Mismatch(f"{name}: the result written into out= differs from a fresh one")
        value, magnitude = reference[name]
        compare(name, fresh, value, magnitude, spec.dtype)
        if torch_reference is not None and name in torch_reference and not case.special:
            compare(name, fresh, torch_reference[name], magnitude, spec.dtype, "PyTorch", 4.0)
        checked += 1
    for k, v in before.items():
        if not np.array_equal(v, placed[k], equal_nan=True):
            raise Mismatch(f"the kernel wrote into its input {k}")
    for k, holder in holders.items():
        if not holder.guards_intact():
            raise Mismatch(f"the guard region around input {k} changed")
    return checked
