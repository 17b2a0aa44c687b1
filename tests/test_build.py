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
from symconv import ConvSpec, PackageError, build, compiler
from symconv.kernel import manifest_digest

SPEC = ConvSpec((2, 3, 8, 8, 8), (4, 3, 3, 3, 3), stride=2, padding=1)


def fresh_compile(spec, cache_dir):
    compiler._loaded.clear()
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
    assert {"__init__.py", "_symconv_kernel.py", "kernels.c", "manifest.json"} <= files
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
    assert manifest["files"]["kernels.c"] == build.file_digest(kernel.path / "kernels.c")
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
    assert float(seconds) < 1.0
    assert sympy_imported == "False"      # a cache hit runs no symbolic stage
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
                                stderr=subprocess.PIPE, text=True) for _ in range(6)]
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
    compiler._loaded.clear()
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
    (lambda p: _replace(p / "kernels.c", b"/* edited */"), "kernels.c does not match"),
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


def test_build_error_reports_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "cc")
    (tmp_path / build.SOURCE).write_text("this is not C;")
    with pytest.raises(build.BuildError, match="C compilation failed"):
        build.compile_extension(tmp_path, "_broken", "void f(void);", build.build_config())


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown target"):
        build.build_config("pentium4")


def test_interrupted_build_leaves_nothing_that_loads(tmp_path):
    def fail(staging):
        (staging / "manifest.json").write_text("{}")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build.publish(tmp_path, "pkg", fail)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]


def test_cache_hit_in_process_is_instant(tmp_path):
    fresh_compile(SPEC, tmp_path)
    compiler._loaded.clear()
    start = time.perf_counter()
    compiler.compile_conv(SPEC, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
