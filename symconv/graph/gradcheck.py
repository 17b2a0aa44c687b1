"""``gradcheck``: any function of tensors through the autodiff graph against central
differences in float64, element by element, with a report naming the input, the largest
absolute and relative errors and where the worst one is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import Tensor, no_grad

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
