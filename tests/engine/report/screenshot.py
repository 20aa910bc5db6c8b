"""Regenerate ``docs/report.png``: a full-page screenshot of a report in headless Chromium.

    radflash score -o /tmp/demo_out --report-maps 4
    python -m tests.engine.report.screenshot /tmp/demo_out/report.html docs/report.png

The PNG is reduced to 256 colours (no dithering), which keeps the heat maps and text legible at
about a third of a megabyte.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.engine.report.browser import console_errors, find_chromium, open_report, start_chromium

WIDTH = 1280


def screenshot(report: Path, png: Path) -> Path:
    from PIL import Image

    found = find_chromium()
    if isinstance(found, str):
        raise SystemExit(f"cannot take the screenshot: {found}")
    drv = start_chromium(*found, width=WIDTH, height=900)
    try:
        open_report(drv, report)
        drv.set_window_size(WIDTH, drv.execute_script("return document.documentElement.scrollHeight"))
        open_report(drv, report)  # again at full height: the table's box depends on the window
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "page.png"
            drv.save_screenshot(str(raw))
            errors = console_errors(drv)
            if errors:
                raise SystemExit(f"{report}: the browser console has errors: {errors}")
            img = Image.open(raw).convert("RGB")
            img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
                png, optimize=True)
    finally:
        drv.quit()
    return png


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tests.engine.report.screenshot REPORT.html OUT.png")
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
