"""Formula reports: one self-contained HTML page per set of specs, for people to look at.

    symconv explain --input 1,1,13 --weight 1,1,3 --stride 2 --dilation 3 --padding 1 \\
        --html report.html --bench

The page shows, for every spec: its fields; the forward index sum; for every
gradient the chain rule's scatter form and the gather form it was solved
into, with loop bounds and divisibility conditions; the generated C with
syntax highlighting; and, when asked, the compiled kernel's timings.

Formulas are typeset from the LaTeX that ``symconv.ir`` prints, by
matplotlib's mathtext (no TeX installation), into PNG images at twice the
CSS size (sharp on high-density screens) embedded as ``data:`` URIs, one per
term, with the conditions of a term on a line of their own.  Every image
carries its LaTeX as ``alt`` text, and the plain-text form is on the page
too.  Syntax highlighting is Pygments'.  Nothing is loaded from anywhere: the
page works offline, opened from disk.

``screenshot()`` renders a page in headless Chromium (Debian's ``chromium``
package), which is how the report is checked and how ``docs/`` got its picture.

Needs matplotlib and Pygments (``pip install symconv[report]``).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, fields, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ._version import __version__
from .kernel import best_variant
from .spec import ConvSpec

log = logging.getLogger("symconv.report")

SCALE = 2          # image pixels per CSS pixel
FONT_SIZE = 12.5   # points at 100 dpi per scale unit: about 17 CSS px


class TypesetError(ValueError):
    """mathtext cannot typeset a formula (only raised with ``strict=True``)."""


# ------------------------------------------------------------------------------------------------
# Typesetting
# ------------------------------------------------------------------------------------------------

_PMOD = re.compile(r"\\pmod\{([^{}]*)\}")


def mathtext_latex(latex: str) -> str:
    r"""symconv's LaTeX in the dialect matplotlib's mathtext reads (it has no ``\pmod``)."""
    return _PMOD.sub(r"\\ (\\mathrm{mod}\\ \1)", latex)


@dataclass(frozen=True)
class Image:
    """A typeset formula: PNG bytes and the CSS size to show them at (``SCALE`` x smaller)."""

    latex: str
    png: bytes
    width: int
    height: int
    typeset: bool = True  # False: mathtext failed and ``png`` is empty (the LaTeX is shown)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def html(self, css_class: str = "") -> str:
        if not self.typeset:
            return (f'<code class="latex-fallback {css_class}" title="mathtext could not typeset '
                    f'this">{html.escape(self.latex)}</code>')
        return (f'<img class="{css_class}" src="{self.data_uri()}" width="{self.width}" '
                f'height="{self.height}" alt="{html.escape(self.latex, quote=True)}">')


_CACHE: dict[tuple[str, float, int], Image] = {}


def typeset(latex: str, font_size: float = FONT_SIZE, scale: int = SCALE,
            strict: bool = False) -> Image:
    """Typeset one LaTeX formula with mathtext into an opaque white PNG whose pixel size is an
    exact multiple of ``scale`` (so the browser shows it without resampling)."""
    key = (latex, font_size, scale)
    if key in _CACHE:
        return _CACHE[key]
    import matplotlib
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    try:
        with matplotlib.rc_context({"mathtext.fontset": "cm"}):
            mathtext.math_to_image(f"${mathtext_latex(latex)}$", buffer,
                                   prop=FontProperties(size=font_size), dpi=100 * scale,
                                   format="png")
    except ValueError as error:
        if strict:
            raise TypesetError(f"mathtext cannot typeset {latex!r}: {error}") from None
        log.warning("mathtext cannot typeset %r: %s", latex, str(error).splitlines()[-1])
        image = Image(latex, b"", 0, 0, typeset=False)
        _CACHE[key] = image
        return image
    rgba = PILImage.open(io.BytesIO(buffer.getvalue())).convert("RGBA")
    pad = 2 * scale  # a little white margin, and sizes rounded up to multiples of scale
    width = -(-(rgba.width + 2 * pad) // scale) * scale
    height = -(-(rgba.height + 2 * pad) // scale) * scale
    canvas = PILImage.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(rgba, (pad, pad), rgba)
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=True)
    image = Image(latex, out.getvalue(), width // scale, height // scale)
    _CACHE[key] = image
    return image


@dataclass
class Line:
    """One term of a sum: the sums and the body, then its conditions (may be empty)."""

    term: str
    conditions: list[str] = field(default_factory=list)


@dataclass
class Formula:
    """An index sum cut for typesetting: ``lhs = term_1 + term_2 + ...``."""

    name: str
    form: str          # "gather" or "scatter"
    lhs: str
    lines: list[Line]
    text: str
    latex: str


def _split_term(term: str) -> Line:
    r"""``sums body \quad [c_1,\ c_2]`` -> Line(sums body, [c_1, c_2])."""
    marker = r" \quad ["
    at = term.rfind(marker)
    if at < 0 or not term.endswith("]"):
        return Line(term)
    notes = term[at + len(marker):-1]
    return Line(term[:at], [n for n in notes.split(r",\ ") if n])


def cut(fn, name: str, form: str) -> Formula:
    """A formula's LaTeX split per term, from the IR's own printer (``printing.nest_text``)."""
    from .symbolic.lowering import loop_nests
    from .symbolic.printing import nest_text, to_latex, to_text
    latex = to_latex(fn)
    text = to_text(fn)
    terms = [nest_text(nest, latex=True) for nest in loop_nests(fn)]
    body = " + ".join(terms)
    if terms and latex.endswith(body) and latex[:-len(body)].rstrip().endswith("="):
        lhs = latex[:-len(body)].rstrip()[:-1].rstrip()
        return Formula(name, form, lhs, [_split_term(t) for t in terms], text, latex)
    # an unexpected layout: typeset the whole formula on one line
    lhs, _, rest = latex.partition(" = ")
    return Formula(name, form, lhs, [Line(rest or latex)], text, latex)


def formulas(compilation) -> list[Formula]:
    """Every formula of a compilation in page order: forward, then per gradient its scatter
    form and its gather form."""
    cut_formulas = []
    for function in compilation.functions:
        name = function.name
        if name in compilation.derivations:
            cut_formulas.append(cut(compilation.derivations[name].scatter, name, "scatter"))
        cut_formulas.append(cut(function.sum, name, "gather"))
    return cut_formulas


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    function: str
    median: float
    best: float
    runs: int
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / self.median / 1e9 if self.median > 0 else float("nan")


def _time(call, repeat: int, budget: float) -> list[float]:
    call()  # warm-up: first touch of the output, OpenMP threads started
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def benchmark(kernel, spec, repeat: int = 20, threads: int | None = None,
              budget: float = 5.0, compare_torch: bool = True, seed: int = 0) -> list[Timing]:
    """Median and best wall time of every compiled function (into reused ``out=`` buffers),
    and, for a convolution of rank 1-3 where torch is installed, PyTorch's forward.  FLOP
    rates need a FLOP count, which convolution specs have (0 elsewhere)."""
    rng = np.random.default_rng(seed)
    shapes, dtype = kernel.record.shapes_at(1), kernel.record.dtype   # FLOPs of an open
    # batch are counted per item
    arrays = {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
    outputs = int(np.prod(shapes[kernel.record.output]))
    flops_of = getattr(spec, "flops", 0)
    results = []
    for name, function in kernel.functions.items():
        args = [arrays[a] for a in function.args]
        out = np.empty(shapes[function.output], dtype)
        times = _time(lambda: function(*args, out=out, threads=threads), repeat, budget)
        flops = outputs if name == "grad_bias" else flops_of
        results.append(Timing(name, statistics.median(times), min(times), len(times), flops))
    if compare_torch and isinstance(spec, ConvSpec) and 1 <= spec.rank <= 3 and \
            spec.padding_mode == "zeros":
        try:
            import torch
        except ImportError:
            return results
        functional = torch.nn.functional
        conv = getattr(functional, f"conv{spec.rank}d")
        x, w = torch.from_numpy(arrays["input"]), torch.from_numpy(arrays["weight"])
        b = torch.from_numpy(arrays["bias"]) if spec.bias else None
        pads = [p for pair in reversed(spec.padding) for p in pair]
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                times = _time(lambda: conv(functional.pad(x, pads), w, b, stride=spec.stride,
                                           dilation=spec.dilation, groups=spec.groups),
                              repeat, budget)
        finally:
            torch.set_num_threads(saved)
        results.append(Timing(f"PyTorch conv{spec.rank}d forward", statistics.median(times),
                              min(times), len(times), spec.flops))
    return results


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --rule: #dde2ea; --accent: #2f5fb3; --card: #ffffff;
        --page: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { font-size: 26px; margin: 8px 0 2px; letter-spacing: -0.01em; }
header .meta, .muted { color: var(--muted); font-size: 13px; }
nav ol { margin: 8px 0 0; padding-left: 20px; font-size: 14px; }
a { color: var(--accent); text-decoration: none; }
section.spec { background: var(--card); border: 1px solid var(--rule); border-radius: 10px;
               padding: 18px 24px 22px; margin: 22px 0; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
section.spec > h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 16px; margin: 22px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid var(--rule); }
h4 { font-size: 15px; margin: 16px 0 4px;
     font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table.fields, table.bench { border-collapse: collapse; font-size: 14px; }
table.fields th, table.fields td, table.bench th, table.bench td {
    padding: 3px 14px 3px 0; text-align: left; vertical-align: top; }
table.fields th { color: var(--muted); font-weight: 500; }
table.bench td.num, table.bench th.num { text-align: right; padding-left: 18px;
    font-variant-numeric: tabular-nums; }
table.bench thead th { border-bottom: 1px solid var(--rule); }
.step { color: var(--muted); font-size: 13.5px; margin: 10px 0 2px; }
.steps ol { padding-left: 1.6em; } .steps li p { font-size: 13.5px; margin: 8px 0 2px; }
.steps summary { cursor: pointer; color: var(--muted); }
figure.formula { margin: 4px 0 6px; padding: 6px 10px; background: #fff; overflow-x: auto;
                 border-left: 3px solid var(--rule); }
figure.formula.gather { border-left-color: var(--accent); }
figure.formula table { border-collapse: collapse; }
figure.formula td { padding: 0; vertical-align: middle; }
figure.formula td.op { padding: 0 6px; color: var(--ink); font-size: 18px; line-height: 1;
                       vertical-align: middle; }
figure.formula img { display: block; }
.where { display: flex; align-items: center; gap: 4px; color: var(--muted); font-size: 13px;
         margin: 0 0 4px 18px; }
details { margin: 4px 0 8px; font-size: 13px; }
details pre { background: var(--page); padding: 8px 10px; overflow-x: auto; margin: 6px 0; }
.latex-fallback { display: inline-block; padding: 4px; background: #fff4e5; }
div.source { max-height: 34em; overflow: auto; border: 1px solid var(--rule); border-radius: 6px;
             font-size: 12.5px; }
div.source pre { margin: 0; padding: 10px 12px; line-height: 1.45;
                 font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
"""


def _highlight(source: str) -> tuple[str, str]:
    """(HTML of the C source, the CSS it needs); plain text without Pygments."""
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import CLexer
    except ImportError:
        return (f'<div class="source plain"><pre>{html.escape(source)}</pre></div>'
                '<p class="muted">(install Pygments for syntax highlighting)</p>', "")
    formatter = HtmlFormatter(cssclass="source", style="friendly")
    return highlight(source, CLexer(), formatter), formatter.get_style_defs(".source")


def _formula_html(formula: Formula, strict: bool) -> str:
    lhs = typeset(formula.lhs + " =", strict=strict)
    rows = []
    for i, line in enumerate(formula.lines):
        term = typeset(line.term, strict=strict)
        first = lhs.html("lhs") if i == 0 else ""
        op = "" if i == 0 else "+"
        rows.append(f'<tr><td class="lhs">{first}</td><td class="op">{op}</td>'
                    f'<td>{term.html("term")}</td></tr>')
        if line.conditions:
            where = typeset(r",\quad ".join(line.conditions), font_size=FONT_SIZE * 0.85,
                            strict=strict)
            rows.append(f'<tr><td></td><td></td><td><div class="where"><span>where</span>'
                        f'{where.html("conditions")}</div></td></tr>')
    return (f'<figure class="formula {formula.form}" data-function="{formula.name}" '
            f'data-form="{formula.form}"><table>{"".join(rows)}</table></figure>')


def _fields_html(spec) -> str:
    """The spec's fields as a table (any spec: its normalised fields, then derived facts)."""
    def shown(name, value):
        if name == "padding" and isinstance(value, tuple) and all(
                isinstance(p, tuple) for p in value):
            return ", ".join(f"{lo}" if lo == hi else f"({lo}, {hi})" for lo, hi in value)
        if name == "shapes":
            return ", ".join(f"{a}{shape}" for a, shape in value)
        if name == "parent":
            return value.describe()
        return value
    rows = [(name.replace("_", " "), shown(name, value))
            for name, value in ((f.name, getattr(spec, f.name)) for f in fields(spec) if f.init)
            if not (name == "padding_mode" and value == "zeros")]
    if hasattr(spec, "output_shape"):
        rows.insert(2, ("output shape", spec.output_shape))
    flops = getattr(spec, "flops", None)
    if flops:
        rows.append(("forward FLOPs", f"{flops:,}"))
    rows.append(("key", spec.key[:16]))
    return '<table class="fields">' + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    ) + "</table>"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bench_html(timings: Sequence[Timing], threads: int | None) -> str:
    from .kernel import default_threads
    rows = "".join(
        f"<tr><td>{html.escape(t.function)}</td><td class='num'>{t.median * 1e3:.3f}</td>"
        f"<td class='num'>{t.best * 1e3:.3f}</td><td class='num'>{t.gflops:.2f}</td>"
        f"<td class='num'>{t.runs}</td></tr>" for t in timings)
    return (f'<table class="bench"><thead><tr><th>function</th><th class="num">median ms</th>'
            f'<th class="num">best ms</th><th class="num">GFLOP/s</th>'
            f'<th class="num">runs</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<p class="muted">{threads or default_threads()} thread(s), into reused output '
            f'buffers, after one warm-up call; {html.escape(_cpu_name())}.</p>')


_STEPS = {
    "scatter": "Chain rule (scatter form): differentiating Σ grad_output · output leaves one "
               "Kronecker delta per array axis",
    "gather": "Solved over the integers (gather form): bounds and conditions of the loops "
              "the C runs",
}


def _steps_html(derivation, strict: bool) -> str:
    """A gradient's derivation steps (symconv.explain), each with its formula typeset."""
    from .explain import gradient_steps
    items = []
    for step in gradient_steps(derivation, latex=True):
        item = f'<p><b>{html.escape(step.kind)}</b>: {html.escape(step.text)}</p>'
        if step.formula:
            image = typeset(step.formula, font_size=FONT_SIZE * 0.85, strict=strict)
            item += image.html("step-formula")
        items.append(f"<li>{item}</li>")
    return (f'<details class="steps" open><summary>How it is derived: {len(items)} steps'
            f'</summary><ol>{"".join(items)}</ol></details>')


def spec_section(spec: ConvSpec, index: int, *, bench: bool = False, cache_dir=None,
                 target: str | None = None, repeat: int = 20, threads: int | None = None,
                 strict: bool = False, steps: bool = False) -> tuple[str, str, int]:
    """(section HTML, CSS it needs, number of formulas) for one spec."""
    from .compiler import compilation as compile_symbolic
    compilation = compile_symbolic(spec, target)
    for stage, seconds in compilation.timings.items():
        log.info("%s: %s %.3f s", spec.slug, stage, seconds)
    start = time.perf_counter()
    parts = [f'<section class="spec" id="spec-{index}">',
             f"<h2>{html.escape(spec.describe().split(';')[0])}</h2>", _fields_html(spec)]
    timings = " · ".join(f"{name} {seconds:.3f} s"
                         for name, seconds in compilation.timings.items())
    parts.append(f'<p class="muted">pipeline: {html.escape(timings)}</p>')
    cut_formulas = formulas(compilation)
    for formula in cut_formulas:
        if formula.name == "forward":
            parts.append("<h3>Forward</h3>")
            parts.append('<p class="step">The definition, as an index sum (arrays marked zero '
                         'outside their shape are the padding)</p>')
        else:
            if formula.form == "scatter":
                if not any("<h3>Gradients</h3>" == p for p in parts):
                    parts.append("<h3>Gradients</h3>")
                parts.append(f"<h4>{html.escape(formula.name)}</h4>")
            parts.append(f'<p class="step">{html.escape(_STEPS[formula.form])}</p>')
        parts.append(_formula_html(formula, strict))
        if formula.form == "gather":
            parts.append(f"<details><summary>text and LaTeX</summary>"
                         f"<pre>{html.escape(formula.text)}</pre>"
                         f"<pre>{html.escape(formula.latex)}</pre></details>")
            if steps and formula.name in compilation.derivations:
                parts.append(_steps_html(compilation.derivations[formula.name], strict))
    log.info("%s: typeset %d formulas in %.3f s", spec.slug, len(cut_formulas),
             time.perf_counter() - start)
    if bench:
        from .compiler import compile_op
        start = time.perf_counter()
        kernel = compile_op(spec, cache_dir=cache_dir, target=target)
        log.info("%s: compiled (or loaded) in %.3f s", spec.slug, time.perf_counter() - start)
        start = time.perf_counter()
        timings_ = benchmark(kernel, spec, repeat=repeat, threads=threads)
        log.info("%s: benchmark in %.3f s", spec.slug, time.perf_counter() - start)
        parts.append("<h3>Benchmark</h3>")
        parts.append(_bench_html(timings_, threads))
    start = time.perf_counter()
    source_html, source_css = _highlight(compilation.source.text)
    lines = compilation.source.text.count("\n")
    variant = best_variant(compilation.variants).target
    parts.append(f'<h3>Generated C</h3><p class="muted">{lines} lines for {variant}, the '
                 f'instruction set this machine runs; each function is headed by the formula '
                 f'it computes</p>')
    parts.append(source_html)
    parts.append("</section>")
    log.info("%s: highlighted the C in %.3f s", spec.slug, time.perf_counter() - start)
    return "\n".join(parts), source_css, len(cut_formulas)


def render(specs: Iterable[ConvSpec], *, bench: bool = False, cache_dir=None,
           target: str | None = None, repeat: int = 20, threads: int | None = None,
           strict: bool = False, title: str | None = None, progress=None,
           steps: bool = False) -> str:
    """The report page for ``specs`` as one HTML string (see the module docstring)."""
    import sympy
    specs = list(specs)
    sections, css = [], ""
    for index, spec in enumerate(specs, 1):
        section, source_css, _ = spec_section(spec, index, bench=bench, cache_dir=cache_dir,
                                              target=target, repeat=repeat, threads=threads,
                                              strict=strict, steps=steps)
        sections.append(section)
        css = css or source_css
        if progress is not None:
            progress(spec)
    title = title or ("symconv: " + specs[0].slug if len(specs) == 1 else
                      f"symconv: {len(specs)} convolutions")
    nav = ""
    if len(specs) > 1:
        nav = "<nav><ol>" + "".join(
            f'<li><a href="#spec-{i}">{html.escape(s.describe().split(";")[0])}</a></li>'
            for i, s in enumerate(specs, 1)) + "</ol></nav>"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="symconv {__version__}">
<title>{html.escape(title)}</title>
<style>{CSS}
{css}</style>
</head>
<body>
<main>
<header>
<h1>symconv formula report</h1>
<p class="meta">Convolutions as index sums, their gradients derived symbolically and solved over
the integers, and the C compiled from them. symconv {__version__}, SymPy {sympy.__version__},
{stamp}.</p>
{nav}
</header>
{"".join(sections)}
<footer>Written by <code>symconv explain --html</code>. Formulas typeset by matplotlib's mathtext;
every image's alt text is its LaTeX. This page loads nothing from the network.</footer>
</main>
</body>
</html>
"""


def write(path: str | os.PathLike, specs: Iterable[ConvSpec], **options: Any) -> Path:
    """Render the report for ``specs`` into ``path`` (see :func:`render` for the options)."""
    path = Path(path)
    text = render(specs, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Headless Chromium
# ------------------------------------------------------------------------------------------------

CHROMIUM_ENV = "SYMCONV_CHROMIUM"
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """``$SYMCONV_CHROMIUM``, else the first Chromium or Chrome on ``PATH``; None if there is
    none (Debian: ``apt-get install chromium``)."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return configured if shutil.which(configured) else None
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page: str | os.PathLike, png: str | os.PathLike, width: int = 1200,
               height: int = 1600, scale: int = 1, timeout: float = 120,
               chromium: str | None = None) -> Path:
    """Render the HTML file ``page`` in headless Chromium (network off, a fresh profile) and
    save a ``width`` x ``height`` CSS-pixel screenshot at ``scale`` device pixels per CSS
    pixel into ``png``."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found: install it (Debian: apt-get install chromium) or "
                           f"set ${CHROMIUM_ENV}")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="symconv-chromium-") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--disable-extensions",
                   "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
                   "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing may come from the network
                   f"--force-device-scale-factor={scale}", f"--window-size={width},{height}",
                   f"--screenshot={png}", url]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Chromium did not finish within {timeout} s") from None
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit status {result.returncode}):\n"
                           f"{result.stderr[-2000:]}")
    return png
