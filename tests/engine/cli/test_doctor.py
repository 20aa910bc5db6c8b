"""``radflash doctor``: exit 0, text and ``--json``, and facts that match what this install really does
(a syntax it says it decodes is decoded from a DCMTK-encoded file; the tools it finds are on PATH)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from radflash.cli import cli
from radflash.io.imageio import try_load
from tests.engine import dicom_factory as F
from tests.engine.io.dcmtk import ENCODERS, encode, require_dcmtk


def _report() -> dict:
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_doctor_json_says_what_decodes_and_it_does(tmp_path: Path) -> None:
    require_dcmtk()
    report = _report()
    rng = np.random.default_rng(np.random.randint(2**31))
    src = F.write(F.make_dataset(rng.integers(0, 4096, (33, 47)).astype(np.uint16), bits_stored=12,
                                 BodyPartExamined="CHEST", ViewPosition="PA"), tmp_path / "src.dcm")
    checked = 0
    for row in report["decoders"]:
        bits = 12 if "12-bit" in row["name"] else None
        if row["uid"] not in ENCODERS or "8-bit" in row["name"]:
            continue
        outcome = try_load(encode(src, tmp_path / f"{row['uid']}-{bits}.dcm", row["uid"]))
        assert (outcome.status == "loaded") == row["decodes"], (row, outcome.reason)
        if row["decodes"]:
            assert outcome.meta.decoder == row["decoder"]
        else:
            assert row["missing"] in outcome.reason
        checked += 1
    assert checked >= 6
    assert {"model", "flags", "cores_usable"} <= set(report["cpu"])
    assert report["torch"]["cuda_available"] in (True, False) and report["backends"][0]["name"] == "eager"
    assert report["extras"]["test"]["installed"]  # this suite runs on the test extra
    found = {s["name"]: s["path"] for s in report["services"]}
    assert found["DCMTK"] == shutil.which("dcmj2pnm")
    assert all(c["path"] for c in report["caches"])


def test_doctor_text_in_a_real_process() -> None:
    done = subprocess.run([sys.executable, "-m", "radflash", "doctor"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for heading in ("Transfer syntaxes", "CPU: ", "Backends", "Extras", "Caches", "Services"):
        assert heading in done.stdout
    assert "JPEG Lossless SV1" in done.stdout and "Traceback" not in done.stderr
