"""Optimisers: SGD with momentum and Adam, with PyTorch's update rules.

    opt = optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad(); loss.backward(); opt.step()

Parameters are updated in place; a parameter without a gradient (``.grad``
None) is skipped that step, as in PyTorch.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .engine import Tensor

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters")
        for p in self.params:
            if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
                raise TypeError(f"{type(self).__name__}: parameters must be leaf tensors with "
                                f"requires_grad=True, got {p!r}")
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p.data, p.grad)

    def _update(self, i: int, param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """``v ← μ v + (1 − dampening) g``; ``p ← p − lr (g + μ v if nesterov else v)``, where
    ``g`` includes ``weight_decay · p``.  Without momentum, plain gradient descent."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.velocity: list[np.ndarray | None] = [None] * len(self.params)

    def _update(self, i: int, param: np.ndarray, grad: np.ndarray) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            v = self.velocity[i]
            if v is None:
                v = self.velocity[i] = np.array(grad, copy=True)
            else:
                v *= self.momentum
                v += (1 - self.dampening) * grad
            grad = grad + self.momentum * v if self.nesterov else v
        param -= self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam`` (L2 ``weight_decay``
    added to the gradient)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]
        self.steps = [0] * len(self.params)

    def _update(self, i: int, param: np.ndarray, grad: np.ndarray) -> None:
        beta1, beta2 = self.betas
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        self.steps[i] += 1
        t = self.steps[i]
        m, v = self.m[i], self.v[i]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        step_size = self.lr / (1 - beta1 ** t)
        denominator = np.sqrt(v) / math.sqrt(1 - beta2 ** t) + self.eps
        param -= step_size * m / denominator
