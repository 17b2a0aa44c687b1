"""torch.autograd.gradcheck and gradgradcheck of the PyTorch binding, with the numbers.

    python scripts/torch_gradcheck.py

For each convolution (ranks 1-4, strides, dilations, asymmetric padding, groups, with and
without bias) in float64: torch's gradcheck and gradgradcheck verdicts, and the largest
difference between the full Jacobian the binding's backward gives
(``torch.autograd.functional.jacobian``) and central differences computed here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import symconv.torch as st  # noqa: E402

CASES = [  # input shape, weight shape, arguments
    ((1, 2, 9), (3, 2, 3), dict(stride=2, padding=1, dilation=2), True),
    ((2, 4, 7), (4, 2, 3), dict(padding=((2, 0),), groups=2), False),
    ((1, 2, 6, 5), (3, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), True),
    ((1, 3, 5, 5), (3, 1, 3, 3), dict(padding="same", groups=3), True),
    ((1, 2, 4, 3, 4), (2, 2, 2, 2, 3), dict(stride=(2, 1, 1), padding=1), True),
    ((1, 1, 3, 4, 3, 3), (2, 1, 2, 2, 2, 2), dict(padding=1, dilation=(1, 2, 1, 1)), True),
]


def numerical_jacobian(fn, inputs, eps=1e-6):
    """d output / d input, by central differences, one input element at a time."""
    out = fn(*inputs).detach()
    blocks = []
    for t in inputs:
        columns = []
        flat = t.detach().view(-1)
        for k in range(flat.numel()):
            saved = flat[k].item()
            flat[k] = saved + eps
            plus = fn(*inputs).detach()
            flat[k] = saved - eps
            minus = fn(*inputs).detach()
            flat[k] = saved
            columns.append(((plus - minus) / (2 * eps)).reshape(-1))
        blocks.append(torch.stack(columns, dim=1).reshape(*out.shape, *t.shape))
    return blocks


def main() -> int:
    cache_dir = tempfile.mkdtemp(prefix="symconv-gradcheck-")
    ok = True
    print(f"{'gradcheck':>9} {'gradgrad':>9} {'max |J - J_fd|':>15} {'relative':>9} "
          f"{'seconds':>8}  case")
    for input_shape, weight_shape, kwargs, bias in CASES:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(input_shape, dtype=torch.float64, generator=generator,
                        requires_grad=True)
        w = torch.randn(weight_shape, dtype=torch.float64, generator=generator,
                        requires_grad=True)
        inputs = (x, w)
        if bias:
            inputs += (torch.randn(weight_shape[0], dtype=torch.float64, generator=generator,
                                   requires_grad=True),)

        def fn(*args):
            return st.conv(*args, cache_dir=cache_dir, **kwargs)
        start = time.perf_counter()
        first = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6,
                                         raise_exception=False)
        second = torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6,
                                              raise_exception=False)
        analytic = torch.autograd.functional.jacobian(fn, inputs)
        numeric = numerical_jacobian(fn, inputs)
        error = max(float((a - n).abs().max()) for a, n in zip(analytic, numeric))
        scale = max(float(n.abs().max()) for n in numeric)
        seconds = time.perf_counter() - start
        arguments = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        name = (f"conv{len(input_shape) - 2}d x{input_shape} w{weight_shape}"
                f"{' +bias' if bias else ''}, {arguments}")
        print(f"{str(first):>9} {str(second):>9} {error:15.2e} {error / scale:9.1e} "
              f"{seconds:8.1f}  {name}")
        ok &= first and second and error / scale < 1e-7
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
