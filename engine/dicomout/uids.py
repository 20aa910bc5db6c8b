"""Deterministic UIDs: the same source image, model (and prompts) give the same objects on every run.

That is what makes storing idempotent: a re-run, a ``--resume`` after a crash between STOW and
commit, or a second verb over the same image produces the *same* SOPInstanceUIDs, so a PACS that
already holds an object is asked (QIDO) and skipped, and nothing is duplicated. Every UID here is
a pydicom ``generate_uid`` over named entropy sources, so two kinds of object never collide.
Instance numbers are derived the same way (:func:`instance_number_for`), never counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

SR_SERIES_NUMBER = 9900
SEG_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
INSTANCE_NUMBER_MAX = 2**31 - 1  # VR IS: a signed 32-bit integer (PS3.5 6.2); highdicom wants it ≥ 1


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=list(parts)))


def sr_uids(source_sop: str, source_study: str, model_sha256: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the SR for one source image and model: the same inputs give the
    same UIDs on every run, so storing again replaces nothing and duplicates nothing."""
    return (_uid("radflash-sr-series", source_study, model_sha256),
            _uid("radflash-sr", source_sop, model_sha256))


def prompt_set_key(prompts: Sequence[tuple[str, str, float]]) -> str:
    """A digest of a segment run's prompts (name, text, threshold): what, with the model, decides a
    SEG's masks, so a SEG's UIDs change whenever its content could."""
    text = json.dumps([[n, p, float(t)] for n, p, t in prompts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seg_uids(source_sop: str, source_study: str, model_sha256: str, prompts_key: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the DICOM SEG for one source image, model and prompt set
    (:func:`prompt_set_key`): like :func:`sr_uids`, the same inputs give the same UIDs every run."""
    return (_uid("radflash-seg-series", source_study, model_sha256, prompts_key),
            _uid("radflash-seg", source_sop, model_sha256, prompts_key))


def sc_uids(source_sop: str, source_study: str, model_sha256: str, prompts_key: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the overlay Secondary Capture: as :func:`seg_uids`, its own series."""
    return (_uid("radflash-sc-series", source_study, model_sha256, prompts_key),
            _uid("radflash-sc", source_sop, model_sha256, prompts_key))


def segment_sr_uids(source_sop: str, source_study: str, model_sha256: str, prompts_key: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the SR a segment run writes beside its SEG (per prompt set, unlike
    :func:`sr_uids`, which is one report per image and model from ``score``)."""
    return (_uid("radflash-segment-sr-series", source_study, model_sha256, prompts_key),
            _uid("radflash-segment-sr", source_sop, model_sha256, prompts_key))


def instance_number_for(source_sop: str) -> int:
    """InstanceNumber of a result object (SR, SEG, SC) made from the image ``source_sop``: a hash of
    that UID into 1..2³¹−1, so it needs no state and a rerun, a ``--resume`` or a restarted
    ``serve`` gives every object the number it had.

    A result series (:func:`sr_uids`, :func:`seg_uids`, …) holds one object per source image of
    one study, so its numbers differ unless two of the study's source UIDs hash alike: for n images
    that chance is about n²/2³² (4 films: 4·10⁻⁹; 1000: 2·10⁻⁴). A per-study counter cannot be
    both stable and unique when a study's images arrive in separate batches or runs, and the
    source's own Series/Instance Number can repeat (many exports, the demo archive too, give every
    film 1 and 1). DICOM asks only for "a number that identifies this instance", not a sequence;
    the SEG, SC and SR of one image share theirs.
    """
    digest = hashlib.sha256(source_sop.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") % INSTANCE_NUMBER_MAX + 1


def tracking_uid(report_sop: str, finding: str) -> str:
    """Tracking UID of one finding's measurement group in one report (stable across runs)."""
    return _uid("radflash-tracking", report_sop, finding)
