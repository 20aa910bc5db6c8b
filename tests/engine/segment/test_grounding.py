"""Grounding vs hand-made masks: peak point order, box of the LARGEST component, 8-connectivity."""

from __future__ import annotations

import numpy as np
import pytest

from radflash.segment.grounding import ground, ground_map, label_runs, largest_component


def test_two_components_box_of_the_larger() -> None:
    mask = np.zeros((37, 53), np.uint8)
    mask[2:6, 3:9] = 1  # 24 px
    mask[20:31, 30:47] = 1  # 187 px
    comp = largest_component(mask)
    assert comp is not None
    assert comp.bbox == (30, 20, 46, 30)  # x_min, y_min, x_max, y_max (inclusive)
    assert comp.pixels == 11 * 17


def test_irregular_component_and_ties() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5, 2:15] = True  # a bar with a hook down the right side: one component of 13 + 6
    mask[6:12, 14] = True
    mask[15:17, 0:3] = True  # 6 px elsewhere
    comp = largest_component(mask)
    assert comp.bbox == (2, 5, 14, 11) and comp.pixels == 19
    tie = np.zeros((5, 9), bool)
    tie[0, 0:2] = tie[4, 7:9] = True
    assert largest_component(tie).bbox == (0, 0, 1, 0)  # ties: the first in row-major order


def test_diagonal_pixels_connect_8_neighbourhood() -> None:
    mask = np.eye(6, dtype=bool)  # a diagonal line is one object, not six
    mask[0, 5] = True
    comp = largest_component(mask)
    assert comp.pixels == 6 and comp.bbox == (0, 0, 5, 5)


def test_empty_and_full_masks() -> None:
    assert largest_component(np.zeros((7, 5), bool)) is None
    g = ground(np.zeros((7, 5), bool), peak_yx=(3, 1), peak_prob=0.2)
    assert g.bbox is None and not g.positive and g.point == (1, 3) and g.mask_pixels == 0
    full = largest_component(np.ones((7, 5), bool))
    assert full.bbox == (0, 0, 4, 6) and full.pixels == 35


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (33, 29), (64, 3)])
def test_matches_scipy_labelling(shape: tuple[int, int]) -> None:
    from scipy import ndimage  # in the test extra: never skipped
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for density in (0.1, 0.4, 0.6, 0.9):
        mask = rng.random(shape) < density
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        _, _, _, run_labels = label_runs(mask)
        assert len(np.unique(run_labels)) == n
        comp = largest_component(mask)
        if n == 0:
            assert comp is None
            continue
        sizes = np.bincount(labels.ravel())[1:]
        assert comp.pixels == sizes.max()
        boxes = []
        for k in np.flatnonzero(sizes == sizes.max()) + 1:
            ys, xs = np.nonzero(labels == k)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
        assert comp.bbox in boxes


def test_ground_map_point_is_x_y_and_box_from_threshold() -> None:
    prob = np.zeros((40, 61), np.float32)
    prob[10:20, 40:55] = 0.8  # large region
    prob[30:33, 5:8] = 0.7  # small region
    prob[12, 50] = 0.95  # the peak, inside the large region
    g = ground_map(prob, 0.5)
    assert g.point == (50, 12)
    assert g.max_prob == pytest.approx(0.95)
    assert g.bbox == (40, 10, 54, 19)
    assert g.mask_pixels == 150 + 9 and g.component_pixels == 150
    d = g.to_dict()
    assert d["point"] == [50, 12] and d["bbox"] == [40, 10, 54, 19] and d["positive"] is True
