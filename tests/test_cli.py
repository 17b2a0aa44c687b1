"""The symconv command: compile, explain, list, gradcheck, demo, and its one-line errors."""

from __future__ import annotations

import io
import json
import os
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


def test_compile_from_flags_then_import_the_package(tmp_path):
    generated = tmp_path / "generated"
    code, out = run(["compile", *FLAGS, "--out", str(generated)])
    assert code == 0
    (package,) = [p for p in generated.iterdir() if not p.name.startswith(".")]
    assert str(package) in out
    script = ("import sys; sys.modules['sympy'] = None\n"
              f"import generated.{package.name} as k\n"
              "import numpy as np\n"
              "y = k.forward(np.ones((2, 3, 9, 8), np.float32), np.ones((4, 3, 3, 3), np.float32),"
              " np.zeros(4, np.float32))\n"
              "print(y.shape, float(y.max()))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 4, 4, 4) 27.0"


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
    assert r"\mathrm{grad\_weight}" in out and "void symconv_grad_weight(" in out
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
    ([], "choose a command"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


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
