"""The emitted C: deterministic, specialised, typed; its integer helpers checked in C."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sympy

from symconv import ConvSpec, compiler
from symconv import codegen
from symconv.errors import IRError
from symconv.package import build, targets
from symconv.symbolic import define
from symconv.symbolic.ir import Array, IndexSum, SumFunction, Term, index

SPEC = dict(input_shape=(2, 3, 9, 8), weight_shape=(4, 3, 3, 2), stride=(2, 3), dilation=(1, 2),
            padding=((1, 0), 2))


def c_text(**fields):
    """The AVX2 C of a convolution (a single-target package: functions keep plain names)."""
    return compiler.compilation(ConvSpec(**fields), "x86-64-v3").source.text


def test_same_spec_gives_byte_identical_c_across_processes():
    code = ("import hashlib; from symconv import ConvSpec, compiler; "
            f"print(hashlib.sha256(compiler.compilation(ConvSpec(**{SPEC!r}), 'x86-64-v3').source.text"
            ".encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip()
               for seed in ("0", "7")}
    digests.add(hashlib.sha256(c_text(**SPEC).encode()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("fields, threads", [
    ({"input_shape": (4, 16, 40, 40), "weight_shape": (32, 16, 3, 3), "padding": 1}, True),
    ({"input_shape": (1, 8, 12, 12, 12), "weight_shape": (16, 8, 3, 3, 3), "stride": 2,
      "padding": 1}, True),
    ({"input_shape": (1, 8, 16, 16), "weight_shape": (8, 8, 3, 3), "padding": 1}, False),
], ids=["threaded", "shared-phase-loops", "too-small"])
def test_each_function_threads_as_its_schedule_splits(fields, threads):
    """Every plan carries its Split (a function's stride phases sharing loops: the
    arrangement, its phases none): a parallel loop over its tasks, taken in the chunks it
    says, only where its work pays for threads; explain's line says which."""
    from symconv.codegen import schedule
    compiled = compiler.compilation(ConvSpec(**fields), "x86-64-v3")
    source = compiled.source.text
    threaded = []
    for name, arrangement in compiled.arrangements.items():
        body = source.split(f"void symconv_{name}(")[1].split("\nvoid ")[0]
        lines = [line.strip() for line in body.splitlines()]
        directives = set()
        for k, line in enumerate(lines):
            found = re.match(r"#pragma omp (?:parallel )?for (?:collapse\((\d+)\) )?"
                             r"schedule\(dynamic, (\d+)\)", line)
            if found:
                loops = int(found[1] or 1)      # a collapse covers loops nested perfectly
                assert all(t.startswith("for (") for t in lines[k + 1:k + 1 + loops]), line
                directives.add((str(loops), found[2]))
        if arrangement.shared:
            assert all(c.split is None for _, c in arrangement.plans)
            assert [n for n, _ in arrangement.split.over] == \
                [str(i.label) for i in arrangement.shared]
            described = [(arrangement.split, schedule.describe_shared(arrangement))]
        else:
            assert arrangement.split is None
            described = [(c.split, schedule.describe(p, c)) for p, c in arrangement.plans]
        for split, line in described:
            assert split.tasks == math.prod(count for _, count in split.over)
            assert split.grain == max(1, split.tasks // schedule.PARALLEL_GRAIN)
            said = line.split("; ")[-1]
            threaded.append(split.threaded)
            if not split.over:          # nothing outside the register blocks to split
                assert not split.threaded and said == "one thread"
                continue
            if split.threaded:
                assert (str(split.loops), str(split.grain)) in directives, name
                assert said.startswith(f"threads take {split.tasks} tasks (")
                counts = said.split("(", 1)[1].split(")")[0]
            else:
                assert said.startswith("one thread: too little work to split over ")
                counts = said.split(" over ")[1]
            assert [int(t.split()[0]) for t in counts.split(" x ")] == \
                [count for _, count in split.over]
    assert any(threaded) == threads
    assert ("#pragma omp" in source) == threads


def test_every_loop_bound_is_a_constant_or_an_outer_index():
    """No loop bound reads memory or a runtime size: only literals, indices of enclosing
    loops and symconv's integer helpers."""
    text = c_text(**SPEC)
    declared = set(re.findall(r"int64_t (\w+) =", text))
    assert {"i_n", "i_o", "i_c", "i_k0"} <= declared
    for line in text.splitlines():
        match = re.search(r"for \(int64_t (\w+) = (.*?); \1 (<=|<) (.*?); ", line)
        if not match:
            continue
        used = set(re.findall(r"[A-Za-z_]\w*", match.group(2) + match.group(4)))
        helpers = {u for u in used if re.fullmatch(r"sc_\w+", u)}
        assert used - helpers <= declared, line


def test_float32_code_uses_float_arithmetic():
    x, y = Array("x", (4,)), Array("y", (4,))
    i = index("i", 4)
    fn = IndexSum(y, (i,), (Term((), sympy.exp(x[i]) / 3 + x[i] ** 2),))
    f32 = codegen.emit([SumFunction("forward", fn, (x,))], "float32", "test").text
    f64 = codegen.emit([SumFunction("forward", fn, (x,))], "float64", "test").text
    assert "expf(" in f32 and "1.0F/3.0F" in f32 and "float sc_acc" in f32
    assert "exp(" in f64 and "expf" not in f64 and "double sc_acc" in f64
    assert "(a_x[i_i]*a_x[i_i])" in f32  # small powers become products


def test_pointers_are_restrict_qualified_and_inputs_const():
    text = c_text(**SPEC)
    assert ("void symconv_grad_input(const float *restrict a_weight, const float *restrict "
            "a_grad_output, float *restrict a_grad_input, int sc_threads)") in text


def test_every_function_has_its_formula_as_a_comment():
    text = c_text(**SPEC)
    for name in ("output[n, o, i0, i1] =", "grad_input[n, c, j0, j1] =",
                 "grad_weight[o, c, k0, k1] =", "grad_bias[o] ="):
        assert f" * {name}" in text


def test_user_names_live_in_their_own_c_namespace():
    """Arrays become a_<name>, indices i_<name>: a name like a C keyword or a generated
    variable reaches C only under its prefix."""
    x, y = Array("int", (4,)), Array("sc_acc", (4,))
    i = index("for", 4)
    fn = IndexSum(y, (i,), (Term((), x[i]),))
    text = codegen.emit([SumFunction("forward", fn, (x,))], "float32", "test").text
    assert "const float *restrict a_int, float *restrict a_sc_acc" in text
    assert "for (int64_t i_for = 0;" in text and "a_sc_acc[i_for] = sc_acc;" in text


def test_function_names_must_be_c_identifiers():
    x, y = Array("x", (4,)), Array("y", (4,))
    fn = IndexSum(y, (index("i", 4),), (Term((), x[index("i", 4)]),))
    with pytest.raises(IRError, match="not a C identifier"):
        codegen.emit([SumFunction("a-b", fn, (x,))], "float32", "test")


def test_floor_helpers_are_correct_for_negative_numerators(tmp_path, one_target_config):
    """sc_floordiv / sc_ceildiv / sc_mod against Python's integer arithmetic."""
    source = codegen.PRELUDE + """
int64_t floordiv(int64_t a, int64_t b) { return sc_floordiv(a, b); }
int64_t ceildiv(int64_t a, int64_t b) { return sc_ceildiv(a, b); }
int64_t mod(int64_t a, int64_t b) { return sc_mod(a, b); }
"""
    (tmp_path / targets.SOURCE).write_text(source)
    cdef = "\n".join(f"int64_t {f}(int64_t a, int64_t b);" for f in ("floordiv", "ceildiv", "mod"))
    path = build.compile_extension(tmp_path, "_helpers", cdef, one_target_config)
    spec = importlib.util.spec_from_file_location("_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for a in range(-23, 24):
        for b in (1, 2, 3, 5, 7):
            assert module.lib.floordiv(a, b) == a // b
            assert module.lib.ceildiv(a, b) == -((-a) // b)
            assert module.lib.mod(a, b) == a % b


def test_stride_phases_leave_no_quotient_and_no_divisibility_test():
    """Stride 2, dilation 3: grad_input is split into the two phases of j0; in each the
    quotient index becomes exact and the congruence a unit-step change of variable."""
    op = define.conv(ConvSpec((1, 1, 13), (1, 1, 3), stride=2, dilation=3, padding=1))
    for target in ("x86-64", "x86-64-v3", "x86-64-v4"):
        text = compiler.derive_and_emit(op, target).source.text
        grad_input = text[text.index("void symconv_grad_input"):text.index("void symconv_grad_w")]
        assert "phase i_j0 = 2·sc_i_j0_phase:" in grad_input
        assert "phase i_j0 = 2·sc_i_j0_phase + 1:" in grad_input
        assert "sc_mod(" not in grad_input and ") / " not in grad_input


def test_quotients_are_emitted_as_exact_division():
    j, k = index("j", 9), index("k", 3)
    assert codegen.c_affine((j - 3 * k + 1) / 2) == "(j - 3*k + 1) / 2"
    assert codegen.c_affine(2 * j - k) == "2*j - k"


def test_affine_text_evaluates_to_the_expression():
    """The direct printer of affine index expressions, read back as Python (C's ``*``, ``+``
    and ``-`` on integers are Python's), equals the expression at random points."""
    rng = random.Random(7)
    names = [index(n, 50) for n in ("i_a", "i_b", "k")] + [sympy.Symbol("sc_row0", integer=True)]
    for _ in range(200):
        chosen = rng.sample(names, rng.randint(0, len(names)))
        expr = sum((rng.choice([-7, -2, -1, 1, 3, 200704]) * n for n in chosen),
                   sympy.Integer(rng.randint(-60, 60)))
        text = codegen.c_affine(expr)
        for _ in range(3):
            point = {n: rng.randint(-20, 20) for n in names}
            scope = {str(n.label) if isinstance(n, sympy.Idx) else str(n): v
                     for n, v in point.items()}
            assert eval(text, {}, scope) == expr.subs(point), (text, expr)
    assert codegen.c_affine(1 - index("i", 9)) == "1 - i"
    assert codegen.c_affine(sympy.Integer(0)) == "0"


def test_zero_gradient_sum_writes_zeros():
    y = Array("y", (3,))
    i = index("i", 3)
    fn = IndexSum(y, (i,), ())
    text = codegen.emit([SumFunction("zero", fn, ())], "float64", "test").text
    assert "double sc_acc = 0;" in text and "a_y[i_i] = sc_acc;" in text


REPRODUCER = """
#include <stdint.h>
static double table[28];
double *data(void) { return table; }
void reduce(const double *restrict g, double *restrict out, int64_t lo0, int64_t hi0) {
    for (int64_t j = 0; j < 7; ++j) {
        int64_t lo = lo0 + (j > 2), hi = hi0 + (j > 2);
        double acc = 0;
        for (int64_t i = lo; i <= hi; ++i) {
            acc += g[7 * i + 1];
            acc += g[7 * i];
        }
        out[j] = acc;
    }
}
"""


def test_build_flags_avoid_gcc_vectorizer_miscompile(tmp_path, one_target_config):
    """GCC 12.2 at -O3 returns 2 instead of 1 for out[3..] here (its loop vectorizer mishandles
    the strided pair of loads in the reduction); symconv's flags must give the right answer."""
    (tmp_path / targets.SOURCE).write_text(REPRODUCER)
    cdef = ("double *data(void);\n"
            "void reduce(const double *g, double *out, int64_t lo0, int64_t hi0);")
    path = build.compile_extension(tmp_path, "_repro", cdef, one_target_config)
    spec = importlib.util.spec_from_file_location("_repro", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.ffi.cast("double *", module.lib.data())
    table[7] = 1.0
    out = module.ffi.new("double[7]")
    module.lib.reduce(table, out, 1, 2)
    assert list(out) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def _c_module(tmp_path, name: str, source: str, cdef: str, target: str):
    """C ``source`` built for ``target`` as the cffi module ``name``, imported."""
    (tmp_path / targets.SOURCE).write_text(source)
    path = build.compile_extension(tmp_path, name, cdef, build.build_config(target))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stride_two_loads_pick_every_other_element(tmp_path):
    """sc_load2 (and under a lane mask, sc_load2m) of the AVX2 prelude: lane l holds p[2l],
    masked lanes 0, for floats and doubles."""
    from symconv.kernel import cpu_features
    if not {"avx2", "fma"} <= (cpu_features() or set()):
        pytest.skip("needs an AVX2 CPU")
    source = codegen.PRELUDE + codegen.c.header("sc_avx2.h") + """
void load2_ps(const float *p, const int32_t *m, float *out, float *masked) {
    _mm256_storeu_ps(out, sc_load2_ps(p));
    _mm256_storeu_ps(masked, sc_load2m_ps(p, _mm256_loadu_si256((const __m256i *)m)));
}
void load2_pd(const double *p, const int64_t *m, double *out, double *masked) {
    _mm256_storeu_pd(out, sc_load2_pd(p));
    _mm256_storeu_pd(masked, sc_load2m_pd(p, _mm256_loadu_si256((const __m256i *)m)));
}
"""
    cdef = ("void load2_ps(const float *p, const int32_t *m, float *out, float *masked);\n"
            "void load2_pd(const double *p, const int64_t *m, double *out, double *masked);")
    module = _c_module(tmp_path, "_loads", source, cdef, "x86-64-v3")
    ffi, rng = module.ffi, random.Random(3)
    for dtype, itype, lanes, name in (("float", "int32_t", 8, "load2_ps"),
                                      ("double", "int64_t", 4, "load2_pd")):
        values = ffi.new(f"{dtype}[]", [float(v) for v in range(1, 2 * lanes + 4)])
        for start in (0, 1, 3):
            active = [rng.random() < 0.5 for _ in range(lanes)]
            mask = ffi.new(f"{itype}[]", [-1 if a else 0 for a in active])
            out, masked = ffi.new(f"{dtype}[]", lanes), ffi.new(f"{dtype}[]", lanes)
            getattr(module.lib, name)(values + start, mask, out, masked)
            expected = [values[start + 2 * lane] for lane in range(lanes)]
            assert list(out) == expected
            assert list(masked) == [e if a else 0.0 for e, a in zip(expected, active)]


def test_stride_two_stores_write_every_other_element(tmp_path):
    """sc_store2m of the AVX-512 prelude (the input gradient of a stride-2 layer, one phase
    at a time): lane l goes to p[2l] where its mask bit is set; every other element, the odd
    ones between included, keeps its value; floats and doubles."""
    from symconv.kernel import cpu_features
    if not {"avx512f", "bmi2"} <= (cpu_features() or set()):
        pytest.skip("needs an AVX-512 CPU")
    source = codegen.PRELUDE + codegen.c.header("sc_avx512.h") + """
void store2_ps(float *p, const float *v, uint32_t m) {
    sc_store2m_ps(p, _mm512_loadu_ps(v), (__mmask16)m);
}
void store2_pd(double *p, const double *v, uint32_t m) {
    sc_store2m_pd(p, _mm512_loadu_pd(v), (__mmask8)m);
}
"""
    cdef = ("void store2_ps(float *p, const float *v, uint32_t m);\n"
            "void store2_pd(double *p, const double *v, uint32_t m);")
    module = _c_module(tmp_path, "_stores", source, cdef, "x86-64-v4")
    ffi, rng = module.ffi, random.Random(5)
    for dtype, lanes, name in (("float", 16, "store2_ps"), ("double", 8, "store2_pd")):
        lane_values = ffi.new(f"{dtype}[]", [100.0 + lane for lane in range(lanes)])
        for start in (0, 1, 3):
            mask = rng.getrandbits(lanes) if start else (1 << lanes) - 1
            memory = ffi.new(f"{dtype}[]", [-1.0 - e for e in range(2 * lanes + 4)])
            expected = list(memory)
            for lane in range(lanes):
                if mask >> lane & 1:
                    expected[start + 2 * lane] = lane_values[lane]
            getattr(module.lib, name)(memory + start, lane_values, mask)
            assert list(memory) == expected, (dtype, start, bin(mask))


@pytest.mark.parametrize("header, target, size", [("sc_avx2.h", "x86-64-v3", 8),
                                                   ("sc_avx512.h", "x86-64-v4", 16)])
def test_transposes_move_each_element_to_its_place(tmp_path, header, target, size):
    """sc_transpose{8,16}_ps (a copy's channels moved innermost) against NumPy: element j
    of row i of a block (rows ``ss`` apart) lands at dst[j*ds + i]; nothing else is
    written."""
    from symconv.kernel import cpu_features
    if not set(targets.TARGET_FEATURES[target]) <= (cpu_features() or set()):
        pytest.skip(f"needs a {target} CPU")
    source = codegen.PRELUDE + codegen.c.header(header) + f"""
void transpose(const float *src, int64_t ss, float *dst, int64_t ds) {{
    sc_transpose{size}_ps(src, ss, dst, ds);
}}
"""
    module = _c_module(tmp_path, "_transpose", source,
                       "void transpose(const float *, int64_t, float *, int64_t);", target)
    ffi, rng = module.ffi, np.random.default_rng(11)
    for ss, ds in ((size, size), (37, 21), (size + 3, 40)):
        src = rng.standard_normal(size * ss).astype(np.float32)
        dst = np.full(size * ds + 5, -7.0, np.float32)
        module.lib.transpose(ffi.from_buffer("float[]", src), ss,
                             ffi.from_buffer("float[]", dst), ds)
        expected = np.full_like(dst, -7.0)
        block = src.reshape(size, ss)[:, :size]
        for j in range(size):
            expected[j * ds:j * ds + size] = block[:, j]
        np.testing.assert_array_equal(dst, expected, err_msg=f"ss={ss} ds={ds}")


@pytest.mark.parametrize("header, flags", [("sc_scalar.h", []),
                                           ("sc_avx2.h", ["-mavx2", "-mfma"]),
                                           ("sc_avx512.h", ["-mavx512f", "-mbmi2"])])
def test_each_prelude_header_compiles_alone(tmp_path, header, flags):
    """The preludes are real C headers: the compiler checks each one on its own (with the
    scalar one first, as the emitter pastes them), warnings as errors."""
    text = codegen.PRELUDE + ("" if header == "sc_scalar.h" else codegen.c.header(header))
    (tmp_path / "unit.c").write_text(text)
    result = subprocess.run([build.c_compiler(), "-std=c99", "-fopenmp", "-Wall", "-Werror",
                             "-Wno-unused-function", "-fsyntax-only", *flags,
                             str(tmp_path / "unit.c")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
