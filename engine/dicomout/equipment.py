"""Who made an object: radflash, the model family and checkpoint, the version, a Device UID.

IHE Radiology's AI Results profile (AIR) asks every AI result object to name the algorithm in its
Contributing Equipment Sequence (0018,A001), so a PACS or a reporting system can tell which model
(and which weights) produced a finding without parsing private text. The same identity is the SR's
observer device (TID 1004) and the SEG's and SC's General Equipment, built here once.

The Device UID is derived from the checkpoint's content hash (sha256 of its weights): the same
weights give the same UID on every run and machine, different checkpoints (even of one family and
one model id) give different UIDs, and no registry of issued UIDs is needed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from radflash.dicomout.text import lo

MANUFACTURER = "radflash"
# AIR's purpose of reference for the algorithm's Contributing Equipment item (IHE RAD AIR, Trial
# Implementation): a code of IHE's own "99IHE" scheme, until DICOM assigns a standard one.
AIR_PURPOSE = ("Newcode1", "99IHE", "Processing Algorithm")


# The namespace of radflash's name-based UUIDs (itself a name-based UUID, fixed forever).
_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/radflash/radflash/device")


def device_uid(model_sha256: str, model_id: str = "") -> str:
    """A 2.25 UID (DICOM PS3.5 B.2: a UUID as one integer) from a name-based UUID (RFC 9562 v5) of
    the checkpoint's content hash; ``model_id`` only when the model has no hash (an in-memory model).

    Not pydicom's ``generate_uid(prefix=None)``: that one ignores its entropy and returns a random
    UUID, a different Device UID on every run.
    """
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, model_sha256 or f'id:{model_id}').int}"


@dataclass(frozen=True)
class Equipment:
    """The algorithm as a DICOM device: what goes into Contributing Equipment, the SR observer
    context and the objects' General Equipment module."""

    model_id: str
    model_sha256: str = ""
    family: str = ""
    software_version: str = ""  # radflash's version; "" = the installed one

    @property
    def manufacturer(self) -> str:
        return MANUFACTURER

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name: the model family and the checkpoint's id (LO, 64 chars)."""
        return lo(f"{self.family} {self.model_id}" if self.family else self.model_id)

    @property
    def version(self) -> str:
        if self.software_version:
            return lo(self.software_version)
        from radflash import __version__

        return lo(__version__)

    @property
    def uid(self) -> str:
        return device_uid(self.model_sha256, self.model_id)

    @property
    def serial_number(self) -> str:
        """Device Serial Number: the weights' hash prefix (enough to tell checkpoints apart by eye)."""
        return self.model_sha256[:16] or "none"

    def contributing_item(self, when: datetime | None = None) -> Any:
        """One Contributing Equipment Sequence item as AIR lists it: manufacturer, model name, software
        version, Device UID, purpose ``(Newcode1, 99IHE)``. Built with pydicom, not highdicom's
        ``ContributingEquipment``, which admits only DCM purposes and has no Device UID."""
        from pydicom.dataset import Dataset

        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = AIR_PURPOSE
        item = Dataset()
        item.Manufacturer = self.manufacturer
        item.ManufacturerModelName = self.model_name
        item.SoftwareVersions = self.version
        item.DeviceSerialNumber = self.serial_number
        item.DeviceUID = self.uid
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.ContributionDateTime = (when or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S+0000")
        item.ContributionDescription = lo(f"AI inference: {self.model_name}")
        return item

    def stamp(self, ds: Any, when: datetime | None = None) -> Any:
        """Add this equipment to ``ds`` (in place): a Contributing Equipment item (replacing an
        earlier radflash item with the same Device UID, so stamping twice adds nothing) and the
        General Equipment fields highdicom leaves out. Returns ``ds``."""
        from pydicom.sequence import Sequence

        items = [i for i in ds.get("ContributingEquipmentSequence", None) or []
                 if str(i.get("DeviceUID", "")) != self.uid]
        ds.ContributingEquipmentSequence = Sequence([*items, self.contributing_item(when)])
        ds.Manufacturer = self.manufacturer
        ds.ManufacturerModelName = self.model_name
        ds.SoftwareVersions = self.version
        ds.DeviceSerialNumber = self.serial_number
        return ds

    def observer_context(self) -> Any:
        """The SR's device observer (TID 1004): the same name, model and UID as Contributing Equipment."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.uid, name=self.manufacturer, manufacturer_name=self.manufacturer,
                model_name=self.model_name, serial_number=self.serial_number))

    def algorithm(self, parameters: list[str] | None = None) -> Any:
        """TID 4019 algorithm identification for measurement groups and SEG segments."""
        import highdicom as hd

        return hd.sr.AlgorithmIdentification(name=self.model_name, version=self.version,
                                             parameters=parameters or None)
