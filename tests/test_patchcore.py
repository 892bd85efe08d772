"""PatchCore: detection on a pasted blob, exact coreset and nearest-neighbour search, thresholds,
save/load round trips and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BLOB, save_png, textured_image, write_mvtec_category
from defectclip.data import DataError, open_dataset
from defectclip.scoring import FeatureScorer, PatchCore, ScoringError, calibrate_threshold, native
from defectclip.scoring.features import measure_centre_offset
from defectclip.scoring.maps import gaussian_blur, interpolation_matrix, patch_scores_to_maps
from defectclip.scoring.patchcore import (
    CANDIDATES_PER_ENTRY,
    CHUNK_POINTS,
    CPU_BATCH_SIZE,
    LOW_BANK_CHUNK,
    LOW_ROW_ALIGN,
    bf16_bank,
    coreset_size,
    greedy_k_center,
    nearest_distances_bf16,
    nearest_neighbours,
    select_coreset,
)


@pytest.fixture(scope="module")
def fitted(tiny_cnn, normal_images):
    return PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu").fit(normal_images)


def inside_blob(anomaly_map: np.ndarray, margin: int = 2) -> bool:
    row, col = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
    rows, cols = BLOB
    return rows.start - margin <= row < rows.stop + margin and cols.start - margin <= col < cols.stop + margin


# --------------------------------------------------------------------------------------------------
# detection


@pytest.mark.parametrize("spec, size", [("tiny:cnn", None), ("offline:efficientnet_lite0", 64)])
def test_a_pasted_blob_scores_higher_and_the_map_peaks_inside_it(spec, size, normal_images, blob_image):
    model = PatchCore(spec, image_size=size, coreset_ratio=0.5, device="cpu").fit(normal_images[:5])
    held_out_normal, defect = model.predict([normal_images[5], blob_image])
    assert defect.score > 1.5 * held_out_normal.score
    assert defect.anomaly_map.shape == (48, 64) and defect.anomaly_map.dtype == np.float32
    assert inside_blob(defect.anomaly_map)
    assert defect.score == pytest.approx(float(defect.anomaly_map.max()))


def test_default_layers_are_the_stride_8_and_16_stages(tiny_cnn):
    assert PatchCore(tiny_cnn, device="cpu").layers == ["layer2", "layer3"]
    assert PatchCore("offline:efficientnet_lite0", device="cpu").layers == ["blocks.2", "blocks.4"]


def test_fit_and_predict_take_a_dataset(tiny_cnn, tmp_path):
    root = write_mvtec_category(tmp_path / "mvtec", "widget", n_train=4)
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu").fit(open_dataset(root, "train"))
    test = open_dataset(root, "test")
    results = model.predict(test)
    scores = np.array([r.score for r in results])
    labels = np.array(test.labels)
    assert scores[labels == 1].min() > scores[labels == 0].max()
    assert model.num_train_images == 4


def test_reweighted_score_keeps_the_ranking(tiny_cnn, normal_images, blob_image):
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, reweight=True, num_neighbors=3, device="cpu").fit(normal_images[:5])
    normal, defect = model.predict([normal_images[5], blob_image])
    assert defect.score > normal.score > 0
    # The paper's weight lies in (0, 1), so the reweighted score sits below the largest patch distance.
    assert defect.score < float(defect.anomaly_map.max()) * 10


def test_gaussian_blur_keeps_mass_and_flattens_a_spike():
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    blurred = gaussian_blur(spike, 4.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(blurred.max()) == pytest.approx(1 / (2 * np.pi * 16), rel=0.02)


def test_without_an_offset_maps_follow_the_plain_resize_convention():
    scores = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(0))
    maps = patch_scores_to_maps(scores, (48, 64), [(48, 64)] * 2, sigma=0.0)
    resized = torch.nn.functional.interpolate(scores[:, None], size=(48, 64), mode="bilinear", align_corners=False)
    for ours, reference in zip(maps, resized[:, 0]):
        np.testing.assert_allclose(ours, reference.numpy(), atol=1e-6)


def test_each_patch_score_lands_on_its_centre():
    scores = torch.zeros(1, 6, 8)
    scores[0, 2, 5] = 1.0
    (shifted,) = patch_scores_to_maps(scores, (48, 64), [(48, 64)], sigma=0.0, centre_offset=(-3.0, 2.0))
    assert np.unravel_index(np.argmax(shifted), shifted.shape) == (8 * 2 - 3, 8 * 5 + 2)
    assert shifted.max() == pytest.approx(1.0)


@pytest.mark.parametrize("size, grid, sigma", [((224, 224), (28, 28), 4.0), ((48, 64), (6, 8), 4.0), ((20, 24), (5, 6), 4.0)])
def test_maps_equal_blurring_the_interpolated_patch_scores(size, grid, sigma):
    # The blur is folded into the interpolation matrices; the map must be what interpolating and
    # then blurring gives (the 20 x 24 case is smaller than the kernel's reach: edge replication).
    scores = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1)) * 30
    offset = (-9.7, -8.0)
    rows, cols = interpolation_matrix(size[0], grid[0], offset[0]), interpolation_matrix(size[1], grid[1], offset[1])
    expected = gaussian_blur(rows @ scores @ cols.T, sigma)
    maps = patch_scores_to_maps(scores, size, [size] * 3, sigma, offset)
    for ours, reference in zip(maps, expected):
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pad, expected", [(0, 3.5), (4, -0.5)])
def test_measured_centre_of_a_strided_conv_is_where_its_window_sits(pad, expected):
    # An 8 x 8, stride-8 window over the input padded by `pad` on the top and left sees pixels
    # [8 i - pad, 8 i - pad + 8): its centre is 8 i + 3.5 - pad.
    conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0)

    def embed(x):
        return conv(torch.nn.functional.pad(x, (pad, 0, pad, 0))[..., : x.shape[-2], : x.shape[-1]])

    dy, dx = measure_centre_offset(embed, (48, 64), torch.device("cpu"))
    assert dy == pytest.approx(expected, abs=1e-4) and dx == pytest.approx(expected, abs=1e-4)


def test_the_measured_centre_of_a_padded_cnn_differs_from_the_resize_convention(tiny_cnn, monkeypatch):
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu")
    dy, dx = model.features.centre_offset()
    stride = 8  # the finest default stage
    assert abs(dy - (stride - 1) / 2) > 1 and abs(dx - (stride - 1) / 2) > 1
    # A second scorer on the same tower (few-shot builds many) reuses the measurement.
    import defectclip.scoring.features as features

    monkeypatch.setattr(features, "measure_centre_offset", lambda *args: pytest.fail("measured twice"))
    assert PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu").features.centre_offset() == (dy, dx)


# --------------------------------------------------------------------------------------------------
# coreset and nearest neighbours


def plain_greedy(points: torch.Tensor, count: int, start: int) -> list[int]:
    """Textbook k-center greedy: every point's distance is updated at every step."""
    chosen = [start]
    min_dist = torch.cdist(points, points[start : start + 1])[:, 0]
    for _ in range(count - 1):
        chosen.append(int(torch.argmax(min_dist)))
        min_dist = torch.minimum(min_dist, torch.cdist(points, points[chosen[-1] : chosen[-1] + 1])[:, 0])
    return chosen


def clustered_points(seed=0, n=3000, dim=16):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(20, dim, generator=generator) * 4
    labels = torch.randint(0, 20, (n,), generator=generator)
    return centers[labels] + torch.randn(n, dim, generator=generator)


def test_coreset_picks_the_requested_count_and_covers_every_point():
    points = clustered_points()
    coreset = greedy_k_center(points, 150, start=7)
    assert coreset.indices.shape == (150,) and len(set(coreset.indices.tolist())) == 150
    farthest = torch.cdist(points, points[coreset.indices]).min(dim=1).values.max()
    assert float(farthest) <= coreset.radius * (1 + 1e-4)
    assert float(farthest) == pytest.approx(coreset.radius, rel=1e-4)


def test_greedy_selects_the_same_points_as_the_textbook_version():
    points = clustered_points(seed=1, n=1500)
    assert greedy_k_center(points, 60, start=3).indices.tolist() == plain_greedy(points, 60, 3)


def test_select_coreset_uses_the_ratio_and_is_seeded():
    features = clustered_points(n=1000, dim=200)
    first = select_coreset(features, 0.1, projection_dim=32, seed=5)
    assert first.indices.numel() == 100
    assert torch.equal(first.indices, select_coreset(features, 0.1, projection_dim=32, seed=5).indices)
    assert not torch.equal(first.indices, select_coreset(features, 0.1, projection_dim=32, seed=6).indices)
    assert select_coreset(features, 1.0).indices.tolist() == list(range(1000))
    with pytest.raises(ScoringError, match="coreset_ratio"):
        select_coreset(features, 0.0)


@pytest.mark.parametrize("k", [1, 4])
def test_chunked_nearest_neighbours_equal_brute_force(k):
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 24, generator=generator), torch.randn(1100, 24, generator=generator) * 1.5
    distances, indices = nearest_neighbours(queries, bank, k=k, bank_chunk=100, block_elements=6400)  # 64 queries a block
    expected_dist, expected_idx = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    torch.testing.assert_close(distances, expected_dist, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected_idx)


def test_the_bank_size_is_the_ratio_capped_at_the_maximum():
    assert coreset_size(497_840, 0.1, 5000) == 5000
    assert coreset_size(497_840, 0.1, None) == 49_784
    assert coreset_size(30_000, 0.1, 5000) == 3000
    assert coreset_size(5, 0.01, 5000) == 1
    with pytest.raises(ScoringError, match="max_bank_size"):
        coreset_size(100, 0.1, 0)


def test_two_stage_selection_covers_every_point_almost_as_well_as_one_stage():
    # Enough points for the chunked stage (more than CANDIDATES_PER_ENTRY x 2 x count, several chunks);
    # 16 dimensions are below both projection sizes, so every distance is exact and the reported
    # radius (chunk radius + final radius) must bound the true covering radius.
    points = clustered_points(seed=3, n=3 * CHUNK_POINTS, dim=16)
    count = 150
    assert points.shape[0] > 2 * CANDIDATES_PER_ENTRY * count
    two_stage = select_coreset(points, 1.0, seed=0, max_size=count)
    assert two_stage.indices.numel() == count and len(set(two_stage.indices.tolist())) == count
    covering = float(torch.cdist(points, points[two_stage.indices]).min(dim=1).values.max())
    assert covering <= two_stage.radius * (1 + 1e-4)
    one_stage = greedy_k_center(points, count, start=0)
    # Greedy k-center is a 2-approximation, so neither can be far from the other; measured ~1.05x.
    assert covering <= 1.25 * one_stage.radius
    assert torch.equal(two_stage.indices, select_coreset(points, 1.0, seed=0, max_size=count).indices)


def realistic_features(n: int, seed: int) -> torch.Tensor:
    """Non-negative, correlated 152-d vectors with norms like ImageNet CNN patch features (~45)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, 152, generator=generator)
    return (torch.randn(n, 16, generator=generator) @ basis + 2.5).clamp_min(0) + 0.3 * torch.rand(n, 152, generator=generator)


def test_bf16_distances_stay_within_half_a_percent_of_exact():
    bank, queries = realistic_features(3000, 0), realistic_features(1500, 1)
    exact = nearest_neighbours(queries, bank)[0][:, 0]
    fast = nearest_distances_bf16(queries, bf16_bank(bank))
    relative = (fast - exact).abs() / exact
    assert float(relative.mean()) < 2e-3 and float(relative.max()) < 5e-3
    # Ties and zero distances: a query equal to a bank row is at distance ~0, never NaN.
    assert float(nearest_distances_bf16(bank[:5], bf16_bank(bank)).max()) < 0.05 * float(exact.median())
    with pytest.raises(ScoringError, match="empty"):
        nearest_distances_bf16(queries, bf16_bank(bank[:0]))


def test_bf16_search_pads_ragged_widths_and_merges_bank_blocks():
    # 37 features: rows are padded with zero columns to the 32-wide AMX tiles, and a bank longer than
    # one block is searched block by block; neither may change a distance.
    generator = torch.Generator().manual_seed(3)
    bank = torch.rand(LOW_BANK_CHUNK + 500, 37, generator=generator) * 4
    queries = torch.rand(300, 37, generator=generator) * 4
    prepared = bf16_bank(bank)
    assert prepared.shape[1] % LOW_ROW_ALIGN == 0 and prepared.shape[1] >= 37 + 4
    exact = nearest_neighbours(queries, bank)[0][:, 0]
    fast = nearest_distances_bf16(queries, prepared)
    assert float(((fast - exact).abs() / exact).max()) < 1e-2
    # The nearest row may sit in the last block only.
    planted = torch.cat([bank, queries[:1]])
    assert float(nearest_distances_bf16(queries[:1], bf16_bank(planted))) < 0.05 * float(exact.median())


@pytest.mark.parametrize("search", ["bf16", "amx"])
def test_bf16_and_exact_search_give_the_same_verdicts(search, tiny_cnn, normal_images, blob_image):
    # "amx": the C kernel of scoring/native (tests/test_native.py); the same bfloat16 rounding.
    if search == "amx" and not native.available()[0]:
        pytest.skip(f"native kernels unavailable here: {native.available()[1]}")
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu", search=search).fit(normal_images[:5])
    fast = model.predict([normal_images[5], blob_image])
    model.search = "exact"
    exact = model.predict([normal_images[5], blob_image])
    # The tiny CNN's patches lie close together relative to their norms, the hard case for bfloat16
    # (its error scales with the norms): still within 2 %.
    for a, b in zip(fast, exact):
        assert a.score == pytest.approx(b.score, rel=2e-2)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=2e-2, atol=2e-2 * float(b.anomaly_map.max()))
    assert fast[1].score > 1.5 * fast[0].score
    with pytest.raises(ScoringError, match="search must be one of"):
        PatchCore(tiny_cnn, device="cpu", search="fast")


def test_the_bf16_bank_follows_a_replaced_memory_bank(tiny_cnn, normal_images, blob_image):
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu", search="bf16").fit(normal_images[:5])
    before = model.predict([blob_image])[0].score
    model.memory_bank = model.memory_bank[:1].clone()  # a far smaller bank: the blob gets farther
    assert model.predict([blob_image])[0].score > before


def test_a_capped_bank_and_the_cpu_batch_default(tiny_cnn, normal_images, tmp_path):
    model = PatchCore(tiny_cnn, coreset_ratio=1.0, max_bank_size=40, device="cpu").fit(normal_images[:3])
    assert model.memory_bank.shape[0] == 40 and model.batch_size == CPU_BATCH_SIZE
    config = json.loads((model.save_pretrained(tmp_path / "capped") / "config.json").read_text())
    assert config["max_bank_size"] == 40 and config["bank_size"] == 40
    uncapped = PatchCore(tiny_cnn, coreset_ratio=1.0, max_bank_size=None, device="cpu").fit(normal_images[:3])
    assert uncapped.memory_bank.shape[0] > 40
    assert PatchCore.from_pretrained(uncapped.save_pretrained(tmp_path / "uncapped"), device="cpu").max_bank_size is None


# --------------------------------------------------------------------------------------------------
# thresholds


def test_f1_optimal_threshold_on_a_hand_made_case():
    # Scores >= 0.7 flag both anomalies and one normal image (F1 0.8); >= 0.8 flags exactly the two
    # anomalies (F1 1.0); >= 0.9 misses one (F1 0.67).
    scores, labels = np.array([0.1, 0.2, 0.7, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    calibration = calibrate_threshold(scores, labels, quantile=0.99)
    assert calibration.method == "f1"
    assert 0.7 < calibration.threshold <= 0.8  # the F1 = 1 threshold, possibly with a margin below 0.8
    np.testing.assert_array_equal(scores >= calibration.threshold, labels == 1)


def test_quantile_threshold_without_anomalies():
    scores = np.linspace(0, 1, 101)
    calibration = calibrate_threshold(scores, None, quantile=0.95)
    assert calibration.threshold == pytest.approx(0.95) and calibration.method == "quantile:0.95"
    with pytest.raises(ScoringError, match="only anomalous"):
        calibrate_threshold([0.5, 0.6], [1, 1], quantile=0.99)


def test_model_calibration_sets_masks_and_decisions(fitted, normal_images, blob_image):
    assert fitted.predict(blob_image)[0].threshold == np.inf  # uncalibrated: nothing is flagged
    threshold = fitted.calibrate(normal_images + [blob_image], [0] * 6 + [1])
    normal, defect = fitted.predict([normal_images[0], blob_image])
    assert defect.is_anomalous and not normal.is_anomalous
    assert defect.threshold == threshold and defect.mask.any() and not normal.mask.any()
    quantile = fitted.calibrate(normal_images, quantile=0.5)
    assert quantile == pytest.approx(np.quantile([r.score for r in fitted.predict(normal_images)], 0.5))


# --------------------------------------------------------------------------------------------------
# save and load


def test_save_then_load_gives_identical_predictions(fitted, normal_images, blob_image, tmp_path):
    fitted.calibrate(normal_images + [blob_image], [0] * 6 + [1])
    folder = fitted.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["tower"] == "tiny:cnn" and config["layers"] == ["layer2", "layer3"]
    assert config["coreset_ratio"] == 0.5 and config["threshold"] == fitted.threshold
    loaded = PatchCore.from_pretrained(folder, device="cpu")
    for before, after in zip(fitted.predict(normal_images[:2] + [blob_image]), loaded.predict(normal_images[:2] + [blob_image])):
        assert before.score == after.score and before.threshold == after.threshold
        np.testing.assert_array_equal(before.anomaly_map, after.anomaly_map)
    assert isinstance(FeatureScorer.from_pretrained(folder), PatchCore)


def test_saving_over_a_previous_save_replaces_it_and_spares_other_folders(fitted, tmp_path):
    folder = fitted.save_pretrained(tmp_path / "model")
    fitted.save_pretrained(folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ScoringError, match="other files"):
        fitted.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_load_refuses_missing_and_unexpected_keys(fitted, tmp_path):
    folder = fitted.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(ScoringError, match="unexpected keys \\['surprise'\\]"):
        PatchCore.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "extra": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(ScoringError, match="unexpected keys \\['extra'\\]"):
        PatchCore.from_pretrained(folder)
    save_file({}, folder / "model.safetensors")
    with pytest.raises(ScoringError, match="missing keys \\['memory_bank'\\]"):
        PatchCore.from_pretrained(folder)


def test_a_relative_local_dir_tower_still_resolves_after_save(tiny_cnn, normal_images, tmp_path, monkeypatch):
    tiny_cnn.save_pretrained(tmp_path / "towers" / "tab")
    monkeypatch.chdir(tmp_path)
    model = PatchCore("local-dir:towers/tab", coreset_ratio=0.5, device="cpu").fit(normal_images[:3])
    folder = model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path.parent)
    loaded = PatchCore.from_pretrained(folder, device="cpu")
    assert loaded.tower.spec == f"local-dir:{(tmp_path / 'towers' / 'tab').resolve()}"
    assert loaded.predict(normal_images[3])[0].score == pytest.approx(model.predict(normal_images[3])[0].score)


# --------------------------------------------------------------------------------------------------
# bad input


def test_wrong_channel_count_is_a_clear_error(fitted):
    with pytest.raises(DataError, match="3 x H x W.*1 channels"):
        fitted.predict(torch.rand(1, 48, 64))
    with pytest.raises(DataError, match="H x W x 3"):
        fitted.predict([np.zeros((48, 64, 4), np.uint8)])


def test_an_image_smaller_than_the_stride_names_the_minimum(fitted):
    with pytest.raises(ScoringError, match="10 x 10 pixels.*at least 16 x 16"):
        fitted.predict(torch.rand(3, 10, 10))
    with pytest.raises(ScoringError, match="at least 16 x 16"):
        PatchCore("tiny:cnn", image_size=8, device="cpu")


def test_a_corrupt_file_is_named(fitted, normal_images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    good = save_png(textured_image(np.random.default_rng(1)), tmp_path / "good.png")
    with pytest.raises(DataError, match="broken.png"):
        fitted.predict([good, broken])
    with pytest.raises(DataError, match="broken.png"):
        PatchCore("tiny:cnn", device="cpu").fit([broken])


def test_an_empty_normal_set_and_an_unfitted_model_are_refused(tiny_cnn):
    with pytest.raises(ScoringError, match="empty"):
        PatchCore(tiny_cnn, device="cpu").fit([])
    with pytest.raises(ScoringError, match="not fitted"):
        PatchCore(tiny_cnn, device="cpu").predict(torch.rand(3, 64, 64))
    with pytest.raises(ScoringError, match="Unknown layers"):
        PatchCore(tiny_cnn, layers=["blocks.2"], device="cpu")
