"""A compiled kernel's gradients checked against finite differences in float64.

``check_kernel``: a compiled kernel's gradients.  The loss is
``L = Σ grad_output · forward(inputs)`` for a random ``grad_output``; for
every differentiable input the kernel's gradient is compared with central
differences of L, once along a random direction (every element at once) and
once per sampled element.  (``symconv.graph.gradcheck`` checks functions of
tensors through the autodiff graph.)
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
    record = kernel.record
    if record.dtype != "float64":
        raise ValueError("gradient checks need a float64 kernel (finite differences in float32 "
                         "are too coarse); compile the spec with dtype='float64'")
    rng = np.random.default_rng(seed)
    shapes = record.shapes_at(2)      # an open batch checked on two items: maps and sums
    inputs = {name: rng.standard_normal(shapes[name]) for name in kernel.inputs}
    cotangent = record.cotangent
    grad_output = rng.standard_normal(shapes[cotangent])

    def loss(values) -> float:
        return float(np.vdot(grad_output, kernel.forward(*(values[n] for n in kernel.inputs))))

    scale = 1e-2  # below this magnitude errors are judged absolutely
    given = {**inputs, cotangent: grad_output}
    gradients = kernel.backward(*(given[n] for n in record.backward_args))
    results = []
    for name, gradient in zip(kernel.gradients, gradients):
        if name not in kernel.differentiable:      # an absent optional array: no gradient
            continue
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
