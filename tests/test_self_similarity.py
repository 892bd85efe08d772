"""Self-similarity (a training-free map) and CLIP-ADA's blend with it: what flags, what is saved, what is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectclip.clip_ada import ClipADA, ClipADAConfig, SelfSimilarityBlend
from defectclip.data import array_to_tensor
from defectclip.errors import ArtifactError
from defectclip.scoring.self_similarity import SelfSimilarity
from defectclip.towers import build_text_tower

from conftest import BLOB, textured_image


@pytest.fixture(scope="module")
def towers(tiny_cnn):
    return tiny_cnn, build_text_tower("tiny:text")


def blend_model(towers) -> ClipADA:
    vision, text = towers
    torch.manual_seed(0)
    return ClipADA(ClipADAConfig(vision=vision.spec, text=text.spec, refine_steps=0), vision=vision, text=text)


def test_a_patch_unlike_the_rest_of_its_own_image_scores_highest(tiny_cnn, blob_image):
    similarity = SelfSimilarity(tiny_cnn, image_size=96)
    anomaly_map = similarity.map(blob_image)
    assert anomaly_map.shape == (48, 64) and anomaly_map.dtype == np.float32
    outside = np.ones_like(anomaly_map, dtype=bool)
    outside[BLOB] = False
    assert anomaly_map[BLOB].mean() > 1.5 * anomaly_map[outside].mean()
    row, col = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    assert BLOB[0].start - 6 <= row < BLOB[0].stop + 6 and BLOB[1].start - 6 <= col < BLOB[1].stop + 6
    # nothing was fitted: a normal image of the same texture stays low everywhere
    normal = similarity.map(textured_image(np.random.default_rng(3)))
    assert normal.max() < anomaly_map.max()


def test_the_blend_is_saved_reloaded_to_identical_maps_and_changes_the_map(towers, normal_images, blob_image, tmp_path):
    model = blend_model(towers)
    plain = model.predict([blob_image])[0].anomaly_map
    blend = model.fit_self_similarity(normal_images, image_size=96)
    assert blend.clip_std > 0 and blend.self_std > 0 and model.config.self_similarity["image_size"] == 96
    blended = model.predict([blob_image])[0]
    assert not np.allclose(blended.anomaly_map, plain)
    assert 0 < blended.anomaly_map.min() and blended.anomaly_map.max() < 1  # still a probability map
    outside = np.ones_like(plain, dtype=bool)
    outside[BLOB] = False
    assert blended.anomaly_map[BLOB].mean() > blended.anomaly_map[outside].mean()

    folder = model.save_pretrained(tmp_path / "blended")
    saved = json.loads((folder / "config.json").read_text())["config"]["self_similarity"]
    assert saved == pytest.approx(vars(blend))
    loaded = ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1])
    again = loaded.predict([blob_image])[0]
    assert np.array_equal(again.anomaly_map, blended.anomaly_map) and again.score == blended.score


def test_the_blend_keeps_clip_adas_scale_where_self_similarity_is_average():
    blend = SelfSimilarityBlend(image_size=64, clip_mean=-3.0, clip_std=0.5, self_mean=10.0, self_std=2.0)
    probability = np.full((4, 4), 1 / (1 + np.exp(3.0)), dtype=np.float32)  # logit -3: CLIP-ADA's mean
    assert np.allclose(blend.blend(probability, np.full((4, 4), 10.0)), probability, atol=1e-6)
    # one spread of self-similarity above its mean moves the logit by half a CLIP-ADA spread
    raised = blend.blend(probability, np.full((4, 4), 12.0))
    assert np.allclose(np.log(raised / (1 - raised)), -3.0 + 0.25, atol=1e-4)


@pytest.mark.parametrize("damage, message", [
    ({"self_std": 0.0}, "self_std"),
    ({"clip_mean": "high"}, "clip_mean"),
    ({"weight": 2.0}, "unexpected keys"),
    ({"mirrors": "yes"}, "mirrors"),
])
def test_a_damaged_blend_in_config_json_is_refused_with_the_field_named(towers, normal_images, tmp_path, damage, message):
    model = blend_model(towers)
    model.fit_self_similarity(normal_images[:2], image_size=64)
    folder = model.save_pretrained(tmp_path / "damaged")
    config = json.loads((folder / "config.json").read_text())
    config["config"]["self_similarity"].update(damage)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=message):
        ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1])


def test_fitting_the_blend_needs_images(towers):
    with pytest.raises(ValueError, match="at least one image"):
        blend_model(towers).fit_self_similarity([])


def test_tensor_and_uint8_inputs_give_the_same_self_similarity(tiny_cnn):
    image = textured_image(np.random.default_rng(5))
    similarity = SelfSimilarity(tiny_cnn, image_size=64)
    assert np.allclose(similarity.map(image), similarity.map(array_to_tensor(image)), atol=1e-5)


def mirrored_edges_image() -> np.ndarray:
    """A texture whose left and right borders carry the same bright wedge, mirrored: unique unless mirrors count."""
    image = textured_image(np.random.default_rng(7), size=(64, 64))
    rows, cols = np.mgrid[0:64, 0:10]
    wedge = cols < (rows % 16) * 10 // 16  # a saw-tooth edge, not mirror-symmetric itself
    left = image[:, :10]
    left[wedge] = 240
    image[:, -10:] = left[:, ::-1]
    return image


def test_mirror_images_let_a_symmetric_part_match_its_other_side(tiny_cnn):
    image = mirrored_edges_image()
    plain = SelfSimilarity(tiny_cnn, image_size=64, mirrors=False).map(image)
    mirrored = SelfSimilarity(tiny_cnn, image_size=64, mirrors=True).map(image)
    edges = np.zeros_like(plain, dtype=bool)
    edges[:, :10] = edges[:, -10:] = True
    assert mirrored[edges].mean() < 0.8 * plain[edges].mean()  # each border found in the other's reflection


def test_a_symmetric_defect_does_not_match_its_own_reflection(tiny_cnn):
    image = textured_image(np.random.default_rng(8), size=(64, 64))
    image[26:38, 26:38] = 250  # centred: the mirror images show it at the very same place
    anomaly_map = SelfSimilarity(tiny_cnn, image_size=64, mirrors=True).map(image)
    inside = np.zeros_like(anomaly_map, dtype=bool)
    inside[26:38, 26:38] = True
    assert anomaly_map[inside].mean() > 1.5 * anomaly_map[~inside].mean()

