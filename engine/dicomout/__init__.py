"""The DICOM objects radflash writes: Structured Reports, Segmentations, Secondary Captures.

One package for every object, whichever verb makes it (``score --store``, ``segment``, a future
``serve`` or DIMSE store), so the objects cannot drift apart: one list of Type 2 attributes copied
from the source (:mod:`.header`), one identity of the algorithm (:mod:`.equipment`: Contributing
Equipment, the SR's observer device and the Device UID derived from the weights), one code table
for findings (:mod:`.codes`, ``codes.json``), one set of deterministic UIDs (:mod:`.uids`).

Layering: this is the sink level's object builder. It takes plain data (a source header, finding
names and numbers, masks, rendered pixels) and returns pydicom/highdicom datasets; it never imports
the verbs (``archive``, ``segment``) that call it, and writing files or STOW-RS stays with them.
highdicom (extras ``seg``/``dicomweb``) is imported only inside the builders.
"""

from radflash.errors import RadflashError


class ObjectError(RadflashError):
    """An object cannot be built from what it was given (a header without pixels' geometry, masks of
    another size); the verb records it for that image and goes on."""
