"""Layers for training through the graph: parameters, modules, save and load.

    model = nn.Sequential(
        nn.Conv(1, 16, 3, padding=1, rank=2, rng=0), nn.ReLU(), nn.MaxPool(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10, rng=1))
    loss = symconv.cross_entropy(model(x), labels)
    model.save("digits.npz"); model.load("digits.npz")

Initialisation follows PyTorch's defaults (weights and biases uniform in
±1/√fan_in), so a network here and the same network in PyTorch start from
the same distribution.  Parameters are found by walking a module's
attributes in definition order (lists and tuples of modules included), which
gives every parameter a stable dotted name such as ``layers.0.weight``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import numpy as np

from . import compiled, ops
from .engine import Tensor

__all__ = ["Parameter", "Module", "Sequential", "Conv", "Linear", "ReLU", "LeakyReLU", "Tanh",
           "Sigmoid", "MaxPool", "AvgPool", "Flatten"]


class Parameter(Tensor):
    """A tensor a module trains: ``requires_grad`` is always True."""

    __slots__ = ()

    def __init__(self, data: Any, dtype: Any = None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


def _generator(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], bound: float,
             dtype: Any) -> Parameter:
    return Parameter(rng.uniform(-bound, bound, size=shape).astype(dtype))


class Module:
    """Base class: ``__call__`` runs ``forward``; parameters are found through attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, parameter)`` in definition order, each parameter once."""
        seen: set[int] = set()
        stack: list[tuple[str, Any]] = [(prefix, self)]
        while stack:  # depth first, in attribute order
            name, value = stack.pop()
            if isinstance(value, Parameter):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield name, value
            elif isinstance(value, Module):
                base = f"{name}." if name else ""
                stack.extend(reversed([(base + key, item) for key, item in vars(value).items()]))
            elif isinstance(value, (list, tuple)):
                stack.extend(reversed([(f"{name}.{i}", item) for i, item in enumerate(value)]))

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter's array by dotted name."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays into the parameters in place (optimisers keep working on them)."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing {missing}, "
                           f"unexpected {unexpected}")
        for name, p in params.items():
            array = np.asarray(state[name])
            if array.shape != p.shape:
                raise ValueError(f"{name}: saved shape {array.shape}, the parameter has {p.shape}")
            p.data[...] = array

    def save(self, path: str | os.PathLike) -> None:
        """Write the parameters to an ``.npz`` file (NumPy adds the suffix if it is missing)."""
        np.savez(path, **self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        """Read parameters saved by :meth:`save`."""
        with np.load(path) as saved:
            self.load_state_dict({name: saved[name] for name in saved.files})

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Module):
    """Layers applied in order."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


class Conv(Module):
    """N-D convolution layer: ``compiled.conv`` with a weight (out, in // groups, *kernel) and bias.

    The rank comes from ``kernel_size`` when it is a sequence, else from
    ``rank`` (e.g. ``Conv(1, 8, 3, rank=4)`` for 3-D + time); an int size without
    ``rank`` is 2-D, like ``torch.nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 rank: int | None = None, dtype: Any = "float32", rng: Any = None):
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * (2 if rank is None else rank)
        kernel_size = tuple(int(k) for k in kernel_size)
        if rank is not None and len(kernel_size) != rank:
            raise ValueError(f"Conv: kernel_size {kernel_size} does not have rank {rank}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv: channels {in_channels} -> {out_channels} are not divisible "
                             f"by groups {groups}")
        rng = _generator(rng)
        fan_in = in_channels // groups * math.prod(kernel_size)
        bound = 1 / math.sqrt(fan_in)
        self.weight = _uniform(rng, (out_channels, in_channels // groups, *kernel_size), bound,
                               dtype)
        self.bias = _uniform(rng, (out_channels,), bound, dtype) if bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: Tensor) -> Tensor:
        return compiled.conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, groups=self.groups)

    def __repr__(self) -> str:
        out, c, *kernel = self.weight.shape
        return (f"Conv({c * self.groups}, {out}, kernel_size={tuple(kernel)}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None})")


class Linear(Module):
    """``x @ weight.T + bias`` with weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = "float32", rng: Any = None):
        rng = _generator(rng)
        bound = 1 / math.sqrt(in_features)
        self.weight = _uniform(rng, (out_features, in_features), bound, dtype)
        self.bias = _uniform(rng, (out_features,), bound, dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        out, inp = self.weight.shape
        return f"Linear({inp}, {out}, bias={self.bias is not None})"


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x)


class LeakyReLU(Module):
    def __init__(self, slope: float = 0.01):
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.slope)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class _Pool(Module):
    """N-D pooling of any rank by the op ``pool(x, kernel_size, stride, padding)`` that a
    subclass sets."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x, self.kernel_size, self.stride, self.padding)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")


class MaxPool(_Pool):
    """N-D max pooling (NumPy), any rank."""

    pool = staticmethod(ops.max_pool)


class AvgPool(_Pool):
    """N-D average pooling, compiled from its index sum, any rank."""

    pool = staticmethod(compiled.avg_pool)


class Flatten(Module):
    """Merge every axis after the batch axis."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)
