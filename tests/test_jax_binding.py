"""symconv.jax against independent references: jax.lax.conv_general_dilated with JAX's own
autodiff (first and second order, under jit), and the NumPy oracle for a 4-D convolution."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_backward, conv_forward

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # float64 references; float32 is tested explicitly
jnp = jax.numpy
sj = pytest.importorskip("symconv.jax")

CASES = [  # input shape, weight shape, stride, (lo, hi) padding, dilation, groups
    pytest.param((2, 3, 11), (4, 3, 3), (2,), ((1, 2),), (2,), 1, id="1d"),
    pytest.param((2, 4, 8, 7), (6, 2, 3, 2), (1, 2), ((1, 1), (0, 1)), (1, 1), 2, id="2d-groups"),
    pytest.param((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), (2, 1, 1), ((0, 1), (1, 1), (1, 0)),
                 (1, 2, 1), 1, id="3d"),
]


def reference(x, w, b, stride, padding, dilation, groups):
    y = jax.lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
                                     feature_group_count=groups)
    return y + b.reshape(1, -1, *(1,) * (x.ndim - 2))


def arrays(input_shape, weight_shape, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(input_shape), dtype),
            jnp.asarray(rng.standard_normal(weight_shape), dtype),
            jnp.asarray(rng.standard_normal(weight_shape[0]), dtype))


def close(got, expected, tolerance, what):
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(np.asarray(got) - expected).max()) / scale
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


@pytest.mark.parametrize("input_shape, weight_shape, stride, padding, dilation, groups", CASES)
def test_jit_grad_and_second_order_match_lax(input_shape, weight_shape, stride, padding,
                                             dilation, groups, cache_dir):
    x, w, b = arrays(input_shape, weight_shape)
    conv_args = (stride, padding, dilation, groups)

    def ours(x, w, b):
        return sj.conv(x, w, b, *conv_args, cache_dir=cache_dir)

    def theirs(x, w, b):
        return reference(x, w, b, *conv_args)
    close(jax.jit(ours)(x, w, b), theirs(x, w, b), 1e-12, "forward under jit")

    def loss(conv):
        return lambda x, w, b: jnp.sum(jnp.sin(conv(x, w, b)))
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, w, b)
    expected = jax.grad(loss(theirs), argnums=(0, 1, 2))(x, w, b)
    for name, g, r in zip(("input", "weight", "bias"), grads, expected):
        close(g, r, 1e-12, f"grad_{name}")

    def penalty(conv):  # second order: the gradient of a norm of the input gradient
        first = jax.grad(loss(conv), argnums=0)
        return lambda x, w, b: jnp.sum(first(x, w, b) ** 2)
    grads = jax.grad(penalty(ours), argnums=(0, 1, 2))(x, w, b)
    expected = jax.grad(penalty(theirs), argnums=(0, 1, 2))(x, w, b)
    for name, g, r in zip(("input", "weight", "bias"), grads, expected):
        close(g, r, 1e-10, f"second-order grad_{name}")


def test_float32_no_bias_and_vmap(cache_dir):
    x, w, _ = arrays((3, 2, 9), (2, 2, 3), np.float32, seed=1)
    y = sj.conv(x, w, None, 1, "same", cache_dir=cache_dir)
    assert y.dtype == jnp.float32
    expected = jax.lax.conv_general_dilated(x, w, (1,), "SAME")
    close(y, expected, 1e-5, "float32 forward")
    per_example = jax.vmap(lambda xi: sj.conv(xi[None], w, None, 1, "same",
                                              cache_dir=cache_dir)[0])(x)
    close(per_example, expected, 1e-5, "vmap")
    gw = jax.grad(lambda w: jnp.sum(sj.conv(x, w, None, 1, "same", cache_dir=cache_dir) ** 2))(w)
    gw_ref = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(x, w, (1,), "SAME") ** 2))(w)
    close(gw, gw_ref, 1e-5, "float32 grad_weight")


def test_4d_against_numpy_oracle(cache_dir):
    x, w, b = arrays((1, 2, 5, 4, 4, 3), (3, 2, 2, 3, 2, 2), seed=2)
    args = ((2, 1, 1, 1), ((1, 0), (1, 1), (0, 0), (1, 1)), (1, 1, 2, 1), 1)
    y = jax.jit(lambda x, w, b: sj.conv(x, w, b, *args, cache_dir=cache_dir))(x, w, b)
    close(y, conv_forward(x, w, b, *args), 1e-12, "4-D forward")
    gy = jnp.asarray(np.random.default_rng(3).standard_normal(y.shape))
    _, vjp = jax.vjp(lambda x, w, b: sj.conv(x, w, b, *args, cache_dir=cache_dir), x, w, b)
    for name, got, ref in zip(("input", "weight", "bias"), vjp(gy),
                              conv_backward(x, w, gy, *args)):
        close(got, ref, 1e-12, f"4-D grad_{name}")


def test_errors(cache_dir):
    x, w, b = arrays((1, 2, 6), (2, 2, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        sj.conv(x.astype(jnp.int32), w.astype(jnp.int32), cache_dir=cache_dir)
    with pytest.raises(TypeError, match="different dtypes.*weight float32"):
        sj.conv(x, w.astype(jnp.float32), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="same number of dims"):
        sj.conv(x, w[..., None], cache_dir=cache_dir)
    with pytest.raises(ValueError, match="ConvSpec.groups"):
        sj.conv(x, w, b, groups=3, cache_dir=cache_dir)
