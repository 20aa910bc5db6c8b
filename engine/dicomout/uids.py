"""Deterministic UIDs: the same source image, model (and prompts) give the same objects on every run.

That is what makes storing idempotent: a re-run, a ``--resume`` after a crash between STOW and
commit, or a second verb over the same image produces the *same* SOPInstanceUIDs, so a PACS that
already holds an object is asked (QIDO) and skipped, and nothing is duplicated. Every UID here is
a pydicom ``generate_uid`` over named entropy sources, so two kinds of object never collide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

SR_SERIES_NUMBER = 9900
SEG_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


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


def tracking_uid(report_sop: str, finding: str) -> str:
    """Tracking UID of one finding's measurement group in one report (stable across runs)."""
    return _uid("radflash-tracking", report_sop, finding)
