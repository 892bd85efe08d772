"""Brightness and contrast matching (`photometric="match"`): a normal image shot at another exposure
stays normal, a defect stays a defect, the target is learnt from the normal images and saved with the
model, and bad settings get clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import normal_tensors
from defectclip.errors import ArtifactError
from defectclip.scoring import PaDiM, PatchCore, ScoringError
from defectclip.scoring.few_shot import fit_few_shot
from defectclip.scoring.photometric import Photometric, luminance_statistics, parse_photometric


def exposed(image: torch.Tensor, gain: float, offset: float = 0.0) -> torch.Tensor:
    """The same scene at another exposure (clipped like a camera would)."""
    return (image * gain + offset).clamp(0, 1)


@pytest.fixture(scope="module")
def normals():
    return normal_tensors(6)


@pytest.fixture(scope="module")
def held_out():
    return normal_tensors(8)[7]


# --------------------------------------------------------------------------------------------------
# the mapping


def test_match_learns_the_median_exposure_of_the_normal_images(normals):
    fitted = Photometric("match").fitted_to(normals)
    stats = np.array([luminance_statistics(image) for image in normals])
    assert fitted.mean == pytest.approx(float(np.median(stats[:, 0])))
    assert fitted.std == pytest.approx(float(np.median(stats[:, 1])))


def test_a_darker_shot_of_the_same_scene_is_brought_back_to_the_same_input(normals):
    target = Photometric("match").fitted_to(normals)
    image = normals[0]
    darker = exposed(image, 0.6, 0.05)
    mean, std = luminance_statistics(target.apply(darker))
    assert mean == pytest.approx(target.mean, abs=0.01) and std == pytest.approx(target.std, abs=0.01)
    assert torch.allclose(target.apply(darker), target.apply(image), atol=0.02)


def test_none_leaves_the_image_untouched_and_match_does_not_write_into_it(normals):
    image = normals[0].clone()
    assert Photometric().apply(image) is image
    Photometric("match").fitted_to(normals).apply(image)
    assert torch.equal(image, normals[0])


def test_a_flat_image_is_not_stretched_into_noise(normals):
    target = Photometric("match").fitted_to(normals)
    flat = torch.full((3, 32, 32), 0.3)
    flat[0, 0, 0] = 0.3 + 1e-4
    assert float(target.apply(flat).std()) < 0.01


@pytest.mark.parametrize("value, message", [
    ("auto", "Unknown photometric mode"),
    ({"mode": "match", "mean": 3.0, "std": 0.1}, "within 0-1"),
    ({"mode": "match", "mean": 0.4}, "both its target mean and std"),
    ({"mode": "match", "mean": 0.4, "std": 0.1, "gamma": 2}, "Unknown photometric keys"),
    ({"mode": "none", "mean": 0.4, "std": 0.1}, "takes no target"),
    ({"mode": "match", "mean": "bright", "std": 0.1}, "must be a number"),
])
def test_bad_settings_are_refused_with_what_to_use(value, message):
    with pytest.raises(ScoringError, match=message):
        parse_photometric(value)


# --------------------------------------------------------------------------------------------------
# inside the scorers


@pytest.mark.parametrize("method", [PatchCore, PaDiM])
def test_a_normal_image_at_another_exposure_stays_normal_only_with_match(tiny_cnn, normals, held_out, method):
    kwargs = {"coreset_ratio": 1.0} if method is PatchCore else {}
    plain = method(tiny_cnn, image_size=48, device="cpu", photometric="none", **kwargs).fit(normals)
    matched = method(tiny_cnn, image_size=48, device="cpu", photometric="match", **kwargs).fit(normals)
    dark = exposed(held_out, 0.45)

    def ratio(model):  # how much darker exposure alone raises the score of a normal image
        normal_score, dark_score = (r.score for r in model.predict([held_out, dark]))
        return dark_score / normal_score

    assert ratio(plain) > 1.5
    assert ratio(matched) < 1.15


def test_a_defect_still_scores_above_normal_images_with_match(tiny_cnn, normals, held_out, blob_image):
    model = PatchCore(tiny_cnn, image_size=48, coreset_ratio=1.0, device="cpu", photometric="match").fit(normals)
    normal, dark_normal, defect = (r.score for r in model.predict([held_out, exposed(held_out, 0.5), blob_image]))
    assert defect > 1.5 * max(normal, dark_normal)


def test_the_learnt_target_is_saved_and_the_reloaded_model_scores_identically(tiny_cnn, normals, held_out, tmp_path):
    model = PatchCore(tiny_cnn, image_size=48, coreset_ratio=1.0, device="cpu", photometric="match").fit(normals)
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["photometric"]
    assert saved == {"mode": "match", "mean": model.photometric.mean, "std": model.photometric.std}
    reloaded = PatchCore.from_pretrained(tmp_path / "model", tower=tiny_cnn, device="cpu")
    assert reloaded.photometric == model.photometric
    images = [held_out, exposed(held_out, 0.5)]
    for a, b in zip(model.predict(images), reloaded.predict(images)):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_a_saved_model_without_the_setting_loads_as_none_and_a_damaged_one_is_refused(tiny_cnn, normals, tmp_path):
    PatchCore(tiny_cnn, image_size=48, coreset_ratio=1.0, device="cpu").fit(normals).save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["photometric"]  # as written before the setting existed
    config_path.write_text(json.dumps(config))
    assert PatchCore.from_pretrained(tmp_path / "m", tower=tiny_cnn, device="cpu").photometric == Photometric()
    config["photometric"] = {"mode": "match", "mean": 0.4, "std": -1}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="std must be above 0"):
        PatchCore.from_pretrained(tmp_path / "m", tower=tiny_cnn, device="cpu")
    config["photometric"] = {"mode": "match", "mean": None, "std": None}  # a target never learnt
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="without its target mean and std"):
        PatchCore.from_pretrained(tmp_path / "m", tower=tiny_cnn, device="cpu")


def test_features_embedded_before_the_target_is_learnt_are_refused(tiny_cnn, normals):
    model = PatchCore(tiny_cnn, image_size=48, coreset_ratio=1.0, device="cpu", photometric="match")
    with pytest.raises(ScoringError, match="fit_photometric"):
        model.fit_embedded(model.embed(normals), len(normals))
    model.fit_photometric(normals)
    model.fit_embedded(model.embed(normals), len(normals))
    assert model.is_fitted


def test_few_shot_matches_to_its_references_by_default(tiny_cnn, normals, held_out):
    references = [(image.permute(1, 2, 0) * 255).round().byte().numpy() for image in normals[:4]]
    scorer, _ = fit_few_shot(references, tiny_cnn, image_size=48, device="cpu")
    expected = Photometric("match").fitted_to(torch.from_numpy(r).permute(2, 0, 1).float() / 255 for r in references)
    assert scorer.photometric == expected
    normal_score, dark_score = (r.score for r in scorer.predict([held_out, exposed(held_out, 0.45)]))
    assert dark_score < 1.15 * normal_score


def test_a_darker_shot_scored_in_tiles_gives_the_same_map(tiny_cnn, normals):
    large = [torch.cat([image, image.flip(-1)], dim=-1) for image in normals]  # 48 x 128 px
    model = PatchCore(tiny_cnn, plan="tiles:48:8", coreset_ratio=1.0, device="cpu", photometric="match").fit(large[:5])
    scene = large[5]
    darker = exposed(scene, 0.5)
    normal_map, dark_map = (r.anomaly_map for r in model.predict([scene, darker]))
    # one gain and offset for the whole image, applied to each tile: the maps agree tile for tile
    assert np.abs(dark_map - normal_map).max() < 0.2 * normal_map.max()
