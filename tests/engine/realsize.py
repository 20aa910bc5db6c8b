"""Real-size films: what a hospital archive holds, not what a unit test finds convenient.

Small fixtures hid a deadlock for a whole release: a 15 MB DICOMweb retrieval and a 30 MB
decoded film filled both directions of a decode worker's pipe. Every source and executor is
therefore also run on these: four generated 3000×2500 16-bit MONOCHROME1 CR films (~15 MB each
uncompressed), one per lossless syntax a CR/DX archive stores (explicit little endian, deflated,
RLE, JPEG 2000), and the real 1955×1841 15-bit CR radiograph from pydicom-data with its JPEG 2000
twin and an RLE copy made here. Each file has its own SOP Instance UID, so a PACS keeps them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE = (3000, 2500)  # rows × columns: a 35×43 cm plate at ~0.14 mm
SYNTAXES = {  # file stem → transfer syntax UID
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "j2k": "1.2.840.10008.1.2.4.90",
}


@dataclass(frozen=True)
class RealSizeArchive:
    folder: Path
    files: tuple[Path, ...]

    @property
    def generated(self) -> tuple[Path, ...]:
        return tuple(p for p in self.files if p.name.startswith("film-"))


def film(seed: int) -> np.ndarray:
    """A smooth 3000×2500 image in [0, 1] (bilinear upsampling of coarse noise: cheap, compressible
    enough for RLE and JPEG 2000 to do real work, and different for every seed)."""
    from PIL import Image

    coarse = np.random.default_rng(seed).random((SHAPE[0] // 10, SHAPE[1] // 10)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize(SHAPE[::-1], Image.BILINEAR))


def write_real_size_archive(folder: Path) -> RealSizeArchive:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import RLELossless, generate_uid

    from radflash.synthetic.dicom_archive import write_dicom

    files = []
    for i, (stem, syntax) in enumerate(SYNTAXES.items()):
        files.append(write_dicom(film(1000 + i), folder / f"film-{stem}.dcm", photometric="MONOCHROME1",
                                 bits_stored=16, transfer_syntax=syntax, seed=1000 + i))
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        source = get_testdata_file(name, download=False)
        assert source is not None, f"pydicom-data's {name} is part of the test install"
        files.append(Path(folder / name))
        files[-1].write_bytes(Path(source).read_bytes())
    ds = pydicom.dcmread(files[-2])  # the uncompressed CR, re-encoded as RLE under a UID of its own
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["radflash RG1 RLE"])
    ds.save_as(folder / "RG1_RLE.dcm", enforce_file_format=True)
    files.append(folder / "RG1_RLE.dcm")
    return RealSizeArchive(folder, tuple(files))
