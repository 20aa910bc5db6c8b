"""Stage costs in core-seconds per image and the pipeline limit (radflash.bench.pipeline_limit).

Not timed: the films are shrunk to 600×500 so the test takes seconds; what is checked is the
shape of the measurement (every syntax, a fast row only where the syntax reduces, the limit is
cores ÷ Σ) and that ``radflash bench --films`` prints it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from radflash.bench import pipeline_limit


@pytest.fixture(scope="module")
def small_films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline_limit, "FILM_SHAPE", (600, 500))
    try:
        return pipeline_limit.write_films(tmp_path_factory.mktemp("films"), 2, distinct=1)
    finally:
        mp.undo()


def test_stage_costs_rows_and_limit(small_films: dict[str, list[Path]]) -> None:
    from radflash.api import as_model

    costs = pipeline_limit.stage_costs(as_model(None), small_films, batch_size=2, repeats=1, cores=2)
    assert [(r.syntax, r.mode) for r in costs.rows] == [("explicit", "full"), ("rle", "full"), ("j2k", "full"),
                                                         ("j2k", "fast")]
    full, fast = costs.row("j2k"), costs.row("j2k", "fast")
    assert full.decoded_shape == (600, 500) and full.decoder == "pylibjpeg-openjpeg"
    assert fast.decoded_shape == (300, 250) and "reduced" in fast.decoder  # demo model 168²: one level
    for r in costs.rows:
        assert r.decode_s > 0 and r.encoder_s > 0 and r.resize_s >= 0 and r.head_s >= 0
        assert r.limit_images_per_s == pytest.approx(2 / r.total_s)
    text = costs.markdown()
    assert text.count("\n") == 2 + len(costs.rows)
    lines = pipeline_limit.stage_cost_lines(costs.to_dict())
    assert len(lines) == 1 + len(costs.rows) and "limit" in lines[-1]


def test_unknown_film_syntax_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown film syntax"):
        pipeline_limit.write_films(tmp_path, 1, ("jpeg-xl",))
