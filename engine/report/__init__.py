"""The run report: one self-contained ``report.html`` per output folder of ``score`` or ``segment``.

:func:`write_report` collects what a run left in its folder (:mod:`.data`), renders it with inline
CSS, JS and SVG (:mod:`.html`, :mod:`.svg`) and writes it atomically; the gallery of top-K
images per finding is gathered during the run itself by an observer (:mod:`.gallery`) and kept
in ``gallery.json`` so ``radflash report OUT`` can rebuild the same file later.
"""

from __future__ import annotations

from radflash.report.build import MODES, REPORT_HTML, default_mode, write_report

__all__ = ["MODES", "REPORT_HTML", "default_mode", "write_report"]
