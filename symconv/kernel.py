"""Kernel: load a compiled symconv package and call it on NumPy arrays.

This module is the deploy-time runtime.  It imports only the standard
library and NumPy (the built extension brings cffi's backend), so a copy of
it ships inside every generated package as ``_symconv_kernel.py`` and the
package imports with no SymPy, no compiler and no symconv installed.

Loading verifies the package before running any of its code: the manifest's
own digest, the hash of every file it lists, the Python ABI and the CPU
features the binary was built for.  Calling checks every array's type,
dtype, shape, contiguity and alignment and raises a clear error otherwise;
inputs are passed zero-copy and never written, outputs are fresh arrays
unless ``out=`` is given.  cffi releases the GIL during each call.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

MANIFEST = "manifest.json"
THREADS_ENV = "SYMCONV_NUM_THREADS"
FORMAT = 2
C_TYPES = {"float32": "float", "float64": "double"}


class PackageError(RuntimeError):
    """A package that is missing, corrupt, or built for another Python or CPU."""


@dataclass(frozen=True)
class Variant:
    """One instruction-set build of a package's C: its target name (``x86-64-v3``), the
    vector ISA its code uses (``avx512``, ``avx2`` or None), its compiler flags, the CPU
    features it needs, its C file and the prefix of its function symbols.  Stored in the
    manifest as ``build.variants``, best first."""

    target: str
    isa: str | None
    flags: tuple[str, ...]
    cpu_features: tuple[str, ...]
    source: str
    prefix: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "cpu_features": list(self.cpu_features)}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "Variant":
        return cls(str(entry["target"]), entry["isa"], tuple(entry["flags"]),
                   tuple(entry["cpu_features"]), str(entry["source"]), str(entry["prefix"]))


@dataclass(frozen=True)
class KernelFunction:
    """One compiled function as the manifest lists it: the arrays it reads, in call order,
    and the array it writes."""

    name: str
    args: tuple[str, ...]
    output: str

    def to_json(self) -> dict[str, Any]:
        return {"args": list(self.args), "output": self.output}

    @classmethod
    def from_json(cls, name: str, entry: Mapping[str, Any]) -> "KernelFunction":
        return cls(str(name), tuple(entry["args"]), str(entry["output"]))


@dataclass(frozen=True)
class VJPEntry:
    """Where one function's gradient with respect to one of its arguments is computed:
    ``function`` of this package reading ``args`` (names of the differentiated function's
    arrays and of its cotangent), or, with ``gradient_of`` set, the gradient with respect to
    the same argument position of the package of ``GradientSpec(this op, gradient_of)``,
    derived and built when first asked for.  ``content`` identifies that derived function
    up to the names of its arrays, so every route to the same function shares one package."""

    function: str
    args: tuple[str, ...] | None = None
    gradient_of: str | None = None
    content: str | None = None
    order: tuple[int, ...] | None = None   # gradient_of's arguments in the content's order

    def to_json(self) -> dict[str, Any]:
        if self.gradient_of is None:
            return {"function": self.function, "args": list(self.args)}
        return {"function": self.function, "gradient_of": self.gradient_of,
                **({"content": self.content, "order": list(self.order)}
                   if self.content else {})}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "VJPEntry":
        args, content = entry.get("args"), entry.get("content")
        if content is not None and not (isinstance(content, str) and
                                        re.fullmatch(r"[0-9a-f]{64}", content)):
            raise ValueError(f"vjp entry {entry['function']}: content is not a sha256 digest")
        order = entry.get("order") if content is not None else None
        return cls(str(entry["function"]), None if args is None else tuple(map(str, args)),
                   None if entry.get("gradient_of") is None else str(entry["gradient_of"]),
                   content, None if order is None else tuple(int(k) for k in order))


def vjp_table(functions: Mapping[str, KernelFunction], differentiable: Sequence[str],
              contents: Mapping[str, tuple[str, Sequence[int]]] | None = None
              ) -> dict[str, dict[str, VJPEntry]]:
    """The VJP table of a package, per function and argument: the forward's gradients are
    the package's ``grad_<input>`` functions; a gradient function is differentiated as an op
    of its own (every argument, the cotangent included), so the table answers any order.
    ``contents``: per gradient function, its content digest and argument order (see
    :class:`VJPEntry`)."""
    forward = functions["forward"]
    table = {"forward": {a: VJPEntry(f"grad_{a}", functions[f"grad_{a}"].args)
                         for a in forward.args if a in differentiable}}
    for name, function in functions.items():
        if name != "forward":
            content, order = (contents or {}).get(name, (None, None))
            table[name] = {a: VJPEntry(f"grad_{a}", gradient_of=name, content=content,
                                       order=None if order is None else tuple(order))
                           for a in function.args}
    return table


@dataclass(frozen=True)
class Manifest:
    """The schema of ``manifest.json``, shared by its writer (the compiler's op fields, then
    the packager's) and its reader (this loader).  ``from_json`` checks a parsed file field
    by field and raises KeyError/TypeError/ValueError on anything the loader could trip on;
    the packager runs it on what it writes.  Kind-specific fields (a convolution's ``spec``
    and ``flops``) and timings are kept as they are in ``extra``."""

    name: str
    module: str
    kind: str
    description: str
    key: str
    dtype: str
    inputs: tuple[str, ...]
    arguments: tuple[str, ...]         # declared call order, absent optional arrays included
    output: str
    differentiable: tuple[str, ...]
    backward_args: tuple[str, ...]     # what ``Kernel.backward`` takes: inputs read, cotangent
    shapes: Mapping[str, tuple[int, ...]]
    functions: Mapping[str, KernelFunction]
    formulas: Mapping[str, Mapping[str, str]]
    build: Mapping[str, Any]           # target, compiler, flags, versions, CPU features...
    variants: tuple[Variant, ...]      # build.variants, best first
    files: Mapping[str, str]           # file name -> sha256
    vjp: Mapping[str, Mapping[str, VJPEntry]]   # function -> argument -> its gradient
    canonical_order: tuple[int, ...] | None     # the forward's arguments in its content's order
    extra: Mapping[str, Any]

    OP_FIELDS = ("kind", "description", "key", "dtype", "inputs", "arguments", "output",
                 "differentiable", "backward_args", "arrays", "functions", "formulas", "vjp",
                 "canonical_order")
    PACKAGE_FIELDS = ("format", "name", "module", "build", "files", "digest")

    def shapes_at(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Every array's shape for a call on ``batch`` items (an open batch axis filled in)."""
        return {name: (batch, *shape[1:]) if shape[0] is None else shape
                for name, shape in self.shapes.items()}

    @property
    def batch_open(self) -> bool:
        """True when the package takes its batch size at run time."""
        return any(shape[0] is None for shape in self.shapes.values())

    @property
    def cotangent(self) -> str:
        """The name of the output's gradient, the last argument of every gradient."""
        return self.backward_args[-1]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Manifest":
        for name, digest in data["files"].items():
            if not (isinstance(name, str) and isinstance(digest, str)) or "/" in name or \
                    name.startswith("."):
                raise ValueError(f"bad file entry {name!r}")
        build = data["build"]
        for key in ("ext_suffix", "machine", "target", "compiler"):
            if not isinstance(build[key], str):
                raise TypeError(f"build.{key} is not a string")
        if not all(isinstance(f, str) for f in build["cpu_features"]):
            raise TypeError("build.cpu_features holds a non-string")
        variants = tuple(map(Variant.from_json, build["variants"]))
        if not variants:
            raise ValueError("build.variants is empty")
        for variant in variants:
            if not all(isinstance(f, str) for f in variant.cpu_features):
                raise TypeError("a variant's cpu_features holds a non-string")
            if variant.source not in data["files"] or not variant.prefix.isidentifier():
                raise ValueError(f"bad variant {variant.target!r}")
        for key in ("name", "module", "kind", "description", "key", "dtype", "output"):
            if not isinstance(data[key], str):
                raise TypeError(f"{key} is not a string")
        if data["dtype"] not in C_TYPES:
            raise ValueError(f"unknown dtype {data['dtype']!r}")
        if not data["module"].isidentifier():
            raise ValueError(f"bad module name {data['module']!r}")
        shapes = {str(name): _shape(entry["shape"]) for name, entry in data["arrays"].items()}
        functions = {}
        for name, entry in data["functions"].items():
            function = functions[name] = KernelFunction.from_json(name, entry)
            for array in (*function.args, function.output):
                shapes[array]
            if not str(name).isidentifier():
                raise ValueError(f"bad function name {name!r}")
        names = {key: tuple(str(n) for n in data[key])
                 for key in ("inputs", "differentiable", "backward_args")}
        names["arguments"] = tuple(str(n) for n in data.get("arguments", names["inputs"]))
        if [n for n in names["arguments"] if n in names["inputs"]] != list(names["inputs"]):
            raise ValueError("arguments do not hold the inputs in order")
        if "vjp" in data:
            vjp = {str(f): {str(a): VJPEntry.from_json(e) for a, e in entries.items()}
                   for f, entries in data["vjp"].items()}
        else:           # a package from before the table: the table every package implied
            vjp = vjp_table(functions, names["differentiable"])
        for function, entries in vjp.items():
            functions[function]
            for entry in entries.values():
                if entry.gradient_of is None:
                    functions[entry.function]
                    if entry.args is None:
                        raise ValueError(f"vjp entry {entry.function} has no args")
                else:
                    functions[entry.gradient_of]
                    if entry.order is not None and sorted(entry.order) != list(
                            range(len(functions[entry.gradient_of].args))):
                        raise ValueError(f"vjp entry {entry.function}: bad order")
        order = data.get("canonical_order")
        if order is not None:
            order = tuple(int(k) for k in order)
            if sorted(order) != list(range(len(functions["forward"].args))):
                raise ValueError("canonical_order is not an order of the forward's arguments")
        known = {*cls.OP_FIELDS, *cls.PACKAGE_FIELDS}
        return cls(name=data["name"], module=data["module"], kind=data["kind"],
                   description=data["description"], key=data["key"], dtype=data["dtype"],
                   output=data["output"],
                   shapes=shapes, functions=functions, formulas=dict(data["formulas"]),
                   build=dict(build), variants=variants, files=dict(data["files"]), vjp=vjp,
                   canonical_order=order,
                   extra={k: v for k, v in data.items() if k not in known}, **names)


def _shape(entry) -> tuple[int | None, ...]:
    """A manifest shape: ints, the first None where the batch is left to run time."""
    shape = tuple(entry)
    if not shape:
        raise ValueError("an array has an empty shape")
    return tuple(None if i == 0 and n is None else int(n) for i, n in enumerate(shape))


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """Digest of the manifest's content, its own ``digest`` field left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str] | None:
    """The CPU's feature flags, or None where they cannot be read (then nothing is checked);
    read once per process."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_features(needed) -> list[str]:
    """The features in ``needed`` this CPU lacks (none where its flags cannot be read)."""
    have = cpu_features()
    return sorted(set(needed) - have) if have is not None else []


def read_manifest(directory: Path, runtime: bool = True) -> dict[str, Any]:
    """The verified manifest of a package; PackageError if anything does not match.

    With ``runtime=False`` a sanitized package is not refused for want of the sanitizer
    runtime in this process (the package itself is intact and built for this machine)."""
    return _verified(directory, runtime)[0]


def _verified(directory: Path, runtime: bool = True) -> tuple[dict[str, Any], Manifest]:
    """:func:`read_manifest`, with the manifest also as its typed record (parsed once)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise PackageError(f"{directory} is not a symconv package: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(f"{path} is unreadable or truncated: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a format-{FORMAT} symconv manifest")
    if manifest.get("digest") != manifest_digest(manifest):
        raise PackageError(f"{path} was modified after the build (digest mismatch)")
    try:
        record = Manifest.from_json(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise PackageError(f"{path} is malformed ({type(error).__name__}: {error}); rebuild "
                           f"the package") from None
    for name, digest in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise PackageError(f"{directory}: {name} is missing")
        if file_digest(file) != digest:
            raise PackageError(f"{directory}: {name} does not match its hash in the manifest "
                               f"(tampered or truncated); rebuild the package")
    build = manifest["build"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if build["ext_suffix"] != suffix:
        raise PackageError(f"{directory} was built for another Python ({build['ext_suffix']}); "
                           f"this one needs {suffix}: rebuild it here")
    if build["machine"] != platform.machine():
        raise PackageError(f"{directory} was built for {build['machine']}, this is "
                           f"{platform.machine()}")
    missing = missing_features(build["cpu_features"])
    if missing:    # the baseline variant's needs: then no variant can run
        raise PackageError(f"{directory} was built for target {build['target']} and needs CPU "
                           f"features this CPU lacks: {', '.join(missing)}; rebuild it here")
    if runtime and build.get("sanitize") and not sanitizer_loaded():
        raise PackageError(f"{directory} was built with AddressSanitizer (target "
                           f"{build['target']}): it loads only in a process started with the "
                           f"sanitizer runtime first, e.g. LD_PRELOAD=\"$({build['compiler']} "
                           f"-print-file-name=libasan.so) $({build['compiler']} "
                           f"-print-file-name=libubsan.so)\" ASAN_OPTIONS=detect_leaks=0")
    return manifest, record




def sanitizer_loaded() -> bool:
    """True when AddressSanitizer's runtime is in this process (preloaded)."""
    import ctypes
    try:
        ctypes.CDLL(None)["__asan_init"]
    except (AttributeError, OSError):
        return False
    return True


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_CORES = _cores()
# More threads than this run as this many: no kernel splits its work into more parallel chunks,
# results do not depend on the count, and OpenMP crashes when it cannot start the threads asked.
MAX_THREADS = max(256, _CORES)
# os.environ decodes on every read (~0.5 µs); its bytes mapping answers in ~40 ns and is kept
# in step by os.environ's own assignments.
_ENVIRON = getattr(os.environ, "_data", None)
_THREADS_KEY = os.fsencode(THREADS_ENV) if isinstance(_ENVIRON, dict) else THREADS_ENV


def default_threads() -> int:
    """``$SYMCONV_NUM_THREADS``, else every core this process may run on."""
    value = (_ENVIRON if isinstance(_ENVIRON, dict) else os.environ).get(_THREADS_KEY)
    if not value:
        return _CORES
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return threads


def best_variant(entries: Sequence[Variant]) -> Variant:
    """The first (best) variant whose CPU features this machine has; the last, the baseline,
    where none fits or the features cannot be read (loading checks the baseline)."""
    return next((v for v in entries if not missing_features(v.cpu_features)), entries[-1])


def choose_variant(manifest: Manifest, name: str | None = None) -> Variant:
    """The variant of a package to run: ``name`` (a target the package was built for, which
    this CPU must support), else the best one this CPU has."""
    entries = manifest.variants
    if name is None:
        return best_variant(entries)
    for entry in entries:
        if entry.target == name:
            missing = missing_features(entry.cpu_features)
            if missing:
                raise PackageError(f"variant {name} needs CPU features this CPU lacks: "
                                   f"{', '.join(missing)}")
            return entry
    raise PackageError(f"{manifest.name} has no variant {name!r}; it was built for "
                       f"{', '.join(v.target for v in entries)}")


def _import_extension(directory: Path, manifest: Manifest):
    module = manifest.module
    return load_extension(directory / (module + manifest.build["ext_suffix"]), module)


def load_extension(path: Path, module: str):
    """Import the compiled cffi extension ``module`` from the file ``path``."""
    loader = importlib.machinery.ExtensionFileLoader(module, str(path))
    spec = importlib.util.spec_from_file_location(module, str(path), loader=loader)
    extension = importlib.util.module_from_spec(spec)
    loader.exec_module(extension)
    return extension


class Function:
    """One compiled function: ``f(*inputs, out=None) -> output``.

    Arrays whose manifest shape starts with None have a batch axis of any size, the same in
    every such array of a call; the output has it too, or (a sum over the batch, like a
    weight gradient) does not."""

    def __init__(self, signature: KernelFunction, shapes: Mapping[str, Sequence[int | None]],
                 dtype: str, extension, prefix: str):
        name = self.name = signature.name
        self.args = signature.args
        self.output = signature.output
        self.dtype = np.dtype(dtype)
        self.shapes = {a: tuple(shapes[a]) for a in (*self.args, self.output)}
        self._c = getattr(extension.lib, prefix + name)
        self._buffer = extension.ffi.from_buffer
        self._null = extension.ffi.NULL
        self._ctype = C_TYPES[dtype] + "[]"
        self._expected = tuple(self.shapes[a] for a in self.args)
        self._batched = tuple(i for i, shape in enumerate(self._expected) if shape[0] is None)
        self._maps = self.shapes[self.output][0] is None
        self._at: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return f"<symconv function {self.name}({', '.join(self.args)}) -> {self.output}>"

    def _checked(self, label: str, array: Any, shape: tuple[int, ...],
                 writable: bool = False) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{self.name}: {label} must be a numpy.ndarray, got {type(array).__name__}")
        if isinstance(array, np.ma.MaskedArray):     # its mask would be ignored
            raise TypeError(f"{self.name}: {label} is a masked array; pass array.filled(value)")
        if array.dtype != self.dtype:
            raise TypeError(f"{self.name}: {label} has dtype {array.dtype}, expected {self.dtype}")
        if array.shape != shape:
            raise ValueError(f"{self.name}: {label} has shape {array.shape}, expected {shape}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{self.name}: {label} is not C-contiguous; pass "
                             f"numpy.ascontiguousarray(...)")
        if not array.flags.aligned:
            raise ValueError(f"{self.name}: {label} is not aligned to its {self.dtype} items; "
                             f"pass a copy")
        if writable and not array.flags.writeable:
            raise ValueError(f"{self.name}: {label} is read-only")
        return array

    def _batch_of(self, arrays: Sequence[Any]) -> int:
        """The batch size of a call: the first axis of every array that has the batch axis,
        which must agree."""
        sizes = {}
        for i in self._batched:
            name, array, shape = self.args[i], arrays[i], self._expected[i]
            if not isinstance(array, np.ndarray):
                self._checked(name, array, shape)      # raises: not an array
            if array.shape[1:] != shape[1:] or array.ndim != len(shape):
                expected = ", ".join(["N", *map(str, shape[1:])])
                raise ValueError(f"{self.name}: {name} has shape {array.shape}, expected "
                                 f"({expected}) for any batch size N")
            sizes[name] = array.shape[0]
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
            raise ValueError(f"{self.name}: the arrays disagree on the batch size (first axis): "
                             f"{listed}")
        return next(iter(sizes.values()))

    def _shapes_at(self, batch: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """The argument shapes and the output shape of a call on ``batch`` items (the last
        few batch sizes remembered: a layer sees a handful)."""
        found = self._at.get(batch)
        if found is None:
            if len(self._at) >= 16:
                self._at.clear()
            found = self._at[batch] = (
                tuple((batch, *s[1:]) if s[0] is None else s for s in self._expected),
                (batch, *self.shapes[self.output][1:]) if self._maps
                else self.shapes[self.output])
        return found

    @property
    def needs_batch(self) -> bool:
        """True when the output has the run-time batch axis but no argument does: its batch
        size is given to the call (``batch=``)."""
        return self._maps and not self._batched

    def _given_batch(self, batch: Any) -> int:
        if batch is None:
            raise TypeError(f"{self.name}: its output has the batch axis but no argument does; "
                            f"pass batch=<size> (or out=)")
        if not isinstance(batch, (int, np.integer)) or batch < 0:
            raise ValueError(f"{self.name}: batch must be a non-negative int, got {batch!r}")
        return int(batch)

    @property
    def batched(self) -> tuple[int, ...]:
        """The positions of the arguments that carry the run-time batch axis."""
        return self._batched

    @property
    def maps_batch(self) -> bool:
        """True when the output carries the batch axis too (a map over the batch, not a sum)."""
        return self._maps

    def result_shape(self, shapes: Sequence[Sequence[Any]], batch: Any = None) -> tuple[Any, ...]:
        """The output shape for arguments of these shapes, read from the manifest alone (a
        symbolic batch size passes through); the arrays are checked when the function runs."""
        shape = self.shapes[self.output]
        if not self._maps:
            return shape
        if self._batched:
            batch = shapes[self._batched[0]][0]
        elif batch is None:
            self._given_batch(batch)        # raises: say what is missing
        return (batch, *shape[1:])

    def output_shape(self, *arrays: np.ndarray, batch: int | None = None) -> tuple[int, ...]:
        """The shape of the output for these arguments (its batch is theirs, or ``batch``
        where no argument has the batch axis)."""
        shape = self.shapes[self.output]
        if not self._maps:
            return shape
        return (self._batch_of(arrays) if self._batched else self._given_batch(batch),
                *shape[1:])

    def __call__(self, *arrays: np.ndarray, out: np.ndarray | None = None,
                 threads: int | None = None, batch: int | None = None) -> np.ndarray:
        """Run on ``arrays`` (in ``self.args`` order) with ``threads`` threads (default:
        ``$SYMCONV_NUM_THREADS`` or all cores); results do not depend on ``threads``.
        ``batch`` is the batch size of an output that has the run-time batch axis when no
        argument has it (:attr:`needs_batch`; a broadcast over the batch, like the gradient
        of a bias gradient); it is ignored otherwise."""
        if threads is None:
            threads = default_threads()
        elif threads.__class__ is not int or threads < 1:
            raise ValueError(f"{self.name}: threads must be a positive int, got {threads!r}")
        if threads > MAX_THREADS:      # OpenMP would try to start them all (and crash)
            threads = MAX_THREADS
        if len(arrays) != len(self._expected):
            raise TypeError(f"{self.name} takes {len(self.args)} arrays ({', '.join(self.args)}), "
                            f"got {len(arrays)}")
        if self._batched:
            first = arrays[self._batched[0]]
            # len() is the first axis of an ndarray; anything else is checked below
            batch = len(first) if first.__class__ is np.ndarray and first.ndim else \
                self._batch_of(arrays)
            found = self._at.get(batch)      # inline: this path runs on every call
            expected, shape = found if found is not None else self._shapes_at(batch)
        elif self._maps:
            batch = self._given_batch(out.shape[0] if isinstance(out, np.ndarray) and out.ndim
                                     else batch)
            expected, shape = self._expected, (batch, *self.shapes[self.output][1:])
        else:
            batch = None
            expected, shape = self._expected, self.shapes[self.output]
        dtype, ctype, buffer = self.dtype, self._ctype, self._buffer
        pointers = []
        for name, array, expect in zip(self.args, arrays, expected):
            # the common case (a C-contiguous, aligned, writeable array) in one expression;
            # anything else, a read-only array too, gets the detailed checks
            if array.__class__ is not np.ndarray or array.dtype is not dtype or \
                    array.shape != expect or not array.flags.carray:
                if self._batched:
                    self._batch_of(arrays)      # arrays that disagree on the batch: say so
                self._checked(name, array, expect)
            pointers.append(buffer(ctype, array))
        if out is None:
            out = np.empty(shape, dtype)
        else:
            if out.__class__ is not np.ndarray or out.dtype is not dtype or \
                    out.shape != shape or not out.flags.carray:
                self._checked(f"out ({self.output})", out, shape, True)
            viewed = out.base is not None
            for name, array in zip(self.args, arrays):
                # two arrays that each own their memory cannot overlap unless they are one
                if (viewed or array is out or array.base is not None) and \
                        np.may_share_memory(out, array):
                    raise ValueError(f"{self.name}: out overlaps the input {name}")
        # out is writable (fresh, or flags.carray or _checked said so): cffi's own check
        # would take as long as the rest of a tiny call's pointers
        written = buffer(ctype, out)
        if batch is None:
            self._c(*pointers, written, threads)
        elif self._maps:                  # a map over the batch: one item per output row
            if batch:
                self._c(*pointers, written, batch, threads)
        else:                             # a sum over the batch, item by item
            scratch = buffer(ctype, np.empty(shape, dtype)) if batch > 1 \
                else self._null           # item 0 goes straight to out
            self._c(*pointers, written, scratch, batch, threads)
        return out


class Kernel:
    """A loaded package: ``forward``, ``backward`` and every compiled function by name.

    A package may hold code for several instruction sets (``manifest['build']['variants']``);
    the kernel runs the best one this CPU has, or the one named by ``variant``."""

    def __init__(self, directory: str | os.PathLike, variant: str | None = None):
        self.path = Path(directory).resolve()
        self.manifest, self.record = _verified(self.path)   # the file as JSON, and typed
        self.variant = choose_variant(self.record, variant)
        # an optional array the op lacks (a bias-free convolution's bias): forward takes None
        self._optional = len(self.record.arguments) != len(self.record.inputs)
        try:
            extension = _import_extension(self.path, self.record)
            self.functions = {
                name: Function(signature, self.record.shapes, self.record.dtype, extension,
                               self.variant.prefix)
                for name, signature in self.record.functions.items()
            }
        except (ImportError, AttributeError) as error:   # a binary that is not this package's
            raise PackageError(f"{self.path}: its extension does not provide what the manifest "
                               f"lists ({error}); rebuild the package") from None

    # --- what the package is --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.record.name

    @property
    def spec(self) -> dict[str, Any] | None:
        """The normalised ConvSpec fields (None for other ops)."""
        return self.record.extra.get("spec")

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.record.inputs

    @property
    def differentiable(self) -> tuple[str, ...]:
        return self.record.differentiable

    @property
    def arguments(self) -> tuple[str, ...]:
        """The declared call order: ``inputs`` with the optional arrays the op does not have
        (a bias-free convolution's bias) in their place.  ``forward`` takes None for those,
        and ``backward`` answers None for them."""
        return self.record.arguments

    @property
    def gradients(self) -> tuple[str, ...]:
        """The arguments ``backward`` returns an entry for, in order."""
        return tuple(a for a in self.arguments
                     if a in self.differentiable or a not in self.inputs)

    @property
    def vjp(self) -> Mapping[str, Mapping[str, VJPEntry]]:
        """The VJP table: per function and differentiable argument, the function that
        computes that gradient (see :class:`VJPEntry`)."""
        return self.record.vjp

    @property
    def formulas(self) -> dict[str, str]:
        """Each function's index sum as text: the forward sum, each gradient in gather form."""
        return {name: f["text"] for name, f in self.record.formulas.items()}

    @property
    def latex(self) -> dict[str, str]:
        return {name: f["latex"] for name, f in self.record.formulas.items()}

    @property
    def source(self) -> str:
        """The generated C of the variant this kernel runs."""
        return (self.path / self.variant.source).read_text()

    def __repr__(self) -> str:
        return f"<symconv Kernel {self.name}: {self.record.description}>"

    def __getattr__(self, name: str) -> Function:
        functions = self.__dict__.get("functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or function {name!r}")

    # --- calling ---------------------------------------------------------------------------------
    def forward(self, *inputs: np.ndarray, out: np.ndarray | None = None,
                threads: int | None = None) -> np.ndarray:
        """The op's output for ``inputs``, in the order of ``self.inputs`` or of
        ``self.arguments`` (None in the place of an absent optional array)."""
        if self._optional and len(inputs) == len(self.arguments):
            absent = [(a, v) for a, v in zip(self.arguments, inputs) if a not in self.inputs]
            for name, value in absent:
                if value is not None:
                    raise TypeError(f"forward: this kernel has no {name} (its spec has none); "
                                    f"pass None or leave it out")
            inputs = tuple(v for a, v in zip(self.arguments, inputs) if a in self.inputs)
        return self.functions["forward"](*inputs, out=out, threads=threads)

    __call__ = forward

    def backward(self, *arrays: np.ndarray | None, wrt: Sequence[str] | None = None,
                 out: Mapping[str, np.ndarray] | None = None,
                 threads: int | None = None) -> tuple[np.ndarray | None, ...]:
        """Gradients of ``Σ grad_output · forward(...)`` for the differentiable inputs.

        ``arrays`` are ``manifest['backward_args']``: the inputs some gradient
        reads, then ``grad_output`` (for a convolution: input, weight,
        grad_output).  ``wrt`` selects a subset by name; the result always has
        one entry per name in ``self.gradients`` (every differentiable input,
        and None for an absent optional one: ``gx, gw, gb`` with ``gb`` None for a
        bias-free convolution), None where not requested.  An array that no
        requested gradient reads may be None.
        """
        names = self.record.backward_args
        if len(arrays) != len(names):
            raise TypeError(f"backward takes {len(names)} arrays ({', '.join(names)}), got "
                            f"{len(arrays)}")
        given = dict(zip(names, arrays))
        wanted = self.differentiable if wrt is None else tuple(wrt)
        unknown = [w for w in wanted if w not in self.differentiable]
        if unknown or isinstance(wrt, str):
            raise ValueError(f"backward: wrt must be a sequence of names from "
                             f"{self.differentiable}, got {wrt!r}")
        out = dict(out or {})
        extra = set(out) - set(wanted)
        if extra:
            raise ValueError(f"backward: out given for {sorted(extra)} which are not requested")
        results = []
        for name in self.gradients:
            if name not in wanted:
                results.append(None)
                continue
            function = self.functions[f"grad_{name}"]
            missing = [a for a in function.args if given[a] is None]
            if missing:
                raise TypeError(f"backward: the gradient for {name} needs {', '.join(missing)}")
            results.append(function(*(given[a] for a in function.args), out=out.get(name),
                                    threads=threads))
        return tuple(results)


def load(directory: str | os.PathLike, variant: str | None = None) -> Kernel:
    """Load a compiled package (a directory holding ``manifest.json``), running the best
    variant this CPU has or the one named."""
    return Kernel(directory, variant)
