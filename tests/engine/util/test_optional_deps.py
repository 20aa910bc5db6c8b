"""Optional dependencies are extras: a missing one is a one-line hint where it is used, never a traceback.

A package is made "missing" in-process with ``sys.modules[name] = None`` (``import name`` then
raises ImportError); the core score path runs in a subprocess whose import system cannot see the
extras at all, as on a machine with only ``pip install radflash``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from radflash.cli import cli
from radflash.errors import BackendUnavailable, MissingDependency
from radflash.util.optional import available, install_hint, require
from radflash.util.progress import progress_bar

DEMO = Path(__file__).resolve().parents[3] / "engine" / "assets" / "demo_archive"
EXTRA_MODULES = ("matplotlib", "highdicom", "onnx", "onnxruntime", "onnxscript", "tqdm")


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``names`` unimportable, their already-imported submodules too (an earlier test in this
    process may have imported ``matplotlib.pyplot``, which ``import`` would then find cached)."""
    for name in names:
        loaded = [key for key in sys.modules if key == name or key.startswith(f"{name}.")]
        for key in {name, *loaded}:
            monkeypatch.setitem(sys.modules, key, None)


def _one_line_error(result, hint: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and hint in lines[-1], result.output


# ---- the helper ------------------------------------------------------------------------------------
def test_require_names_package_purpose_and_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependency) as info:
        require("matplotlib.pyplot", extra="plot", purpose="plots")
    message = str(info.value)
    assert message == "matplotlib is required for plots: pip install 'radflash[plot]'"
    # backend auto falls back on BackendUnavailable: a missing backend package must be one too
    assert isinstance(info.value, BackendUnavailable)


def test_require_returns_the_module_when_present() -> None:
    assert require("json", extra="none", purpose="tests") is json
    assert install_hint("seg") == "pip install 'radflash[seg]'"


def test_broken_install_is_told_apart_from_a_missing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "rf_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import rf_dependency_that_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency) as info:
        require("rf_broken_pkg", extra="plot", purpose="plots")
    message = str(info.value)
    assert message.startswith("rf_broken_pkg is installed but cannot be imported (No module named "
                              "'rf_dependency_that_is_gone')")
    assert message.endswith(": pip install 'radflash[plot]'") and "\n" not in message


def test_available_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert available("json") and not available("rf_no_such_module") and not available("rf_no_such.sub")
    _block(monkeypatch, "highdicom")
    assert not available("highdicom") and not available("highdicom.seg")


# ---- every point of use, through the CLI ---------------------------------------------------------
def test_segment_dicom_seg_without_highdicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "highdicom")
    src = DEMO / "patient00" / "study0" / "img000.dcm"
    result = CliRunner().invoke(cli, ["segment", str(src), "-o", str(tmp_path / "out"), "--prompt",
                                      "There is pneumothorax", "--format", "png,dicom-seg", "--quiet"])
    _one_line_error(result, "highdicom is required for --format dicom-seg: pip install 'radflash[seg]'")
    assert not (tmp_path / "out").exists()  # refused before any output or model load


def test_segment_dicom_seg_writer_without_highdicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from radflash.segment.writers import SegmentInfo, write_dicom_seg

    _block(monkeypatch, "highdicom")
    with pytest.raises(MissingDependency, match=r"highdicom is required for DICOM SEG output: pip install "
                                                r"'radflash\[seg\]'"):
        write_dicom_seg(tmp_path / "x.dcm", DEMO / "patient00" / "study0" / "img000.dcm",
                        np.zeros((1, 4, 4), np.uint8), [SegmentInfo("p", "p", 0.5)], model_id="m")


@pytest.mark.parametrize("argv,hint", [
    (["bench", "--plot", "PLOT"], "matplotlib is required for --plot: pip install 'radflash[plot]'"),
    (["evaluate", "--n", "2", "--val-n", "2", "--out", "OUT"],
     "matplotlib is required for roc.png (--out): pip install 'radflash[plot]'"),
])
def test_plots_without_matplotlib(argv: list[str], hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    argv = [str(tmp_path / a) if a in ("PLOT", "OUT") else a for a in argv]
    started = time.perf_counter()
    result = CliRunner().invoke(cli, argv)
    _one_line_error(result, hint)
    assert time.perf_counter() - started < 30  # refused up front, not after the benchmark/evaluation
    assert list(tmp_path.iterdir()) == []


def test_plot_helper_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.training.plots import plot_losses

    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingDependency, match=r"^matplotlib is required for plots: pip install 'radflash\[plot\]'$"):
        plot_losses([(1, 2.0), (2, 1.0)], [], tmp_path / "loss.png")


def test_onnx_export_without_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "onnxscript")
    result = CliRunner().invoke(cli, ["export", "onnx", str(tmp_path / "enc.onnx")])
    _one_line_error(result, "onnxscript is required for ONNX export: pip install 'radflash[onnx]'")
    assert not (tmp_path / "enc.onnx").exists()


def test_onnxruntime_backend_without_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "onnxruntime")
    src = DEMO / "patient00" / "study0" / "img000.dcm"
    result = CliRunner().invoke(cli, ["score", str(src), "-o", str(tmp_path / "out"), "--backend", "onnxruntime",
                                      "--workers", "0", "--quiet"])
    _one_line_error(result, "onnxruntime is required for the onnxruntime backend: pip install 'radflash[onnx]' "
                            "(or onnxruntime-gpu on CUDA)")


def test_int8_quantisation_without_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from radflash.calibration.quantize import quantize_onnxruntime

    _block(monkeypatch, "onnxruntime", "onnxruntime.quantization")
    with pytest.raises(MissingDependency, match=r"required for INT8 quantisation: pip install 'radflash\[onnx\]'"):
        quantize_onnxruntime(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", torch.zeros(1, 3, 8, 8))


# ---- the core path needs none of the extras ------------------------------------------------------
CORE_RUN = textwrap.dedent("""
    import importlib.machinery, json, sys
    HIDDEN = set(sys.argv[1].split(","))
    asked = []

    class HideExtras:  # as if never installed: find_spec returns None, import raises ModuleNotFoundError
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                asked.append(name)
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        def find_distributions(self, *args, **kwargs):  # importlib.metadata: versions in the manifest
            for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
                if (dist.metadata["Name"] or "").lower() not in HIDDEN:
                    yield dist

    sys.meta_path[:] = [HideExtras() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    from radflash.cli import cli
    try:
        cli.main(sys.argv[2:], prog_name="radflash", standalone_mode=False)
        code = 0
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN and sys.modules[m] is not None)
    print(json.dumps({"code": code, "loaded": loaded, "asked": sorted(set(asked))}))
""")


def test_core_score_path_runs_without_any_extra(tmp_path: Path) -> None:
    files = [DEMO / "patient00" / "study0" / "img000.dcm", DEMO / "patient01" / "study1" / "img001.dcm"]
    out = tmp_path / "out"
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "200"}  # draw the bar into the pipe
    proc = subprocess.run(
        [sys.executable, "-c", CORE_RUN, ",".join(EXTRA_MODULES), "score", *map(str, files), "-o", str(out),
         "--workers", "0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr[-3000:]
    assert report["loaded"] == []
    # never even looked for (the backend choice may probe for onnxruntime; torch.hub probes for tqdm)
    assert not [m for m in report["asked"] if m.split(".")[0] in ("matplotlib", "highdicom")]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "results.parquet").num_rows == 2
    # the rich progress bar (radflash.util.progress): rate and live counts on stderr
    assert "scoring" in proc.stderr and "2/2" in proc.stderr and "img/s" in proc.stderr, proc.stderr[-2000:]
    assert "scored 2 skipped 0 failed 0" in proc.stderr


# ---- the progress bar ------------------------------------------------------------------------------
def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=160, color_system=None), buf


def _final_frame(text: str) -> str:
    """The last drawn state of the bar: control sequences removed, the last non-empty line or redraw."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line for line in re.split(r"[\r\n]", plain) if line.strip()][-1]


def test_progress_shows_rate_and_live_counts() -> None:
    console, buf = _terminal()
    bar = progress_bar(4, desc="scoring", console=console, fields={"scored": 0, "skipped": 0, "failed": 1})
    assert bar is not None
    for status in ("scored", "skipped", "scored"):
        time.sleep(0.02)
        bar.update(count=status)
    bar.write("a note")
    bar.close()
    bar.close()  # idempotent: the atexit safety net may call it again
    text = buf.getvalue()
    final = _final_frame(text)
    assert "scoring" in final and "3/4" in final and "scored 2 skipped 1 failed 1" in final
    rate = float(final.split(" img/s")[0].split()[-1])
    assert 1 < rate < 200  # three updates ~20 ms apart
    assert "a note" in text


def test_progress_fields_and_resume_offset() -> None:
    console, buf = _terminal()
    bar = progress_bar(10, desc="train", unit="step", initial=7, console=console)
    assert bar is not None
    bar.update(1, loss="0.512", lr=1e-4)
    bar.close()
    final = _final_frame(buf.getvalue())
    assert "8/10" in final and "loss 0.512 lr 0.0001" in final and "step/s" in final


def test_progress_is_off_when_quiet_empty_done_or_not_a_terminal() -> None:
    console, buf = _terminal()
    assert progress_bar(5, desc="x", enabled=False, console=console) is None
    assert progress_bar(0, desc="x", console=console) is None
    assert progress_bar(5, desc="x", initial=5, console=console) is None
    assert progress_bar(5, desc="x", console=Console(file=io.StringIO())) is None  # a log file or pipe
    assert buf.getvalue() == ""
