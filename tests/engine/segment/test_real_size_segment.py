"""``segment`` on real-size films (tests/engine/realsize.py): maps at each film's own size, the
same with and without decode worker processes, with PNG masks written at full resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radflash.segment.verb import segment

pytestmark = pytest.mark.slow


def test_real_size_films_segment_at_their_own_size(real_size_archive, tiny_model: Path, tmp_path: Path) -> None:
    import pydicom
    from PIL import Image

    prompts = ["left lung", "There is pleural effusion"]
    inline = segment([real_size_archive.folder], None, prompts=prompts, model=tiny_model, workers=0, batch_size=16,
                     progress=False)
    pooled = segment([real_size_archive.folder], tmp_path / "out", prompts=prompts, model=tiny_model, workers=2,
                     batch_size=1, formats=("png",), progress=False)
    assert not inline.failures and not pooled.failures
    assert len(inline.images) == len(pooled.images) == len(real_size_archive.files)
    sizes = {p.name: (int(ds.Rows), int(ds.Columns)) for p in real_size_archive.files
             for ds in [pydicom.dcmread(p, stop_before_pixels=True)]}
    by_source = {Path(r.source).name: r for r in pooled.images}
    for r in inline.images:
        name = Path(r.source).name
        assert r.size == sizes[name] and r.probs.shape == (2, *sizes[name])
        other = by_source[name]
        for prompt, g in r.groundings.items():  # batch composition moves the last bits only
            assert other.groundings[prompt].max_prob == pytest.approx(g.max_prob, abs=1e-5)
            mask = np.asarray(Image.open(tmp_path / "out" / other.files[f"mask:{prompt}"]))
            assert mask.shape == sizes[name]
