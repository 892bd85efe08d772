"""Region splitting (DBSCAN), captions and transplanted defects, on masks drawn by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectclip.captions import (
    TEMPLATES,
    all_captions,
    candidate_captions,
    caption,
    defect_phrase,
    indefinite_article,
)
from defectclip.data.regions import bounding_box, split_regions, split_sample_regions
from defectclip.data.transplant import transplant_region


def blank(shape=(64, 80)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def assert_partition(mask: np.ndarray, regions: list[np.ndarray]) -> None:
    """Every foreground pixel in exactly one region, no background pixel in any."""
    cover = np.sum([r.astype(int) for r in regions], axis=0)
    assert cover[mask].min() == 1 and cover[mask].max() == 1
    assert cover[~mask].max() == 0


# ------------------------------------------------------------------------------------------- regions


def test_two_separate_blobs_give_two_regions_in_raster_order():
    mask = blank()
    mask[5:15, 5:20] = True
    mask[35:55, 40:70] = True
    split = split_regions(mask)
    assert len(split) == 2 and split.dropped == 0
    assert bounding_box(split.regions[0]) == [5, 5, 20, 15]
    assert bounding_box(split.regions[1]) == [40, 35, 70, 55]
    assert_partition(mask, split.regions)
    labels = split.label_map()
    assert labels[10, 10] == 1 and labels[40, 50] == 2 and labels[0, 0] == 0


def test_one_blob_gives_one_region_and_accepts_torch_and_uint8_masks():
    mask = blank()
    mask[10:30, 10:30] = True
    assert len(split_regions(mask)) == 1
    assert len(split_regions(torch.from_numpy(mask))) == 1
    assert len(split_regions(mask.astype(np.uint8) * 255)) == 1


def test_gap_below_eps_is_bridged_and_gap_above_it_is_not():
    mask = blank()
    mask[10:20, 5:20] = True
    mask[10:20, 23:40] = True  # 3 px gap: one dotted defect
    assert len(split_regions(mask, eps=5)) == 1
    assert len(split_regions(mask, eps=2)) == 2


def test_isolated_noise_pixels_join_their_nearest_cluster():
    mask = blank()
    mask[5:15, 5:15] = True
    mask[40:60, 50:75] = True
    specks = [(20, 20), (62, 78), (30, 48)]  # nearest: first blob, second blob, second blob
    for y, x in specks:
        mask[y, x] = True
    split = split_regions(mask)
    assert len(split) == 2 and split.dropped == 0
    assert_partition(mask, split.regions)
    first, second = split.regions
    assert first[20, 20] and second[62, 78] and second[30, 48]


def test_only_sparse_specks_become_one_region():
    mask = blank()
    for y, x in [(3, 3), (30, 60), (50, 10), (10, 40), (60, 70)]:
        mask[y, x] = True
    split = split_regions(mask, min_area=1)
    assert len(split) == 1
    assert_partition(mask, split.regions)


def test_empty_mask_gives_no_regions():
    split = split_regions(blank())
    assert len(split) == 0 and split.dropped == 0


def test_region_below_min_area_is_dropped_and_counted():
    mask = blank()
    mask[5:25, 5:25] = True
    mask[50:53, 60:63] = True  # 9 px: dense enough to be its own cluster, too small to keep
    split = split_regions(mask, min_area=16)
    assert len(split) == 1 and split.dropped == 1 and split.dropped_pixels == 9
    assert split.regions[0].sum() == 400


def test_large_mask_is_subsampled_seeded_and_still_partitioned():
    mask = np.zeros((400, 400), dtype=bool)
    mask[10:100, 10:390] = True
    mask[300:390, 10:390] = True
    for y in range(180, 220):  # a thin diagonal scratch, 80 px from both blocks
        mask[y, 2 * y - 250] = True
    split = split_regions(mask, max_points=500, seed=3)
    assert split.stride > 1 and split.eps_used >= 5
    assert len(split) == 3
    assert_partition(mask, split.regions)
    again = split_regions(mask, max_points=500, seed=3)
    assert all((a == b).all() for a, b in zip(split.regions, again.regions))


def test_sample_regions_split_each_type_on_its_own():
    index = np.zeros((64, 80), dtype=np.int64)
    index[5:15, 5:15] = 1
    index[5:15, 60:75] = 1
    index[40:60, 10:70] = 2
    index[15:20, 5:15] = 2  # touches a type-1 blob but is another type: its own region
    result = split_sample_regions({"inclusion": index == 1, "patches": index == 2})
    assert [defect for defect, _ in result] == ["inclusion", "inclusion", "patches", "patches"]
    assert result.total_dropped == 0
    for defect, code in (("inclusion", 1), ("patches", 2)):
        assert_partition(index == code, [region for d, region in result if d == defect])


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError):
        split_regions(blank(), eps=0)
    with pytest.raises(ValueError):
        split_regions(np.zeros((2, 3, 4)))


# ------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "defect, obj, expected",
    [
        ("blowhole", "magnetic tile", "a blowhole in the magnetic tile"),
        ("scratches", "steel strip", "a scratch on the steel strip"),
        ("patches", "steel_strip", "a patch on the steel strip"),
        ("inclusion", "steel strip", "an inclusion in the steel strip"),
        ("break", "magnetic tile", "a break in the magnetic tile"),
        ("crack", "magnetic tile", "a crack in the magnetic tile"),
        ("fray", "magnetic tile", "a frayed edge on the magnetic tile"),
        ("uneven", "magnetic tile", "an uneven area on the magnetic tile"),
        ("oil_spots", "steel strip", "an oil spot on the steel strip"),
        ("glass_shard", "bottle", "a glass shard defect on the bottle"),
        ("Unidentified", "bottle", "an unidentified defect on the bottle"),
        ("uniform-shift", "bottle", "a uniform shift defect on the bottle"),
    ],
)
def test_canonical_captions_read_right(defect, obj, expected):
    assert caption(defect, obj) == expected


def test_other_templates_and_articles():
    assert caption("inclusion", "steel strip", 1) == "a photo of a steel strip with an inclusion"
    assert caption("blowhole", "engine block", 2) == "an engine block showing a blowhole"
    assert len(all_captions("crack", "tile")) == len(TEMPLATES)
    assert defect_phrase("scratches") == "a scratch"
    assert [indefinite_article(w) for w in ("hour", "unit", "apple", "board")] == ["an", "a", "an", "a"]
    with pytest.raises(ValueError):
        caption("crack", "tile", template_index=len(TEMPLATES))


def test_candidate_captions_are_the_canonical_caption_per_type_in_order():
    candidates = candidate_captions("steel strip", ["inclusion", "patches", "scratches", "patches"])
    assert candidates == [
        "an inclusion in the steel strip",
        "a patch on the steel strip",
        "a scratch on the steel strip",
    ]


# ------------------------------------------------------------------------------------------- transplant


def test_transplant_places_the_region_and_changes_nothing_far_from_it():
    rng = np.random.default_rng(0)
    source = rng.integers(180, 200, (60, 70, 3), dtype=np.uint8)
    region = np.zeros((60, 70), dtype=bool)
    region[0:8, 30:50] = True  # touches the source's border
    source[region] = 20
    target = np.full((90, 100, 3), 128, dtype=np.uint8)

    placed = transplant_region(source, region, target, "crack", seed=5)
    assert placed.defect == "crack"
    assert placed.mask.sum() == region.sum()  # the same shape, moved
    x0, y0, x1, y1 = bounding_box(placed.mask)
    assert (x1 - x0, y1 - y0) == (20, 8) and placed.offset == (x0, y0)
    assert placed.image[placed.mask].mean() < 100  # the dark defect came along
    near = np.zeros_like(placed.mask)
    near[max(y0 - 4, 0) : y1 + 4, max(x0 - 4, 0) : x1 + 4] = True
    assert (placed.image[~near] == 128).all()  # beyond the blending ring the target is untouched
    again = transplant_region(source, region, target, "crack", seed=5)
    assert (again.image == placed.image).all() and (again.mask == placed.mask).all()


def _flat_image_with_square_defect(side: int, box: tuple[int, int, int, int], background: int, defect: int):
    """A side x side RGB image of one grey level with a box (top, bottom, left, right) of another: (image, mask)."""
    image = np.full((side, side, 3), background, dtype=np.uint8)
    region = np.zeros((side, side), dtype=bool)
    region[box[0] : box[1], box[2] : box[3]] = True
    image[region] = defect
    return image, region


def test_a_faint_defect_keeps_its_contrast_in_another_image():
    # A blowhole 15 grey levels darker than its surroundings, blended into a much brighter tile, must
    # still be 15 levels darker there (OpenCV's seamlessClone returned the target unchanged for this).
    source, region = _flat_image_with_square_defect(40, (15, 25, 15, 25), background=45, defect=30)
    target = np.full((100, 120, 3), 118, dtype=np.uint8)
    for anchor in (None, True):
        placed = transplant_region(source, region, target, seed=2, anchor=anchor)
        assert abs(float(placed.image[placed.mask].mean()) - 103) <= 1
        assert (placed.image[~placed.mask] == 118).all()  # the surroundings were equal, so nothing else moves


def test_transplant_respects_allowed_area_and_gray_images():
    source = np.full((40, 40), 200, dtype=np.uint8)
    region = np.zeros((40, 40), dtype=bool)
    region[10:16, 10:16] = True
    source[region] = 10
    target = np.full((60, 60), 100, dtype=np.uint8)
    allowed = np.zeros((60, 60), dtype=bool)
    allowed[:, 30:] = True
    placed = transplant_region(source, region, target, seed=1, allowed=allowed)
    assert placed.image.shape == (60, 60)
    assert allowed[placed.mask].all()
    with pytest.raises(ValueError):
        transplant_region(source, region, np.zeros((8, 8), np.uint8))  # too small a canvas


def test_anchored_transplant_keeps_the_borders_the_region_touched():
    from defectclip.data.transplant import region_anchor

    rng = np.random.default_rng(0)
    source = rng.integers(180, 200, (60, 70, 3), dtype=np.uint8)
    edge = np.zeros((60, 70), dtype=bool)
    edge[0:8, 30:50] = True  # a break on the top border, in the middle of it
    source[edge] = 20
    target = np.full((90, 140, 3), 128, dtype=np.uint8)

    anchor = region_anchor(edge)
    assert anchor.touches == ((False, False), (True, False))
    placed = transplant_region(source, edge, target, "break", seed=3, anchor=anchor)
    x0, y0, x1, y1 = bounding_box(placed.mask)
    assert y0 == 0 and (x1 - x0, y1 - y0) == (20, 8)  # flush with the top border, the same shape
    assert abs((x0 + x1) / 2 / 140 - anchor.centre[0]) < 0.02  # at the same relative place along it
    assert placed.image[placed.mask].mean() < 100  # and the dark defect came along

    corner = np.zeros((60, 70), dtype=bool)
    corner[50:60, 62:70] = True  # the bottom-right corner
    placed = transplant_region(source, corner, target, seed=3, anchor=True)
    x0, y0, x1, y1 = bounding_box(placed.mask)
    assert (x1, y1) == (140, 90)

    # The anchored spot taken: the region slides along its border instead of leaving it.
    allowed = np.ones((90, 140), dtype=bool)
    allowed[:, 40:100] = False
    placed = transplant_region(source, edge, target, seed=3, anchor=anchor, allowed=allowed)
    x0, y0, x1, y1 = bounding_box(placed.mask)
    assert y0 == 0 and allowed[placed.mask].all()
    allowed[:12, :] = False  # no room left on the top border at all
    with pytest.raises(ValueError, match="borders"):
        transplant_region(source, edge, target, seed=3, anchor=anchor, allowed=allowed)


def test_anchored_transplant_of_an_inner_region_keeps_its_relative_place():
    source, spot = _flat_image_with_square_defect(100, (70, 76, 20, 26), background=200, defect=10)
    target = np.full((200, 300, 3), 90, dtype=np.uint8)
    placed = transplant_region(source, spot, target, seed=0, anchor=True)
    x0, y0, x1, y1 = bounding_box(placed.mask)
    assert abs((x0 + x1) / 2 - 0.23 * 300) <= 1 and abs((y0 + y1) / 2 - 0.73 * 200) <= 1
    far = np.ones((200, 300), dtype=bool)
    far[y0 - 6 : y1 + 6, x0 - 6 : x1 + 6] = False
    assert (placed.image[far] == 90).all()
