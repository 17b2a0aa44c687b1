"""Specs: frozen, validated, normalised descriptions of the ops symconv compiles.

``ConvSpec`` is one N-D convolution; ``AvgPoolSpec`` one N-D average pooling.
Layout and semantics follow PyTorch so users can switch: input
``(N, C_in, *spatial)``, weight ``(C_out, C_in // groups, *kernel)``, bias
``(C_out,)``, output ``(N, C_out, *out_spatial)``, cross-correlation, zero
padding.  Any number of spatial dimensions is allowed.

Every field is normalised to per-dimension tuples on construction, so two
specs that describe the same computation (``padding="same"`` and the
explicit pads it stands for) compare equal and share one key.  An invalid
field raises ValueError naming ``Class.field`` and the value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import re
from dataclasses import MISSING as dataclasses_missing
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Mapping

import numpy as np

from .errors import IRError


DTYPES = ("float32", "float64")


def _fail(where: str, message: str, value: Any) -> ValueError:
    """A ValueError naming the field (``where`` is ``Class.field``) and the bad value."""
    return ValueError(f"{where}: {message}, got {value!r}")


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers; False for bools, floats, strings and arrays."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


# The name a batch extent left open (None in a shape) goes by in keys, formulas and the CLI.
BATCH = "N"


def _shape(field_name: str, value: Any, open_batch: bool = False) -> tuple[int | None, ...]:
    """At least (N, C, one spatial dim), every size positive; with ``open_batch`` the first
    may be None (or "N"): a batch extent known only at run time."""
    try:
        shape = tuple(value)
    except TypeError:
        raise _fail(field_name, "expected a sequence of positive ints", value) from None
    if open_batch and shape and (shape[0] is None or shape[0] == BATCH):
        return (None, *_shape(field_name, (1, *shape[1:]))[1:])
    if not all(is_int(v) for v in shape):
        expected = " (the first may be None: a batch size known at run time)" \
            if open_batch else ""
        raise _fail(field_name, f"expected a sequence of positive ints{expected}", value)
    shape = tuple(int(v) for v in shape)
    if len(shape) < 3:
        raise _fail(field_name, "expected at least 3 dims (batch/channels, channels, one spatial dim)",
                    value)
    if any(v <= 0 for v in shape):
        raise _fail(field_name, "every size must be positive", value)
    return shape


def per_dim(field_name: str, value: Any, rank: int, minimum: int) -> tuple[int, ...]:
    """An int applied to every spatial dim, or one int per spatial dim."""
    values = (value,) * rank if is_int(value) else value
    try:
        values = tuple(values)
    except TypeError:
        raise _fail(field_name, f"expected an int or {rank} ints", value) from None
    if len(values) != rank or not all(is_int(v) for v in values):
        raise _fail(field_name, f"expected an int or {rank} ints", value)
    values = tuple(int(v) for v in values)
    if any(v < minimum for v in values):
        raise _fail(field_name, f"every entry must be >= {minimum}", value)
    return values


def _padding(where: str, value: Any, rank: int, spatial, kernel, stride,
             dilation) -> tuple[tuple[int, int], ...]:
    """Normalise padding to one (lo, hi) pair per spatial dim."""
    if isinstance(value, str):
        if value == "valid":
            return ((0, 0),) * rank
        if value == "same":
            pairs = []
            for size, k, s, d in zip(spatial, kernel, stride, dilation):
                out = -(-size // s)
                total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise _fail(where, "expected 'valid', 'same', an int, ints or (lo, hi) pairs", value)
    if is_int(value):
        pairs = ((int(value), int(value)),) * rank
    else:
        try:
            entries = tuple(value)
        except TypeError:
            raise _fail(where, "expected 'valid', 'same', an int, ints or (lo, hi) pairs",
                        value) from None
        if len(entries) != rank:
            raise _fail(where, f"expected {rank} entries (one per spatial dim)", value)
        pairs = []
        for entry in entries:
            if is_int(entry):
                pairs.append((int(entry), int(entry)))
                continue
            try:
                lo, hi = entry
            except (TypeError, ValueError):
                raise _fail(where, "each entry must be an int or a (lo, hi) pair", value) from None
            if not (is_int(lo) and is_int(hi)):
                raise _fail(where, "each entry must be an int or a (lo, hi) pair", value)
            pairs.append((int(lo), int(hi)))
        pairs = tuple(pairs)
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise _fail(where, "padding must be non-negative", value)
    return pairs


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Where the channels sit in memory: after the batch (NCHW, torch's default) or innermost
# (NHWC, torch's channels_last, any rank).  Shapes in a spec are always written channels first.
LAYOUTS = ("channels_first", "channels_last")


def channels_last_shape(shape: tuple) -> tuple:
    """(N, C, *spatial) as a channels-last array holds it: (N, *spatial, C)."""
    return (shape[0], *shape[2:], shape[1])


def channels_first_shape(shape: tuple) -> tuple:
    """A channels-last array's shape (N, *spatial, C) as a spec writes it: (N, C, *spatial)."""
    return (shape[0], shape[-1], *shape[1:-1])


def _check_padding_mode(where: str, mode: Any, padding, spatial) -> None:
    """What each mode can pad: reflect mirrors without repeating the edge (pad < size),
    circular wraps around once (pad <= size), replicate repeats the edge (any pad)."""
    if mode not in PADDING_MODES:
        raise _fail(where, f"expected one of {PADDING_MODES}", mode)
    for dim, ((lo, hi), size) in enumerate(zip(padding, spatial)):
        if mode == "reflect" and max(lo, hi) >= size:
            raise _fail(where, f"reflect padding {max(lo, hi)} must be less than the input size "
                        f"{size} in spatial dim {dim}", mode)
        if mode == "circular" and max(lo, hi) > size:
            raise _fail(where, f"circular padding {max(lo, hi)} must be at most the input size "
                        f"{size} in spatial dim {dim}", mode)


def _dims(values) -> str:
    return "x".join(BATCH if v is None else str(v) for v in values)


def shape_text(shape) -> str:
    """A shape as people read it, an open batch as N: ``(N, 3, 32, 32)``."""
    return "(" + ", ".join(BATCH if v is None else str(v) for v in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def _out_spatial(where: str, spatial, kernel, stride, dilation, padding) -> tuple[int, ...]:
    """Output sizes; a kernel reaching beyond the padded input is an error."""
    out = []
    for dim, (size, k, s, d, (lo, hi)) in enumerate(zip(spatial, kernel, stride, dilation, padding)):
        reach = d * (k - 1) + 1
        if size + lo + hi < reach:
            raise _fail(where, f"kernel reach {reach} (dilation {d} x (size {k} - 1) + 1) is "
                        f"larger than the padded input {size} + {lo} + {hi} in spatial dim {dim}",
                        kernel)
        out.append((size + lo + hi - reach) // s + 1)
    return tuple(out)


class _Spec:
    """What every spec shares: dict round trip, a stable key, a slug."""

    KIND: ClassVar[str]
    # Fields added after specs were first keyed, left out of the dict (and the key) at their
    # default: packages compiled before them keep their keys.
    QUIET_DEFAULTS: ClassVar[Mapping[str, Any]] = {}

    def _where(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    def _set(self, **values) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def rank(self) -> int:
        """Number of spatial dimensions."""
        return len(self.input_shape) - 2

    @property
    def batch_open(self) -> bool:
        """True when the batch extent is left to run time (``input_shape[0]`` is None)."""
        return self.input_shape[0] is None

    def with_batch(self, batch: int | None):
        """The same op for a fixed batch size (None: open)."""
        return replace(self, input_shape=(batch, *self.input_shape[1:]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready normalised form; ``from_dict`` inverts it."""
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, tuple) else value
        quiet = self.QUIET_DEFAULTS
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)
                if f.init and not (f.name in quiet and getattr(self, f.name) == quiet[f.name])}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build a spec from a mapping (a JSON/TOML table); unknown keys are an error."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                             f"expected some of {', '.join(sorted(known))}")
        required = [f.name for f in fields(cls) if f.init and f.default is dataclasses_missing]
        for name in required:
            if name not in data:
                raise ValueError(f"{cls.__name__}.{name}: missing")
        return cls(**dict(data))

    @functools.cached_property
    def key(self) -> str:
        """A stable hash of the kind and the normalised fields (hex sha256), computed once."""
        text = json.dumps({"kind": self.KIND, **self.to_dict()}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def _dtype_tag(self) -> str:
        return "f32" if self.dtype == "float32" else "f64"

    def _check_dtype(self) -> None:
        """``dtype`` as its name: NumPy dtypes and scalar types are accepted (np.float32)."""
        name = self.dtype
        if not isinstance(name, str):
            try:
                name = np.dtype(name).name
            except TypeError:
                pass
        if name not in DTYPES:
            raise _fail(self._where("dtype"), f"expected one of {DTYPES}", self.dtype)
        self._set(dtype=name)

    def _shapes_and_groups(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """Input and weight shapes of equal rank, and a positive group count (convolutions)."""
        where = self._where
        input_shape = _shape(where("input_shape"), self.input_shape, open_batch=True)
        weight_shape = _shape(where("weight_shape"), self.weight_shape)
        if len(weight_shape) != len(input_shape):
            raise _fail(where("weight_shape"), f"expected {len(input_shape)} dims like input_shape "
                        f"{input_shape}", weight_shape)
        if not is_int(self.groups) or int(self.groups) < 1:
            raise _fail(where("groups"), "expected a positive int", self.groups)
        return input_shape, weight_shape, int(self.groups)


@dataclass(frozen=True)
class ConvSpec(_Spec):
    """One N-D convolution, specialised to exact shapes; the batch (``input_shape[0]``) may be
    None, left to run time: one package then serves every batch size.

    ``stride``, ``dilation`` and ``padding`` accept an int or one value per
    spatial dim; ``padding`` also accepts (lo, hi) pairs, ``"valid"`` and
    ``"same"`` (output size ceil(in / stride), extra pad on the high side).
    After construction they are tuples; ``padding`` is a tuple of pairs.

    Shapes are written channels first, like torch's.  ``layout="channels_last"`` keeps the
    input and output arrays channels innermost, ``(N, *spatial, C)`` (torch's channels_last
    memory, NHWC / NDHWC, any rank): ``array_shape`` gives the shape each array is passed
    in.  The weight is ``(C_out, C_in // groups, *kernel)`` in both layouts.
    """

    KIND: ClassVar[str] = "conv"
    QUIET_DEFAULTS: ClassVar[Mapping[str, Any]] = {"layout": "channels_first"}

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True
    dtype: str = "float32"
    padding_mode: str = "zeros"
    layout: str = "channels_first"
    output_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        where = self._where
        input_shape, weight_shape, groups = self._shapes_and_groups()
        if self.layout not in LAYOUTS:
            raise _fail(where("layout"), f"expected one of {LAYOUTS}", self.layout)
        rank = len(input_shape) - 2
        c_in, c_out = input_shape[1], weight_shape[0]
        if c_in % groups:
            raise _fail(where("groups"), f"input channels {c_in} are not divisible by groups",
                        groups)
        if c_out % groups:
            raise _fail(where("groups"), f"output channels {c_out} are not divisible by groups",
                        groups)
        if weight_shape[1] != c_in // groups:
            raise _fail(where("weight_shape"), f"dim 1 must be input channels // groups = "
                        f"{c_in} // {groups} = {c_in // groups}", weight_shape)
        if not isinstance(self.bias, bool):
            raise _fail(where("bias"), "expected True or False", self.bias)
        self._check_dtype()
        stride = per_dim(where("stride"), self.stride, rank, 1)
        dilation = per_dim(where("dilation"), self.dilation, rank, 1)
        spatial, kernel = input_shape[2:], weight_shape[2:]
        padding = _padding(where("padding"), self.padding, rank, spatial, kernel, stride, dilation)
        _check_padding_mode(where("padding_mode"), self.padding_mode, padding, spatial)
        out = _out_spatial(where("weight_shape"), spatial, kernel, stride, dilation, padding)
        self._set(input_shape=input_shape, weight_shape=weight_shape, stride=stride,
                  padding=padding, dilation=dilation, groups=groups,
                  output_shape=(input_shape[0], c_out, *out))

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return (self.weight_shape[0],) if self.bias else None

    def array_shape(self, name: str) -> tuple[int | None, ...]:
        """The shape the array ``name`` ("input", "weight", "bias", "output") is passed in:
        the input and output channels innermost under ``layout="channels_last"``."""
        shape = {"input": self.input_shape, "weight": self.weight_shape,
                 "bias": self.bias_shape, "output": self.output_shape}[name]
        moved = self.layout == "channels_last" and name in ("input", "output")
        return channels_last_shape(shape) if moved else shape

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the dense forward pass (grad_input and grad_weight match);
        per sample when the batch is open."""
        n, c_out, *out_spatial = self.output_shape
        return ((n or 1) * c_out * math.prod(out_spatial) * self.weight_shape[1]
                * math.prod(self.kernel_size))

    @property
    def flops(self) -> int:
        """Floating-point operations of the forward pass: two per multiply-accumulate."""
        return 2 * self.macs

    @property
    def slug(self) -> str:
        """A short readable identifier (not unique: the key tells specs apart)."""
        return (f"conv{self.rank}d_{_dims(self.input_shape)}_w{_dims(self.weight_shape)}"
                f"_{self._dtype_tag}{'_nhwc' if self.layout == 'channels_last' else ''}")

    def describe(self) -> str:
        """One line for humans."""
        pads = ", ".join(f"{lo}" if lo == hi else f"({lo}, {hi})" for lo, hi in self.padding)
        mode = "" if self.padding_mode == "zeros" else f" {self.padding_mode}"
        layout = "" if self.layout == "channels_first" else f", {self.layout}"
        return (f"conv{self.rank}d input {shape_text(self.input_shape)} weight "
                f"{shape_text(self.weight_shape)} -> output {shape_text(self.output_shape)}; "
                f"stride {self.stride}, padding ({pads}){mode}, dilation "
                f"{self.dilation}, groups {self.groups}, bias {self.bias}, {self.dtype}{layout}")


@dataclass(frozen=True)
class AvgPoolSpec(_Spec):
    """N-D average pooling: the mean of each (zero-padded) window, divided by the window size
    like PyTorch's ``avg_pool`` with ``count_include_pad=True``.  ``stride`` defaults to the
    window size; ``padding`` takes the same forms as ConvSpec's."""

    KIND: ClassVar[str] = "avg_pool"

    input_shape: tuple[int, ...]
    kernel_size: Any
    stride: Any = None
    padding: Any = 0
    dtype: str = "float32"
    output_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        where = self._where
        input_shape = _shape(where("input_shape"), self.input_shape, open_batch=True)
        rank = len(input_shape) - 2
        kernel = per_dim(where("kernel_size"), self.kernel_size, rank, 1)
        stride = kernel if self.stride is None else per_dim(where("stride"), self.stride, rank, 1)
        self._check_dtype()
        dilation = (1,) * rank
        padding = _padding(where("padding"), self.padding, rank, input_shape[2:], kernel, stride,
                           dilation)
        out = _out_spatial(where("kernel_size"), input_shape[2:], kernel, stride, dilation, padding)
        self._set(input_shape=input_shape, kernel_size=kernel, stride=stride, padding=padding,
                  output_shape=input_shape[:2] + out)

    @property
    def slug(self) -> str:
        return (f"avgpool{self.rank}d_{_dims(self.input_shape)}_k{_dims(self.kernel_size)}"
                f"_{self._dtype_tag}")

    def describe(self) -> str:
        return (f"avg_pool{self.rank}d input {shape_text(self.input_shape)} window "
                f"{self.kernel_size} -> output {shape_text(self.output_shape)}; "
                f"stride {self.stride}, padding {self.padding}, "
                f"{self.dtype}")


@dataclass(frozen=True)
class ConvTransposeSpec(_Spec):
    """N-D transposed convolution like ``torch.nn.functional.conv_transpose{n}d``: input
    ``(N, C_in, *spatial)``, weight ``(C_in, C_out // groups, *kernel)``, output
    ``(N, C_out, *out)`` with ``out = (in - 1)·stride - pad_lo - pad_hi + dilation·(kernel - 1)
    + output_padding + 1``.  It is the input gradient of the convolution with the same
    stride, padding, dilation and groups (``adjoint``), which is how it is derived."""

    KIND: ClassVar[str] = "conv_transpose"

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    output_padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True
    dtype: str = "float32"
    output_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        where = self._where
        input_shape, weight_shape, groups = self._shapes_and_groups()
        rank = len(input_shape) - 2
        if weight_shape[0] != input_shape[1]:
            raise _fail(where("weight_shape"), f"dim 0 must be the input channels "
                        f"{input_shape[1]}", weight_shape)
        if input_shape[1] % groups:
            raise _fail(where("groups"), f"input channels {input_shape[1]} are not divisible by "
                        f"groups", groups)
        if not isinstance(self.bias, bool):
            raise _fail(where("bias"), "expected True or False", self.bias)
        self._check_dtype()
        stride = per_dim(where("stride"), self.stride, rank, 1)
        dilation = per_dim(where("dilation"), self.dilation, rank, 1)
        output_padding = per_dim(where("output_padding"), self.output_padding, rank, 0)
        if any(op >= s for op, s in zip(output_padding, stride)):
            raise _fail(where("output_padding"), f"each entry must be smaller than the stride "
                        f"{stride}", output_padding)
        kernel = weight_shape[2:]
        if isinstance(self.padding, str):
            raise _fail(where("padding"), "expected an int, ints or (lo, hi) pairs", self.padding)
        padding = _padding(where("padding"), self.padding, rank, input_shape[2:], kernel, stride,
                           dilation)
        out = tuple((n - 1) * s - lo - hi + d * (k - 1) + op + 1 for n, s, (lo, hi), d, k, op in
                    zip(input_shape[2:], stride, padding, dilation, kernel, output_padding))
        if any(o < 1 for o in out):
            raise _fail(where("padding"), f"leaves no output (output size {out})", self.padding)
        self._set(input_shape=input_shape, weight_shape=weight_shape, stride=stride,
                  padding=padding, output_padding=output_padding, dilation=dilation,
                  groups=groups, output_shape=(input_shape[0], weight_shape[1] * groups, *out))

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return (self.output_shape[1],) if self.bias else None

    @property
    def adjoint(self) -> ConvSpec:
        """The convolution whose input gradient this is (no bias; same memory for weights)."""
        return ConvSpec(self.output_shape, self.weight_shape, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, groups=self.groups,
                        bias=False, dtype=self.dtype)

    @property
    def flops(self) -> int:
        return self.adjoint.flops

    @property
    def slug(self) -> str:
        return (f"convT{self.rank}d_{_dims(self.input_shape)}_w{_dims(self.weight_shape)}"
                f"_{self._dtype_tag}")

    def describe(self) -> str:
        return (f"conv_transpose{self.rank}d input {shape_text(self.input_shape)} weight "
                f"{shape_text(self.weight_shape)} -> output {shape_text(self.output_shape)}; "
                f"stride {self.stride}, padding {self.padding}, "
                f"output_padding {self.output_padding}, dilation {self.dilation}, groups "
                f"{self.groups}, bias {self.bias}, {self.dtype}")


_ARRAY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ExprSpec(_Spec):
    """A user-defined op written as an index sum, for example::

        ExprSpec("Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))",
                 shapes={"X": (2, 3, 9), "W": (3, 3)})

    ``shapes`` gives every input array's shape, in call order, and may give the output's;
    otherwise the output's ranges are the largest that keep every read inside its array.
    ``sum(body, (index, first, last), ...)`` sums over inclusive integer ranges; ``i // 2``
    floors; SymPy functions (exp, tanh, ...) and integer powers of sums are allowed.
    Arrays in ``zero_outside`` read as 0 outside their shape.  Parsing needs SymPy and
    happens in symbolic/define/expression.py; this spec only normalises and keys the text.
    """

    KIND: ClassVar[str] = "expr"

    expression: str
    shapes: Any
    dtype: str = "float32"
    zero_outside: Any = ()

    def __post_init__(self) -> None:
        where = self._where
        if not isinstance(self.expression, str) or "=" not in self.expression:
            raise _fail(where("expression"), "expected a string 'Out[indices] = expression'",
                        self.expression)
        pairs = self.shapes.items() if isinstance(self.shapes, Mapping) else self.shapes
        try:
            pairs = tuple((str(name), tuple(shape)) for name, shape in pairs)
        except (TypeError, ValueError):
            raise _fail(where("shapes"), "expected a mapping of array name to shape",
                        self.shapes) from None
        for name, shape in pairs:
            if not _ARRAY_NAME.match(name):
                raise _fail(where("shapes"), f"array name {name!r} is not an identifier",
                            self.shapes)
            if not shape or not all(is_int(n) and n > 0 for n in shape[1:]) or \
                    not (is_int(shape[0]) and shape[0] > 0 or
                         isinstance(shape[0], str) and _ARRAY_NAME.match(shape[0])):
                raise _fail(where("shapes"), f"shape of {name} must be positive ints (the "
                            f"first may be a name: an extent known at run time)", shape)
        named = {shape[0] for _, shape in pairs if isinstance(shape[0], str)}
        if len(named) > 1:
            raise IRError(f"{where('shapes')}: one run-time extent per op, got "
                          f"{', '.join(sorted(named))}")
        if len({name for name, _ in pairs}) != len(pairs):
            raise _fail(where("shapes"), "an array is named twice", self.shapes)
        arrays = {name for name, _ in pairs} | {self.output_name}
        for name, _ in pairs:
            if name.startswith("grad_") and name[len("grad_"):] in arrays:
                raise IRError(f"{where('shapes')}: an array named {name} would clash with the "
                              f"gradient of {name[len('grad_'):]}, which symconv names so; "
                              f"rename it")
        outside = (self.zero_outside,) if isinstance(self.zero_outside, str) else \
            tuple(self.zero_outside)
        unknown = [n for n in outside if n not in dict(pairs)]
        if unknown:
            raise _fail(where("zero_outside"), f"{unknown} are not arrays in shapes",
                        self.zero_outside)
        self._check_dtype()
        self._set(expression=" ".join(self.expression.split()),
                  shapes=tuple((name, tuple(n if isinstance(n, str) else int(n) for n in shape))
                               for name, shape in pairs),
                  zero_outside=tuple(sorted(outside)))

    @property
    def output_name(self) -> str:
        return self.expression.split("[", 1)[0].strip()

    @property
    def run_time_extent(self) -> str | None:
        """The name of the extent known only at run time (the first axis of the arrays that
        give it), or None."""
        return next((shape[0] for _, shape in self.shapes if isinstance(shape[0], str)), None)

    @property
    def batch_open(self) -> bool:
        return self.run_time_extent is not None

    @property
    def slug(self) -> str:
        name = re.sub(r"\W", "", self.output_name) or "op"
        return f"op_{name}_{self._dtype_tag}"

    def describe(self) -> str:
        arrays = ", ".join(f"{name}({', '.join(map(str, shape))})" for name, shape in self.shapes)
        return f"{self.expression}  [{arrays}; {self.dtype}]"


@dataclass(frozen=True)
class GradientSpec(_Spec):
    """One gradient function of another spec's op, as an op of its own: its forward is that
    derived gradient sum, and its own gradients are derived again (double backward)."""

    KIND: ClassVar[str] = "gradient"

    parent: Any
    function: str
    content: str | None = None     # the function's digest from the parent's manifest

    def __post_init__(self) -> None:
        if isinstance(self.parent, Mapping):
            object.__setattr__(self, "parent", spec_from_dict(self.parent))
        if not isinstance(self.parent, _Spec):
            raise _fail(self._where("parent"), "expected a spec", self.parent)
        if not (isinstance(self.function, str) and self.function.startswith("grad_")):
            raise _fail(self._where("function"), "expected a gradient function name "
                        "'grad_<input>'", self.function)
        if self.content is not None and not (
                isinstance(self.content, str) and re.fullmatch(r"[0-9a-f]{64}", self.content)):
            raise _fail(self._where("content"), "expected a sha256 hex digest", self.content)

    @functools.cached_property
    def key(self) -> str:
        """With ``content``, the digest of what the function computes, so every route to the
        same derived function (a gradient of a gradient of...) names one package."""
        if self.content is None:
            return super().key
        return hashlib.sha256(f"gradient:{self.content}".encode()).hexdigest()

    @property
    def root(self) -> _Spec:
        """The op this chain of gradients starts from."""
        return self.parent.root if isinstance(self.parent, GradientSpec) else self.parent

    @property
    def dtype(self) -> str:
        return self.parent.dtype

    @property
    def batch_open(self) -> bool:
        return self.parent.batch_open

    def to_dict(self) -> dict[str, Any]:
        return {"parent": {"kind": self.parent.KIND, **self.parent.to_dict()},
                "function": self.function,
                **({"content": self.content} if self.content is not None else {})}

    @property
    def slug(self) -> str:
        if self.content is not None:
            return f"{self.root.slug}_derived"
        return f"{self.parent.slug}_{self.function}"

    def describe(self) -> str:
        return f"{self.function} of {self.parent.describe()}"


SPECS = {cls.KIND: cls for cls in (ConvSpec, AvgPoolSpec, ConvTransposeSpec, ExprSpec,
                                   GradientSpec)}


def spec_from_dict(data: Mapping[str, Any]) -> _Spec:
    """Any spec from ``{"kind": ..., **fields}`` (the kind defaults to conv)."""
    data = dict(data)
    kind = data.pop("kind", "conv")
    if kind not in SPECS:
        raise ValueError(f"unknown spec kind {kind!r}; expected one of {', '.join(SPECS)}")
    return SPECS[kind].from_dict(data)


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return int(value) if is_int(value) else value


_SPECS: dict[tuple, _Spec] = {}


def spec_of(kind: type, **fields) -> _Spec:
    """The validated spec of a spec class and its fields, built once per distinct fields: a
    layer called every step skips validating and hashing its spec again."""
    key = (kind, tuple(sorted((name, _frozen(value)) for name, value in fields.items())))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = kind(**fields)
    return spec
