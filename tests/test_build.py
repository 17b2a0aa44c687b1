"""Packages: layout, manifest, cache hits, SymPy-free loading, concurrency, integrity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import symconv
from symconv import ConvSpec, PackageError, compiler
from symconv.package import build, targets
from symconv.kernel import Variant, manifest_digest

SPEC = ConvSpec((2, 3, 8, 8, 8), (4, 3, 3, 3, 3), stride=2, padding=1)


def fresh_compile(spec, cache_dir):
    compiler.KERNELS.clear()
    return compiler.compile_conv(spec, cache_dir=cache_dir)


def run_python(code, cwd=None, env=None, block_sympy=False):
    """Run code in a fresh interpreter; with block_sympy, ``import sympy`` fails there."""
    code = ("import sys; sys.modules['sympy'] = None\n" if block_sympy else "") + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_package_layout_and_manifest(compile_spec):
    kernel = compile_spec(SPEC)
    files = {p.name for p in kernel.path.iterdir()}
    module = kernel.manifest["module"]
    variants = kernel.manifest["build"]["variants"]
    sources = {v["source"] for v in variants}
    assert {"__init__.py", "_symconv_kernel.py", "manifest.json", *sources} <= files
    assert any(f.startswith(module) and f.endswith(".so") for f in files)
    assert not any(f.endswith((".o", ".tmp")) for f in files)
    manifest = kernel.manifest
    assert ConvSpec.from_dict(manifest["spec"]) == SPEC
    assert set(manifest["formulas"]) == {"forward", "grad_input", "grad_weight", "grad_bias"}
    for entry in manifest["formulas"].values():
        assert entry["text"] and entry["latex"].startswith(r"\mathrm{")
    assert "δ(" in manifest["formulas"]["grad_input"]["scatter"]
    config = manifest["build"]
    assert "-O3" in config["flags"] and config["compiler_version"]
    assert {"python", "cffi", "symconv", "ext_suffix", "target"} <= set(config)
    for source in sources:
        assert manifest["files"][source] == build.file_digest(kernel.path / source)
    assert config["cpu_features"] == variants[-1]["cpu_features"]   # the baseline's
    assert kernel.formulas["grad_input"] == manifest["formulas"]["grad_input"]["text"]
    assert kernel.source.startswith("/* symconv: conv3d")


def test_cache_hit_is_fast_and_does_not_rebuild(tmp_path):
    first = fresh_compile(SPEC, tmp_path)
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    out = run_python(f"""
        import time
        start = time.perf_counter()
        import symconv
        from symconv import ConvSpec
        k = symconv.compile_conv(ConvSpec.from_dict({SPEC.to_dict()!r}), cache_dir={str(tmp_path)!r})
        import sys
        print(time.perf_counter() - start, 'sympy' in sys.modules, k.path)
    """)
    seconds, sympy_imported, path = out.split()
    assert float(seconds) < 5.0          # imports included, on a loaded shared machine
    assert sympy_imported == "False"      # a cache hit runs no symbolic stage (no rebuild)
    assert Path(path) == first.path
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp


def test_package_imports_without_sympy_or_symconv(compile_spec, rng):
    kernel = compile_spec(SPEC)
    x = rng.standard_normal(SPEC.input_shape).astype(np.float32)
    w = rng.standard_normal(SPEC.weight_shape).astype(np.float32)
    b = rng.standard_normal(SPEC.bias_shape).astype(np.float32)
    np.savez(kernel.path.parent / "io.npz", x=x, w=w, b=b)
    out = run_python(f"""
        sys.modules['symconv'] = None
        sys.path.insert(0, {str(kernel.path.parent)!r})
        import numpy as np
        import {kernel.name} as k
        data = np.load({str(kernel.path.parent / 'io.npz')!r})
        y = k.forward(data['x'], data['w'], data['b'])
        gx, gw, gb = k.backward(data['x'], data['w'], np.ones_like(y))
        np.save({str(kernel.path.parent / 'y.npy')!r}, y)
        print(sorted(k.formulas), float(gb.sum()))
    """, block_sympy=True)
    assert "grad_input" in out
    np.testing.assert_array_equal(np.load(kernel.path.parent / "y.npy"), kernel.forward(x, w, b))


def test_symconv_load_without_sympy(compile_spec):
    kernel = compile_spec(SPEC)
    out = run_python(f"""
        import symconv
        k = symconv.load({str(kernel.path)!r})
        print(k.name)
    """, block_sympy=True)
    assert out.strip() == kernel.name


def test_concurrent_compiles_of_one_spec_make_one_package(tmp_path):
    spec = ConvSpec((1, 2, 7, 7), (3, 2, 3, 3), stride=2, padding=(1, 2), dilation=(2, 1))
    code = textwrap.dedent(f"""
        import numpy as np, symconv
        from symconv import ConvSpec
        k = symconv.compile_conv(ConvSpec.from_dict({spec.to_dict()!r}), cache_dir={str(tmp_path)!r})
        x = np.ones({spec.input_shape}, np.float32); w = np.ones({spec.weight_shape}, np.float32)
        print(k.path, float(k.forward(x, w, np.ones(3, np.float32)).sum()))
    """)
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
        results.append(stdout.strip())
    assert len(set(results)) == 1
    packages = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(packages) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"] == []
    symconv.load(packages[0])


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMCONV_CACHE_DIR", str(tmp_path / "env-cache"))
    spec = ConvSpec((1, 1, 6), (1, 1, 3))
    compiler.KERNELS.clear()
    kernel = compiler.compile_conv(spec)
    assert kernel.path.parent == (tmp_path / "env-cache").resolve()


def _replace(path: Path, data: bytes) -> None:
    """Damage a file on disk as a new inode: the copy this process has mapped stays intact
    (truncating a loaded shared library in place would crash any process using it)."""
    staging = path.with_name(path.name + ".damaged")
    staging.write_bytes(data)
    os.replace(staging, path)


def _rewrite_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    manifest["digest"] = manifest_digest(manifest)
    _replace(path / "manifest.json", json.dumps(manifest).encode())


def _binary(path: Path) -> Path:
    return next(path.glob("*.so"))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _replace(next(p.glob("kernels*.c")), b"/* edited */"), r"kernels\S*\.c does not match"),
    (lambda p: _replace(_binary(p), _binary(p).read_bytes()[:1000]), "does not match its hash"),
    (lambda p: _replace(p / "manifest.json", (p / "manifest.json").read_bytes()[:200]),
     "unreadable or truncated"),
    (lambda p: _replace(p / "manifest.json", (p / "manifest.json").read_bytes().replace(
        b'"float32"', b'"float64"', 1)), "digest mismatch"),
    (lambda p: _rewrite_manifest(p, lambda m: m["build"].update(ext_suffix=".cpython-27.so")),
     "another Python"),
    (lambda p: _rewrite_manifest(p, lambda m: m["build"]["cpu_features"].append("avx9000")),
     "lacks: avx9000"),
    (lambda p: (p / "manifest.json").unlink(), "not a symconv package"),
    (lambda p: _rewrite_manifest(p, lambda m: m["build"].update(machine="sparc64")),
     "built for sparc64"),
    (lambda p: _rewrite_manifest(p, lambda m: m.pop("functions")), "malformed"),
    (lambda p: _rewrite_manifest(p, lambda m: m["files"].update({"../escape.py": "0" * 64})),
     "malformed"),
    (lambda p: _rewrite_manifest(p, lambda m: m["arrays"]["input"].update(shape="big")),
     "malformed"),
    (lambda p: _rewrite_manifest(p, lambda m: m.update(module="_x; import os")), "malformed"),
    (lambda p: _replace(p / "__init__.py", b"raise SystemExit"), "__init__.py does not match"),
    (lambda p: _replace(p / "_symconv_kernel.py", b""), "_symconv_kernel.py does not match"),
])
def test_damaged_packages_are_refused_and_rebuilt(tmp_path, damage, message):
    spec = ConvSpec((1, 2, 6), (2, 2, 3), padding=1)
    kernel = fresh_compile(spec, tmp_path)
    damage(kernel.path)
    with pytest.raises(PackageError, match=message):
        symconv.load(kernel.path)
    rebuilt = fresh_compile(spec, tmp_path)        # the cache notices and rebuilds
    assert rebuilt.path == kernel.path
    x = np.ones(spec.input_shape, np.float32)
    w = np.ones(spec.weight_shape, np.float32)
    np.testing.assert_allclose(rebuilt.forward(x, w, np.zeros(2, np.float32))[0, 0], [4, 6, 6, 6, 6, 4])


def test_a_binary_swapped_in_from_another_package_is_refused(tmp_path):
    """Even with every hash in the manifest recomputed to match, another package's binary
    (other module name, other symbols) gives a PackageError, not an ImportError."""
    one = fresh_compile(ConvSpec((1, 2, 6), (2, 2, 3), padding=1), tmp_path)
    other = fresh_compile(ConvSpec((1, 1, 7), (1, 1, 2)), tmp_path)
    binary = _binary(one.path)
    _replace(binary, _binary(other.path).read_bytes())
    _rewrite_manifest(one.path, lambda m: m["files"].update(
        {binary.name: build.file_digest(binary)}))
    out = run_python(f"""
        import symconv
        try:
            symconv.load({str(one.path)!r})
        except symconv.PackageError as error:
            print("refused:", error)
    """)      # a fresh process: this one has the original extension loaded already
    assert out.startswith("refused:") and "extension does not provide" in out


def test_build_error_reports_the_compiler_output(tmp_path, monkeypatch, one_target_config):
    monkeypatch.setenv("CC", "cc")
    (tmp_path / targets.SOURCE).write_text("this is not C;")
    with pytest.raises(build.BuildError, match="C compilation failed"):
        build.compile_extension(tmp_path, "_broken", "void f(void);", one_target_config)


@pytest.mark.skipif("clang" in build.compiler_version(build.c_compiler()).lower(),
                    reason="GCC's precompiled headers")
def test_variants_compile_against_their_precompiled_prelude(tmp_path, one_target_config):
    """The prelude is precompiled once and read by every later build: a damaged precompiled
    header is noticed, the file compiles whole, and the header is built anew next time;
    where it cannot be kept, the file compiles whole too.  The functions after it keep the
    packaged file's line numbers (__LINE__, and so the sanitizer's reports)."""
    from symconv.codegen.c import PRELUDE
    from symconv.codegen.isa import SIMD_PRELUDE
    from symconv.kernel import load_extension

    entry = Variant.from_json(one_target_config["variants"][-1])
    prelude = PRELUDE + (SIMD_PRELUDE[entry.isa] if entry.isa else "")
    where = "int sc_where(void) { return __LINE__; }"
    text = f"/* symconv: a test */\n{prelude}\n{where}\n"
    line = text.splitlines().index(where) + 1
    preludes = build.Preludes({entry.target: prelude}, tmp_path / "preludes")

    def built(name):
        directory = tmp_path / name
        directory.mkdir()
        (directory / entry.source).write_text(text)
        module = f"_where_{name}"
        path = build.compile_extension(directory, module, "int sc_where(void);",
                                       one_target_config, preludes)
        assert load_extension(path, module).lib.sc_where() == line
        if not preludes.root.is_dir():
            return None
        return [p for p in preludes.root.iterdir() if not p.name.startswith(".")]

    (home,) = built("first")
    header = home / build.PRELUDE_HEADER
    precompiled = home / f"{build.PRELUDE_HEADER}.gch"
    assert header.read_text() == prelude and precompiled.stat().st_size > 0
    made = precompiled.stat().st_mtime_ns
    assert built("second") == [home] and precompiled.stat().st_mtime_ns == made
    precompiled.write_bytes(precompiled.read_bytes()[:4096])
    assert built("damaged") == [] and not home.exists()
    assert built("again") == [home] and precompiled.stat().st_size > 4096
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    preludes = build.Preludes({entry.target: prelude}, blocked / "preludes")
    assert built("unwritable") is None      # nowhere to keep it: the file compiles whole


def test_generated_c_the_compiler_refuses_is_reported_as_a_bug(tmp_path, monkeypatch):
    """An InternalError naming the spec and the kept report files; not chained under the
    cache miss (PackageError) that started the build."""
    from symconv import codegen

    def broken(*args, **kwargs):
        source = emit(*args, **kwargs)
        return codegen.CSource(source.text + "\nthis is not C;\n", source.functions,
                               source.prelude)
    emit = codegen.emit
    monkeypatch.setattr(codegen, "emit", broken)
    spec = ConvSpec((1, 1, 5), (1, 1, 3))
    with pytest.raises(symconv.InternalError, match="bug in symconv") as caught:
        compiler.compile_op(spec, cache_dir=tmp_path, target="x86-64")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert spec.describe() in str(caught.value)
    report = next((tmp_path / "bug-reports").iterdir())
    assert str(report) in str(caught.value)
    assert symconv.spec.spec_from_dict(json.loads((report / "spec.json").read_text())) == spec
    source = (report / "kernels-x86-64.c").read_text()
    line = source.splitlines().index("this is not C;") + 1
    assert f".c:{line}:" in (report / "compiler.txt").read_text()   # the line it holds
    assert not [p for p in tmp_path.iterdir() if p.name != "bug-reports" and
                not p.name.startswith(".")]        # no package was published


@pytest.mark.parametrize("target, message", [
    ("pentium4", "unknown target 'pentium4'"),
    ("x86-64-v4,avx9", "unknown target 'avx9'"),
    ("x86-64-v3,x86-64-v3", "names an instruction set twice"),
    ("x86-64-v3+fast", "unknown target modifier"),
])
def test_unknown_target_is_refused(target, message):
    with pytest.raises(ValueError, match=message):
        build.build_config(target)


def test_the_default_target_can_come_from_the_environment(monkeypatch):
    """$SYMCONV_TARGET names the default target (one variant builds half as much); a bad
    value is refused naming the variable, and so is a sanitized default."""
    monkeypatch.setenv(targets.TARGET_ENV, "x86-64-v3")
    assert build.build_config()["target"] == "x86-64-v3"
    assert [v.target for v in targets.variants()] == ["x86-64-v3"]
    assert build.build_config("x86-64")["target"] == "x86-64"      # a named target wins
    assert compiler.KERNELS._key(SPEC, None, None, False)[2] == "x86-64-v3"
    for bad, message in (("avx9", r"\$SYMCONV_TARGET: unknown target 'avx9'"),
                         ("x86-64+sanitize", "cannot be sanitized"),
                         ("+sanitize", "cannot be sanitized")):
        monkeypatch.setenv(targets.TARGET_ENV, bad)
        with pytest.raises(ValueError, match=message):
            build.build_config()


def test_target_lists_give_one_variant_each_best_first():
    entries = targets.variants("x86-64-v4,x86-64-v3,x86-64+sanitize")
    assert [v.target for v in entries] == ["x86-64-v4", "x86-64-v3", "x86-64"]
    assert [v.isa for v in entries] == ["avx512", "avx2", None]
    assert [v.flags for v in entries] == [("-march=x86-64-v4",), ("-march=x86-64-v3",),
                                          ("-march=x86-64",)]
    assert len({v.source for v in entries}) == len({v.prefix for v in entries}) == 3
    config = build.build_config("x86-64-v4,x86-64-v3,x86-64+sanitize")
    assert config["sanitize"] and config["cpu_features"] == []   # the baseline's: none
    assert targets.variants("x86-64-v3") == [Variant(
        target="x86-64-v3", isa="avx2", flags=("-march=x86-64-v3",),
        cpu_features=targets.TARGET_FEATURES["x86-64-v3"], source="kernels.c",
        prefix="symconv_")]
    assert Variant.from_json(entries[0].to_json()) == entries[0]     # the manifest's form


def test_different_specs_in_parallel_do_not_interfere(tmp_path):
    """Four processes compile overlapping sets of specs into one cache at once; each checks its
    results against the oracle, and every package is intact afterwards."""
    specs = [ConvSpec((1, 2, 9), (3, 2, 3), padding=1),
             ConvSpec((2, 2, 6, 5), (2, 1, 3, 2), groups=2, stride=(2, 1), dtype="float64"),
             ConvSpec((1, 1, 5, 4, 4), (2, 1, 2, 2, 2), dilation=(1, 2, 1), padding=1, bias=False),
             ConvSpec((1, 3, 11), (3, 1, 4), groups=3, stride=3, padding=((2, 0),))]
    tests = str(Path(__file__).parent)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {tests!r})
        import numpy as np, symconv
        from symconv import ConvSpec
        from oracle import conv_forward
        for fields in sys.argv[1:]:
            spec = ConvSpec.from_dict(eval(fields))
            k = symconv.compile_conv(spec, cache_dir={str(tmp_path)!r})
            rng = np.random.default_rng(0)
            x = rng.standard_normal(spec.input_shape).astype(spec.dtype)
            w = rng.standard_normal(spec.weight_shape).astype(spec.dtype)
            b = [rng.standard_normal(spec.bias_shape).astype(spec.dtype)] if spec.bias else []
            expected = conv_forward(x, w, b[0] if b else None, spec.stride, spec.padding,
                                    spec.dilation, spec.groups)
            assert np.allclose(k.forward(x, w, *b), expected, atol=1e-4), spec
            print(k.path)
    """)
    chosen = [(0, 1), (1, 2), (2, 3), (3, 0)]
    workers = [subprocess.Popen([sys.executable, "-c", code,
                                 *(repr(specs[i].to_dict()) for i in pair)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for pair in chosen]
    paths = set()
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
        paths |= set(stdout.split())
    packages = {str(p) for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert paths == packages and len(packages) == 4
    for package in packages:
        symconv.load(package)


def _children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, command line) of a process's children, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            for child in (task / "children").read_text().split():
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                found.append((int(child), [a.decode(errors="replace") for a in argv]))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_build_killed_mid_compile_leaves_nothing_that_loads(tmp_path):
    """SIGKILL the compiling process while the C compiler runs: no package appears (the
    compiler, orphaned, finishes into the staging directory), the next compile of the spec
    builds and loads it, and the dead build's staging directory is removed."""
    import signal
    spec = ConvSpec((2, 4, 9, 8, 7), (4, 2, 3, 2, 3), groups=2, stride=(2, 1, 1), padding=1)
    code = (f"import symconv; from symconv import ConvSpec; symconv.compile_conv("
            f"ConvSpec.from_dict({spec.to_dict()!r}), cache_dir={str(tmp_path)!r})")
    victim = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    compiler_pids, deadline = [], time.monotonic() + 120
    while not compiler_pids and victim.poll() is None and time.monotonic() < deadline:
        compiler_pids = [pid for pid, argv in _children(victim.pid)   # not `cc --version`
                         if "-shared" in argv and any(a.endswith(".c") for a in argv)]
        time.sleep(0.002)
    assert compiler_pids, "the compiler was never seen running"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    for pid in compiler_pids:                   # let the orphaned compiler finish
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"]
    assert staging, "the killed build left no staging directory (was it killed too late?)"
    kernel = fresh_compile(spec, tmp_path)
    assert kernel.path.parent == tmp_path.resolve()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".locks"]
    x = np.ones(spec.input_shape, np.float32)
    w = np.ones(spec.weight_shape, np.float32)
    assert kernel.forward(x, w, np.zeros(4, np.float32)).max() == 2 * 3 * 2 * 3


def test_package_key_covers_versions_and_compiler(tmp_path, monkeypatch):
    """symconv's, cffi's and Python's versions, the Python ABI and the compiler's version each
    change the package name: a cache shared across upgrades never serves a stale binary."""
    spec = ConvSpec((1, 1, 5), (1, 1, 3))

    def name():
        return build.package_name(spec.slug, spec.key, build.build_config("x86-64"))

    names = {name()}
    with monkeypatch.context() as m:
        m.setattr(build, "__version__", "99.0")
        names.add(name())
    with monkeypatch.context() as m:
        m.setattr(build.cffi, "__version__", "0.1")
        names.add(name())
    with monkeypatch.context() as m:
        m.setattr(build.platform, "python_version", lambda: "3.99.0")
        names.add(name())
    with monkeypatch.context() as m:
        real = build.sysconfig.get_config_var
        m.setattr(build.sysconfig, "get_config_var",
                  lambda key: ".cpython-399-x86_64-linux-gnu.so" if key == "EXT_SUFFIX" else real(key))
        names.add(name())
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "fakecc 99.1"; exit 0; fi\n'
                    'exec gcc "$@"\n')
    fake.chmod(0o755)
    with monkeypatch.context() as m:
        m.setenv("CC", str(fake))
        assert build.build_config("x86-64")["compiler_version"] == "fakecc 99.1"
        names.add(name())
    assert len(names) == 6


def test_interrupted_build_leaves_nothing_that_loads(tmp_path):
    def fail(staging):
        (staging / "manifest.json").write_text("{}")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build.publish(tmp_path, "pkg", fail)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]


def test_cache_hit_in_process_is_instant(tmp_path):
    fresh_compile(SPEC, tmp_path)
    compiler.KERNELS.clear()
    start = time.perf_counter()
    compiler.compile_conv(SPEC, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0


def test_fingerprint_covers_every_module_that_shapes_a_package(tmp_path):
    """A change to any source of the compiler's stages makes new package keys, with no list
    of files to keep up to date: edit, add or split a file in a copy and the key changes."""
    import shutil
    root = Path(build.__file__).resolve().parent.parent
    sources = {p.relative_to(root).as_posix() for p in build.compiler_sources()}
    assert {"spec.py", "kernel.py", "symbolic/ir.py", "symbolic/derive.py",
            "symbolic/define/conv.py", "codegen/schedule.py", "codegen/c.py",
            "package/build.py", "package/targets.py"} <= sources
    copy = tmp_path / "symconv"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert build.fingerprint_of(copy) == build.fingerprint() == build.fingerprint_of(root)
    seen = {build.fingerprint()}
    for change in ("symbolic/derive.py", "codegen/c.py", "spec.py"):
        with open(copy / change, "a") as f:
            f.write("\n# a change\n")
        seen.add(build.fingerprint_of(copy))
    (copy / "codegen" / "split_off.py").write_text("X = 1\n")      # a new file in a stage
    seen.add(build.fingerprint_of(copy))
    (copy / "graph" / "ops.py").write_text("# outside the compiler\n")   # not a stage: no change
    assert build.fingerprint_of(copy) in seen
    assert len(seen) == 5
    config = build.build_config()
    names = {build.package_name("s", "k", {**config, "fingerprint": f}) for f in seen}
    assert len(names) == 5


def test_one_kernel_cache_serves_compile_op_the_graph_and_the_bindings(cache_dir, tmp_path, rng):
    """compile_op, the graph and the framework bindings share compiler.KERNELS, keyed by the
    spec's key and the cache directory: a spec is loaded once per process and directory."""
    from symconv.binding import conv_kernel
    from symconv.compiler import KERNELS
    spec = ConvSpec((None, 2, 7), (3, 2, 3), padding=1, stride=2)   # what bindings compile
    kernel = compiler.compile_op(spec)
    entries = len(KERNELS)
    assert conv_kernel((1, 2, 7), (3, 2, 3), stride=2, padding=1) is kernel      # bindings
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((1, 2, 7), (3, 2, 3), (3,)))
    y = symconv.conv(symconv.Tensor(x), symconv.Tensor(w), symconv.Tensor(b), stride=2,
                     padding=1)                                                   # the graph
    np.testing.assert_array_equal(y.data, kernel.forward(x, w, b))
    assert compiler.compile_conv(ConvSpec(**spec.to_dict())) is kernel           # equal spec
    assert len(KERNELS) == entries
    elsewhere = compiler.compile_op(spec, cache_dir=tmp_path)                     # other dir
    assert elsewhere is not kernel and len(KERNELS) == entries + 1
    assert compiler.KERNELS.load(spec).cached and not compiler.KERNELS.load(
        ConvSpec((1, 2, 9), (3, 2, 3)), cache_dir=tmp_path / "fresh").cached
