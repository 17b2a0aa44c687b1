"""An independent reference: N-D convolution and its gradients written from the definition.

Nothing here comes from symconv.  The forward pads the input with zeros and,
for every kernel tap, adds the strided input window times that tap's weights;
the gradients are the same loop run backwards (scatter into the padded input,
accumulate into the weight tap).  Everything is computed in float64.
"""

from __future__ import annotations

import itertools

import numpy as np


def output_size(size, kernel, stride, pad_lo, pad_hi, dilation):
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _windows(x_shape, w_shape, stride, padding, dilation):
    """For every kernel tap: (tap, slices of the padded input it reads for all outputs)."""
    spatial, kernel = x_shape[2:], w_shape[2:]
    out = [output_size(n, k, s, lo, hi, d)
           for n, k, s, (lo, hi), d in zip(spatial, kernel, stride, padding, dilation)]
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(d * t, d * t + s * (o - 1) + 1, s)
                       for t, s, d, o in zip(tap, stride, dilation, out))
        yield tap, window, out


def conv_forward(x, w, b, stride, padding, dilation, groups):
    """y[n, o, i] = b[o] + Σ_c Σ_k w[o, c, k] x_padded[n, g·Cg + c, s·i + d·k]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n_batch, c_in = x.shape[:2]
    c_out, c_group = w.shape[:2]
    o_group = c_out // groups
    xp = np.pad(x, [(0, 0), (0, 0), *padding])
    y = None
    for tap, window, out in _windows(x.shape, w.shape, stride, padding, dilation):
        if y is None:
            y = np.zeros((n_batch, c_out, *out))
        for g in range(groups):
            patch = xp[(slice(None), slice(g * c_group, (g + 1) * c_group), *window)]
            taps = w[(slice(g * o_group, (g + 1) * o_group), slice(None), *tap)]
            y[:, g * o_group:(g + 1) * o_group] += np.einsum("nc...,oc->no...", patch, taps)
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, c_out) + (1,) * (x.ndim - 2))
    return y


def conv_backward(x, w, gy, stride, padding, dilation, groups):
    """(grad_input, grad_weight, grad_bias) of Σ gy · y, by running the forward loop backwards."""
    x, w, gy = (np.asarray(a, np.float64) for a in (x, w, gy))
    c_out, c_group = w.shape[:2]
    o_group = c_out // groups
    xp = np.pad(x, [(0, 0), (0, 0), *padding])
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for tap, window, _ in _windows(x.shape, w.shape, stride, padding, dilation):
        for g in range(groups):
            ci = (slice(None), slice(g * c_group, (g + 1) * c_group), *window)
            oi = slice(g * o_group, (g + 1) * o_group)
            gyg = gy[:, oi]
            gxp[ci] += np.einsum("no...,oc->nc...", gyg, w[(oi, slice(None), *tap)])
            # einsum multiplies every pair: BLAS (tensordot) skips zeros, so an infinite
            # gradient times a padded zero would give 0 instead of the definition's NaN
            flat_gy = gyg.reshape(gyg.shape[0], gyg.shape[1], -1)
            flat_x = xp[ci].reshape(gyg.shape[0], c_group, -1)
            gw[(oi, slice(None), *tap)] += np.einsum("nop,ncp->oc", flat_gy, flat_x)
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(padding, x.shape[2:]))
    gx = gxp[(slice(None), slice(None), *inner)]
    gb = gy.sum(axis=(0, *range(2, gy.ndim)))
    return gx, gw, gb


def same_padding(spatial, kernel, stride, dilation):
    """'same' padding: output ceil(in / stride), the odd pixel on the high side."""
    pairs = []
    for n, k, s, d in zip(spatial, kernel, stride, dilation):
        out = -(-n // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
        pairs.append((total // 2, total - total // 2))
    return pairs


NUMPY_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_input(x, padding, mode):
    """The padded input a padding mode stands for (numpy.pad), for the zero-padding oracle."""
    return np.pad(np.asarray(x, np.float64), [(0, 0), (0, 0), *padding], mode=NUMPY_MODES[mode])


def conv_forward_mode(x, w, b, stride, padding, dilation, groups, mode):
    """Any padding mode: pad with numpy.pad, then the zero-padding oracle without padding."""
    valid = [(0, 0)] * len(padding)
    return conv_forward(pad_input(x, padding, mode), w, b, stride, valid, dilation, groups)


def conv_backward_mode(x, w, gy, stride, padding, dilation, groups, mode):
    """Gradients through numpy.pad: the padded gradient folded back onto the input by
    differentiating the pad itself (each padded element adds to the element it copies)."""
    xp = pad_input(x, padding, mode)
    valid = [(0, 0)] * len(padding)
    gxp, gw, gb = conv_backward(xp, w, gy, stride, valid, dilation, groups)
    # the pad is linear: its adjoint scatters every padded element back to its source
    index = np.arange(np.prod(x.shape[2:])).reshape(x.shape[2:])
    source = np.pad(index, padding, mode=NUMPY_MODES[mode]) if mode != "zeros" else None
    gx = np.zeros(np.asarray(x).shape)
    flat = gx.reshape(gx.shape[0], gx.shape[1], -1)
    if source is None:
        inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(padding, x.shape[2:]))
        return gxp[(slice(None), slice(None), *inner)], gw, gb
    grads = gxp.reshape(gxp.shape[0], gxp.shape[1], -1)
    np.add.at(flat, (slice(None), slice(None), source.reshape(-1)), grads)
    return gx, gw, gb
