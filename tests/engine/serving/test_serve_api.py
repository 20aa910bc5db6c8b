"""``radflash.serve`` is the function (the package is ``radflash.serving``), and it takes either
:class:`ServeOptions` or the CLI's flags as keywords, which build the same options."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.engine.orthanc import free_port


def test_radflash_serve_is_the_function_and_takes_options_or_keywords(tmp_path: Path) -> None:
    import radflash
    import radflash.serving
    from radflash.errors import InputError
    from radflash.serving.options import ServeOptions

    assert radflash.serve is radflash.serving.serve and callable(radflash.serve)
    assert "serve" in radflash.__all__

    flat = ServeOptions.from_flat(tmp_path / "a", forward=["dicomweb+http://127.0.0.1:1/dicom-web"], max_batch=4,
                                  allow_ae=["PACS@127.0.0.1"], dicom_port=0, min_free_mb=0)
    assert flat.forward.targets == ("dicomweb+http://127.0.0.1:1/dicom-web",)
    assert flat.schedule.max_batch == 4 and flat.intake.dicom_port is None and flat.intake.min_free_bytes == 0
    assert flat.intake.allow_ae[0].aet == "PACS" and flat.intake.allow_ae[0].host == "127.0.0.1"
    with pytest.raises(InputError, match="would be ignored"):
        radflash.serve(flat, max_batch=2)
    with pytest.raises(InputError, match="state"):
        radflash.serve(max_batch=2)

    # the keyword spelling starts a real node (no C-STORE port, HTTP on a free one)
    port = free_port()
    node = radflash.serve(state=tmp_path / "node", dicom_port=0, http_port=port, min_free_mb=0, device="cpu",
                          workers=0, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["ready"] is True
        assert node.options.intake.dicom_port is None
    finally:
        node.stop()
