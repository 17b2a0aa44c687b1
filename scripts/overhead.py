#!/usr/bin/env python
"""Per-call overhead of symconv's PyTorch and JAX ops on a tiny convolution (1-D, 2 -> 4
channels, length 16, kernel 3, float32, one thread), against each framework's own conv and
against the compiled kernel called alone; medians of the best of five repeats, in µs.

    python scripts/overhead.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import timeit


def best(function, number: int) -> float:
    function()
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="symconv-overhead-")

    import jax
    import jax.numpy as jnp
    import torch

    import symconv.jax as sj
    import symconv.torch as st
    from symconv.binding import conv_kernel
    torch.set_num_threads(1)
    F = torch.nn.functional
    x, w, b = torch.randn(1, 2, 16), torch.randn(4, 2, 3), torch.randn(4)
    kernel = conv_kernel(x.shape, w.shape, 1, 1, cache_dir=cache)
    arrays = (x.numpy(), w.numpy(), b.numpy())
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    rows = [
        ("kernel alone (NumPy arrays)", best(lambda: kernel.forward(*arrays), 5000), None),
        ("torch forward", best(lambda: st.conv(x, w, b, padding=1, cache_dir=cache), 3000),
         best(lambda: F.conv1d(x, w, b, padding=1), 3000)),
        ("torch forward + backward",
         best(lambda: st.conv(xg, wg, b, padding=1, cache_dir=cache).sum().backward(), 500),
         best(lambda: F.conv1d(xg, wg, b, padding=1).sum().backward(), 500)),
    ]
    xj, wj, bj = (jnp.asarray(a) for a in arrays)

    def lax(x, w, b):
        return jax.lax.conv_general_dilated(x, w, (1,), [(1, 1)]) + b[None, :, None]

    def ours(x, w, b):
        return sj.conv(x, w, b, padding=1, cache_dir=cache)
    for label, mine, theirs in (
            ("jax jit forward", jax.jit(ours), jax.jit(lax)),
            ("jax jit grad", jax.jit(jax.grad(lambda x, w, b: jnp.sum(ours(x, w, b) ** 2), 1)),
             jax.jit(jax.grad(lambda x, w, b: jnp.sum(lax(x, w, b) ** 2), 1)))):
        rows.append((label, best(lambda: jax.block_until_ready(mine(xj, wj, bj)), 500),
                     best(lambda: jax.block_until_ready(theirs(xj, wj, bj)), 500)))
    print(f"{'':30} {'symconv':>9} {'framework':>10}")
    for label, mine, theirs in rows:
        print(f"{label:30} {mine:8.1f}  {'' if theirs is None else f'{theirs:9.1f}'}")


if __name__ == "__main__":
    main()
