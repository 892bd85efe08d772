"""The describer reads the region: the region view, normal ("no defect") regions, per-object captions and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectclip.alphaclip import AlphaDescriber, region_view, view_window
from defectclip.captions import NO_DEFECT, no_defect_caption
from defectclip.data.regions import clear_area, disk_shape, place_normal_region, sample_normal_regions
from defectclip.errors import DefectclipError, UnknownObjectError
from train.alphaclip_lora import balanced_order, candidate_cross_entropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------- the view


def test_view_is_a_square_crop_around_the_region_with_context_and_a_minimum_side():
    assert view_window((40, 50, 60, 60), context=2.0, min_side=8) == (30, 35, 40)  # 20 px box -> 40 px crop
    assert view_window((10, 10, 13, 12), context=2.0, min_side=48) == (-12, -13, 48)  # a speck still gets 48 px


def test_a_small_region_fills_the_view_instead_of_vanishing():
    image = torch.rand(3, 400, 400)
    mask = torch.zeros(400, 400, dtype=torch.bool)
    mask[200:206, 100:106] = True  # 0.02 % of the image
    views, coverage = region_view(image, mask, (64, 64), min_side=24)
    assert views.shape == (3, 64, 64) and coverage.shape == (64, 64)
    assert 0.04 < coverage.mean() < 0.10  # a 6 px region in a 24 px crop: about 1/16 of the view
    whole = torch.nn.functional.interpolate(mask[None, None].float(), size=(64, 64), mode="area")[0, 0]
    assert coverage.mean() > 50 * whole.mean()


def test_view_does_not_depend_on_how_large_the_rest_of_the_image_is():
    """The region of a small image and the same region inside a 4x larger canvas are seen identically."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 100, 120, generator=generator)
    mask = torch.zeros(100, 120, dtype=torch.bool)
    mask[40:52, 50:58] = True
    canvas = torch.rand(3, 400, 480, generator=generator)
    canvas[:, 200:300, 240:360] = image
    big_mask = torch.zeros(400, 480, dtype=torch.bool)
    big_mask[200:300, 240:360] = mask
    small_view = region_view(image, mask, (48, 48))
    big_view = region_view(canvas, big_mask, (48, 48))
    assert torch.equal(small_view[0], big_view[0]) and torch.equal(small_view[1], big_view[1])


def test_crop_past_the_border_is_zero_outside_the_image():
    image = torch.ones(3, 50, 50)
    mask = torch.zeros(50, 50, dtype=torch.bool)
    mask[0:4, 0:4] = True
    views, coverage = region_view(image, mask, (48, 48), min_side=48)
    assert views[:, :10, :10].max() == 0 and views[:, -5:, -5:].min() == 1  # top-left lies outside the image


def test_describer_answer_depends_on_the_clicked_region():
    """Two regions of one image give two different embeddings: the view is the region's, not the image's."""
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16},
                                     candidates={"widget": ["a scratch on the widget", "a dent in the widget"]})
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))
    image[:, 10:30, 10:30] = 1.0
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 90:110, 90:110] = True
    embeddings = describer.embed_regions(image[None].expand(2, -1, -1, -1), masks)
    assert not torch.allclose(embeddings[0], embeddings[1], atol=1e-3)


def test_flip_average_is_the_mean_of_the_four_flipped_views_and_ignores_a_mirror():
    from defectclip.alphaclip.describer import view_averaged_embeddings

    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16},
                                     flip_average=True)
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 96, 96, generator=generator)
    mask = torch.zeros(96, 96, dtype=torch.bool)
    mask[20:34, 50:58] = True
    pixels, alpha = describer.prepare(image[None], mask[None])
    by_hand = torch.stack([describer.image(pixels.flip(d), alpha.flip(d)) if d else describer.image(pixels, alpha)
                           for d in ((), (-1,), (-2,), (-2, -1))]).mean(0)
    averaged = describer.embed_regions(image[None], mask[None])
    assert torch.allclose(averaged, torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-6)
    assert not torch.allclose(averaged, describer.image(pixels, alpha), atol=1e-4)  # not just the one view
    mirrored = view_averaged_embeddings(describer.image, pixels.flip(-1), alpha.flip(-1))
    assert torch.allclose(mirrored, averaged, atol=1e-5)  # a mirrored region gets the same answer
    describer.config["flip_average"] = False
    assert torch.allclose(describer.embed_regions(image[None], mask[None]), describer.image(pixels, alpha))


def test_quarter_turn_average_takes_all_eight_symmetries_so_a_turned_region_reads_the_same():
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16},
                                     flip_average=True, quarter_turn_average=True)
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 96, 96, generator=generator)
    mask = torch.zeros(96, 96, dtype=torch.bool)
    mask[20:34, 50:58] = True  # not square: its quarter turn is another outline
    pixels, alpha = describer.prepare(image[None], mask[None])
    views = []
    for turns in range(4):
        turned_pixels, turned_alpha = torch.rot90(pixels, turns, (-2, -1)), torch.rot90(alpha, turns, (-2, -1))
        views += [describer.image(turned_pixels, turned_alpha), describer.image(turned_pixels.flip(-1), turned_alpha.flip(-1))]
    by_hand = torch.nn.functional.normalize(torch.stack(views).mean(0), dim=-1)
    averaged = describer.embed_regions(image[None], mask[None])
    assert torch.allclose(averaged, by_hand, atol=1e-6)
    # The same region in the image turned a quarter (and its mask with it) gets the same embedding.
    turned = describer.embed_regions(torch.rot90(image, 1, (-2, -1))[None], torch.rot90(mask, 1, (-2, -1))[None])
    assert torch.allclose(turned, averaged, atol=1e-5)
    describer.config["quarter_turn_average"] = False  # the four flips alone do not see the turned view
    assert not torch.allclose(describer.embed_regions(image[None], mask[None]), averaged, atol=1e-4)


def test_quarter_turn_average_is_saved_and_needs_a_square_input(tmp_path):
    import json

    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, flip_average=True,
                                     quarter_turn_average=True, candidates={"widget": ["a dent in the widget"]})
    describer.save_pretrained(tmp_path / "d")
    assert AlphaDescriber.from_pretrained(tmp_path / "d").quarter_turn_average
    config_path = tmp_path / "d" / "describer_config.json"
    config = json.loads(config_path.read_text())
    config["preprocess"]["size"] = [32, 48]
    config_path.write_text(json.dumps(config))
    with pytest.raises(DefectclipError, match="quarter_turn_average.*square"):
        AlphaDescriber.from_pretrained(tmp_path / "d")
    del config["quarter_turn_average"]  # describers saved before it existed average the flips alone
    config_path.write_text(json.dumps(config))
    assert not AlphaDescriber.from_pretrained(tmp_path / "d").quarter_turn_average


def test_flip_average_is_saved_and_checked(tmp_path):
    import json

    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, flip_average=True,
                                     candidates={"widget": ["a dent in the widget"]})
    describer.save_pretrained(tmp_path / "d")
    assert AlphaDescriber.from_pretrained(tmp_path / "d").flip_average
    config_path = tmp_path / "d" / "describer_config.json"
    config = json.loads(config_path.read_text())
    del config["flip_average"]  # describers saved before it existed embed one view
    config_path.write_text(json.dumps(config))
    assert not AlphaDescriber.from_pretrained(tmp_path / "d").flip_average
    config["flip_average"] = "yes"
    config_path.write_text(json.dumps(config))
    with pytest.raises(DefectclipError, match="flip_average"):
        AlphaDescriber.from_pretrained(tmp_path / "d")


# ------------------------------------------------------------------------------------------- captions


def test_unknown_object_raises_a_clear_error_instead_of_other_captions():
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32,
                                     candidates={"magnetic tile": ["a crack in the magnetic tile", no_defect_caption("magnetic tile")]},
                                     no_defect={"magnetic tile": no_defect_caption("magnetic tile")})
    with pytest.raises(UnknownObjectError, match="steel strip.*magnetic tile") as caught:
        describer.candidates_for("steel strip")
    assert isinstance(caught.value, DefectclipError)
    assert describer.no_defect_caption("magnetic tile").startswith(NO_DEFECT)
    assert describer.no_defect_caption("steel strip") is None


def test_saved_view_and_no_defect_round_trip_and_are_checked(tmp_path):
    caption = no_defect_caption("widget")
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16},
                                     candidates={"widget": ["a dent in the widget", caption]}, no_defect={"widget": caption})
    describer.save_pretrained(tmp_path / "d")
    loaded = AlphaDescriber.from_pretrained(tmp_path / "d")
    assert loaded.view == {"context": 2.0, "min_side": 16} and loaded.no_defect_caption("widget") == caption
    image, mask = torch.rand(3, 64, 64), torch.zeros(64, 64, dtype=torch.bool)
    mask[5:9, 40:50] = True
    assert torch.allclose(loaded.embed_regions(image[None], mask[None]), describer.embed_regions(image[None], mask[None]))

    import json

    config_path = tmp_path / "d" / "describer_config.json"
    config = json.loads(config_path.read_text())
    config["no_defect"] = {"widget": "a caption that is not a candidate"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(DefectclipError, match="no_defect"):
        AlphaDescriber.from_pretrained(tmp_path / "d")


# ------------------------------------------------------------------------------------------- normal regions


def test_normal_regions_keep_clear_of_every_defect():
    defects = np.zeros((100, 100), bool)
    defects[40:60, 40:60] = True
    rng = np.random.default_rng(0)
    regions = sample_normal_regions(defects, [disk_shape(5), np.ones((3, 12), bool)], 20, rng)
    assert len(regions) == 20
    allowed = clear_area(defects)
    for region in regions:
        assert region.any() and allowed[region].all()


def test_no_place_for_a_normal_region_gives_none():
    defects = np.ones((30, 30), bool)
    assert place_normal_region(defects, disk_shape(3), np.random.default_rng(0)) is None
    assert place_normal_region(np.zeros((10, 10), bool), np.ones((12, 4), bool), np.random.default_rng(0)) is None


# ------------------------------------------------------------------------------------------- training


def test_candidate_loss_ranks_only_the_regions_own_object():
    """Another object's caption, however close, never competes: the loss equals CE over the own object's captions."""
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    caption_object = torch.tensor([0, 0, 0, 1, 1])
    image = torch.stack([text[1], text[3]])  # region 0 of object 0 (caption 1), region 1 of object 1 (caption 3)
    image[0] = torch.nn.functional.normalize(image[0] + 5 * text[4], dim=-1)  # very close to another object's caption
    labels = torch.tensor([1, 3])
    loss = candidate_cross_entropy(image, text, labels, caption_object, 0.1)
    own = [torch.nn.functional.cross_entropy((image[i] @ text[caption_object == caption_object[labels[i]]].T / 0.1)[None],
                                             torch.tensor([int(labels[i]) - (0 if caption_object[labels[i]] == 0 else 3)]))
           for i in range(2)]
    assert loss == pytest.approx(float(torch.stack(own).mean()), rel=1e-5)


def test_balanced_order_repeats_the_smaller_object():
    objects = ["steel strip"] * 16 + ["magnetic tile"] * 1
    order = balanced_order(objects, 1.0)
    assert order.count(16) == 16 and len(order) == 32
    assert balanced_order(objects, 0.0) == list(range(17))
    assert balanced_order(objects, 0.5).count(16) == 4


# ------------------------------------------------------------------------------------------- training augmentations


def test_blended_regions_land_away_from_every_other_region():
    from defectclip.data.regions import clear_area
    from defectclip.data.transplant import blend_regions_into

    rng = np.random.default_rng(0)
    canvas = rng.integers(90, 110, (120, 120, 3)).astype(np.uint8)
    own = np.zeros((120, 120), bool)
    own[10:20, 10:20] = True
    source = rng.integers(90, 110, (60, 60, 3)).astype(np.uint8)
    source[20:30, 20:40] = 250
    donor = np.zeros((60, 60), bool)
    donor[20:30, 20:40] = True
    image, masks, labels = blend_regions_into(canvas, [own], ["own"], [(source, donor, "a"), (source, donor, "b")], rng)
    assert labels == ["own", "a", "b"] and len(masks) == 3
    assert masks[1].sum() == donor.sum() and image[masks[1]].mean() > 130  # the bright donor came along (canvas: 90-110)
    assert clear_area(masks[0])[masks[1]].all() and clear_area(masks[0] | masks[1])[masks[2]].all()
    far = clear_area(masks[1] | masks[2], 10)
    assert np.array_equal(image[far], canvas[far])  # nothing but the blends changed


def test_mixed_copies_keep_a_border_defect_on_its_border():
    from defectclip.data.regions import bounding_box
    from defectclip.region_dataset import MixAugmenter, RegionRecord

    rng = np.random.default_rng(1)

    def record(defect: str, box: tuple[slice, slice]) -> RegionRecord:
        image = torch.from_numpy(rng.uniform(0.4, 0.6, (3, 80, 100))).float()
        mask = np.zeros((1, 80, 100), bool)
        mask[(0, *box)] = True
        image[:, box[0], box[1]] = 0.05
        return RegionRecord(image, "tile", mask, [defect], [f"a {defect} in the tile"])

    augmenter = MixAugmenter(seed=0)  # anchored by default
    augmenter.add(record("break", (slice(0, 10), slice(40, 60))))  # on the top border
    image, masks, labels = augmenter.mixed(record("blowhole", (slice(50, 58), slice(20, 28))))
    assert [caption for caption, _ in labels] == ["a blowhole in the tile", "a break in the tile"]
    x0, y0, x1, y1 = bounding_box(masks[1])
    assert y0 == 0 and (x1 - x0, y1 - y0) == (20, 10)  # still on the top border, whole
    assert float(image[:, masks[1]].mean()) < 0.2  # the dark break came along
    with pytest.raises(ValueError, match="placement"):
        MixAugmenter(placement="middle")


def test_loose_regions_cover_the_defect_they_copy():
    from defectclip.region_dataset import loose_region

    mask = np.zeros((100, 100), bool)
    mask[40:50, 30:70] = True
    rng = np.random.default_rng(3)
    for _ in range(10):
        loose = loose_region(mask, rng)
        assert (loose & mask).any()  # a click disk on it, or the mask grown: never off the defect
        assert loose.sum() >= min(mask.sum(), np.pi * 8**2 * 0.9)


def test_each_loose_copy_gets_a_normal_twin_of_its_outline_on_clean_surface():
    from defectclip.data.regions import crop_to_box
    from defectclip.region_dataset import loose_region, normal_twins

    defects = np.zeros((1, 240, 240), bool)  # room enough for a twin of every copy
    defects[0, 110:120, 110:130] = True
    rng = np.random.default_rng(4)
    copies = [loose_region(defects[0], rng) for _ in range(6)]
    twins = normal_twins(np.concatenate([defects, np.stack(copies)]), copies, rng)
    assert len(twins) == len(copies)
    clear = clear_area(defects[0] | np.stack(copies).any(axis=0))
    for copy, twin in zip(copies, twins):
        assert np.array_equal(crop_to_box(twin), crop_to_box(copy))  # the same outline, elsewhere
        assert clear[twin].all()  # on normal surface, away from the defect and every loose copy
    crowded = np.ones((1, 240, 240), bool)
    assert normal_twins(crowded, copies, rng) == []  # nowhere clear: no twin rather than one on a defect


def test_loose_twins_need_loose_copies(tmp_path):
    from train.alphaclip_lora import parse_args

    with pytest.raises(SystemExit, match="--loose-twins"):
        parse_args(["--dataset", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--loose-twins"])


def test_mixed_copies_are_one_for_all_datasets_or_one_per_dataset(tmp_path):
    from train.alphaclip_lora import mixed_copies_of, parse_args, training_record

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    base = ["--dataset", str(small), str(large), "--output-dir", str(tmp_path / "out"), "--mixed"]
    each = parse_args([*base, "--mixed-copies", "4", "2"])
    assert [mixed_copies_of(each, 0), mixed_copies_of(each, 1)] == [4, 2]
    assert training_record(each)["mixed_copies"] == [4, 2]
    shared = parse_args([*base, "--mixed-copies", "3"])
    assert [mixed_copies_of(shared, 0), mixed_copies_of(shared, 1)] == [3, 3]
    assert training_record(shared)["mixed_copies"] == 3  # as describers trained before recorded it
    assert mixed_copies_of(parse_args(base[:-1] + ["--mixed-copies", "4", "2"]), 0) == 0  # no --mixed, no copies
    with pytest.raises(SystemExit, match="one per --dataset \\(2\\), got 3"):
        parse_args([*base, "--mixed-copies", "4", "2", "1"])
    with pytest.raises(SystemExit, match="at least 1"):
        parse_args([*base, "--mixed-copies", "0", "2"])


# ------------------------------------------------------------------------------------------- augmentation


def test_quarter_turns_move_image_and_mask_together():
    from train.alphaclip_lora import random_quarter_turns

    pixels, alpha = torch.zeros(6, 3, 8, 8), torch.zeros(6, 1, 8, 8)
    pixels[:, :, 1, 6] = 1.0  # a defect pixel near the top right corner, marked in both
    alpha[:, :, 1, 6] = 1.0
    turned, turned_alpha = random_quarter_turns(pixels, alpha, 1.0, torch.Generator().manual_seed(3))
    for view, mask in zip(turned, turned_alpha):
        spot = torch.nonzero(mask[0]).tolist()
        assert spot in ([[1, 1]], [[6, 6]])  # a quarter turn either way, never left in place
        assert torch.nonzero(view[0]).tolist() == spot
    unturned, _ = random_quarter_turns(pixels, alpha, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(unturned, pixels)


def test_quarter_turn_average_is_opt_in_and_needs_turned_training_views(tmp_path):
    from train.alphaclip_lora import parse_args

    base = ["--dataset", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    assert parse_args(base + ["--rot90-prob", "0.5"]).quarter_turn_average is False
    assert parse_args(base + ["--rot90-prob", "0.5", "--quarter-turn-average"]).quarter_turn_average is True
    with pytest.raises(SystemExit, match="--rot90-prob"):  # it would average views it never saw
        parse_args(base + ["--quarter-turn-average"])


def test_quarter_turns_refuse_views_that_are_not_square():
    from train.alphaclip_lora import random_quarter_turns

    with pytest.raises(SystemExit, match="square"):
        random_quarter_turns(torch.zeros(2, 3, 8, 10), torch.zeros(2, 1, 8, 10), 0.5, torch.Generator())


def test_photometric_jitter_changes_contrast_and_brightness_within_range():
    from train.alphaclip_lora import random_photometric

    views = torch.linspace(0.3, 0.7, 16).repeat(32, 3, 16, 1)  # 32 views of one gentle ramp
    changed = random_photometric(views, 0.3, torch.Generator().manual_seed(0))
    assert changed.min() >= 0.0 and changed.max() <= 1.0
    spread = changed.amax(dim=(1, 2, 3)) - changed.amin(dim=(1, 2, 3))
    assert 0.4 * 0.7 - 1e-6 <= spread.min() and spread.max() <= 0.4 * 1.3 + 1e-6
    assert spread.max() - spread.min() > 0.1  # the views differ from each other
    shift = changed.mean(dim=(1, 2, 3)) - 0.5
    assert shift.abs().max() <= 0.15 + 1e-6 and shift.abs().max() > 0.05
    assert torch.equal(random_photometric(views, 0.0, torch.Generator()), views)


def test_augmentation_settings_out_of_range_are_refused(tmp_path):
    from train.alphaclip_lora import parse_args

    for flag, value in (("--photometric", "1.5"), ("--rot90-prob", "2")):
        with pytest.raises(SystemExit, match=flag):
            parse_args(["--dataset", str(tmp_path), "--output-dir", str(tmp_path / "out"), flag, value])

