"""Input plans: windows that cover every pixel, stitched maps at full resolution, small defects on
large images found by tiles, plans saved with the model, and clear errors for bad plans."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import textured_image, write_mvtec_category
from defectclip.data import DataError, MVTecDataset, array_to_tensor
from defectclip.scoring import MAX_IMAGE_PIXELS, FeatureScorer, InputPlan, PaDiM, PatchCore, ScoringError, parse_plan
from defectclip.scoring.plan import Box, stitch, tile_starts

LARGE = (192, 256)  # rows, columns
SPOT = (slice(120, 126), slice(70, 76))  # a 6 x 6 px defect: 0.07 % of the large image


@pytest.fixture(scope="module")
def large_normals():
    rng = np.random.default_rng(1)
    return [array_to_tensor(textured_image(rng, LARGE)) for _ in range(5)]


@pytest.fixture(scope="module")
def large_test():
    """(held-out normal, the same kind of image with a small bright spot) at 192 x 256 px."""
    rng = np.random.default_rng(2)
    normal = textured_image(rng, LARGE)
    spotted = textured_image(rng, LARGE)
    spotted[SPOT] = 255
    return array_to_tensor(normal), array_to_tensor(spotted)


# --------------------------------------------------------------------------------------------------
# windows and stitching


@pytest.mark.parametrize("length, tile, overlap", [(256, 64, 16), (1000, 256, 32), (300, 256, 0), (65, 64, 8)])
def test_windows_cover_the_axis_overlap_as_asked_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    gaps = np.diff(starts)
    assert (gaps <= tile - overlap).all() and (gaps > 0).all()  # neighbours overlap by >= overlap, no gaps


def test_an_image_no_larger_than_a_tile_is_one_window():
    assert InputPlan("tiles", 256, 32).windows(200, 180) == [Box(0, 0, 200, 180)]
    assert InputPlan().windows(5000, 4000) == [Box(0, 0, 5000, 4000)]


def test_every_pixel_lies_in_a_window():
    covered = np.zeros((700, 1030), dtype=int)
    for box in InputPlan("tiles", 256, 32).windows(700, 1030):
        assert box.size == (256, 256)
        covered[box.top : box.bottom, box.left : box.right] += 1
    assert covered.min() >= 1


def test_stitching_averages_overlapping_windows_at_full_size():
    boxes = [Box(0, 0, 4, 4), Box(0, 2, 4, 6)]
    stitched = stitch([np.full((4, 4), 1.0, np.float32), np.full((4, 4), 3.0, np.float32)], boxes, (4, 6))
    assert stitched.shape == (4, 6)
    assert np.allclose(stitched[:, :2], 1.0) and np.allclose(stitched[:, 2:4], 2.0) and np.allclose(stitched[:, 4:], 3.0)


@pytest.mark.parametrize("spec, expected", [
    ("resize", InputPlan()), (None, InputPlan()), ("tiles:256", InputPlan("tiles", 256, 32)),
    ("tiles:128:0", InputPlan("tiles", 128, 0)), ({"mode": "tiles", "tile": 64, "overlap": 8}, InputPlan("tiles", 64, 8)),
])
def test_plans_parse_from_strings_and_saved_dicts(spec, expected):
    assert parse_plan(spec) == expected
    assert parse_plan(expected.to_dict()) == expected


@pytest.mark.parametrize("spec, words", [
    ("tiles:64:64", "overlap"), ("tiles:0", "positive tile"), ("tiles:big", "whole pixels"),
    ("mosaic", "Cannot read input plan"), ({"mode": "tiles", "tile": 64, "stride": 8}, "Unknown input-plan keys"),
])
def test_a_bad_plan_says_what_is_wrong(spec, words):
    with pytest.raises(ScoringError, match=words):
        parse_plan(spec)


def test_an_image_above_the_pixel_limit_is_refused_with_the_limit_named():
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    with pytest.raises(ScoringError, match=r"40 MP limit; crop it"):
        InputPlan("tiles", 256, 32).windows(side, side)


# --------------------------------------------------------------------------------------------------
# scoring with tiles


def separation(model, large_test) -> float:
    """Defect score over the held-out normal score."""
    normal, spotted = model.predict(list(large_test))
    return spotted.score / normal.score


def test_tiles_find_a_small_spot_on_a_large_image_that_resizing_blurs_away(tiny_cnn, large_normals, large_test):
    tiled = PatchCore(tiny_cnn, plan="tiles:64:16", coreset_ratio=1.0, device="cpu").fit(large_normals)
    resized = PatchCore(tiny_cnn, image_size=64, coreset_ratio=1.0, device="cpu").fit(large_normals)
    normal, spotted = tiled.predict(list(large_test))
    assert spotted.anomaly_map.shape == LARGE and normal.anomaly_map.shape == LARGE
    row, col = np.unravel_index(np.argmax(spotted.anomaly_map), LARGE)
    assert SPOT[0].start - 4 <= row < SPOT[0].stop + 4 and SPOT[1].start - 4 <= col < SPOT[1].stop + 4
    assert separation(tiled, large_test) > 1.3
    assert separation(tiled, large_test) > separation(resized, large_test) + 0.2


def test_tiles_are_scored_at_native_resolution_unless_an_image_size_is_given(tiny_cnn):
    assert PatchCore(tiny_cnn, plan="tiles:64:16", device="cpu").preprocess.size == (64, 64)
    assert PatchCore(tiny_cnn, plan="tiles:64:16", image_size=32, device="cpu").preprocess.size == (32, 32)


def test_padim_shares_its_statistics_over_tiles(tiny_cnn, large_normals, large_test):
    model = PaDiM(tiny_cnn, plan=InputPlan("tiles", 64, 16), device="cpu").fit(large_normals)
    normal, spotted = model.predict(list(large_test))
    assert spotted.anomaly_map.shape == LARGE
    assert spotted.score > normal.score


def test_features_embedded_once_give_the_same_results_as_fit_and_predict(tiny_cnn, large_normals, large_test):
    direct = PatchCore(tiny_cnn, plan="tiles:64:16", coreset_ratio=0.05, device="cpu").fit(large_normals)
    reused = PatchCore(tiny_cnn, plan="tiles:64:16", coreset_ratio=0.05, device="cpu")
    train = list(reused.embed(large_normals, exact=True))  # fit() learns from the exact tower
    reused.fit_embedded(train, len(large_normals))
    expected = direct.predict(list(large_test))
    got = reused.predict_embedded(reused.embed(list(large_test)))
    assert reused.num_train_images == len(large_normals)
    for a, b in zip(expected, got):
        assert a.score == pytest.approx(b.score) and np.allclose(a.anomaly_map, b.anomaly_map)


def test_images_of_mixed_sizes_each_get_a_map_of_their_own_size(tiny_cnn, large_normals):
    model = PatchCore(tiny_cnn, plan="tiles:64:16", coreset_ratio=1.0, device="cpu", batch_size=4)
    model.fit(large_normals[:2])
    rng = np.random.default_rng(3)
    images = [array_to_tensor(textured_image(rng, size)) for size in [(48, 64), (192, 256), (100, 70)]]
    assert [r.anomaly_map.shape for r in model.predict(images)] == [(48, 64), (192, 256), (100, 70)]


# --------------------------------------------------------------------------------------------------
# saved with the model


def test_the_plan_is_saved_and_a_loaded_model_tiles_the_same_way(tmp_path, tiny_cnn, large_normals, large_test):
    model = PatchCore(tiny_cnn, plan="tiles:64:16", coreset_ratio=0.05, device="cpu").fit(large_normals)
    model.save_pretrained(tmp_path / "tiled")
    config = json.loads((tmp_path / "tiled" / "config.json").read_text())
    assert config["plan"] == {"mode": "tiles", "tile": 64, "overlap": 16}
    loaded = FeatureScorer.from_pretrained(tmp_path / "tiled")
    assert loaded.plan == InputPlan("tiles", 64, 16)
    for a, b in zip(model.predict(list(large_test)), loaded.predict(list(large_test))):
        assert a.score == pytest.approx(b.score, rel=1e-5)


def test_a_folder_saved_before_plans_existed_loads_as_resize(tmp_path, tiny_cnn, large_normals):
    PaDiM(tiny_cnn, device="cpu").fit(large_normals[:3]).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    del config["plan"]
    path.write_text(json.dumps(config))
    assert FeatureScorer.from_pretrained(tmp_path / "old").plan == InputPlan()


# --------------------------------------------------------------------------------------------------
# data sets with image labels only


def test_a_test_set_without_masks_is_read_with_image_labels_only(tmp_path):
    category = write_mvtec_category(tmp_path)
    shutil.rmtree(category / "ground_truth")
    with pytest.raises(DataError, match="require_masks=False"):
        MVTecDataset(tmp_path, "test")
    test = MVTecDataset(tmp_path, "test", require_masks=False)
    assert not test.has_all_masks
    assert sorted(test.labels) == [0, 0, 1, 1]
    assert not bool(test[test.labels.index(1)].mask.any())


def load_eval_backbones():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_backbones.py"
    spec = importlib.util.spec_from_file_location("eval_backbones", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_eval_backbones_reports_image_metrics_for_a_set_without_masks(tmp_path):
    category = write_mvtec_category(tmp_path / "data", n_train=4, n_good_test=3)
    shutil.rmtree(category / "ground_truth")
    threads = torch.get_num_threads()
    try:
        report = load_eval_backbones().main([
            "--data", str(category), "--towers", "tiny:cnn", "--methods", "patchcore", "padim",
            "--seeds", "0", "1", "--image-size", "32", "--coreset-ratio", "0.5", "--device", "cpu",
            "--out", str(tmp_path / "out" / "eval"),
        ])
    finally:
        torch.set_num_threads(threads)
    assert len(report["runs"]) == 4
    for run in report["runs"]:
        assert 0.0 <= run["image_auroc"] <= 1.0
        assert run["pixel_auroc"] is None and run["aupro"] is None
    assert "image_auroc" in report["summary"]["patchcore"]["tiny:cnn"]["mean"]
    assert "pixel_auroc" not in report["summary"]["patchcore"]["tiny:cnn"]["mean"]
    headline = report["results"]["padim"]["tiny:cnn"]
    assert 0.0 <= headline["image_auroc"] <= 1.0 and headline["pixel_auroc"] is None and headline["aupro"] is None
    assert "n/a (no masks)" in (tmp_path / "out" / "eval.md").read_text()
    assert report["wall_s"] > 0


def test_eval_backbones_breaks_the_numbers_down_by_defect_type(tmp_path):
    category = write_mvtec_category(tmp_path / "data", n_train=4, n_good_test=3, defects=("scratch", "stain"))
    threads = torch.get_num_threads()
    try:
        report = load_eval_backbones().main([
            "--data", str(category), "--towers", "tiny:cnn", "--methods", "patchcore", "--seeds", "0", "1",
            "--image-size", "32", "--coreset-ratio", "0.5", "--device", "cpu", "--out", str(tmp_path / "out" / "eval"),
        ])
    finally:
        torch.set_num_threads(threads)
    for run in report["runs"]:
        assert set(run["by_defect"]) == {"scratch", "stain"}
        assert all(cell["images"] == 2 and 0.0 <= cell["pixel_auroc"] <= 1.0 for cell in run["by_defect"].values())
    cell = report["by_defect_type"]["patchcore"]["tiny:cnn"]["widget"]["stain"]
    stain_runs = [run["by_defect"]["stain"]["image_auroc"] for run in report["runs"]]
    assert cell["images"] == 2 and cell["image_auroc"][0] == pytest.approx(sum(stain_runs) / len(stain_runs))
    text = (tmp_path / "out" / "eval.md").read_text()
    assert "per defect type" in text and "| stain | 2 |" in text
