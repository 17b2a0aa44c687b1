"""3-D and 4-D (3-D + time) CNNs trained through symconv's graph on tasks this script generates.

    python scripts/train_volumes.py              # both tasks
    python scripts/train_volumes.py --task 3d    # or only one: 3d, 4d

3d: which of four shapes (ball, hollow shell, ring, cross of three bars) sits, at a random
    place, size and orientation, in a noisy 16^3 volume.  Network: conv3d 3^3 (1 -> 8) -> ReLU
    -> max-pool 2 -> conv3d 3^3 (8 -> 16) -> ReLU -> max-pool 2 -> linear (1024 -> 4).
4d: which of six directions (+-x, +-y, +-z) a blurred blob moves in through 8 frames of a noisy
    8^3 volume, i.e. an (N, 1, 8, 8, 8, 8) input.  Telling the direction needs a filter that
    spans time and space together: a 4-D convolution, which PyTorch has no layer for.
    Network: conv4d 3^4 (1 -> 8) -> ReLU -> avg-pool 2^4 (compiled from its index sum too) ->
    conv4d 3^4 (8 -> 16) -> ReLU -> mean over (t, z, y, x) -> linear (16 -> 6).

Each task prints its training loss per epoch (it falls), the held-out accuracy and the time per
epoch.  Chance is 25% (3d) and 16.7% (4d).
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

SHAPES = ("ball", "shell", "ring", "cross")
DIRECTIONS = ("+t·x", "-t·x", "+t·y", "-t·y", "+t·z", "-t·z")


# --- data ---------------------------------------------------------------------------------------

def make_shapes(n: int, size: int = 16, noise: float = 0.5, seed: int = 0):
    """(volumes (n, 1, size, size, size) float32, labels (n,)): one shape per volume."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=n)
    grid = np.indices((size,) * 3, dtype=np.float32)            # (3, s, s, s)
    volumes = np.empty((n, 1, size, size, size), np.float32)
    for i, label in enumerate(labels):
        radius = rng.uniform(3.0, 5.0)
        center = rng.uniform(radius, size - 1 - radius, size=3).astype(np.float32)
        offset = np.abs(grid - center[:, None, None, None])      # |x - c| per axis
        distance = np.sqrt((offset ** 2).sum(axis=0))
        if SHAPES[label] == "ball":
            inside = distance <= radius
        elif SHAPES[label] == "shell":
            inside = np.abs(distance - radius) <= 0.8
        elif SHAPES[label] == "ring":  # a torus around a random axis
            axis = rng.integers(0, 3)
            across = np.sqrt((np.delete(offset, axis, axis=0) ** 2).sum(axis=0))  # from the axis
            inside = np.sqrt((across - radius) ** 2 + offset[axis] ** 2) <= 1.2
        else:  # three orthogonal bars through the centre
            thin = offset <= 1.0
            inside = (offset.max(axis=0) <= radius) & (thin.sum(axis=0) >= 2)
        volumes[i, 0] = inside + noise * rng.standard_normal((size,) * 3)
    return volumes, labels.astype(np.int64)


def make_motions(n: int, frames: int = 8, size: int = 8, speed: float = 0.5, noise: float = 0.3,
                 seed: int = 0):
    """(clips (n, 1, frames, size, size, size) float32, labels (n,)): a Gaussian blob moving at
    ``speed`` voxels per frame along one of six directions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DIRECTIONS), size=n)
    grid = np.indices((size,) * 3, dtype=np.float32)
    travel = speed * (frames - 1)
    clips = np.empty((n, 1, frames, size, size, size), np.float32)
    for i, label in enumerate(labels):
        axis, sign = divmod(int(label), 2)
        velocity = np.zeros(3, np.float32)
        velocity[axis] = speed if sign == 0 else -speed
        start = rng.uniform(1.5, size - 2.5, size=3).astype(np.float32)
        start[axis] = rng.uniform(1.5, size - 2.5 - travel) if sign == 0 else \
            rng.uniform(1.5 + travel, size - 2.5)
        for t in range(frames):
            center = start + t * velocity
            d2 = ((grid - center[:, None, None, None]) ** 2).sum(axis=0)
            clips[i, 0, t] = np.exp(-d2 / (2 * 1.2 ** 2))
    clips += noise * rng.standard_normal(clips.shape).astype(np.float32)
    return clips, labels.astype(np.int64)


# --- networks -----------------------------------------------------------------------------------

def shapes_model(seed: int = 0) -> nn.Sequential:
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv(1, 8, (3, 3, 3), padding=1, rng=rng), nn.ReLU(), nn.MaxPool(2),
        nn.Conv(8, 16, (3, 3, 3), padding=1, rng=rng), nn.ReLU(), nn.MaxPool(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4 * 4, len(SHAPES), rng=rng))


class MotionNet(nn.Module):
    """Two 4-D convolutions, a compiled 4-D average pooling, a global mean, a linear layer."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.conv1 = nn.Conv(1, 8, 3, padding=1, rank=4, rng=rng)
        self.pool = nn.AvgPool(2)
        self.conv2 = nn.Conv(8, 16, 3, padding=1, rank=4, rng=rng)
        self.linear = nn.Linear(16, len(DIRECTIONS), rng=rng)

    def forward(self, x):
        h = self.pool(self.conv1(x).relu())
        h = self.conv2(h).relu().mean(axis=(2, 3, 4, 5))
        return self.linear(h)


# --- training -----------------------------------------------------------------------------------

def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Accuracy in batches of ``batch_size`` (``len(x)`` must be a multiple of it)."""
    correct = 0
    with sc.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(sc.Tensor(x[start:start + batch_size])).data
            correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    return correct / len(x)


def fit(name: str, model, data, epochs: int, batch_size: int, lr: float, seed: int = 0,
        verbose: bool = True) -> dict:
    """Adam on cross-entropy over fixed-size shuffled batches; returns losses, accuracy, times."""
    x_train, y_train, x_test, y_test = data
    opt = optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch_size
    losses, seconds = [], []
    if verbose:
        print(f"{name}: {len(x_train)} training / {len(x_test)} held-out samples of shape "
              f"{x_train.shape[1:]}, batch {batch_size}")
    for epoch in range(1, epochs + 1):
        start, epoch_losses = time.perf_counter(), []
        order = rng.permutation(len(x_train))
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            opt.zero_grad()
            loss = sc.cross_entropy(model(sc.Tensor(x_train[idx])), y_train[idx])
            loss.backward()
            opt.step()
            epoch_losses.append(loss.item())
            if verbose and sys.stderr.isatty():
                print(f"\r  epoch {epoch}/{epochs} step {step + 1}/{steps} "
                      f"loss {np.mean(epoch_losses):.4f}", end="", file=sys.stderr, flush=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(np.mean(epoch_losses)))
        if verbose:
            if sys.stderr.isatty():
                print("\r", end="", file=sys.stderr)
            print(f"  epoch {epoch:2d}/{epochs}  mean training loss {losses[-1]:.4f}  "
                  f"({seconds[-1]:.2f} s)")
    accuracy = evaluate(model, x_test, y_test, batch_size)
    if verbose:
        print(f"  held-out accuracy {100 * accuracy:.1f}%, loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}, {np.median(seconds):.2f} s per epoch (median)")
    return {"losses": losses, "accuracy": accuracy, "epoch_seconds": seconds}


def split(x: np.ndarray, y: np.ndarray, test: int):
    return x[test:], y[test:], x[:test], y[:test]


def run_3d(epochs: int = 10, train: int = 640, test: int = 160, batch_size: int = 16,
           seed: int = 0, verbose: bool = True) -> dict:
    x, y = make_shapes(train + test, seed=seed)
    return fit("3-D shapes", shapes_model(seed), split(x, y, test), epochs, batch_size, 2e-3,
               seed, verbose)


def run_4d(epochs: int = 12, train: int = 480, test: int = 120, batch_size: int = 16,
           seed: int = 0, verbose: bool = True) -> dict:
    x, y = make_motions(train + test, seed=seed)
    return fit("4-D motion (3-D + time)", MotionNet(seed), split(x, y, test), epochs, batch_size,
               3e-3, seed, verbose)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("3d", "4d", "both"), default="both")
    parser.add_argument("--epochs", type=int, help="override each task's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    extra = {} if args.epochs is None else {"epochs": args.epochs}
    if args.task in ("3d", "both"):
        run_3d(seed=args.seed, **extra)
    if args.task in ("4d", "both"):
        run_4d(seed=args.seed, **extra)


if __name__ == "__main__":
    main()
