"""Train a small CNN on scikit-learn's 8x8 digits through symconv's autodiff graph.

    pip install -e ".[train]"                      # scikit-learn (bundled data, no download)
    python scripts/train_digits.py                 # train, then report test accuracy and s/epoch
    python scripts/train_digits.py --compare-torch # also: time per training step vs PyTorch

The network: conv 3x3 (1 -> 16) -> ReLU -> max-pool 2 -> conv 3x3 (16 -> 32) -> ReLU ->
max-pool 2 -> linear (128 -> 10), trained with Adam on cross-entropy (the learning rate drops
tenfold for the last third of the epochs).  The two convolutions run
the kernels symconv compiles from index sums (compiled on the first step, then cached on disk);
everything else is the graph's NumPy ops.  20% of the 1,797 images are held out (stratified,
fixed seed) and never trained on.

Every epoch reshuffles and drops the incomplete last batch (equal steps); evaluation's last
batch is smaller, and runs through the same compiled layers: the kernels take the batch size
at run time.
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


def load_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) float32 in [0, 1], int labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("scikit-learn is needed for the digits data: pip install -e '.[train]'")
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def build_model(seed: int = 0) -> nn.Sequential:
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv(1, 16, (3, 3), padding=1, rng=rng), nn.ReLU(), nn.MaxPool(2),
        nn.Conv(16, 32, (3, 3), padding=1, rng=rng), nn.ReLU(), nn.MaxPool(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10, rng=rng))


def batches(n: int, size: int, rng: np.random.Generator):
    """Shuffled index batches of exactly ``size`` (the incomplete last one is dropped)."""
    order = rng.permutation(n)
    for start in range(0, n - size + 1, size):
        yield order[start:start + size]


def train_step(model, opt, x: np.ndarray, y: np.ndarray) -> float:
    opt.zero_grad()
    loss = sc.cross_entropy(model(sc.Tensor(x)), y)
    loss.backward()
    opt.step()
    return loss.item()


def predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions in batches of ``batch_size`` (the last one may be smaller)."""
    with sc.no_grad():
        return np.concatenate([model(sc.Tensor(x[start:start + batch_size])).data.argmax(axis=1)
                               for start in range(0, len(x), batch_size)])


class Progress:
    """A one-line progress bar on stderr (one line per epoch when stderr is not a terminal)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.live = total, label, sys.stderr.isatty()

    def update(self, done: int, note: str) -> None:
        if self.live or done == self.total:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done == self.total else ""
            print(f"\r{self.label} [{bar}] {done}/{self.total} {note}", end=end, file=sys.stderr,
                  flush=True)


def train(epochs: int = 15, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
          verbose: bool = True) -> dict:
    x_train, y_train, x_test, y_test = load_data(seed)
    model = build_model(seed)
    opt = optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch_size
    epoch_seconds, epoch_losses = [], []
    for epoch in range(1, epochs + 1):
        opt.lr = lr if epoch <= epochs - epochs // 3 else lr / 10
        progress = Progress(steps, f"epoch {epoch:2d}/{epochs}")
        start, losses = time.perf_counter(), []
        for step, idx in enumerate(batches(len(x_train), batch_size, rng), 1):
            losses.append(train_step(model, opt, x_train[idx], y_train[idx]))
            if verbose:
                progress.update(step, f"loss {np.mean(losses):.4f}")
        epoch_seconds.append(time.perf_counter() - start)
        epoch_losses.append(float(np.mean(losses)))
    accuracy = float((predict(model, x_test, batch_size) == y_test).mean())
    train_accuracy = float((predict(model, x_train, batch_size) == y_train).mean())
    return {"model": model, "accuracy": accuracy, "train_accuracy": train_accuracy,
            "epoch_seconds": epoch_seconds, "epoch_losses": epoch_losses,
            "test_size": len(x_test), "train_size": len(x_train)}


# --- the same network in PyTorch, for timing ---------------------------------------------------

def torch_model(model: nn.Sequential):
    """The network in PyTorch with a copy of ``model``'s current weights."""
    import torch
    conv1, conv2, linear = model[0], model[3], model[7]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(128, 10))
    with torch.no_grad():
        for ours, theirs in ((conv1, net[0]), (conv2, net[3]), (linear, net[7])):
            theirs.weight.copy_(torch.from_numpy(ours.weight.data))
            theirs.bias.copy_(torch.from_numpy(ours.bias.data))
    return net


def time_steps(step, x_batches, y_batches, warmup: int = 5) -> float:
    """Median seconds of ``step(x, y)`` over the batches after ``warmup`` calls."""
    for i in range(warmup):
        step(x_batches[i], y_batches[i])
    times = []
    for x, y in zip(x_batches, y_batches):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare_torch(batch_size: int = 32, steps: int = 200, seed: int = 0, lr: float = 3e-3) -> dict:
    """Seconds per training step (forward, backward, Adam) of the network, symconv vs PyTorch."""
    import torch
    x_train, y_train, _, _ = load_data(seed)
    rng = np.random.default_rng(seed)
    idx = [rng.choice(len(x_train), batch_size, replace=False) for _ in range(steps)]
    xs, ys = [x_train[i] for i in idx], [y_train[i] for i in idx]

    model = build_model(seed)
    net = torch_model(model)
    opt = optim.Adam(model.parameters(), lr=lr)
    ours = time_steps(lambda x, y: train_step(model, opt, x, y), xs, ys)

    torch_opt = torch.optim.Adam(net.parameters(), lr=lr)
    txs, tys = [torch.from_numpy(x) for x in xs], [torch.from_numpy(y) for y in ys]

    def torch_step(x, y):
        torch_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        torch_opt.step()
        return loss.item()
    theirs = time_steps(torch_step, txs, tys)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        theirs_1 = time_steps(torch_step, txs, tys)
    finally:
        torch.set_num_threads(threads)
    return {"symconv": ours, "torch": theirs, "torch_threads": threads, "torch_1_thread": theirs_1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="PATH.npz", help="save the trained parameters")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time one training step here and in PyTorch")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    result = train(args.epochs, args.batch_size, args.lr, args.seed)
    total = time.perf_counter() - start
    seconds = result["epoch_seconds"]
    print(f"digits: {result['train_size']} training / {result['test_size']} held-out images, "
          f"{args.epochs} epochs of batch {args.batch_size}")
    print(f"test accuracy  {100 * result['accuracy']:.2f}%  "
          f"(train {100 * result['train_accuracy']:.2f}%)")
    print(f"time per epoch {np.median(seconds[1:] or seconds):.3f} s median "
          f"(first epoch {seconds[0]:.3f} s, includes compiling on a cold cache); "
          f"{total:.1f} s in all")
    if args.save:
        result["model"].save(args.save)
        print(f"parameters saved to {args.save}")
    if args.compare_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("--compare-torch needs PyTorch")
        t = compare_torch(args.batch_size, seed=args.seed, lr=args.lr)
        print(f"time per training step (batch {args.batch_size}, forward + backward + Adam, "
              f"median of 200):")
        print(f"  symconv                   {1e3 * t['symconv']:.3f} ms")
        print(f"  PyTorch ({t['torch_threads']} threads)       {1e3 * t['torch']:.3f} ms")
        print(f"  PyTorch (1 thread)        {1e3 * t['torch_1_thread']:.3f} ms")


if __name__ == "__main__":
    main()
