"""The VJP table every manifest carries, and the derived packages it names: what the entries
say, packages from before the table, content digests that let every route to the same
derived function share one package, and the rules (symconv.autodiff) checked against the
NumPy oracle and finite differences."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from oracle import conv_backward, conv_forward
from symconv import ConvSpec, GradientSpec, compiler
from symconv.autodiff import Package, jvp, package_of, vjp
from symconv.kernel import Kernel, manifest_digest

SPEC = ConvSpec(input_shape=(None, 2, 7), weight_shape=(3, 2, 3), stride=2, padding=1,
                dtype="float64")
ORACLE_ARGS = ((2,), [(1, 1)], (1,), 1)


def _package(cache_dir) -> Package:
    return package_of(SPEC, cache_dir)


def test_forward_entries_name_the_package_gradients(cache_dir):
    table = _package(cache_dir).kernel.vjp
    assert {a: (e.function, e.args, e.gradient_of) for a, e in table["forward"].items()} == {
        "input": ("grad_input", ("weight", "grad_output"), None),
        "weight": ("grad_weight", ("input", "grad_output"), None),
        "bias": ("grad_bias", ("grad_output",), None)}
    for function in ("grad_input", "grad_weight", "grad_bias"):
        entries = table[function]
        assert {e.gradient_of for e in entries.values()} == {function}
        assert len({e.content for e in entries.values()}) == 1      # one derived package
        assert all(len(e.content) == 64 for e in entries.values())
    contents = {table[f]["grad_output"].content for f in ("grad_input", "grad_weight",
                                                           "grad_bias")}
    assert len(contents) == 3                                       # different functions


def test_a_package_from_before_the_table_gets_the_table_it_implied(cache_dir, tmp_path):
    kernel = _package(cache_dir).kernel
    old = tmp_path / kernel.path.name
    shutil.copytree(kernel.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["vjp"], manifest["canonical_order"]
    manifest["digest"] = manifest_digest(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = Kernel(old)
    assert loaded.vjp["forward"] == kernel.vjp["forward"]
    assert loaded.vjp["grad_input"]["weight"].gradient_of == "grad_input"
    assert loaded.vjp["grad_input"]["weight"].content is None
    assert loaded.record.canonical_order is None


def test_routes_to_the_same_derived_function_share_a_digest(cache_dir):
    """grad_input's gradient w.r.t. grad_output is a convolution without bias; the gradient
    of that w.r.t. its own cotangent is grad_input again: derived twice, digested alike."""
    package = _package(cache_dir)
    first = vjp(package, "grad_input", "grad_output")            # conv_nobias(u, weight)
    second = vjp(first.package, first.function, first.params[first.sources.index(None)])
    table = package.kernel.vjp
    again = second.package.kernel.vjp[second.function]          # grad_input, derived again
    digest = table["grad_input"]["weight"].content
    assert {e.content for e in again.values()} == {digest}
    assert package.gradient("grad_input", digest).spec.key == \
        second.package.gradient(second.function, digest).spec.key


def test_rules_against_the_oracle_and_finite_differences(cache_dir):
    package = _package(cache_dir)
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 2, 7)), rng.standard_normal((3, 2, 3)), \
        rng.standard_normal(3)
    gy = rng.standard_normal((2, 3, 4))
    values = {"input": x, "weight": w, "bias": b}
    expected = dict(zip(("input", "weight", "bias"), conv_backward(x, w, gy, *ORACLE_ARGS)))
    for name in ("input", "weight", "bias"):
        rule = vjp(package, "forward", name)
        got = rule.package.kernel.functions[rule.function](*rule.arrays(values, gy))
        np.testing.assert_allclose(got, expected[name], rtol=1e-12, atol=1e-12)
    # forward mode: the VJP of the VJP along a tangent equals a central difference
    for name, tangent in (("input", rng.standard_normal(x.shape)),
                          ("weight", rng.standard_normal(w.shape)),
                          ("bias", rng.standard_normal(b.shape))):
        rule = jvp(package, "forward", name)
        got = rule.package.kernel.functions[rule.function](
            *rule.arrays(values, tangent), batch=x.shape[0])
        eps = 1e-6
        plus = dict(values, **{name: values[name] + eps * tangent})
        minus = dict(values, **{name: values[name] - eps * tangent})
        difference = (conv_forward(plus["input"], plus["weight"], plus["bias"], *ORACLE_ARGS)
                      - conv_forward(minus["input"], minus["weight"], minus["bias"],
                                     *ORACLE_ARGS)) / (2 * eps)
        np.testing.assert_allclose(got, difference, rtol=1e-7, atol=1e-7)


def test_a_gradient_spec_with_content_is_keyed_by_it_alone():
    content = "ab" * 32
    one = GradientSpec(parent=SPEC, function="grad_input", content=content)
    other = GradientSpec(parent=GradientSpec(parent=SPEC, function="grad_weight"),
                         function="grad_grad_output", content=content)
    assert one.key == other.key and one.slug == other.slug
    assert GradientSpec(parent=SPEC, function="grad_input").key != one.key
    with pytest.raises(ValueError, match="sha256"):
        GradientSpec(parent=SPEC, function="grad_input", content="not a digest")


def test_second_order_in_both_modes_builds_a_bounded_set_of_packages(tmp_path):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from jax.test_util import check_grads

    import symconv.jax as sj
    rng = np.random.default_rng(3)
    x, w, b = (jax.numpy.asarray(rng.standard_normal(s)) for s in ((2, 2, 7), (3, 2, 3), (3,)))
    check_grads(lambda x, w, b: sj.conv(x, w, b, stride=2, padding=1, cache_dir=tmp_path),
                (x, w, b), order=2, modes=("fwd", "rev"))
    built = [p for p in tmp_path.iterdir() if p.name.startswith("conv1d")]
    assert len(built) <= 8, sorted(p.name for p in built)     # 24 before digests were shared
    compiler.KERNELS.clear()
