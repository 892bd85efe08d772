"""Few-shot PatchCore: a bank and a threshold from 1-16 normal references alone, with duplicate and
outlier references reported, one feature pass per image and no refits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import textured_image
from defectclip.errors import ArtifactError
from defectclip.scoring import PatchCore
from defectclip.scoring.blend import MapBlend
from defectclip.scoring.features import PatchFeatures
from defectclip.scoring.few_shot import (
    MAX_REFERENCES, MIN_SAMPLES, FewShotError, Holdout, block_distances, check_reference_count, content_digest,
    embed_patches, fit_few_shot, neighbourhood, place_threshold,
)

SIZE = (64, 64)


@pytest.fixture(scope="module")
def tower(tiny_cnn):
    return tiny_cnn


@pytest.fixture(scope="module")
def references():
    rng = np.random.default_rng(0)
    return [textured_image(rng, SIZE) for _ in range(6)]


def with_defect(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[20:36, 24:42]
    out[20:36, 24:42] = (((yy // 2 + xx // 2) % 2) * 255)[..., None]  # a high-contrast checker patch
    return out


@pytest.mark.parametrize("count", [0, MAX_REFERENCES + 1])
def test_reference_count_is_checked_with_a_clear_message(count):
    with pytest.raises(FewShotError, match=r"1 to 16 normal reference images.*got " + str(count)):
        check_reference_count(count)


def test_too_many_references_fail_before_any_feature_pass(tower, references, monkeypatch):
    calls = []
    monkeypatch.setattr(PatchFeatures, "embed", lambda self, batch: calls.append(batch) or None)
    with pytest.raises(FewShotError, match="got 17"):
        fit_few_shot([references[0]] * 17, tower)
    assert calls == []


@pytest.mark.parametrize("count", [1, 2, 4])
def test_threshold_separates_new_normal_images_from_defective_ones(tower, references, count):
    scorer, report = fit_few_shot(references[:count], tower, image_size=64)
    assert scorer.threshold == report.threshold and np.isfinite(report.threshold)
    assert len(report.normal_scores) >= MIN_SAMPLES and len(report.defect_scores) == MIN_SAMPLES
    rng = np.random.default_rng(42)
    unseen = [textured_image(rng, SIZE) for _ in range(3)]
    normal = scorer.predict(unseen)
    defective = scorer.predict([with_defect(image) for image in unseen])
    assert all(not r.is_anomalous for r in normal), [r.score for r in normal]
    assert all(r.is_anomalous for r in defective), [r.score for r in defective]


def test_single_reference_is_never_compared_with_its_own_pixels(tower, references):
    _, report = fit_few_shot(references[:1], tower, image_size=64)
    # Scored against itself a reference would score ~0: its normal samples are new views of it only.
    assert len(report.normal_scores) == MIN_SAMPLES
    assert min(report.normal_scores) > 0.1 * max(report.normal_scores)


def test_a_single_reference_patch_only_meets_patches_away_from_its_own_place(tower, references):
    scorer = PatchCore(tower, image_size=64, coreset_ratio=1.0, device="cpu")
    block = embed_patches(scorer, references[:1])[0]
    holdout = Holdout.of(scorer, [block], [block_distances(block, [block])])
    held_out = holdout.distances(block)[:, 0]
    exact = torch.cdist(block, block).masked_fill(holdout.excluded, torch.inf).amin(1)
    assert holdout.single and bool(holdout.excluded.diagonal().all())
    assert (held_out > 1e-3).all()  # never its own patch (distance 0)
    torch.testing.assert_close(held_out, exact, rtol=1e-3, atol=1e-3)
    assert not holdout.excluded.all(dim=1).any()  # every patch keeps somewhere else to match


@pytest.mark.parametrize("grid", [(1, 2), (2, 2), (3, 3), (4, 4), (3, 9), (28, 28)])
def test_every_patch_keeps_patches_it_may_match_and_never_itself(grid):
    excluded = neighbourhood(grid)
    assert bool(excluded.diagonal().all()) and not excluded.all(dim=1).any()


def test_identical_references_are_merged_and_reported(tower, references):
    refs = [references[0], references[1], references[0].copy(), references[2]]
    scorer, report = fit_few_shot(refs, tower, image_size=64)
    assert report.duplicates == [(2, 0)]
    assert report.used == [0, 1, 3]
    assert scorer.num_train_images == 3
    unique, _ = fit_few_shot([refs[0], refs[1], refs[3]], tower, image_size=64)
    assert torch.equal(scorer.memory_bank, unique.memory_bank)
    assert any("Reference 3 is identical to reference 1" in line for line in report.messages())


def test_blank_and_foreign_references_are_left_out_and_reported(tower, references):
    black = np.zeros((*SIZE, 3), np.uint8)
    foreign = np.random.default_rng(5).integers(0, 256, (*SIZE, 3), dtype=np.uint8)  # not the product
    refs = references[:4] + [black, foreign]
    scorer, report = fit_few_shot(refs, tower, image_size=64)
    left_out = dict(report.outliers)
    assert set(left_out) == {4, 5}
    assert "blank" in left_out[4] and "unlike the other references" in left_out[5]
    assert report.used == [0, 1, 2, 3] and scorer.num_train_images == 4
    clean, _ = fit_few_shot(references[:4], tower, image_size=64)
    assert torch.equal(scorer.memory_bank, clean.memory_bank)


def test_only_blank_references_are_refused(tower):
    with pytest.raises(FewShotError, match="blank"):
        fit_few_shot([np.full((*SIZE, 3), 128, np.uint8)] * 2 + [np.zeros((*SIZE, 3), np.uint8)], tower)


def test_one_feature_pass_per_image_and_no_refit(tower, references, monkeypatch):
    embedded = []
    original = PatchFeatures.embed
    monkeypatch.setattr(PatchFeatures, "embed",
                        lambda self, batch, **kw: embedded.append(len(batch)) or original(self, batch, **kw))
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("few-shot must not refit a bank"))
    refs = references[:4]
    fit_few_shot(refs, tower, image_size=64, self_similarity=False)
    # 4 references once each, 4 augmented copies to reach MIN_SAMPLES normal scores, 8 synthetic defects.
    bank_and_threshold = len(refs) + (MIN_SAMPLES - len(refs)) + MIN_SAMPLES
    assert sum(embedded) == bank_and_threshold
    embedded.clear()
    fit_few_shot(refs, tower, image_size=64)
    # the blend: one self-similarity map (the image and its two mirror images) per threshold sample
    assert sum(embedded) == bank_and_threshold + 3 * (MIN_SAMPLES + MIN_SAMPLES)


def test_saved_few_shot_model_keeps_its_threshold(tower, references, tmp_path):
    scorer, report = fit_few_shot(references[:2], tower, image_size=64)
    loaded = PatchCore.from_pretrained(scorer.save_pretrained(tmp_path / "fs"), tower=tower)
    assert loaded.threshold == pytest.approx(report.threshold)
    assert loaded.calibration.startswith("few-shot")


def test_the_blend_is_the_bank_map_plus_the_images_own_self_similarity(tower, references):
    scorer, report = fit_few_shot(references[:2], tower, image_size=64)
    plain, _ = fit_few_shot(references[:2], tower, image_size=64, self_similarity=False)
    assert isinstance(scorer.self_similarity, MapBlend) and plain.self_similarity is None
    assert torch.equal(scorer.memory_bank, plain.memory_bank)  # the bank is the same; only maps and threshold differ
    image = with_defect(textured_image(np.random.default_rng(7), SIZE))
    blended, alone = scorer.predict([image])[0], plain.predict([image])[0]
    own = scorer.similarity().map(image)
    assert np.allclose(blended.anomaly_map, scorer.self_similarity.blend(alone.anomaly_map, own), atol=1e-5)
    assert blended.score == pytest.approx(float(blended.anomaly_map.max()))
    assert report.blended and "self-similarity" in report.messages()[-1]


def test_the_blended_threshold_reads_min_samples_normal_scores_however_many_references(tower):
    rng = np.random.default_rng(11)
    many = [textured_image(rng, SIZE) for _ in range(MIN_SAMPLES + 2)]
    _, plain = fit_few_shot(many, tower, image_size=64, self_similarity=False)
    _, blended = fit_few_shot(many, tower, image_size=64)
    assert len(plain.normal_scores) == len(many)  # every reference held out
    assert len(blended.normal_scores) == MIN_SAMPLES == len(blended.defect_scores)  # a map each: the cost is bounded


def test_a_saved_blended_model_reloads_to_identical_outputs(tower, references, tmp_path):
    scorer, _ = fit_few_shot(references[:3], tower, image_size=64)
    loaded = PatchCore.from_pretrained(scorer.save_pretrained(tmp_path / "fs"), tower=tower)
    assert loaded.self_similarity == scorer.self_similarity
    images = [with_defect(references[5]), references[4]]
    for before, after in zip(scorer.predict(images), loaded.predict(images)):
        assert after.score == before.score and np.array_equal(after.anomaly_map, before.anomaly_map)
        assert after.is_anomalous == before.is_anomalous


@pytest.mark.parametrize("field, value", [("self_std", 0.0), ("map_mean", "high"), ("image_size", 8), ("extra", 1)])
def test_a_damaged_blend_is_refused_with_the_field_named(tower, references, tmp_path, field, value):
    import json

    folder = fit_few_shot(references[:2], tower, image_size=64)[0].save_pretrained(tmp_path / "fs")
    config = json.loads((folder / "config.json").read_text())
    config["self_similarity"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=field):
        PatchCore.from_pretrained(folder, tower=tower)


def test_refitting_a_blended_scorer_drops_the_blend(tower, references):
    scorer, _ = fit_few_shot(references[:2], tower, image_size=64)
    scorer.fit(references[2:5])
    assert scorer.self_similarity is None and scorer.threshold is None


def test_block_distances_match_the_exact_nearest_patch():
    rng = torch.Generator().manual_seed(0)
    queries, blocks = torch.randn(30, 8, generator=rng), [torch.randn(n, 8, generator=rng) for n in (5, 12)]
    exact = torch.stack([torch.cdist(queries, block).min(dim=1).values for block in blocks], dim=1)
    assert torch.allclose(block_distances(queries, blocks), exact, atol=1e-4)


def test_threshold_rule():
    threshold, rule = place_threshold([1.0, 1.2, 0.8], [3.0, 3.4, 2.6])
    assert 1.2 < threshold < 2.6 and rule.startswith("equal-error")
    assert place_threshold([1.0, 1.0], [5.0, 7.0, 9.0])[0] < 5.0  # identical normal scores do not pin it
    pooled, rule = place_threshold([2.0, 2.2, 1.8], [1.9, 2.0, 2.1])
    assert pooled > 2.0 and "pooled" in rule


def test_content_digest_sees_pixels_not_objects(references):
    assert content_digest(references[0]) == content_digest(references[0].copy())
    assert content_digest(references[0]) != content_digest(references[1])
    assert content_digest(references[0]) != content_digest(references[0].reshape(32, 128, 3))
