#!/usr/bin/env python
"""Regenerate docs/how-autodiff-handles-convolution.md from real `symconv explain --steps`
output, each example with a numeric check of its gradients.

    python scripts/walkthrough.py            # rewrite the document
    python scripts/walkthrough.py --check    # exit 1 if it is out of date (as the tests do)

The check evaluates the forward sum and each derived gather form with symconv's reference
interpreter in float64 (no C): for L = Σ grad_output · output and a random direction v, the
gradient's ⟨grad, v⟩ against the central difference (L(x + h·v) - L(x - h·v)) / 2h.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from symconv import cli  # noqa: E402
from symconv.compiler import compilation  # noqa: E402
from symconv.symbolic.interpreter import evaluate  # noqa: E402

DOCUMENT = ROOT / "docs" / "how-autodiff-handles-convolution.md"


@dataclass(frozen=True)
class Example:
    title: str
    text: str                  # what the example shows, before the output
    argv: tuple[str, ...]      # `symconv explain` arguments (after the command)
    gradients: tuple[str, ...]  # whose steps to show


EXAMPLES = [
    Example(
        "1-D: every delta is a substitution",
        "A 1-D convolution with padding 1. The chain rule gives each gradient as a sum over "
        "all of the forward's indices with one Kronecker delta per axis of the array. Every "
        "delta has an index with coefficient ±1, so each is a substitution; the range of the "
        "substituted index becomes a constraint, and lowering turns the constraints into "
        "loop bounds. That is all there is at stride 1: grad_input is a correlation with the "
        "flipped kernel, grad_weight one of the input with grad_output.",
        ("--input", "2,2,8", "--weight", "3,2,3", "--padding", "1"),
        ("grad_input", "grad_weight")),
    Example(
        "2-D with stride 2: why it is not just a matrix product",
        "Unrolled (im2col), a 2-D convolution's forward is a matrix product, and so is each "
        "gradient of the unrolled form; but grad_input of the real input has to add the "
        "unrolled columns back into overlapping windows (col2im), a scatter. In gather form "
        "that scatter is solved: the delta j = 2·i + k - 1 has a unit coefficient on the tap "
        "k, so k = j + 1 - 2·i is substituted, and the stride moves into the bounds of i, "
        "⌈(j - 1)/2⌉ .. ⌊(j + 1)/2⌋, which divide the output index by 2. The schedule splits "
        "the output into the phases j mod 2 on both axes; in each phase the bounds are exact "
        "and the taps are fixed: four small dense correlations with the sub-kernels 1×1, "
        "1×2, 2×1 and 2×2 of the 3×3 kernel, no division and no divisibility test anywhere.",
        ("--input", "2,2,6,6", "--weight", "2,2,3,3", "--stride", "2", "--padding", "1"),
        ("grad_input",)),
    Example(
        "3-D: the same steps, one more axis",
        "Nothing here knows the rank: a 3-D convolution adds one delta per gradient, solved "
        "like the others.",
        ("--input", "2,2,4,4,4", "--weight", "2,2,2,2,2"),
        ("grad_input",)),
    Example(
        "Stride 2 and dilation 3: coprime",
        "j + 1 = 2·i + 3·k: neither coefficient is ±1 and they share no factor. The index "
        "with the larger range (the output position i) becomes the exact quotient "
        "(j + 1 - 3·k)/2, valid when j + 1 - 3·k ≡ 0 (mod 2): the k loop then runs in steps "
        "of 2 from a residue that depends on j.",
        ("--input", "2,2,11", "--weight", "2,2,3", "--stride", "2", "--dilation", "3",
         "--padding", "1", "--no-bias"),
        ("grad_input",)),
    Example(
        "Stride 2 and dilation 2: a common factor",
        "j + 1 = 2·i + 2·k: the coefficients share the factor 2, so j + 1 must be even (a "
        "congruence on the free index alone: lowering makes it a guard, and the schedule's "
        "even phase has no terms at all), and i = (j + 1)/2 - k is then substituted.",
        ("--input", "2,2,11", "--weight", "2,2,3", "--stride", "2", "--dilation", "2",
         "--padding", "1", "--no-bias"),
        ("grad_input",)),
    Example(
        "Grouped",
        "Grouped convolutions carry a group axis g in every array; each gradient substitutes "
        "the group index like any other, so no gradient sums across groups.",
        ("--input", "2,4,5,5", "--weight", "4,2,3,3", "--groups", "2", "--no-bias"),
        ("grad_weight",)),
    Example(
        "Transposed",
        "A transposed convolution is the adjoint of a convolution; written as an index sum "
        "its forward already has the exact-quotient form, and its grad_input is an ordinary "
        "strided convolution: the same elimination run the other way.",
        ("--input", "2,2,4", "--weight", "2,2,3", "--stride", "2", "--transpose",
         "--no-bias"),
        ("grad_input",)),
    Example(
        "A user op with a nonlinear body",
        "Any affine index sum is differentiated the same way; the body's derivative (here of "
        "tanh) comes from SymPy and the deltas from the reads.",
        ("--expr", "Y[i] = sum(tanh(W[a] * X[2*i + a]), (a, 0, 2))", "--shape", "X=9",
         "--shape", "W=3"),
        ("grad_W", "grad_X")),
]


def _explain(argv) -> str:
    out = io.StringIO()
    status = cli.main(["explain", *argv, "--steps", "--target", "generic"], out=out)
    if status:
        raise RuntimeError(f"symconv explain {' '.join(argv)} failed ({status})")
    return out.getvalue()


def _blocks(output: str) -> dict[str, str]:
    """The explain output cut at its `== name ==` headings."""
    blocks, name, lines = {}, None, []
    for line in output.splitlines():
        if line.startswith("== "):
            if name:
                blocks[name] = "\n".join(lines).strip()
            name, lines = line.strip("= ").split(":")[0], [line]
        elif name:
            lines.append(line)
    if name:
        blocks[name] = "\n".join(lines).strip()
    return blocks


def _spec(argv):
    args = cli.build_parser().parse_args(["explain", *argv])
    return cli._specs(args)[0]


def numeric_check(spec, seed: int = 0, h: float = 1e-6) -> list[str]:
    """Each gradient against a central finite difference of L = Σ grad_output · output,
    everything evaluated by the reference interpreter in float64."""
    compiled = compilation(spec, "generic")     # the interpreter computes in float64
    forward = compiled.functions[0]
    rng = np.random.default_rng(seed)
    arrays = {a.name: rng.standard_normal(a.shape) for a in forward.args}
    cotangent = compiled.cotangent_name
    arrays[cotangent] = rng.standard_normal(forward.sum.output.shape)

    def loss(values):
        return float(np.sum(arrays[cotangent] * evaluate(forward.sum, values)))

    lines = []
    for name, derivation in compiled.derivations.items():
        wrt = derivation.wrt.name
        direction = rng.standard_normal(arrays[wrt].shape)
        grad = evaluate(derivation.gather, arrays)
        analytic = float(np.sum(grad * direction))
        shifted = [loss({**arrays, wrt: arrays[wrt] + sign * h * direction})
                   for sign in (1, -1)]
        numeric = (shifted[0] - shifted[1]) / (2 * h)
        agree = abs(analytic - numeric) <= 1e-6 * max(1.0, abs(analytic))
        lines.append(f"- {name}: ⟨{name}, v⟩ = {analytic:.6g}, finite difference {numeric:.6g}"
                     f" — {'agree' if agree else 'DISAGREE'} (relative tolerance 1e-6)")
    return lines


def render() -> str:
    parts = [
        "# How automatic differentiation handles convolution",
        "",
        "*Generated by `python scripts/walkthrough.py` from the output of `symconv explain "
        "--steps`; `tests/test_walkthrough.py` fails when it is out of date.*",
        "",
        "symconv writes a convolution, of any rank, stride, dilation, grouping or padding, as "
        "an index sum, and derives each gradient in two moves. The chain rule turns "
        "`y[F] = Σ_R body` into a *scatter*: `grad_x[J] = Σ_F Σ_R grad_y[F] · ∂body/∂x · "
        "Π δ(J_t, e_t(F, R))`, one Kronecker delta per axis of `x`. Then each delta, an "
        "affine equation over the integers, is eliminated exactly: a summation index with "
        "coefficient ±1 is substituted; a common factor of the coefficients becomes a "
        "congruence; otherwise an index is solved as an exact quotient under the congruence "
        "that makes it an integer; every eliminated index's range becomes a constraint. What "
        "is left is a *gather*: one output element at a time, no delta, which lowering turns "
        "into loops (constraints into bounds, congruences into steps) and the schedule splits "
        "into stride phases. The examples below are that process printed step by step, each "
        "step with the formula after it; each formula is the same gradient (the test suite "
        "evaluates every one of them and compares).",
        "",
        "Every example ends with a numeric check: the gather form evaluated by symconv's "
        "reference interpreter against a central finite difference, in float64.",
    ]
    for number, example in enumerate(EXAMPLES, 1):
        blocks = _blocks(_explain(example.argv))
        command = "symconv explain " + " ".join(
            f"'{a}'" if " " in a or "[" in a else a for a in example.argv) + " --steps"
        parts += ["", f"## {number}. {example.title}", "", example.text, "", "```",
                  f"$ {command}", "", blocks["forward"], ""]
        for gradient in example.gradients:
            parts.append(blocks[gradient])
            parts.append("")
        parts[-1] = "```"
        parts += ["", "Numeric check:", "", *numeric_check(_spec(example.argv))]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
        if current != text:
            print(f"{DOCUMENT.relative_to(ROOT)} is out of date: run python "
                  f"scripts/walkthrough.py", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.parent.mkdir(exist_ok=True)
    DOCUMENT.write_text(text, encoding="utf-8")
    print(f"wrote {DOCUMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
