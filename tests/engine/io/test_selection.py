"""Selection rules: which headers are scored, and the one-line reason for the rest."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from radflash.errors import InputError
from radflash.io.imageio import ImageMeta
from radflash.io.selection import SelectionRules, check, decoder_reason
from tests.engine import dicom_factory as F


def meta(**overrides) -> ImageMeta:
    base = dict(path="x.dcm", kind="dicom", modality="DX", body_part="CHEST", view_position="PA",
                photometric="MONOCHROME2", rows=8, cols=8, frames=None, samples_per_pixel=1, bits_allocated=16,
                bits_stored=12, transfer_syntax="1.2.840.10008.1.2.1", has_pixel_data=True)
    base.update(overrides)
    return ImageMeta(**base)


CASES = [
    # header overrides, rules, reason (None = scored)
    ({}, None, None),
    ({"modality": "CR"}, None, None),
    ({"modality": "MR"}, None, "modality MR not in CR/DX"),
    ({"modality": None}, None, "no modality (not in CR/DX)"),
    ({"modality": "MR"}, SelectionRules(modalities=("mr",)), None),
    ({"modality": "SEG"}, SelectionRules.any_image(), "not a radiograph: SEG"),
    ({"modality": "SR", "has_pixel_data": False}, None, "not a radiograph: SR"),
    ({"has_pixel_data": False}, None, "no pixel data"),
    ({"has_pixel_data": None}, None, None),  # deflated: decided after the full read
    ({"body_part": "KNEE"}, None, "body part KNEE"),
    ({"body_part": "Chest"}, None, None),
    ({"body_part": "PORT CHEST"}, None, None),
    ({"body_part": "THORAX"}, None, None),
    ({"body_part": "LUNG"}, None, None),
    ({"body_part": None}, None, None),
    ({"body_part": "UNKNOWN"}, None, None),
    ({"body_part": None}, SelectionRules(accept_unknown_body_part=False), "body part unknown"),
    ({"body_part": "KNEE"}, SelectionRules(body_parts=None), None),
    ({"view_position": "AP"}, None, None),
    ({"view_position": None}, None, None),
    ({"view_position": None}, SelectionRules(accept_unknown_view=False), "view unknown"),
    ({"view_position": "LL"}, None, "view LL (lateral)"),
    ({"view_position": "RL"}, None, "view RL (lateral)"),
    ({"view_position": "LATERAL"}, None, "view LATERAL (lateral)"),
    ({"view_position": "LL"}, SelectionRules(include_lateral=True), None),
    ({"view_position": None, "view_hint": "lateral"}, None, "view lateral (view code)"),
    ({"view_position": "LLD"}, None, "view LLD (not frontal)"),
    ({"view_position": "LLD"}, SelectionRules(views=None), None),
    ({"frames": 2}, None, "multi-frame (2 frames)"),
    ({"frames": 1}, None, None),
    ({"photometric": "RGB", "samples_per_pixel": 3}, None, "colour image (RGB)"),
    ({"photometric": "PALETTE COLOR"}, None, "colour image (PALETTE COLOR)"),
    ({"bits_allocated": 1}, None, "binary image (1 bit allocated)"),
    ({"transfer_syntax": "1.2.3.4"}, None, "unknown transfer syntax (1.2.3.4)"),
    ({"transfer_syntax": None}, None, None),
    ({"transfer_syntax": "1.2.840.10008.1.2.4.90"}, None, None),
    ({"kind": "png", "modality": None, "body_part": None, "view_position": None, "transfer_syntax": None}, None, None),
    ({"kind": "png", "frames": 4}, None, "multi-frame (4 frames)"),
]


@pytest.mark.parametrize(("overrides", "rules", "reason"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_check_reasons(overrides: dict, rules: SelectionRules | None, reason: str | None) -> None:
    assert check(meta(**overrides), rules) == reason


def test_check_reads_a_dataset_directly() -> None:
    ds = F.make_dataset(np.zeros((4, 4), np.uint16), modality="DX", BodyPartExamined="CHEST", ViewPosition="PA")
    assert check(ds) is None
    ds.ViewPosition = ""
    code = Dataset()
    code.CodeMeaning = "left lateral"
    ds.ViewCodeSequence = Sequence([code])
    assert check(ds) == "view lateral (view code)"
    del ds.PixelData
    assert check(ds, SelectionRules.any_image()) == "no pixel data"


def test_decoder_reason_names_the_syntax_and_a_fix() -> None:
    from pydicom.pixels import get_decoder

    uid = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1: pylibjpeg-libjpeg or GDCM only
    reason = decoder_reason(uid)
    if get_decoder(uid).is_available:
        assert reason is None
    else:
        assert reason.startswith(f"encapsulated without decoder ({uid}")
    assert decoder_reason("1.2.840.10008.1.2.1") is None and decoder_reason("1.2.840.10008.1.2.1.99") is None


def test_rules_normalise_and_validate() -> None:
    rules = SelectionRules(modalities="cr, dx ", body_parts=["chest"], views=("pa",))
    assert (rules.modalities, rules.body_parts, rules.views) == (("CR", "DX"), ("CHEST",), ("PA",))
    with pytest.raises(InputError, match="modalities is empty"):
        SelectionRules(modalities=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.include_lateral = True  # type: ignore[misc]


def test_rules_are_json_serialisable_for_the_manifest() -> None:
    as_dict = dataclasses.asdict(SelectionRules())
    assert json.loads(json.dumps(as_dict))["modalities"] == ["CR", "DX"]
    assert as_dict["include_lateral"] is False and as_dict["views"] == ("PA", "AP")
