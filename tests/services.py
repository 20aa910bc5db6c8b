"""Real components the tests start (Orthanc, DCMTK, dicom3tools, Chromium): absent, a test skips
on a developer's machine, naming what to install, and fails under CI (``CI`` set, as ``.ci/run``
does), where a missing component is a broken install, never a reason to skip."""

from __future__ import annotations

import os

import pytest


def unavailable(reason: str) -> None:
    """Fail (CI) or skip (elsewhere) the running test because ``reason``: a component is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI needs every test component: .ci/run installs them)")
    pytest.skip(reason)
