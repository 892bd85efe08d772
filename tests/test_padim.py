"""PaDiM: detection on a pasted blob, exact Gaussian statistics, save/load and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import BLOB, normal_tensors, write_mvtec_category
from defectclip.data import DataError, open_dataset
from defectclip.scoring import FeatureScorer, PaDiM, ScoringError
from defectclip.scoring.padim import mahalanobis, random_channels


@pytest.fixture(scope="module")
def normal_images():
    return normal_tensors(8)


@pytest.fixture(scope="module")
def fitted(tiny_cnn, normal_images):
    return PaDiM(tiny_cnn, d=20, device="cpu").fit(normal_images[:6])


def test_default_layers_and_channel_count(tiny_cnn):
    model = PaDiM(tiny_cnn, device="cpu")
    assert model.layers == ["layer1", "layer2", "layer3"]  # strides 4, 8, 16 as in the paper
    assert PaDiM("offline:efficientnet_lite0", device="cpu").layers == ["blocks.1", "blocks.2", "blocks.4"]
    with pytest.raises(ScoringError, match="d must be between 1 and the 56 channels"):
        PaDiM(tiny_cnn, d=57, device="cpu")


@pytest.mark.parametrize("spec, size", [("tiny:cnn", None), ("offline:efficientnet_lite0", 64)])
def test_a_pasted_blob_scores_higher_and_the_map_peaks_inside_it(spec, size, normal_images, blob_image):
    model = PaDiM(spec, image_size=size, device="cpu").fit(normal_images[:7])
    normal, defect = model.predict([normal_images[7], blob_image])
    assert defect.score > 1.5 * normal.score
    assert defect.anomaly_map.shape == (48, 64)
    row, col = np.unravel_index(np.argmax(defect.anomaly_map), defect.anomaly_map.shape)
    assert BLOB[0].start - 2 <= row < BLOB[0].stop + 2 and BLOB[1].start - 2 <= col < BLOB[1].stop + 2


def test_statistics_equal_numpy_mean_and_covariance(fitted, normal_images):
    batch = fitted.features.model_input(normal_images[:6], torch.device("cpu"))
    patches = fitted._positions(fitted.features(batch)).double().numpy()  # N x P x d
    position = 5
    expected_mean = patches[:, position].mean(0)
    expected_cov = np.cov(patches[:, position], rowvar=False) + 0.01 * np.eye(fitted.d)
    np.testing.assert_allclose(fitted.mean[position].numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fitted.precision[position].numpy(), np.linalg.inv(expected_cov), rtol=1e-3, atol=1e-3)


def test_mahalanobis_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    patches, mean = torch.randn(2, 3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    root = torch.randn(3, 4, 4, generator=generator)
    precision = root @ root.transpose(1, 2) + torch.eye(4)
    delta = patches[1, 2] - mean[2]
    assert float(mahalanobis(patches, mean, precision)[1, 2]) == pytest.approx(float(delta @ precision[2] @ delta) ** 0.5, rel=1e-5)


def test_channel_subset_is_seeded():
    assert torch.equal(random_channels(176, 100, 3), random_channels(176, 100, 3))
    assert not torch.equal(random_channels(176, 100, 3), random_channels(176, 100, 4))
    assert random_channels(176, None, 0).numel() == 100 and random_channels(40, None, 0).numel() == 40


def test_fit_on_a_labelled_dataset_uses_only_its_normal_images(tiny_cnn, tmp_path):
    root = write_mvtec_category(tmp_path / "mvtec", "widget", n_good_test=3)
    model = PaDiM(tiny_cnn, d=16, device="cpu").fit(open_dataset(root, "test"))
    assert model.num_train_images == 3


def test_save_then_load_gives_identical_predictions(fitted, normal_images, blob_image, tmp_path):
    fitted.calibrate(normal_images[6:] + [blob_image], [0, 0, 1])
    folder = fitted.save_pretrained(tmp_path / "padim")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "padim" and config["d"] == 20 and config["epsilon"] == 0.01
    loaded = PaDiM.from_pretrained(folder, device="cpu")
    assert isinstance(FeatureScorer.from_pretrained(folder), PaDiM)
    for before, after in zip(fitted.predict(normal_images[6:] + [blob_image]), loaded.predict(normal_images[6:] + [blob_image])):
        assert before.score == after.score and before.threshold == after.threshold
        np.testing.assert_array_equal(before.anomaly_map, after.anomaly_map)


def test_load_refuses_a_config_with_a_missing_key(fitted, tmp_path):
    folder = fitted.save_pretrained(tmp_path / "padim")
    config = json.loads((folder / "config.json").read_text())
    del config["epsilon"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScoringError, match="missing keys \\['epsilon'\\]"):
        PaDiM.from_pretrained(folder)


def test_bad_inputs_raise_clear_errors(fitted, tiny_cnn, tmp_path):
    with pytest.raises(ScoringError, match="10 x 10 pixels.*at least 16 x 16"):
        fitted.predict(torch.rand(3, 10, 10))
    with pytest.raises(DataError, match="4 channels"):
        fitted.predict(torch.rand(4, 48, 64))
    broken = tmp_path / "scan_017.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="scan_017.png"):
        fitted.predict([broken])
    with pytest.raises(ScoringError, match="empty"):
        PaDiM(tiny_cnn, device="cpu").fit([])
