"""The symconv command: compile, explain, list, gradcheck, demo, and its one-line errors; the
HTML report, benchmark, --verbose stage logging and the progress bar."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from symconv import ConvSpec
from symconv.cli import main

FLAGS = ["--input", "2,3,9,8", "--weight", "4,3,3,3", "--stride", "2", "--padding", "1:0,1"]


def run(argv):
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def only_package(generated):
    (package,) = [p for p in generated.iterdir() if not p.name.startswith(".")]
    return package


def run_with_package(generated, code: str) -> str:
    """Run ``code`` in a fresh Python without SymPy, the package under ``generated`` imported
    as ``k`` and NumPy as ``np``; its stdout."""
    script = ("import sys; sys.modules['sympy'] = None\n"
              f"import {generated.name}.{only_package(generated).name} as k\n"
              f"import numpy as np\n{code}\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=generated.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_compile_from_flags_then_import_the_package(tmp_path):
    generated = tmp_path / "generated"
    code, out = run(["compile", *FLAGS, "--out", str(generated)])
    assert code == 0
    assert str(only_package(generated)) in out
    assert run_with_package(generated, "y = k.forward(np.ones((2, 3, 9, 8), np.float32), "
                            "np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32))\n"
                            "print(y.shape, float(y.max()))") == "(2, 4, 4, 4) 27.0"



def test_compile_several_specs_from_json_and_toml(tmp_path):
    specs = [ConvSpec((1, 2, 6), (2, 2, 3)).to_dict(),
             ConvSpec((1, 2, 6, 6), (2, 1, 3, 3), groups=2, padding="same").to_dict()]
    (tmp_path / "specs.json").write_text(json.dumps({"specs": specs}))
    (tmp_path / "one.toml").write_text(
        '[[specs]]\ninput_shape = [1, 1, 5]\nweight_shape = [1, 1, 2]\nstride = 2\n'
        'padding = "same"\ndtype = "float64"\n')
    out_dir = tmp_path / "out"
    code, out = run(["compile", "--spec", str(tmp_path / "specs.json"), "--spec",
                     str(tmp_path / "one.toml"), "--out", str(out_dir)])
    assert code == 0 and len(out.strip().splitlines()) == 3
    code, listing = run(["list", str(out_dir)])
    assert code == 0
    names = listing.splitlines()[::2]
    assert [n.split("_")[0] for n in names] == ["conv1d", "conv1d", "conv2d"]
    assert "groups 2" in listing


def test_explain_text_latex_c_and_scatter():
    code, out = run(["explain", *FLAGS])
    assert code == 0
    assert "== grad_input ==" in out and "grad_input[n, c, j0, j1] =" in out and "⌈" in out
    code, out = run(["explain", *FLAGS, "--latex", "--c", "--scatter"])
    assert code == 0
    assert r"\mathrm{grad\_weight}" in out and re.search(r"void symconv_\w*grad_weight\(", out)
    assert "chain rule (scatter form):" in out and r"\delta" in out


def test_gradcheck_command(tmp_path):
    code, out = run(["gradcheck", "--input", "1,2,7", "--weight", "3,2,3", "--stride", "2",
                     "--dilation", "2", "--padding", "2", "--cache-dir", str(tmp_path)])
    assert code == 0
    assert out.count("-> ok") == 3


def test_demo(tmp_path):
    code, out = run(["demo", "--cache-dir", str(tmp_path)])
    assert code == 0
    assert "all gradients agree" in out and "solved over the integers" in out


@pytest.mark.parametrize("argv, fragment", [
    (["compile", "--input", "2,x,9", "--weight", "4,3,3"], "expected comma-separated integers"),
    (["compile", "--inputs", "2,3,9"], "unrecognized arguments"),
    (["compile", "--weight", "4,3,3"], "give --input and --weight"),
    (["explain", "--input", "1,3,9", "--weight", "4,2,3", "--groups", "2"], "ConvSpec.groups"),
    (["explain", "--input", "1,2,9", "--weight", "4,2,3", "--padding", "1:2:3"],
     "ConvSpec.padding: each entry must be an int or a (lo, hi) pair"),
    (["compile", "--spec", "/nonexistent/spec.json"], "cannot read spec file"),
    (["frobnicate"], "invalid choice"),
    (["explain", "--expr", "Y[i] = X[i]", "--shape", "X=5", "--input", "1,2,3"],
     "--expr cannot be combined with --input"),
    (["explain", "--input", "1,2,9", "--weight", "2,2,3", "--zero-outside", "X"],
     "only --expr takes --zero-outside"),
    (["explain", "--input", "1,2,9", "--weight", "2,2,3", "--output-padding", "1"],
     "--output-padding only applies to --transpose"),
    (["explain", "--input", "1,2,9", "--weight", "2,2,3", "--transpose", "--padding-mode",
      "reflect"], "pads with zeros only"),
    (["explain", "--input", "1,2,9", "--weight", "2,2,3", "--gradient", "grad_foo"],
     "has no gradient grad_foo (it has grad_input, grad_weight, grad_bias)"),
    (["explain", "--expr", "Y[i] = X[i", "--shape", "X=5"], "expression: cannot read"),
    (["explain", "--expr", "Y[i] = X[i + k]", "--shape", "X=5"], "cannot infer the range of"),
    ([], "choose a command"),
    (["compile", "--input", "1,3,10000000000,10000000000", "--weight", "4,3,3,3"],
     "input of shape (1, 3, 10000000000, 10000000000) would take 1.2e+21 bytes"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


CORRELATE = "Y[n, i] = sum(W[k] * X[n, i + k - 1], (k, 0, 2))"


def test_expr_explain_and_compile_then_import_without_sympy(tmp_path):
    flags = ["--expr", CORRELATE, "--shape", "X=2,6", "--shape", "W=3", "--shape", "Y=2,6",
             "--zero-outside", "X", "--dtype", "float64"]
    code, out = run(["explain", *flags])
    assert code == 0
    assert "== grad_X ==" in out and "== grad_W ==" in out
    code, out = run(["compile", *flags, "--out", str(tmp_path / "generated")])
    assert code == 0
    assert run_with_package(tmp_path / "generated", (
        "x = np.arange(12.0).reshape(2, 6); w = np.array([1.0, -2.0, 3.0])\n"
        "padded = np.pad(x, ((0, 0), (1, 1)))\n"
        "want = sum(w[j] * padded[:, j:j + 6] for j in range(3))\n"
        "print(np.array_equal(k.forward(x, w), want) or k.forward(x, w).tolist())")) == "True"


@pytest.mark.parametrize("flags", [
    ["--transpose", "--stride", "2", "--output-padding", "1", "--padding", "1"],
    ["--padding-mode", "reflect", "--padding", "2"],
    ["--padding-mode", "circular", "--padding", "1:2", "--stride", "2"],
    ["--gradient", "grad_weight", "--stride", "2"],
])
def test_gradcheck_of_transposed_padded_and_gradient_ops(flags, tmp_path):
    code, out = run(["gradcheck", "--input", "1,2,9", "--weight", "2,2,3", *flags,
                     "--cache-dir", str(tmp_path)])
    assert code == 0, out
    checks = [line for line in out.splitlines() if "rel. error" in line]
    assert len(checks) >= 2 and all(line.endswith("-> ok") for line in checks), out


def test_explain_shows_how_each_function_covers_a_run_time_batch():
    # AVX2's plans (with AVX-512's registers, the weight gradient sums in lanes instead)
    code, out = run(["explain", "--expr", CORRELATE, "--shape", "X=N,6", "--shape", "W=3",
                     "--shape", "Y=N,6", "--zero-outside", "X", "--dtype", "float64",
                     "--target", "x86-64-v3"])
    assert code == 0
    forward, grad_x, grad_w = (out.split(f"== {name} ==")[1].split("==")[0]
                               for name in ("forward", "grad_X", "grad_W"))
    assert "schedule: over a run-time batch: the items side by side" in forward
    assert "schedule: over a run-time batch: the items side by side" in grad_x
    assert "schedule: over a run-time batch: the items summed in order" in grad_w
    assert "(1 vector per register block)" in grad_w        # not "1 vectors"


def test_explain_a_gradient_op_shows_second_derivatives():
    code, out = run(["explain", "--input", "1,2,9", "--weight", "2,2,3", "--no-bias",
                     "--gradient", "grad_input"])
    assert code == 0
    forward = out[out.index("== forward =="):].splitlines()[1]
    assert forward.startswith("grad_input[n, c, j0] =")  # the op's forward: the derived gradient
    assert "grad_output[n, o, j0 - k0]*weight[o, c, k0]" in forward
    assert "== grad_grad_output ==" in out and "== grad_weight ==" in out


def test_spec_file_with_kinds(tmp_path):
    from symconv import ConvTransposeSpec, ExprSpec

    specs = [{"kind": "conv_transpose", **ConvTransposeSpec((1, 2, 5), (2, 3, 3),
                                                             stride=2).to_dict()},
             {"kind": "expr", **ExprSpec(CORRELATE, {"X": (2, 6), "W": (3,), "Y": (2, 6)},
                                         zero_outside=("X",)).to_dict()}]
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    code, out = run(["explain", "--spec", str(tmp_path / "specs.json")])
    assert code == 0
    assert out.count("== grad_weight ==") == 1 and "== grad_X ==" in out
    code, out = run(["gradcheck", "--spec", str(tmp_path / "specs.json"), "--cache-dir",
                     str(tmp_path / "cache")])
    assert code == 0 and out.count("-> ok") == 5, out


def test_bad_spec_file(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["explain", "--spec", str(tmp_path / "bad.json")]) == 2
    assert "not valid json" in capsys.readouterr().err


def test_help_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "symconv", "compile", "--help"],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0 and "--padding" in result.stdout
    result = subprocess.run([sys.executable, "-m", "symconv", "compile", "--stride"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


# --- report, benchmark, logging and progress ----------------------------------------------------

def test_explain_html_report_with_benchmark(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pygments")
    page = tmp_path / "out" / "report.html"
    code, out = run(["explain", *FLAGS, "--html", str(page), "--bench", "--repeat", "2",
                     "--threads", "1", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and out.startswith(f"wrote {page}")
    text = page.read_text()
    for name in ("forward", "grad_input", "grad_weight", "grad_bias"):
        assert f'data-function="{name}" data-form="gather"' in text
    assert "<h3>Benchmark</h3>" in text and "GFLOP/s" in text
    assert not re.search(r"void symconv_\w*grad_input\(", text)  # highlighted: in spans
    assert re.search(r"symconv_\w*grad_input</span>", text)


def test_explain_bench_prints_timings(tmp_path):
    code, out = run(["explain", "--input", "1,2,9", "--weight", "2,2,3", "--bench", "--repeat",
                     "2", "--cache-dir", str(tmp_path)])
    assert code == 0
    lines = out[out.index("== benchmark ("):].splitlines()[1:]
    assert {line.split(":")[0].strip() for line in lines} >= {"forward", "grad_input",
                                                              "grad_weight", "grad_bias"}
    assert all("ms" in line and "GFLOP/s" in line for line in lines)


def test_verbose_logs_every_stage_with_its_time(tmp_path, capsys):
    argv = ["compile", "--input", "1,2,7", "--weight", "2,2,3", "--stride", "2", "--out",
            str(tmp_path)]
    assert main([*argv, "--verbose"]) == 0
    err = capsys.readouterr().err
    for stage in ("define (index sum)", "derive (gradients)", "codegen (C)",
                  "C compiler + cffi", "imports, packaging and load", "total"):
        assert re.search(rf"conv1d_1x2x7_w2x2x3_f32: {re.escape(stage)} \d+\.\d{{3}} s", err), \
            (stage, err)
    assert main(["-v", *argv]) == 0  # before the command works too
    assert re.search(r"cache hit, loaded in \d+\.\d{3} s", capsys.readouterr().err)
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # quiet without --verbose


def _compile_many(tmp_path, stderr, *flags):
    specs = [ConvSpec((1, 1, 5 + i), (1, 1, 2)).to_dict() for i in range(3)]
    (tmp_path / "many.json").write_text(json.dumps(specs))
    return subprocess.run([sys.executable, "-m", "symconv", "compile", "--spec",
                           str(tmp_path / "many.json"), "--out", str(tmp_path / "out"), *flags],
                          stdout=subprocess.PIPE, stderr=stderr, timeout=300)


def test_progress_bar_on_a_terminal_and_quiet_on_a_pipe(tmp_path):
    import pty
    master, slave = pty.openpty()
    try:
        result = _compile_many(tmp_path, slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert result.returncode == 0
    assert len(result.stdout.decode().strip().splitlines()) == 3  # results still on stdout
    terminal = b"".join(chunks).decode()
    assert "compiling [" in terminal and "3/3" in terminal and "\r" in terminal
    assert "eta" in terminal  # drawn between the specs, not only at the end
    piped = _compile_many(tmp_path, subprocess.PIPE)
    assert piped.returncode == 0 and piped.stderr == b""
    forced = _compile_many(tmp_path, subprocess.PIPE, "--progress")
    assert b"compiling [" in forced.stderr and b"3/3" in forced.stderr


def test_progress_bar_and_log_lines_do_not_garble_each_other():
    from symconv.progress import Progress, configure, log

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    configure(True, stream)
    try:
        with Progress(2, "work", stream=stream) as bar:
            log.info("first stage 0.100 s")
            bar.advance("a")
            bar.write("a result line")
            bar.advance("b")
    finally:
        configure(False)
    lines = [line.split("\r\x1b[2K")[-1] for line in stream.getvalue().split("\n")]
    assert "symconv: first stage 0.100 s" in lines and "a result line" in lines
    assert lines[-2].startswith("work [") and "2/2" in lines[-2]
    assert Progress(3, stream=io.StringIO()).enabled is False


def test_version_and_the_list_default(tmp_path, capsys, monkeypatch):
    import symconv
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"symconv {symconv.__version__}"
    monkeypatch.chdir(tmp_path)                  # no ./generated here
    assert main(["list"]) == 2
    assert "no such directory: generated (the default; name one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    assert "default: generated" in capsys.readouterr().out
