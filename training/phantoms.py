"""The phantom generator under its training name: a re-export of :mod:`radflash.synthetic.phantoms`.

The generator lives in the engine (bench, tests and the demo archive need it, and the engine never
imports training); this module keeps ``radflash.training.phantoms`` working for code and scripts
that import it from here. It holds no code of its own: change the generator there.
"""

from radflash.synthetic.phantoms import (
    ANATOMY,
    FINDINGS,
    FindingSpec,
    Phantom,
    PlacedFinding,
    allowed_combos,
    generate_batch,
    generate_phantom,
    write_report,
)

__all__ = [
    "ANATOMY",
    "FINDINGS",
    "FindingSpec",
    "Phantom",
    "PlacedFinding",
    "allowed_combos",
    "generate_batch",
    "generate_phantom",
    "write_report",
]
