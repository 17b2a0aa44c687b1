"""C -> a cffi extension module inside a self-contained package directory.

A package is named ``<slug>_<key>``; the key hashes everything that decides
the built binary: the op's own key, the fingerprint of symconv's compiler
sources (code generation is deterministic, so these fix the C text), the
target ISA and flags, the C compiler's version, the Python ABI and cffi's
version.  The key is known before any derivation runs, so a cache hit costs
one manifest check and no SymPy at all.

Publishing is safe under concurrency: a per-package file lock, a build in a
staging directory beside the target, and an atomic rename.  A package that
fails verification is moved aside and rebuilt.  This module never imports
SymPy; the C text arrives as a string.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import cffi

from .._version import __version__
from ..errors import BuildError, GeneratedCodeError
from .. import kernel as runtime
from ..kernel import (FORMAT, MANIFEST, Manifest, PackageError, Variant, file_digest,
                      manifest_digest, read_manifest)
from .targets import SANITIZE, split_target, variants

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: locking falls back to exclusive creation
    fcntl = None

RUNTIME = "_symconv_kernel.py"
CACHE_ENV = "SYMCONV_CACHE_DIR"

# -fno-tree-loop-vectorize: GCC 12.2's loop vectorizer miscompiles reductions over strided
# load groups (tests/test_codegen.py::test_build_flags_avoid_gcc_vectorizer_miscompile has the
# reproducer); -fno-tree-slp-vectorize: its SLP vectorizer at -march=x86-64-v4 miscompiles a
# scalar gather loop (tests/cases.py REGRESSIONS "slp-avx512-grouped-f64").  symconv's
# schedule vectorises explicitly instead.
BASE_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
              "-fno-tree-loop-vectorize", "-fno-tree-slp-vectorize")

# cffi's wrapper only converts arguments and calls the kernels: unoptimised, a call of the
# smallest bench kernel took as long (4.3 us) and the wrapper compiled in half the time.
WRAPPER_FLAGS = ("-O0",)

# "<target>+sanitize": the same code built with AddressSanitizer and UBSan, for tests.  Any
# report aborts the process (no recovery); the frame pointer and debug info make the reports
# readable.  -O1, the level ASan's documentation suggests, checks the same accesses and
# compiles in half the time of -O3.  Such a package loads only in a process started with the
# sanitizer runtime preloaded (LD_PRELOAD, see sanitizer_runtime()).
SANITIZE_FLAGS = ("-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g")

# What decides a package's content: every source file of the compiler's stages, found by
# walking these folders (a new or split file is included without editing this), and the
# modules they build on.
_COMPILER_STAGES = ("symbolic", "codegen", "package")
_COMPILER_BASE = ("spec.py", "errors.py", "kernel.py")


def default_cache_dir() -> Path:
    """``$SYMCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/symconv``, else ``~/.cache/symconv``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "symconv"



def sanitizer_runtime(cc: str | None = None) -> list[str]:
    """The shared sanitizer runtimes a sanitized package needs preloaded (LD_PRELOAD), as the
    compiler reports them; BuildError if it has none."""
    cc = cc or c_compiler()
    found = []
    for library in ("libasan.so", "libubsan.so"):
        try:
            result = subprocess.run([cc, f"-print-file-name={library}"], capture_output=True,
                                    text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f"C compiler {cc!r} cannot be run: {error}") from None
        path = result.stdout.strip()
        if result.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            raise BuildError(f"{cc} has no {library}: install the compiler's sanitizer "
                             f"runtimes (e.g. Debian's libasan8 and libubsan1)")
        found.append(os.path.realpath(path))
    return found


@functools.lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"C compiler {cc!r} cannot be run: {error}; install gcc or set CC") from None
    return (result.stdout or result.stderr).splitlines()[0].strip() if result.returncode == 0 \
        else f"{cc} (version unknown)"


def c_compiler() -> str:
    return os.environ.get("CC", "cc")


def compiler_sources(root: Path | None = None) -> list[Path]:
    """The source files of symconv's compiler under ``root`` (this symconv by default), in a
    fixed order: every ``*.py`` in the stage folders, and the modules they build on."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    found = [root / name for name in _COMPILER_BASE]
    for stage in _COMPILER_STAGES:
        found += sorted((root / stage).rglob("*.py"))
    return found


def fingerprint_of(root: Path | None = None) -> str:
    """Hash of the version and of the compiler's sources (paths and contents) under ``root``."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for path in compiler_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """This symconv's compiler fingerprint: any change to its sources makes new package keys."""
    return fingerprint_of()


def build_config(target: str | None = None) -> dict[str, Any]:
    """Everything besides the op that decides the binary."""
    names, sanitize = split_target(target)
    target = ",".join(names) + (f"+{SANITIZE}" if sanitize else "")
    entries = variants(target)
    cc = c_compiler()
    return {
        "target": target,
        "sanitize": sanitize,
        "variants": [v.to_json() for v in entries],
        "cpu_features": list(entries[-1].cpu_features),   # the baseline: what loading needs
        "compiler": cc,
        "compiler_version": compiler_version(cc),
        "flags": [*BASE_FLAGS, *(SANITIZE_FLAGS if sanitize else ())],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "cffi": cffi.__version__,
        "symconv": __version__,
        "fingerprint": fingerprint(),
    }


def package_name(slug: str, op_key: str, config: Mapping[str, Any]) -> str:
    text = json.dumps({"op": op_key, "config": dict(config)}, sort_keys=True)
    return f"{slug}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _run_all(commands: list[tuple[list[str], type[BuildError]]]) -> None:
    """Run compiler commands side by side; the first failure raises its command's error type
    with the compiler's output."""
    running = [(command, error, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
               for command, error in commands]
    results = [(command, error, process.communicate()[0], process.returncode)
               for command, error, process in running]
    for command, error, output, code in results:
        if code != 0:
            raise error(f"C compilation failed ({' '.join(command)}):\n{output[-4000:]}")


# GCC spends much of a package's build parsing the system headers of the C's prelude
# (immintrin.h, omp.h): 0.5 of 1.1 s for a small 2-D spec's AVX2 file, 0.6 of 1.9 s for a
# 3-D one's AVX-512 file.  So each prelude is compiled once more, as a header with GCC's
# precompiled form beside it, into ``<cache>/preludes/<key>/`` (the key covers the compiler,
# its flags and the text), and a variant compiles as an include of it followed by its own
# functions, ``#line`` keeping the packaged file's line numbers in any message.  The packaged
# C file stays whole; where the precompiled header cannot be built or read, the file
# compiles as it is.  Preludes are kept in the default cache (``$SYMCONV_CACHE_DIR``, else
# ~/.cache/symconv) whatever cache a package goes to, as ccache keeps its own: a new cache
# directory does not pay for them again.
PRELUDES = "preludes"
PRELUDE_HEADER = "sc_prelude.h"


@dataclass(frozen=True)
class Preludes:
    """Each variant's prelude (by its target name): text its C file holds whole, after its
    title comment; and where the precompiled ones are kept."""

    texts: Mapping[str, str]
    root: Path = field(default_factory=lambda: default_cache_dir() / PRELUDES)


def _precompiled_prelude(preludes: Preludes, entry: Variant,
                         config: Mapping[str, Any]) -> Path | None:
    """The header of this variant's prelude with its precompiled form beside it, built
    once per cache; None where there is no prelude or the compiler cannot precompile it."""
    text = preludes.texts.get(entry.target)
    if not text or "clang" in config["compiler_version"].lower():
        return None     # clang reads a precompiled header only when told to (-include-pch)
    flags = [config["compiler"], *config["flags"], *entry.flags]
    key = hashlib.sha256("\0".join([config["compiler_version"], *flags, text]).encode())

    def write(staging: Path) -> None:
        (staging / PRELUDE_HEADER).write_text(text)
        _run_all([([*flags, "-x", "c-header", str(staging / PRELUDE_HEADER), "-o",
                    str(staging / f"{PRELUDE_HEADER}.gch")], BuildError)])

    try:
        home = publish(preludes.root, key.hexdigest()[:16], write,
                       valid=lambda d: (d / f"{PRELUDE_HEADER}.gch").is_file())
    except (BuildError, OSError):
        return None
    return home / PRELUDE_HEADER


def _against_prelude(directory: Path, unit: Path, entry: Variant, header: Path | None,
                     preludes: Preludes | None) -> Path:
    """``unit``: a variant's functions after an include of its precompiled prelude, or the
    variant's whole C file where there is none."""
    source = directory / entry.source
    if header is None:
        return source
    text = source.read_text()
    start = text.find(preludes.texts[entry.target])
    if start < 0:
        return source
    end = start + len(preludes.texts[entry.target])
    line = text.count("\n", 0, end) + 1
    unit.write_text(f'#include "{header}"\n#line {line} "{entry.source}"\n{text[end:]}')
    return unit


def compile_extension(directory: Path, module: str, cdef: str, config: Mapping[str, Any],
                      preludes: Preludes | None = None) -> Path:
    """Compile each variant's C file in ``directory`` with its own flags and cffi's API-mode
    wrapper for the baseline, side by side, then link them into ``module``.  With
    ``preludes``, each variant compiles against its precompiled prelude (see PRELUDES)."""
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(module, cdef)    # the wrapper sees declarations only
    wrapper = directory / f"{module}.c"
    with contextlib.redirect_stdout(io.StringIO()):  # cffi announces the file it writes
        ffi.emit_c_code(str(wrapper))
    target = directory / (module + config["ext_suffix"])
    cc, flags = config["compiler"], config["flags"]
    include = [f"-I{sysconfig.get_paths()['include']}", f"-I{directory}"]
    entries = [Variant.from_json(entry) for entry in config["variants"]]
    objects = [directory / f"{module}.{i}.o" for i in range(len(entries))]
    units = [directory / f"{module}.{i}.c" for i in range(len(entries))]
    wrapper_object = directory / f"{module}.wrapper.o"
    headers = [None] * len(entries)
    if preludes is not None:
        with ThreadPoolExecutor(len(entries)) as pool:
            headers = list(pool.map(lambda e: _precompiled_prelude(preludes, e, config),
                                    entries))

    def compile_objects(sources: list[Path]) -> None:
        _run_all([([cc, *flags, *entry.flags, "-c", str(source), "-o", str(obj)],
                   GeneratedCodeError) for entry, source, obj in zip(entries, sources, objects)] +
                 [([cc, *flags, *WRAPPER_FLAGS, *entries[-1].flags, *include, "-c",
                    str(wrapper), "-o", str(wrapper_object)], BuildError)])

    try:
        sources = [_against_prelude(directory, unit, entry, header, preludes)
                   for unit, entry, header in zip(units, entries, headers)]
        plain = [directory / entry.source for entry in entries]
        try:
            compile_objects(sources)
        except GeneratedCodeError:
            if sources == plain:
                raise
            compile_objects(plain)      # it was a precompiled header: rebuilt on the next use
            for home in {header.parent for header in headers if header is not None}:
                with contextlib.suppress(OSError):      # another build discarded it first
                    _discard(home)
        _run_all([([cc, *flags, *entries[-1].flags, *map(str, objects), str(wrapper_object),
                    "-o", str(target), "-lm"], BuildError)])
    finally:
        for temporary in (wrapper, *objects, *units, wrapper_object):
            temporary.unlink(missing_ok=True)
    return target


_INIT = '''"""symconv package {name}: {description}

Generated by symconv {version}; imports with numpy and cffi alone.  ``kernel``
is the loaded Kernel; the names below are its functions.
"""

from pathlib import Path as _Path

from .{runtime} import Kernel as _Kernel

kernel = _Kernel(_Path(__file__).resolve().parent)
forward = kernel.forward
backward = kernel.backward
formulas = kernel.formulas
{functions}
'''


def write_package(directory: Path, name: str, sources: Mapping[str, str], cdef: str,
                  manifest: Mapping[str, Any], config: Mapping[str, Any],
                  preludes: Preludes | None = None) -> None:
    """Fill an empty directory with a complete package; ``sources`` holds the C text of each
    variant (by its target name), ``cdef`` the declarations of them all and ``preludes``
    the part of each text to precompile."""
    module = f"_{name}"
    entries = [Variant.from_json(entry) for entry in config["variants"]]
    for entry in entries:
        (directory / entry.source).write_text(sources[entry.target])
    start = time.perf_counter()
    binary = compile_extension(directory, module, cdef, config, preludes)
    seconds = time.perf_counter() - start
    shutil.copyfile(runtime.__file__, directory / RUNTIME)
    functions = "\n".join(f"{f} = kernel.functions[{f!r}]" for f in manifest["functions"]
                          if f != "forward")
    (directory / "__init__.py").write_text(_INIT.format(
        name=name, description=manifest["description"], version=__version__,
        runtime=RUNTIME[:-3], functions=functions))
    files = (*(entry.source for entry in entries), binary.name, "__init__.py",
             RUNTIME)
    full = {
        **manifest,
        "format": FORMAT,
        "name": name,
        "module": module,
        "build": dict(config),
        "files": {f: file_digest(directory / f) for f in files},
    }
    full.setdefault("timings", {})["compile_c"] = round(seconds, 4)
    full["digest"] = manifest_digest(full)
    Manifest.from_json(full)    # the loader's schema: a package it would refuse is never written
    (directory / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def is_valid(directory: Path) -> bool:
    """Intact and built for this machine (a sanitized package need not load in this process)."""
    try:
        read_manifest(directory, runtime=False)
    except PackageError:
        return False
    return True


def publish(root: Path, name: str, write: Callable[[Path], None],
            valid: Callable[[Path], bool] = is_valid) -> Path:
    """``root/name``, built by ``write(staging_dir)`` unless a ``valid`` one is already there
    (by default an intact package built for this machine).

    Concurrent callers serialise on a lock file; the package appears by an
    atomic rename, so readers never see a half-written one.  A build killed
    before its rename leaves only a staging directory, removed by the next
    build of the same package (staging directories of a name exist only while
    its lock is held, so any found under the lock are dead).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    with _locked(root / ".locks" / f"{name}.lock"):
        for stale in root.glob(f".{glob.escape(name)}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            if valid(final):
                return final
            _discard(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            write(staging)
            staging.chmod(0o755)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _discard(directory: Path) -> None:
    """Move a broken package out of the way, then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.broken.", dir=directory.parent))
    os.rename(directory, trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)
