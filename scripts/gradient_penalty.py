"""A Wasserstein critic with a gradient penalty (WGAN-GP), trained through symconv's graph.

    python scripts/gradient_penalty.py                 # train, printing the losses
    python scripts/gradient_penalty.py --check-torch   # also compare one step with PyTorch

The critic D is a small 1-D CNN (conv -> tanh -> conv -> mean).  "Real" samples are noisy
sine waves, "fake" ones noise.  Each step evaluates the penalty

    λ · mean((||∇_x D(x̂)||₂ - 1)²)   at x̂ = ε·real + (1 - ε)·fake,

whose gradient with respect to the critic's weights needs the derivative of a derivative:
``sc.grad(..., create_graph=True)`` records the backward pass through the convolutions
(their derived gradient sums), and backward then runs through those gradients' own derived
sums.  The critic learns to separate the two sets (its Wasserstein estimate rises) while
the penalty keeps its gradient norm near 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import symconv as sc  # noqa: E402
from symconv import nn, optim  # noqa: E402

LENGTH = 32


def samples(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(real, fake), each (n, 1, LENGTH) float64."""
    t = np.linspace(0, 2 * np.pi, LENGTH)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    real = np.sin(t + phase) + 0.1 * rng.standard_normal((n, 1, LENGTH))
    fake = rng.standard_normal((n, 1, LENGTH))
    return real, fake


class Critic(nn.Module):
    def __init__(self, rng: np.random.Generator):
        self.c1 = nn.Conv(1, 8, 5, padding=2, rank=1, dtype="float64", rng=rng)
        self.c2 = nn.Conv(8, 1, 5, padding=2, rank=1, dtype="float64", rng=rng)

    def forward(self, x: sc.Tensor) -> sc.Tensor:
        return self.c2(self.c1(x).tanh()).mean(axis=(1, 2))


def losses(critic: Critic, real: np.ndarray, fake: np.ndarray, epsilon: np.ndarray,
           weight: float):
    """(total loss, Wasserstein estimate, penalty) as graph tensors."""
    mixed = sc.Tensor(epsilon * real + (1 - epsilon) * fake, requires_grad=True)
    (gradient,) = sc.grad(critic(mixed).sum(), [mixed], create_graph=True)
    norms = ((gradient ** 2).sum(axis=(1, 2)) + 1e-12).sqrt()
    penalty = ((norms - 1.0) ** 2).mean()
    estimate = critic(sc.Tensor(real)).mean() - critic(sc.Tensor(fake)).mean()
    return penalty * weight - estimate, estimate, penalty


def check_against_torch(critic: Critic, real, fake, epsilon, weight: float) -> None:
    """One step's parameter gradients against the same critic in PyTorch."""
    import torch
    loss, _, _ = losses(critic, real, fake, epsilon, weight)
    critic.zero_grad()
    loss.backward()
    params = {name: torch.tensor(p.data, requires_grad=True)
              for name, p in critic.named_parameters()}

    def torch_critic(x):
        h = torch.nn.functional.conv1d(x, params["c1.weight"], params["c1.bias"], padding=2)
        return torch.nn.functional.conv1d(h.tanh(), params["c2.weight"], params["c2.bias"],
                                          padding=2).mean(dim=(1, 2))

    mixed = torch.tensor(epsilon * real + (1 - epsilon) * fake, requires_grad=True)
    (gradient,) = torch.autograd.grad(torch_critic(mixed).sum(), [mixed], create_graph=True)
    norms = ((gradient ** 2).sum(dim=(1, 2)) + 1e-12).sqrt()
    estimate = torch_critic(torch.tensor(real)).mean() - torch_critic(torch.tensor(fake)).mean()
    (((norms - 1) ** 2).mean() * weight - estimate).backward()
    worst = max(float(np.abs(p.grad - params[name].grad.numpy()).max())
                for name, p in critic.named_parameters())
    print(f"one step against PyTorch: largest parameter-gradient difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--penalty-weight", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-torch", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    critic = Critic(rng)
    optimiser = optim.Adam(critic.parameters(), lr=1e-2)
    if args.check_torch:
        real, fake = samples(rng, args.batch)
        check_against_torch(critic, real, fake, rng.uniform(size=(args.batch, 1, 1)),
                            args.penalty_weight)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        real, fake = samples(rng, args.batch)
        loss, estimate, penalty = losses(critic, real, fake, rng.uniform(size=(args.batch, 1, 1)),
                                         args.penalty_weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step == 1 or step % 25 == 0:
            print(f"step {step:3d}: Wasserstein estimate {estimate.item():7.4f}, gradient "
                  f"penalty {penalty.item():7.4f}")
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{seconds * 1e3:.1f} ms per step (forward, gradient with create_graph, "
          f"backward through it)")


if __name__ == "__main__":
    main()
