"""Every op kind through symconv.jax's one primitive, differentiated by the VJP table in both
modes: values and gradients against JAX's own ops (or JAX autodiff of the same formula in
jnp), and jax.test_util.check_grads to second order, forward and reverse, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_forward

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy
lax = jax.lax
sj = pytest.importorskip("symconv.jax")
from jax.test_util import check_grads  # noqa: E402

SHIFT = "Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))"
SQUASH = "Y[n, i] = sum(tanh(W[a] * X[n, i + a]) + X[n, i + a] ** 2 * W[a], (a, 0, 2))"


def lax_conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    rank = x.ndim - 2
    pads = [(padding, padding)] * rank if isinstance(padding, int) else padding
    y = lax.conv_general_dilated(x, w, (stride,) * rank if isinstance(stride, int) else stride,
                                 pads, rhs_dilation=(dilation,) * rank,
                                 feature_group_count=groups)
    return y if b is None else y + b.reshape(1, -1, *(1,) * rank)


def lax_conv_transpose(x, w, b, stride, padding, output_padding):
    """torch's conv_transpose2d as a dilated-input convolution with the flipped kernel."""
    k = w.shape[2:]
    flipped = jnp.flip(w, axis=(2, 3)).swapaxes(0, 1)
    pads = [(kk - 1 - padding, kk - 1 - padding + output_padding) for kk in k]
    y = lax.conv_general_dilated(x, flipped, (1, 1), pads, lhs_dilation=(stride, stride))
    return y + b.reshape(1, -1, 1, 1)


def lax_avg_pool(x, size, stride, padding):
    window = (1, 1, size, size)
    total = lax.reduce_window(x, 0.0, lax.add, window, (1, 1, stride, stride),
                              [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    return total / size ** 2


def padded(mode):
    numpy_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]

    def reference(x, w, b):
        return lax_conv(jnp.pad(x, [(0, 0), (0, 0), (2, 2), (1, 1)], mode=numpy_mode), w, b)
    return reference


def shift_reference(x, w):
    taps = jnp.stack([x[:, :, a:a + 7:2] for a in range(3)], -1)          # (n, c, i, a)
    return jnp.einsum("ncia,ca->nci", taps, w)


def squash_reference(x, w):
    windows = jnp.stack([x[:, a:a + 6] for a in range(3)], -1)            # (n, i, a)
    return jnp.sum(jnp.tanh(windows * w) + windows ** 2 * w, -1)


def cases(cache_dir):
    """name -> (symconv function, reference function, argument shapes).  Built for one
    instruction set (the default's baseline): second order builds a few derived packages."""
    from symconv.package import targets
    at = {"cache_dir": cache_dir, "target": targets.variants()[-1].target}
    return {
        "conv1d": (lambda x, w, b: sj.conv(x, w, b, stride=2, padding=1, dilation=2, **at),
                   lambda x, w, b: lax_conv(x, w, b, 2, 1, 2), [(2, 2, 9), (3, 2, 3), (3,)]),
        "conv2d-groups": (lambda x, w: sj.conv(x, w, None, padding=1, groups=2, **at),
                          lambda x, w: lax_conv(x, w, None, 1, 1, 1, 2),
                          [(1, 4, 5, 4), (2, 2, 3, 2)]),
        "conv3d": (lambda x, w, b: sj.conv(x, w, b, stride=(1, 2, 1), padding=1, **at),
                   lambda x, w, b: lax_conv(x, w, b, (1, 2, 1), 1),
                   [(1, 2, 4, 5, 3), (2, 2, 2, 3, 2), (2,)]),
        "conv-transpose2d": (
            lambda x, w, b: sj.conv_transpose(x, w, b, stride=2, padding=1, output_padding=1,
                                              **at),
            lambda x, w, b: lax_conv_transpose(x, w, b, 2, 1, 1),
            [(1, 2, 3, 4), (2, 3, 3, 2), (3,)]),
        "avg-pool2d": (lambda x: sj.avg_pool(x, 3, stride=2, padding=1, **at),
                       lambda x: lax_avg_pool(x, 3, 2, 1), [(2, 2, 7, 6)]),
        **{f"conv2d-{mode}": (
            lambda x, w, b, mode=mode: sj.conv(x, w, b, padding=(2, 1), padding_mode=mode, **at),
            padded(mode), [(1, 2, 5, 4), (2, 2, 3, 3), (2,)])
           for mode in ("reflect", "replicate", "circular")},
        "op-strided": (sj.op(SHIFT, {"X": (2, 3, 9), "W": (3, 3)}, **at),
                       shift_reference, [(2, 3, 9), (3, 3)]),
        "op-nonlinear": (sj.op(SQUASH, {"X": (2, 8), "W": (3,)}, **at),
                         squash_reference, [(2, 8), (3,)]),
    }


NAMES = ["conv1d", "conv2d-groups", "conv3d", "conv-transpose2d", "avg-pool2d",
         "conv2d-reflect", "conv2d-replicate", "conv2d-circular", "op-strided", "op-nonlinear"]
FIRST_ORDER_ONLY = {"conv2d-replicate", "conv2d-circular", "op-nonlinear"}
"""Cases whose second order JAX leaves to others: the padding modes but reflect (the
binding's path is the same for each; test_torch_ops checks each mode's second order), and
the nonlinear op (its binding's path is op-strided's; test_torch_ops' gradgradcheck and
test_double_backward check its second derivatives).  Their derived packages took a minute
and a half of the suite."""


def close(got, expected, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-10, atol=1e-10,
                               err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_values_both_modes_and_second_order_match_jax(name, cache_dir):
    ours, reference, shapes = cases(cache_dir)[name]
    rng = np.random.default_rng(NAMES.index(name))
    args = [jnp.asarray(rng.standard_normal(shape)) for shape in shapes]
    close(ours(*args), reference(*args), "forward")
    close(jax.jit(ours)(*args), reference(*args), "forward under jit")
    argnums = tuple(range(len(args)))

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)))
    for have, want in zip(jax.jit(jax.grad(loss(ours), argnums))(*args),
                          jax.grad(loss(reference), argnums)(*args)):
        close(have, want, "grad")
    tangents = [jnp.asarray(rng.standard_normal(shape)) for shape in shapes]
    close(jax.jvp(ours, args, tangents)[1], jax.jvp(reference, args, tangents)[1], "jvp")
    check_grads(ours, args, order=1 if name in FIRST_ORDER_ONLY else 2, modes=("fwd", "rev"))


def test_four_dimensional_conv_against_the_numpy_oracle(cache_dir):
    from symconv.package import targets
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 1, 3, 3, 4, 3)), rng.standard_normal((2, 1, 2, 2, 3, 2))

    def ours(x, w):
        return sj.conv(x, w, None, stride=(1, 1, 2, 1), padding=1, cache_dir=cache_dir,
                       target=targets.variants()[-1].target)
    expected = conv_forward(x, w, None, (1, 1, 2, 1), [(1, 1)] * 4, (1,) * 4, 1)
    close(ours(jnp.asarray(x), jnp.asarray(w)), expected, "4-D forward")
    check_grads(ours, (jnp.asarray(x), jnp.asarray(w)), order=2, modes=("fwd", "rev"))


def test_linearize_hessian_and_vmap(cache_dir):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 2, 7)))
    w = jnp.asarray(rng.standard_normal((3, 2, 3)))

    def loss(w):
        return jnp.sum(jnp.tanh(sj.conv(x, w, None, padding=1, cache_dir=cache_dir)))

    def reference(w):
        return jnp.sum(jnp.tanh(lax_conv(x, w, None, 1, 1)))
    _, tangent_map = jax.linearize(loss, w)
    close(tangent_map(w), jax.jvp(reference, (w,), (w,))[1], "linearize")
    close(jax.hessian(loss)(w), jax.hessian(reference)(w), "hessian")
    xs = jnp.stack([x, 2 * x, -x])
    close(jax.vmap(lambda xi: sj.conv(xi, w, None, padding=1, cache_dir=cache_dir))(xs),
          jax.vmap(lambda xi: lax_conv(xi, w, None, 1, 1))(xs), "vmap over the input")
    ws = jnp.stack([w, -w])
    close(jax.jit(jax.vmap(lambda wi: sj.conv(x, wi, None, cache_dir=cache_dir)))(ws),
          jax.vmap(lambda wi: lax_conv(x, wi))(ws), "vmap over the weight, under jit")


def test_vmap_over_the_input_is_one_kernel_call(cache_dir, monkeypatch):
    from symconv.binding import conv_kernel
    kernel = conv_kernel((4, 3, 10), (5, 3, 3), padding=1, bias=False, dtype="float64",
                         cache_dir=cache_dir)
    forward = kernel.functions["forward"]
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(forward, name)

        def __call__(self, *arrays, **options):
            calls.append(arrays[0].shape)
            return forward(*arrays, **options)
    monkeypatch.setitem(kernel.functions, "forward", Spy())
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.standard_normal((6, 4, 3, 10)))
    w = jnp.asarray(rng.standard_normal((5, 3, 3)))
    ys = jax.vmap(lambda x: sj.conv(x, w, None, padding=1, cache_dir=cache_dir))(xs)
    assert calls == [(24, 3, 10)]                  # one call, the vmapped axis in the batch
    close(ys, jax.vmap(lambda x: lax_conv(x, w, None, 1, 1))(xs), "folded vmap")


def test_op_errors(cache_dir):
    made = sj.op(SHIFT, {"X": (2, 3, 9), "W": (3, 3)}, dtype="float32", cache_dir=cache_dir)
    x, w = jnp.zeros((2, 3, 9)), jnp.zeros((3, 3))
    with pytest.raises(TypeError, match="made with dtype='float32'"):
        made(x, w)
    with pytest.raises(TypeError, match="takes 2 arrays"):
        made(x)
    with pytest.raises(TypeError, match="different dtypes"):
        made(x, w.astype(jnp.float32))
