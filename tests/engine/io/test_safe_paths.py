"""Output names from untrusted DICOM tags and file names can never leave the output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from radflash.errors import InputError
from radflash.io.safe_paths import MAX_NAME, NameAllocator, image_output_name, inside, safe_name

HOSTILE = [
    "../../etc/x", "/abs", "/", "..", ".", "", "a/../../b", "..\\..\\windows\\x", "C:\\evil", "a\x00b",
    "~/x", "x" * 5000, "CON", "nul.txt", " ", "\u202e\u0000..", "ééé/../", ".hidden", "-rf",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_safe_name_is_one_harmless_component(raw: str, tmp_path: Path) -> None:
    name = safe_name(raw)
    assert name and len(name) <= MAX_NAME
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith((".", "-"))  # no hidden files, nothing a shell reads as an option
    assert name not in (".", "..")
    target = inside(tmp_path, name)
    assert target.parent == tmp_path.resolve()


def test_safe_name_keeps_uids_and_stems_readable() -> None:
    assert safe_name("1.2.840.113619.2.55.3.604688119") == "1.2.840.113619.2.55.3.604688119"
    assert safe_name("IM 0001 (copy)") == "IM_0001_copy"
    assert safe_name("There is pneumothorax") == "There_is_pneumothorax"


def test_long_names_stay_distinct() -> None:
    a, b = "1." * 200 + "1", "1." * 200 + "2"
    assert safe_name(a) != safe_name(b)
    assert len(safe_name(a)) <= MAX_NAME


def test_allocator_deduplicates_case_insensitively() -> None:
    alloc = NameAllocator()
    names = [alloc.claim(x) for x in ["img", "IMG", "img", "../img", "/img", "img-2"]]
    assert len({n.lower() for n in names}) == len(names)
    assert names[:3] == ["img", "IMG-2", "img-3"]


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "/etc", "a\\b", "a\x00"])
def test_inside_rejects_unsafe_parts(part: str, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        inside(tmp_path, part)


def test_inside_rejects_symlink_escape(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "link")
    with pytest.raises(InputError, match="outside"):
        inside(out, "link", "file.png")
    assert inside(out, "ok", "file.png") == (out / "ok" / "file.png").resolve()


def test_image_output_name_prefers_uid_then_stem() -> None:
    assert image_output_name("1.2.3", "/data/IM0001.dcm", 1) == "1.2.3"
    assert image_output_name(None, "/data/IM0001.dcm", 1) == "IM0001"
    assert image_output_name("  ", "/data/chest.PNG", 2) == "chest"
    assert image_output_name(None, None, 7) == "image-0007"
