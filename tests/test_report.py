"""The formula report: every formula typesets, the page is complete and self-contained, and in
headless Chromium every typeset formula is really painted on the page (found pixel for pixel in
a screenshot)."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pygments")
PIL = pytest.importorskip("PIL.Image")

from symconv import ConvSpec, compilation, report  # noqa: E402
from symconv.symbolic import lowering, printing  # noqa: E402

SPECS = [
    pytest.param(ConvSpec((1, 1, 13), (1, 1, 3), stride=2, dilation=3, padding=1), id="1d-coprime"),
    pytest.param(ConvSpec((2, 4, 9, 8), (6, 2, 3, 2), stride=(2, 3), padding=((1, 0), (2, 1)),
                          groups=2), id="2d-groups"),
    pytest.param(ConvSpec((1, 2, 7, 6, 5), (2, 2, 3, 3, 2), stride=2, padding="same",
                          dilation=(1, 2, 1), dtype="float64"), id="3d-same"),
    pytest.param(ConvSpec((1, 1, 5, 4, 4, 3), (1, 1, 2, 2, 3, 2), stride=(2, 1, 1, 1)), id="4d"),
]


class Page(HTMLParser):
    """Tags with their attributes, and the text, of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag, **attrs):
        return [a for t, a in self.tags
                if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(data_uri.split(",", 1)[1])
    return np.asarray(PIL.open(io.BytesIO(raw)).convert("RGB"))


def test_mathtext_needs_the_translation_and_gets_it():
    from matplotlib.mathtext import MathTextParser
    latex = r"j_{0} + k_{0} + 1 \equiv 0 \pmod{2}"
    with pytest.raises(ValueError):
        MathTextParser("path").parse(f"${latex}$")
    assert report.mathtext_latex(latex) == r"j_{0} + k_{0} + 1 \equiv 0 \ (\mathrm{mod}\ 2)"
    image = report.typeset(latex, strict=True)
    pixels = png(image.data_uri())
    assert pixels.shape == (image.height * report.SCALE, image.width * report.SCALE, 3)
    assert (pixels < 128).any() and (pixels == 255).all(axis=2).mean() > 0.5  # ink on white


@pytest.mark.parametrize("spec", SPECS)
def test_every_formula_is_cut_per_term_and_typesets(spec):
    compiled = compilation(spec)
    formulas = report.formulas(compiled)
    names = [f.name for f in compiled.functions]
    assert [(f.name, f.form) for f in formulas if f.form == "gather"] == [(n, "gather")
                                                                        for n in names]
    assert {f.name for f in formulas if f.form == "scatter"} == set(names) - {"forward"}
    for formula in formulas:
        fn = {f.name: f.sum for f in compiled.functions}[formula.name] \
            if formula.form == "gather" else compiled.derivations[formula.name].scatter
        assert len(formula.lines) == len(lowering.loop_nests(fn))
        assert formula.latex == printing.to_latex(fn) and formula.text == printing.to_text(fn)
        for line in formula.lines:  # the cut loses nothing: it reassembles the printer's term
            rebuilt = line.term + (r" \quad [" + r",\ ".join(line.conditions) + "]"
                                   if line.conditions else "")
            assert rebuilt in formula.latex
            for piece in (line.term, *line.conditions):
                assert report.typeset(piece, strict=True).typeset
        report.typeset(formula.lhs + " =", strict=True)
    gather = {f.name: f for f in formulas if f.form == "gather"}
    if spec.stride == (2,) and spec.dilation == (3,):  # coprime: solved under a congruence
        assert any(r"\equiv" in c for line in gather["grad_input"].lines for c in line.conditions)


def test_page_is_complete_and_self_contained(tmp_path):
    spec = ConvSpec((2, 4, 9, 8), (6, 2, 3, 2), stride=(2, 3), padding=((1, 0), (2, 1)), groups=2)
    path = report.write(tmp_path / "report.html", [spec], strict=True)
    text = path.read_text()
    page = Page(text)
    # nothing from anywhere: every resource is inline
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith(("data:", "#")), (tag, attrs[name][:80])
    assert not re.search(r"url\(|@import|https?://", text)
    # every function's gather form, every gradient's scatter form
    compiled = compilation(spec)
    for name, fn in ((f.name, f.sum) for f in compiled.functions):
        assert len(page.all("figure", **{"data-function": name, "data-form": "gather"})) == 1
        if name != "forward":
            assert len(page.all("figure", **{"data-function": name, "data-form": "scatter"})) == 1
        assert html.escape(printing.to_text(fn)) in text  # the plain-text form is on the page too
    # each image is a typeset term whose LaTeX is its alt text
    alts = {a["alt"] for a in page.all("img")}
    for formula in report.formulas(compiled):
        for line in formula.lines:
            assert line.term in alts
            if line.conditions:
                assert r",\quad ".join(line.conditions) in alts
    for image in page.all("img"):
        pixels = png(image["src"])
        assert pixels.shape[:2] == (int(image["height"]) * report.SCALE,
                                    int(image["width"]) * report.SCALE)
    # the C, highlighted, and the spec's fields
    assert re.search(r"symconv_\w*grad_input", text) and '<span class="kt">float</span>' in text
    assert str(spec.output_shape) in "".join(page.text)  # in the fields table


def test_benchmark_numbers(cache_dir):
    spec = ConvSpec((1, 2, 12, 10), (3, 2, 3, 3), padding=1)
    text = report.render([spec], bench=True, cache_dir=cache_dir, repeat=3, threads=1)
    table = text[text.index('<table class="bench">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td><td class='num'>([\d.]+)</td><td class='num'>"
                      r"([\d.]+)</td><td class='num'>([\d.]+)</td><td class='num'>(\d+)</td>",
                      table)
    functions = {name for name, *_ in rows}
    assert {"forward", "grad_input", "grad_weight", "grad_bias"} <= functions
    for name, median, best, gflops, runs in rows:
        assert 0 < float(best) <= float(median) and float(gflops) > 0 and int(runs) >= 3


def find(screenshot: np.ndarray, template: np.ndarray) -> list[tuple[int, int]]:
    """Every place the template appears in the screenshot, exactly (pixel for pixel)."""
    h, w, _ = template.shape
    ink = (template < 250).any(axis=2).sum(axis=1)
    r = int(np.argmax(ink))  # search by the row with the most ink, then compare the whole image
    needle = template[r].tobytes()
    found = []
    for y in range(r, screenshot.shape[0] - (h - r) + 1):
        row = screenshot[y].tobytes()
        start = row.find(needle)
        while start >= 0:
            x = start // 3
            if start % 3 == 0 and x + w <= screenshot.shape[1] and np.array_equal(
                    screenshot[y - r:y - r + h, x:x + w], template):
                found.append((y - r, x))
            start = row.find(needle, start + 1)
    return found


def test_screenshot_in_headless_chromium_shows_every_formula(tmp_path):
    if report.find_chromium() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    spec = ConvSpec((1, 1, 13), (1, 1, 3), stride=2, dilation=3, padding=1)
    page = report.write(tmp_path / "report.html", [spec], strict=True)
    shot = report.screenshot(page, tmp_path / "report.png", width=1100, height=2600,
                             scale=report.SCALE)
    pixels = np.asarray(PIL.open(shot).convert("RGB"))
    assert pixels.shape == (2600 * report.SCALE, 1100 * report.SCALE, 3)
    assert (pixels.min(axis=2) < 100).mean() > 0.005, "the page rendered (dark text on it)"
    images = [a["src"] for a in Page(page.read_text()).all("img")]
    assert len(images) >= 12
    positions = []
    for uri in dict.fromkeys(images):  # distinct images, in page order
        found = find(pixels, png(uri))
        assert len(found) == images.count(uri), f"a formula image is not painted as often as " \
                                                f"the page has it ({len(found)} found)"
        positions.append(found[0][0])
    assert positions[0] < positions[-1]


def test_steps_are_typeset_and_painted_in_headless_chromium(tmp_path):
    """`explain --steps --html`: every gradient gets its numbered steps, every step formula
    typesets (strict), and Chromium paints them."""
    from symconv.compiler import compilation
    from symconv.explain import gradient_steps
    spec = ConvSpec((1, 1, 13), (1, 1, 3), stride=2, dilation=3, padding=1)
    page = report.write(tmp_path / "steps.html", [spec], strict=True, steps=True)
    text = page.read_text()
    derivations = compilation(spec).derivations
    assert text.count('<details class="steps" open>') == len(derivations)
    for derivation in derivations.values():
        assert f"How it is derived: {len(gradient_steps(derivation))} steps" in text
    if report.find_chromium() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    shot = report.screenshot(page, tmp_path / "steps.png", width=1100, height=2400,
                             scale=report.SCALE)
    pixels = np.asarray(PIL.open(shot).convert("RGB"))
    step_images = [a["src"] for a in Page(text.split('<details class="steps"')[1]).all("img")]
    assert step_images
    for uri in step_images[:3]:   # grad_input's first steps: within the first screen
        assert find(pixels, png(uri)), "a step formula is not painted"
