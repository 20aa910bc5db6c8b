"""Decoder choice per transfer syntax: what decodes on the default install, what is refused and why,
which plugin decoded a file, and the end-of-run line for files skipped for a missing decoder.

Compressed files are written by DCMTK's encoders (``tests/engine/io/dcmtk.py``); decoded stored values
are compared with the original array exactly (every syntax here is lossless).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radflash.io import decoders
from radflash.io.imageio import SkippedImage, load_image, try_load
from radflash.io.selection import decoder_reason
from tests.engine import dicom_factory as F
from tests.engine.io.dcmtk import encode, require_dcmtk

DEFAULT_INSTALL = {  # lossless CR/DX syntaxes → the library that decodes them on the default install
    decoders.JPEG_LOSSLESS_SV1: "gdcm",
    decoders.JPEG_LOSSLESS: "gdcm",
    decoders.JPEG_LS_LOSSLESS: "pyjpegls",
    decoders.JPEG_2000_LOSSLESS: "pylibjpeg-openjpeg",
    decoders.RLE_LOSSLESS: "pylibjpeg-rle",
}


def _film(tmp_path: Path, bits: int = 12, shape: tuple[int, int] = (45, 71)) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(np.random.randint(2**31))
    pixels = rng.integers(0, 2**bits, size=shape).astype(np.uint16 if bits > 8 else np.uint8)
    ds = F.make_dataset(pixels, bits_stored=bits, BodyPartExamined="CHEST", ViewPosition="PA",
                        WindowCenter=2**(bits - 1), WindowWidth=2**bits)
    return F.write(ds, tmp_path / "film.dcm"), pixels


@pytest.mark.parametrize("uid", list(DEFAULT_INSTALL))
def test_cr_dx_lossless_syntaxes_decode_with_the_preferred_plugin(uid: str, tmp_path: Path) -> None:
    require_dcmtk()
    src, pixels = _film(tmp_path)
    path = encode(src, tmp_path / "encoded.dcm", uid)
    outcome = try_load(path)  # the default chest rules: a CR chest PA film is scored
    assert outcome.status == "loaded", outcome.reason
    assert outcome.meta.decoder == DEFAULT_INSTALL[uid]
    np.testing.assert_array_equal(decoders.decode(pydicom.dcmread(path)).array, pixels)


def test_native_and_raster_files_name_their_decoder(tmp_path: Path) -> None:
    src, _ = _film(tmp_path)
    assert load_image(src).meta.decoder == "native"
    from PIL import Image

    Image.fromarray(np.full((9, 11), 7, np.uint8) + np.arange(11, dtype=np.uint8)).save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png").meta.decoder == "pillow"


def test_12bit_jpeg_extended_is_refused_with_the_libjpeg_install_line(tmp_path: Path) -> None:
    require_dcmtk()
    if "pylibjpeg" in decoders.installed_plugins(decoders.JPEG_EXTENDED):
        pytest.skip("the GPL libjpeg plugin is installed here: 12-bit JPEG Extended decodes")
    src, _ = _film(tmp_path)
    path = encode(src, tmp_path / "jpeg12.dcm", decoders.JPEG_EXTENDED)
    with pytest.raises(SkippedImage) as info:
        load_image(path)
    assert info.value.reason == (f"encapsulated without decoder ({decoders.JPEG_EXTENDED}; 12-bit JPEG Extended "
                                 f"needs the GPL libjpeg: {decoders.LIBJPEG_INSTALL})")
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_8bit_jpeg_extended_decodes_without_libjpeg() -> None:
    assert decoder_reason(decoders.JPEG_EXTENDED, 8) is None
    assert "pillow" in decoders.usable_plugins(decoders.JPEG_EXTENDED, 8)
    assert not {"pillow", "gdcm"} & set(decoders.usable_plugins(decoders.JPEG_EXTENDED, 12))


@pytest.mark.parametrize(("uid", "hint"), [
    (decoders.JPEG_LOSSLESS_SV1, "pip install python-gdcm"),
    (decoders.JPEG_LS_LOSSLESS, "pip install pyjpegls (or python-gdcm)"),
    (decoders.JPEG_2000_LOSSLESS, "pip install pylibjpeg pylibjpeg-openjpeg"),
    (decoders.RLE_LOSSLESS, "pip install pylibjpeg pylibjpeg-rle"),
])
def test_a_missing_plugin_gives_the_syntax_and_its_install_line(uid: str, hint: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoders, "installed_plugins", lambda transfer_syntax: ())
    assert decoder_reason(uid, 16) == f"encapsulated without decoder ({uid}; {hint})"


def test_reasons_for_native_and_unknown_syntaxes() -> None:
    assert decoder_reason("1.2.840.10008.1.2.1") is None and decoder_reason("1.2.840.10008.1.2.1.99") is None
    assert decoder_reason(None) is None
    assert decoder_reason("1.2.3.4") == "unknown transfer syntax (1.2.3.4)"


def test_a_failing_plugin_falls_back_to_the_next_and_the_column_names_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    require_dcmtk()
    src, pixels = _film(tmp_path)
    path = encode(src, tmp_path / "ls.dcm", decoders.JPEG_LS_LOSSLESS)
    real = decoders.usable_plugins
    monkeypatch.setattr(decoders, "usable_plugins", lambda *a, **k: ("no-such-plugin", *real(*a, **k)))
    image = load_image(path)
    assert image.meta.decoder == DEFAULT_INSTALL[decoders.JPEG_LS_LOSSLESS]
    np.testing.assert_array_equal(decoders.decode(pydicom.dcmread(path)).array, pixels)


def test_when_every_plugin_fails_the_file_fails_with_the_first_error(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    require_dcmtk()
    src, _ = _film(tmp_path)
    path = encode(src, tmp_path / "ls.dcm", decoders.JPEG_LS_LOSSLESS)
    monkeypatch.setattr(decoders, "usable_plugins", lambda *a, **k: ("no-such-plugin", "nor-this-one"))
    outcome = try_load(path)
    assert outcome.status == "failed" and outcome.reason.startswith("pixel decode failed (")
    assert "no-such-plugin" in outcome.reason and "\n" not in outcome.reason


def test_missing_decoder_line_counts_files_and_collects_install_lines() -> None:
    jpeg12 = (f"encapsulated without decoder ({decoders.JPEG_EXTENDED}; 12-bit JPEG Extended needs the GPL "
              f"libjpeg: {decoders.LIBJPEG_INSTALL})")
    gdcm = f"encapsulated without decoder ({decoders.JPEG_LOSSLESS_SV1}; pip install python-gdcm)"
    assert decoders.missing_decoder_line(["not a radiograph: CT", None]) is None
    line = decoders.missing_decoder_line([jpeg12, "not frontal", jpeg12, gdcm, None])
    assert line == (f"3 files were skipped for a missing decoder: 12-bit JPEG Extended needs the GPL libjpeg: "
                    f"{decoders.LIBJPEG_INSTALL}; pip install python-gdcm")
    assert decoders.missing_decoder_line([jpeg12]).startswith("1 file was skipped")


def test_syntax_table_lists_what_this_install_decodes() -> None:
    rows = {(r["uid"], r["name"]): r for r in decoders.syntax_table()}
    by_uid = {uid: r for (uid, _), r in rows.items()}
    for uid, lib in DEFAULT_INSTALL.items():
        assert by_uid[uid]["decodes"] and by_uid[uid]["decoder"] == lib
    jpeg12 = rows[(decoders.JPEG_EXTENDED, "JPEG Extended (12-bit)")]
    assert jpeg12["decodes"] == ("pylibjpeg" in decoders.installed_plugins(decoders.JPEG_EXTENDED))
    if not jpeg12["decodes"]:
        assert decoders.LIBJPEG_INSTALL in jpeg12["missing"]


def test_score_ends_with_the_missing_decoder_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_dcmtk()
    if "pylibjpeg" in decoders.installed_plugins(decoders.JPEG_EXTENDED):
        pytest.skip("the GPL libjpeg plugin is installed here: nothing is skipped for a missing decoder")
    from radflash.archive.verb import score

    inputs = tmp_path / "in"
    inputs.mkdir()
    src, _ = _film(tmp_path, shape=(64, 64))
    encode(src, inputs / "a.dcm", decoders.JPEG_EXTENDED)
    encode(src, inputs / "b.dcm", decoders.JPEG_LOSSLESS_SV1)
    with caplog.at_level(logging.WARNING, logger="radflash.score"):
        run = score(inputs, tmp_path / "out", progress=False)
    assert (run.scored, run.skipped) == (1, 1)
    lines = [r.getMessage() for r in caplog.records if "missing decoder" in r.getMessage()]
    assert lines == [f"1 file was skipped for a missing decoder: 12-bit JPEG Extended needs the GPL libjpeg: "
                     f"{decoders.LIBJPEG_INSTALL}"]
    status = {Path(p).name: (s, d) for p, s, d in zip(run.status.column("path").to_pylist(),
                                                       run.status.column("status").to_pylist(),
                                                       run.status.column("decoder").to_pylist())}
    assert status["a.dcm"] == ("skipped", None)
    assert status["b.dcm"][0] == "scored"


def test_status_table_names_the_decoder_of_each_scored_file(tmp_path: Path) -> None:
    require_dcmtk()
    from radflash.archive.verb import score

    inputs = tmp_path / "in"
    inputs.mkdir()
    src, _ = _film(tmp_path, shape=(64, 64))
    for uid, lib in DEFAULT_INSTALL.items():
        encode(src, inputs / f"{lib}.dcm", uid)
    run = score(inputs, tmp_path / "out", progress=False)
    from radflash.archive.sinks import read_table

    status = read_table(run.status_path)
    got = dict(zip((Path(p).stem for p in status.column("path").to_pylist()), status.column("decoder").to_pylist()))
    assert got == {lib: lib for lib in DEFAULT_INSTALL.values()}

