"""Scale-out on Dask: convolve a chunked volume with symconv's kernels, block by block.

    import dask.array as da, symconv.dask as sd
    x = da.from_zarr(...)                                   # (N, C, *spatial), chunked in space
    y = sd.conv(x, w, b, stride=2, padding=1)               # a lazy dask array
    gx, gw, gb = sd.conv_backward(x, w, gy, stride=2, padding=1, bias=True)

The result equals the single-machine kernel's: every output element is
computed by exactly one block, from exactly the input it reads.

How the volume is cut (per spatial axis, in the coordinates of the
zero-padded input; the padding itself is never materialised as dask chunks:
the first and last blocks add their zeros when they run):

* The chunk boundaries are the input's, moved onto multiples of the stride,
  so chunk ``[a, b)`` *owns* the outputs ``i`` whose window starts in it
  (``s·i ∈ [a, b)``).  Chunks too small for the halos, owning no output or
  holding no input element are merged into a neighbour.
* **forward** (``map_overlap`` on the input): an owned output's window reaches
  at most ``reach - stride`` past ``b`` (``reach = dilation·(kernel - 1) + 1``),
  so each block gets that much from the next block (an asymmetric halo, none
  before it) and runs a "valid" convolution on exactly the region its outputs
  read.  The output's chunks are the owned outputs.
* **grad_input** (``map_overlap`` on ``grad_output``): input position ``p``
  receives from outputs ``i`` with ``s·i ≤ p < s·i + reach``, so a block needs
  ``⌊(reach - 1)/s⌋`` outputs of the previous block (a halo before it, none
  after).  It runs the local convolution's ``grad_input`` on them and keeps
  its own input chunk.
* **grad_weight / grad_bias**: each block's local ``grad_weight`` (and
  ``grad_bias``) over its owned outputs is one partial sum; the partials are
  added in float64 by a tree reduction (``sum(split_every=...)``) and cast
  back to the dtype.

Kernels are specialised to exact shapes but the batch size, which they take at
run time, so each block shape that differs in more than its batch gets its own
kernel (a handful: interior blocks share one).  ``precompile=True``
builds them in the calling process first, into ``cache_dir`` (default
``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``); worker processes load them
from there, so give workers the same cache directory (a shared file system
for a multi-machine cluster), or let each worker compile on a miss.  Each
kernel call runs ``threads`` OpenMP threads (default 1: dask's workers are
the parallelism).  Weights and biases travel inside the task graph; they are
small next to the volume.  Only ``padding_mode="zeros"``.

Needs dask (``pip install symconv[dask]``; ``dask[distributed]`` for a cluster).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np

from . import autodiff
from .autodiff import Package
from .binding import conv_package
from .spec import ConvSpec

__all__ = ["conv", "conv_backward", "grad_input", "grad_weight", "chunking", "ChunkedConv",
           "AxisChunking"]


@dataclass(frozen=True)
class AxisChunking:
    """How one spatial axis is cut.  ``bounds`` are chunk boundaries of the padded input
    (``0 = b_0 < ... < b_m = padded``), ``outputs`` the first output each chunk owns
    (``o_0 = 0 < ... < o_m = out``)."""

    size: int
    pad: tuple[int, int]
    stride: int
    dilation: int
    kernel: int
    bounds: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def reach(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def padded(self) -> int:
        return self.size + self.pad[0] + self.pad[1]

    @property
    def halo_in(self) -> int:
        """Input positions a block's windows read past its end."""
        return max(self.reach - self.stride, 0)

    @property
    def halo_out(self) -> int:
        """Outputs of the previous block whose windows reach into a block."""
        return (self.reach - 1) // self.stride

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    @property
    def out_chunks(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.outputs, self.outputs[1:]))

    @property
    def input_bounds(self) -> tuple[int, ...]:
        """The chunk boundaries in the (unpadded) input: chunk ``j`` holds input elements
        ``[input_bounds[j], input_bounds[j + 1])``; the first and last also hold padding."""
        lo = self.pad[0]
        return (0, *(b - lo for b in self.bounds[1:-1]), self.size)

    @property
    def input_chunks(self) -> tuple[int, ...]:
        bounds = self.input_bounds
        return tuple(b - a for a, b in zip(bounds, bounds[1:]))

    def forward_length(self, j: int) -> int:
        """Length of the input region block ``j``'s outputs read (from ``bounds[j]``)."""
        return self.stride * (self.outputs[j + 1] - self.outputs[j] - 1) + self.reach

    def first_gather_output(self, j: int) -> int:
        """The first output block ``j`` sees in ``grad_input`` (its own, minus the halo)."""
        return self.outputs[j] - self.halo_out if j > 0 else self.outputs[0]

    def gather_length(self, j: int) -> int:
        """Length of the input region the outputs block ``j`` sees in ``grad_input`` cover
        (from ``stride · first_gather_output(j)``)."""
        return self.stride * (self.outputs[j + 1] - 1 - self.first_gather_output(j)) + self.reach

    @classmethod
    def make(cls, size: int, pad: tuple[int, int], stride: int, dilation: int, kernel: int,
             out: int, input_chunks: Sequence[int]) -> "AxisChunking":
        lo, hi = pad
        padded = size + lo + hi
        edges = np.cumsum(input_chunks)[:-1] + lo  # interior chunk boundaries, padded coords
        bounds = sorted({0} | {int(stride * round(e / stride)) for e in edges})
        bounds = [b for b in bounds if b < padded] + [padded]
        chunking = cls(size, (lo, hi), stride, dilation, kernel, (), ())
        need_in, need_out = max(chunking.halo_in, 1), max(chunking.halo_out, 1)
        while True:
            outputs = [min(-(-b // stride), out) for b in bounds[:-1]] + [out]
            counts = np.diff(outputs)
            inputs = np.diff([0, *(b - lo for b in bounds[1:-1]), size])
            bad = [j for j in range(len(counts)) if counts[j] < need_out or inputs[j] < need_in]
            if not bad or len(bounds) == 2:
                break
            j = bad[0]
            del bounds[j if j > 0 else 1]  # merge chunk j into its left (or right) neighbour
        return cls(size, (lo, hi), stride, dilation, kernel, tuple(bounds), tuple(outputs))


def _resolved_cache_dir(cache_dir) -> str:
    """An absolute cache directory to hand to workers (the default resolved here, once)."""
    if cache_dir is None:
        from .package.build import default_cache_dir
        cache_dir = default_cache_dir()
    return os.fspath(Path(cache_dir).expanduser().resolve())


def _local_package(shape, weight_shape, conv: dict, cache_dir, target) -> Package:
    """The package of a block's "valid" convolution on a region of ``shape``."""
    return conv_package(shape, weight_shape, conv["stride"], 0, conv["dilation"], conv["groups"],
                        conv["bias"], conv["dtype"], "zeros", cache_dir, target)


def _gradient(package: Package, wrt: str, values: dict, cotangent, threads) -> np.ndarray:
    """The gradient of ``Σ cotangent · forward`` with respect to ``wrt``: the call the
    package's VJP table names."""
    rule = autodiff.vjp(package, "forward", wrt)
    function = rule.package.kernel.functions[rule.function]
    return function(*rule.arrays(values, cotangent), threads=threads)


def _ready(array: np.ndarray) -> np.ndarray:
    """The array as the kernels take it: C-contiguous and aligned.  Arrays that arrive from
    another process (distributed's deserialisation) may be unaligned views of a message
    buffer; those are copied, the rest passed as they are."""
    if array.flags.c_contiguous and array.flags.aligned:
        return array
    return np.array(array, order="C", copy=True)


def _region(block: np.ndarray, chunkings: Sequence[AxisChunking], j: Sequence[int]) -> np.ndarray:
    """The part of the padded input block ``j``'s outputs read, from its overlapped input
    block: a view of it, with the padding's zeros added at the edges of the input."""
    index, pads = [slice(None), slice(None)], [(0, 0), (0, 0)]
    for d, chunking in enumerate(chunkings):
        start = chunking.bounds[j[d]] - chunking.pad[0]  # first position read, input coordinates
        stop = start + chunking.forward_length(j[d])
        first = chunking.input_bounds[j[d]]  # the block holds [first, first + its length)
        take = (max(start, first), min(stop, first + block.shape[2 + d]))
        before, after = take[0] - start, stop - take[1]
        if before > max(-start, 0) or after > max(stop - chunking.size, 0):
            raise RuntimeError(f"symconv.dask: block {tuple(j)} of shape {block.shape} does not "
                               f"hold the input its outputs read (chunks were changed behind "
                               f"the chunking's back)")
        index.append(slice(take[0] - first, take[1] - first))
        pads.append((before, after))
    region = block[tuple(index)]
    if any(p != (0, 0) for p in pads):
        region = np.pad(region, pads)  # zeros outside the input: the padding
    return _ready(region)


def _forward_block(block, *, weight, bias, chunkings, conv, cache_dir, target, threads,
                   block_id=None):
    region = _region(block, chunkings, block_id[2:])
    kernel = _local_package(region.shape, weight.shape, conv, cache_dir, target).kernel
    arrays = (region, _ready(weight)) if bias is None else (region, _ready(weight), _ready(bias))
    return kernel.forward(*arrays, threads=threads)


def _grad_input_block(block, *, weight, chunkings, conv, cache_dir, target, threads, block_id=None):
    j = block_id[2:]
    rank = len(j)
    starts = [chunkings[d].first_gather_output(j[d]) for d in range(rank)]
    expected = tuple(chunkings[d].outputs[j[d] + 1] - starts[d] for d in range(rank))
    if block.shape[2:] != expected:
        raise RuntimeError(f"symconv.dask: grad_output block {block_id} has shape {block.shape}, "
                           f"expected spatial {expected} (chunks were changed behind the "
                           f"chunking's back)")
    lengths = [chunkings[d].gather_length(j[d]) for d in range(rank)]
    shape = (block.shape[0], weight.shape[1] * conv["groups"], *lengths)
    package = _local_package(shape, weight.shape, conv, cache_dir, target)
    local = _gradient(package, "input", {"weight": _ready(weight)}, _ready(block), threads)
    sizes = [chunkings[d].input_chunks[j[d]] for d in range(rank)]
    result = np.zeros(shape[:2] + tuple(sizes), local.dtype)
    source, target_ = [], []
    for d in range(rank):
        chunking = chunkings[d]
        # the chunk's first input element, in the padded coordinates the local region starts at
        offset = chunking.input_bounds[j[d]] + chunking.pad[0] - chunking.stride * starts[d]
        count = max(min(sizes[d], lengths[d] - offset), 0)  # beyond: read by no output
        source.append(slice(offset, offset + count))
        target_.append(slice(0, count))
    result[(slice(None), slice(None), *target_)] = local[(slice(None), slice(None), *source)]
    return result


def _weight_block(block, gy, *, chunkings, weight_shape, conv, cache_dir, target, threads,
                  block_id=None):
    region = _region(block, chunkings, block_id[2:block.ndim])  # the last index is the new axis
    package = _local_package(region.shape, weight_shape, conv, cache_dir, target)
    gy = _ready(gy)
    parts = [_gradient(package, "weight", {"input": region}, gy, threads).ravel()]
    if conv["bias"]:
        parts.append(_gradient(package, "bias", {}, gy, threads))
    flat = np.concatenate(parts).astype(np.float64)
    return flat.reshape((1,) * block.ndim + flat.shape)


class ChunkedConv:
    """One convolution over a chunked volume: the chunking, its block kernels, and the passes.

    ``input_chunks`` are the input's chunks (a dask ``chunks`` tuple: batch, channels,
    then one tuple per spatial axis); channels are always taken whole.
    """

    def __init__(self, spec: ConvSpec, input_chunks, cache_dir=None, target=None,
                 threads: int | None = 1):
        if getattr(spec, "padding_mode", "zeros") != "zeros":
            raise NotImplementedError(f"symconv.dask: padding_mode {spec.padding_mode!r} is not "
                                      f"supported; only zeros")
        if getattr(spec, "layout", "channels_first") != "channels_first":
            raise NotImplementedError(f"symconv.dask: layout {spec.layout!r} is not supported; "
                                      f"chunks are cut channels first, (N, C, *spatial)")
        self.spec = spec
        self.cache_dir = _resolved_cache_dir(cache_dir)
        self.target, self.threads = target, threads
        chunks = tuple(tuple(int(c) for c in axis) for axis in input_chunks)
        if len(chunks) != len(spec.input_shape) or any(
                sum(c) != n for c, n in zip(chunks, spec.input_shape)):
            raise ValueError(f"symconv.dask: chunks {chunks} do not fit the input shape "
                             f"{spec.input_shape}")
        self.batch_chunks = chunks[0]
        self.chunkings = tuple(
            AxisChunking.make(n, pad, s, d, k, o, c) for n, pad, s, d, k, o, c in zip(
                spec.input_shape[2:], spec.padding, spec.stride, spec.dilation, spec.kernel_size,
                spec.output_shape[2:], chunks[2:]))
        self.conv = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups,
                         bias=spec.bias, dtype=spec.dtype)

    @property
    def rank(self) -> int:
        return len(self.chunkings)

    @property
    def input_chunks(self) -> tuple[tuple[int, ...], ...]:
        """The chunks the input (and grad_input) take: channels whole, space as planned."""
        return (self.batch_chunks, (self.spec.input_shape[1],),
                *(p.input_chunks for p in self.chunkings))

    @property
    def output_chunks(self) -> tuple[tuple[int, ...], ...]:
        return (self.batch_chunks, (self.spec.output_shape[1],),
                *(p.out_chunks for p in self.chunkings))

    def block_shapes(self) -> set[tuple[int, ...]]:
        """The input shapes of every block kernel (forward/grad_weight and grad_input)."""
        c_in = self.spec.input_shape[1]
        shapes = set()
        for n in set(self.batch_chunks):
            for j in np.ndindex(*(len(p.out_chunks) for p in self.chunkings)):
                shapes.add((n, c_in, *(p.forward_length(i) for p, i in zip(self.chunkings, j))))
                shapes.add((n, c_in, *(p.gather_length(i) for p, i in zip(self.chunkings, j))))
        return shapes

    def compile(self, progress: bool | None = None) -> list:
        """Build (or load) every block kernel in this process, into ``cache_dir``, with a
        progress bar on stderr when it is a terminal (``progress`` forces it on or off)."""
        from .progress import Progress
        kernels = []
        shapes = sorted(self.block_shapes())
        with Progress(len(shapes), "symconv.dask block kernels", enabled=progress) as bar:
            for shape in shapes:
                kernels.append(_local_package(shape, self.spec.weight_shape, self.conv,
                                              self.cache_dir, self.target).kernel)
                bar.advance()
        return kernels

    # --- the passes ------------------------------------------------------------------------------
    def _input(self, x) -> da.Array:
        x = _as_dask(x, self.spec.input_shape, self.spec.dtype, "input")
        return x.rechunk(self.input_chunks)

    def _grad_output(self, gy) -> da.Array:
        gy = _as_dask(gy, self.spec.output_shape, self.spec.dtype, "grad_output")
        return gy.rechunk(self.output_chunks)

    def _depth(self, which: str) -> dict[int, Any]:
        depth = {0: 0, 1: 0}
        for d, chunking in enumerate(self.chunkings):
            if len(chunking.chunks) == 1:  # one block holds the whole axis: no neighbours
                depth[2 + d] = 0
            else:
                depth[2 + d] = (0, chunking.halo_in) if which == "input" else (chunking.halo_out, 0)
        return depth

    def _common(self):
        return dict(conv=self.conv, cache_dir=self.cache_dir, target=self.target,
                    threads=self.threads)

    def forward(self, x, weight, bias=None) -> da.Array:
        weight, bias = self._weights(weight, bias)
        x = self._input(x)
        function = functools.partial(_forward_block, weight=weight, bias=bias, chunkings=self.chunkings,
                                     **self._common())
        return da.map_overlap(function, x, depth=self._depth("input"), boundary="none",
                              trim=False, allow_rechunk=False, chunks=self.output_chunks,
                              dtype=self.spec.dtype,
                              meta=np.empty((0,) * x.ndim, self.spec.dtype))

    def grad_input(self, weight, grad_output) -> da.Array:
        weight, _ = self._weights(weight, None, need_bias=False)
        gy = self._grad_output(grad_output)
        function = functools.partial(_grad_input_block, weight=weight, chunkings=self.chunkings,
                                     **self._common())
        return da.map_overlap(function, gy, depth=self._depth("output"), boundary="none",
                              trim=False, allow_rechunk=False, chunks=self.input_chunks,
                              dtype=self.spec.dtype,
                              meta=np.empty((0,) * gy.ndim, self.spec.dtype))

    def grad_weight_bias(self, x, grad_output, split_every: int = 4):
        """(grad_weight, grad_bias or None) as lazy dask arrays, tree-reduced."""
        x = self._input(x)
        gy = self._grad_output(grad_output)
        xo = da.overlap.overlap(x, depth=self._depth("input"), boundary="none",
                                allow_rechunk=False)
        w_size = math.prod(self.spec.weight_shape)
        size = w_size + (self.spec.weight_shape[0] if self.spec.bias else 0)
        function = functools.partial(_weight_block, chunkings=self.chunkings,
                                     weight_shape=self.spec.weight_shape, **self._common())
        chunks = tuple((1,) * len(c) for c in xo.chunks) + ((size,),)
        parts = da.map_blocks(function, xo, gy, chunks=chunks, new_axis=[xo.ndim],
                              dtype=np.float64,
                              meta=np.empty((0,) * (xo.ndim + 1), np.float64))
        total = parts.sum(axis=tuple(range(xo.ndim)), split_every=split_every)
        total = total.astype(self.spec.dtype)
        gw = total[:w_size].reshape(self.spec.weight_shape)
        gb = total[w_size:] if self.spec.bias else None
        return gw, gb

    def backward(self, x, weight, grad_output, wrt=None):
        """(grad_input, grad_weight, grad_bias): lazy dask arrays, None where not asked for
        (by default every gradient the convolution has; grad_bias None without a bias)."""
        wrt = tuple(wrt) if wrt is not None else \
            ("input", "weight", *(("bias",) if self.spec.bias else ()))
        unknown = set(wrt) - {"input", "weight", "bias"}
        if unknown or ("bias" in wrt and not self.spec.bias):
            raise ValueError(f"symconv.dask: wrt must name some of input, weight"
                             f"{', bias' if self.spec.bias else ''}; got {wrt!r}")
        gx = self.grad_input(weight, grad_output) if "input" in wrt else None
        gw = gb = None
        if "weight" in wrt or "bias" in wrt:
            gw, gb = self.grad_weight_bias(x, grad_output)
        return (gx, gw if "weight" in wrt else None, gb if "bias" in wrt else None)

    def _weights(self, weight, bias, need_bias: bool = True):
        dtype = np.dtype(self.spec.dtype)
        weight = _small(weight, self.spec.weight_shape, dtype, "weight")
        if not need_bias:
            return weight, None
        if self.spec.bias:
            if bias is None:
                raise ValueError("symconv.dask: this convolution has a bias; pass bias=")
            bias = _small(bias, self.spec.bias_shape, dtype, "bias")
        elif bias is not None:
            raise ValueError("symconv.dask: bias given to a convolution planned without one")
        return weight, bias


def _small(array, shape, dtype, name) -> np.ndarray:
    if isinstance(array, da.Array):
        array = array.compute()
    array = np.ascontiguousarray(array)
    if array.dtype != dtype:
        raise TypeError(f"symconv.dask: {name} has dtype {array.dtype}, expected {dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"symconv.dask: {name} has shape {array.shape}, expected {tuple(shape)}")
    return array


def _as_dask(array, shape, dtype, name) -> da.Array:
    if not isinstance(array, da.Array):
        array = da.from_array(np.asarray(array), chunks="auto")
    if array.dtype != np.dtype(dtype):
        raise TypeError(f"symconv.dask: {name} has dtype {array.dtype}, expected {dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"symconv.dask: {name} has shape {array.shape}, expected {tuple(shape)}")
    return array


_CHUNKINGS: dict[tuple, ChunkedConv] = {}


def chunking(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups: int = 1,
         bias: bool = True, dtype="float32", *, chunks, cache_dir=None, target=None,
         threads: int | None = 1, precompile: bool = True) -> ChunkedConv:
    """The :class:`ChunkedConv` for these arguments and input ``chunks`` (anything
    ``dask.array`` accepts as chunks for the input shape), memoised; with ``precompile``
    its block kernels are built (or loaded) here first."""
    spec = ConvSpec(input_shape=tuple(input_shape), weight_shape=tuple(weight_shape),
                    stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                    dtype=np.dtype(dtype).name)
    chunks = da.core.normalize_chunks(chunks, spec.input_shape, dtype=np.dtype(spec.dtype))
    key = (spec.key, chunks, cache_dir and os.fspath(cache_dir), target, threads)
    found = _CHUNKINGS.get(key)
    if found is None:
        found = _CHUNKINGS[key] = ChunkedConv(spec, chunks, cache_dir, target, threads)
    if precompile:
        found.compile()
    return found


def _input(x, chunks) -> da.Array:
    if isinstance(x, da.Array):
        return x.rechunk(chunks) if chunks is not None else x
    if chunks is None:
        raise ValueError("symconv.dask: give chunks= for a NumPy input (or pass a dask array)")
    return da.from_array(np.asarray(x), chunks=chunks)


def _dtype(array) -> str:
    return np.dtype(array.dtype if hasattr(array, "dtype") else np.asarray(array).dtype).name


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, *,
         chunks=None, cache_dir=None, target=None, threads: int | None = 1,
         precompile: bool = True) -> da.Array:
    """The convolution of a chunked input (a dask array, or NumPy with ``chunks=``) as a lazy
    dask array; arguments like ``torch.nn.functional.conv{n}d`` and ``symconv.ConvSpec``."""
    x = _input(x, chunks)
    chunked = chunking(x.shape, np.shape(weight), stride, padding, dilation, groups,
                     bias is not None, x.dtype, chunks=x.chunks, cache_dir=cache_dir,
                     target=target, threads=threads, precompile=precompile)
    return chunked.forward(x, weight, bias)


def conv_backward(x, weight, grad_output, stride=1, padding=0, dilation=1, groups: int = 1, *,
                  bias: bool = True, wrt=None, chunks=None, cache_dir=None, target=None,
                  threads: int | None = 1, precompile: bool = True):
    """(grad_input, grad_weight, grad_bias) of ``Σ grad_output · conv(x, weight, bias)`` as lazy
    dask arrays, None where not in ``wrt`` (default: all; grad_bias only with ``bias``)."""
    x = _input(x, chunks)
    chunked = chunking(x.shape, np.shape(weight), stride, padding, dilation, groups, bias,
                     x.dtype, chunks=x.chunks, cache_dir=cache_dir, target=target,
                     threads=threads, precompile=precompile)
    return chunked.backward(x, weight, grad_output, wrt=wrt)


def grad_input(weight, grad_output, input_shape, stride=1, padding=0, dilation=1,
               groups: int = 1, *, chunks, cache_dir=None, target=None,
               threads: int | None = 1, precompile: bool = True) -> da.Array:
    """The input gradient alone (a transposed convolution of ``grad_output``) for an input of
    ``input_shape`` cut into ``chunks``: needs no input at all."""
    chunked = chunking(input_shape, np.shape(weight), stride, padding, dilation, groups, False,
                     _dtype(weight), chunks=chunks, cache_dir=cache_dir, target=target,
                     threads=threads, precompile=precompile)
    return chunked.grad_input(weight, grad_output)


def grad_weight(x, grad_output, weight_shape, stride=1, padding=0, dilation=1, groups: int = 1,
                *, bias: bool = False, chunks=None, cache_dir=None, target=None,
                threads: int | None = 1, precompile: bool = True):
    """The weight gradient alone (with ``bias``: the pair (grad_weight, grad_bias)), each block's
    partial sum added by a tree reduction."""
    x = _input(x, chunks)
    chunked = chunking(x.shape, weight_shape, stride, padding, dilation, groups, bias, x.dtype,
                     chunks=x.chunks, cache_dir=cache_dir, target=target, threads=threads,
                     precompile=precompile)
    gw, gb = chunked.grad_weight_bias(x, grad_output)
    return (gw, gb) if bias else gw
