"""Time the pipeline per stage for a few specs, then a cache hit in a fresh process.

    python scripts/compile_times.py            # uses a temporary cache directory

Prints derive / codegen / C compile seconds (from each package's manifest) and
the wall time of a cache hit, measured in a new interpreter so that nothing is
preloaded.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from symconv import ConvSpec, compiler

SPECS = {
    "3-D 2x3x16^3, k3, s2, p1": ConvSpec((2, 3, 16, 16, 16), (8, 3, 3, 3, 3), stride=2, padding=1),
    "3-D 2x16x32^3, k3, p2, d2": ConvSpec((2, 16, 32, 32, 32), (32, 16, 3, 3, 3), padding=2,
                                         dilation=2),
    "4-D 1x4x16^4, k3, p1": ConvSpec((1, 4, 16, 16, 16, 16), (8, 4, 3, 3, 3, 3), padding=1),
    "5-D 1x2x8^5, k3, s2, p1": ConvSpec((1, 2, 8, 8, 8, 8, 8), (4, 2, 3, 3, 3, 3, 3), stride=2,
                                        padding=1),
}

HIT = """
import time, symconv
start = time.perf_counter()
symconv.compile_conv(symconv.ConvSpec.from_dict({spec!r}), cache_dir={cache!r})
print(time.perf_counter() - start)
"""


def main() -> None:
    cache = tempfile.mkdtemp(prefix="symconv-times-")
    print(f"{'spec':28} {'define+derive':>14} {'codegen':>8} {'C compile':>10} {'total':>7} "
          f"{'cache hit':>10}")
    for label, spec in SPECS.items():
        start = time.perf_counter()
        kernel = compiler.compile_conv(spec, cache_dir=cache)
        total = time.perf_counter() - start
        timings = kernel.manifest["timings"]
        hit = float(subprocess.run([sys.executable, "-c", HIT.format(spec=spec.to_dict(),
                                                                      cache=cache)],
                                   capture_output=True, text=True, check=True).stdout)
        print(f"{label:28} {timings['define'] + timings['derive']:13.2f}s "
              f"{timings['codegen']:7.2f}s {timings['compile_c']:9.2f}s {total:6.2f}s "
              f"{hit * 1000:8.1f}ms")


if __name__ == "__main__":
    main()
