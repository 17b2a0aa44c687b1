"""Finite-difference checks in float64.

``check_kernel``: a compiled kernel's gradients.  The loss is
``L = Σ grad_output · forward(inputs)`` for a random ``grad_output``; for
every differentiable input the kernel's gradient is compared with central
differences of L, once along a random direction (every element at once) and
once per sampled element.

``gradcheck``: any function of tensors through the autodiff graph
(``symconv.graph``), element by element, with a report naming the input,
the largest absolute and relative errors and where the worst one is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernel import Kernel


@dataclass(frozen=True)
class GradientCheck:
    """The outcome for one input: relative errors and the worst sampled element."""

    name: str
    directional_error: float
    element_error: float
    worst_element: tuple[int, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.directional_error <= self.tolerance and self.element_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name:>12}: direction rel. error {self.directional_error:.2e}, "
                f"element rel. error {self.element_error:.2e} (worst at {self.worst_element}) "
                f"-> {verdict}")


def _relative(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), scale)


def check_kernel(kernel: Kernel, seed: int = 0, samples: int = 6, eps: float = 1e-4,
                 tolerance: float = 1e-6) -> list[GradientCheck]:
    """Check every gradient of a float64 kernel against central differences."""
    if kernel.manifest["dtype"] != "float64":
        raise ValueError("gradient checks need a float64 kernel (finite differences in float32 "
                         "are too coarse); compile the spec with dtype='float64'")
    rng = np.random.default_rng(seed)
    shapes = {name: tuple(a["shape"]) for name, a in kernel.manifest["arrays"].items()}
    inputs = {name: rng.standard_normal(shapes[name]) for name in kernel.inputs}
    cotangent = kernel.manifest["backward_args"][-1]
    grad_output = rng.standard_normal(shapes[cotangent])

    def loss(values) -> float:
        return float(np.vdot(grad_output, kernel.forward(*(values[n] for n in kernel.inputs))))

    scale = 1e-2  # below this magnitude errors are judged absolutely
    given = {**inputs, cotangent: grad_output}
    gradients = kernel.backward(*(given[n] for n in kernel.manifest["backward_args"]))
    results = []
    for name, gradient in zip(kernel.differentiable, gradients):
        def shifted(delta):
            return loss({**inputs, name: inputs[name] + delta})

        direction = rng.standard_normal(shapes[name])
        numeric = (shifted(eps * direction) - shifted(-eps * direction)) / (2 * eps)
        directional = _relative(numeric, float(np.vdot(gradient, direction)), scale)
        worst, worst_at = 0.0, ()
        for flat in rng.choice(gradient.size, size=min(samples, gradient.size), replace=False):
            at = np.unravel_index(flat, gradient.shape)
            bump = np.zeros(shapes[name])
            bump[at] = eps
            numeric = (shifted(bump) - shifted(-bump)) / (2 * eps)
            error = _relative(numeric, float(gradient[at]), scale)
            if error >= worst:
                worst, worst_at = error, tuple(int(i) for i in at)
        results.append(GradientCheck(name, directional, worst, worst_at, tolerance))
    return results


# ------------------------------------------------------------------------------------------------
# Graph-level check: any function of tensors, by finite differences in float64
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputReport:
    """How one input's backward gradient compares with central differences.

    The absolute error of an element is ``|backward - numeric|``, its relative error
    that divided by ``max(|numeric|, atol)``; an element passes when its absolute error
    is at most ``atol + rtol |numeric|``.
    """

    index: int
    shape: tuple[int, ...]
    checked: int                 # elements compared
    max_abs_error: float
    max_rel_error: float
    worst_at: tuple[int, ...]    # the element furthest outside the tolerance (or closest to it)
    analytic: float              # the two gradients there
    numeric: float
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"input {self.index} {self.shape}: max abs error {self.max_abs_error:.2e}, max rel "
                f"error {self.max_rel_error:.2e} over {self.checked} elements; worst at "
                f"{self.worst_at}: backward {self.analytic:.6g}, finite differences "
                f"{self.numeric:.6g} -> {verdict}")


@dataclass(frozen=True)
class GradcheckReport:
    """The outcome of :func:`gradcheck`: one :class:`InputReport` per checked input."""

    inputs: tuple[InputReport, ...]
    eps: float
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.inputs)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = (f"gradcheck {'passed' if self.passed else 'FAILED'} (float64, eps {self.eps:g}; "
                f"|backward - numeric| <= {self.atol:g} + {self.rtol:g} |numeric|)")
        return "\n".join([head, *(f"  {r}" for r in self.inputs)])


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` on a mismatch; ``.report`` holds the details."""

    def __init__(self, report: GradcheckReport):
        super().__init__(str(report))
        self.report = report


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              max_elements: int | None = None, seed: int = 0,
              raise_exception: bool = True) -> GradcheckReport:
    """Check the graph's gradients of ``fn(*inputs)`` against central differences in float64.

    ``inputs`` may hold Tensors, arrays and other values.  Floating-point
    Tensors with ``requires_grad`` and floating-point arrays are checked
    (converted to float64 copies); everything else (Tensors without
    ``requires_grad``, integer arrays such as class targets, numbers) is
    passed through unchanged.  A non-scalar output is reduced to
    ``Σ r · fn(...)`` with a fixed random ``r``.  Every element of every
    checked input is perturbed unless ``max_elements`` limits it to a random
    sample.  Returns a :class:`GradcheckReport` (truthy when it passed); on a
    mismatch raises :class:`GradcheckError` unless ``raise_exception=False``.
    """
    from .graph import Tensor, no_grad

    rng = np.random.default_rng(seed)
    args, checked = [], []
    for position, value in enumerate(inputs):
        array = value.data if isinstance(value, Tensor) else value
        wants = value.requires_grad if isinstance(value, Tensor) else True
        if wants and isinstance(array, np.ndarray) and array.dtype.kind == "f":
            args.append(Tensor(np.array(array, np.float64), requires_grad=True))
            checked.append(position)
        else:
            args.append(value)
    if not checked:
        raise ValueError("gradcheck: no input to check (give floating-point arrays or Tensors "
                         "with requires_grad=True)")

    output = fn(*args)
    if not isinstance(output, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(output).__name__}")
    if output.dtype != np.float64:
        raise TypeError(f"gradcheck: fn returned {output.dtype} for float64 inputs; finite "
                        f"differences need the whole computation in float64")
    weights = rng.standard_normal(output.shape)

    def loss() -> float:
        with no_grad():
            return float(np.vdot(weights, fn(*args).data))

    if not output.requires_grad:
        raise ValueError("gradcheck: fn's output does not depend on any checked input through "
                         "the graph")
    output.backward(weights)

    reports = []
    for position in checked:
        tensor = args[position]
        data = tensor.data
        analytic = tensor.grad if tensor.grad is not None else np.zeros_like(data)
        count = data.size if max_elements is None else min(max_elements, data.size)
        flats = (np.arange(data.size) if count == data.size
                 else np.sort(rng.choice(data.size, size=count, replace=False)))
        numeric = np.empty(count)
        for n, flat in enumerate(flats):
            at = np.unravel_index(flat, data.shape)
            original = data[at]
            data[at] = original + eps
            plus = loss()
            data[at] = original - eps
            minus = loss()
            data[at] = original
            numeric[n] = (plus - minus) / (2 * eps)
        got = analytic.reshape(-1)[flats]
        abs_error = np.abs(got - numeric)
        rel_error = abs_error / np.maximum(np.abs(numeric), atol)
        excess = abs_error / (atol + rtol * np.abs(numeric))
        worst = int(np.argmax(excess)) if count else 0
        reports.append(InputReport(
            index=position, shape=data.shape, checked=count,
            max_abs_error=float(abs_error.max(initial=0.0)),
            max_rel_error=float(rel_error.max(initial=0.0)),
            worst_at=tuple(int(i) for i in np.unravel_index(flats[worst], data.shape)) if count
            else (),
            analytic=float(got[worst]) if count else 0.0,
            numeric=float(numeric[worst]) if count else 0.0,
            passed=bool(np.all(excess <= 1.0))))
    report = GradcheckReport(tuple(reports), eps, atol, rtol)
    if raise_exception and not report.passed:
        raise GradcheckError(report)
    return report
