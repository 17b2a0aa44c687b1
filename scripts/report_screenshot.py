"""Regenerate docs/report.png: the formula report of the README's strided, dilated example,
rendered by headless Chromium.

    python scripts/report_screenshot.py                # -> docs/report.png (and a temporary page)
    python scripts/report_screenshot.py --html docs/report.html --height 2400

The page is written by ``symconv.report`` (what ``symconv explain --html`` runs), the
screenshot taken by ``symconv.report.screenshot`` with the network off, and the PNG reduced
to a 256-colour palette so it stays small in the repository.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from symconv import ConvSpec, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    parser.add_argument("--html", default=None, help="keep the page here (default: temporary)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1700)
    parser.add_argument("--bench", action="store_true", help="include the benchmark table")
    args = parser.parse_args()
    from PIL import Image

    spec = ConvSpec((1, 1, 13), (1, 1, 3), stride=2, dilation=3, padding=1)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(args.html) if args.html else Path(tmp) / "report.html"
        report.write(page, [spec], bench=args.bench, strict=True)
        raw = report.screenshot(page, Path(tmp) / "raw.png", width=args.width,
                                height=args.height, scale=1)
        image = Image.open(raw).convert("RGB")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
            .save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB, {image.width}x{image.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
