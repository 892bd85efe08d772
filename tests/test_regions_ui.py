"""Which region a click selects: inside, near, or far from the predicted defects."""

import numpy as np
import pytest

from defectclip.regions_ui import predicted_regions, region_from_click


def two_blobs():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # 100 px
    mask[60:90, 50:80] = True  # 900 px
    mask[0, 99] = True  # a 1-px speck from smoothing
    return mask


def test_predicted_regions_are_components_largest_first_without_specks():
    regions = predicted_regions(two_blobs())
    assert [int(r.sum()) for r in regions] == [900, 100]


def test_click_inside_a_region_selects_it():
    regions = predicted_regions(two_blobs())
    region, index = region_from_click(regions, (100, 100), x=15, y=15)
    assert index == 1 and region[15, 15] and region.sum() == 100


def test_click_near_a_region_snaps_to_the_nearest_within_15_px():
    regions = predicted_regions(two_blobs())
    _, index = region_from_click(regions, (100, 100), x=19 + 14, y=15)  # 14 px right of the small blob
    assert index == 1
    _, index = region_from_click(regions, (100, 100), x=19 + 16, y=15)  # 16 px: too far
    assert index is None


def test_click_far_from_everything_gives_a_disk_around_it():
    region, index = region_from_click([], (100, 100), x=50, y=30, disk_radius=5)
    assert index is None and region[30, 50] and region[30, 55] and not region[30, 56]
    assert region.sum() == pytest.approx(np.pi * 25, rel=0.2)


def test_click_outside_the_image_is_an_error():
    with pytest.raises(ValueError, match="outside the 100x100 image"):
        region_from_click([], (100, 100), x=100, y=5)
