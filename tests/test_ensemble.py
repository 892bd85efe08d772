"""Ensemble of scorers: standardised maps averaged, held-out statistics, save/load, the pipeline, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BLOB, normal_tensors, write_mvtec_category
from defectclip.data import open_dataset
from defectclip.errors import ArtifactError
from defectclip.pipeline import InspectionPipeline
from defectclip.scoring import Ensemble, FeatureScorer, PaDiM, PatchCore, ScoringError, load_scorer
from defectclip.scoring.ensemble import split_held_out


@pytest.fixture(scope="module")
def normal_images():
    return normal_tensors(12)


def make_ensemble(tower) -> Ensemble:
    return Ensemble([PatchCore(tower, coreset_ratio=0.5, device="cpu"), PaDiM(tower, d=20, device="cpu")],
                    held_out_every=4)


@pytest.fixture(scope="module")
def fitted(tiny_cnn, normal_images):
    return make_ensemble(tiny_cnn).fit(normal_images[:11])


def test_every_nth_normal_image_is_held_out_of_the_members_fit():
    assert split_held_out(9, 4) == ([1, 2, 3, 5, 6, 7], [0, 4, 8])
    with pytest.raises(ScoringError, match="at least 2 normal images"):
        split_held_out(1, 10)


def test_members_fit_on_the_rest_and_maps_are_standardised_on_the_held_out(fitted, normal_images):
    held_out = [normal_images[i] for i in (0, 4, 8)]
    assert fitted.num_train_images == 11
    assert fitted.members[0].num_train_images == fitted.members[1].num_train_images == 8
    for member, mean, std in zip(fitted.members, fitted.map_mean, fitted.map_std):
        values = np.concatenate([r.anomaly_map.ravel() for r in member.predict(held_out)]).astype(np.float64)
        assert mean == pytest.approx(values.mean(), rel=1e-5)
        assert std == pytest.approx(values.std(), rel=1e-4)


def test_the_map_is_the_mean_standardised_map_and_the_score_its_maximum(fitted, normal_images, blob_image):
    result, = fitted.predict([blob_image])
    maps = [member.predict([blob_image])[0].anomaly_map for member in fitted.members]
    expected = sum((m - mean) / std for m, mean, std in zip(maps, fitted.map_mean, fitted.map_std)) / 2
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-5, atol=1e-5)
    assert result.score == pytest.approx(float(result.anomaly_map.max()))


def test_a_pasted_blob_scores_higher_than_a_normal_image_and_peaks_inside_it(fitted, normal_images, blob_image):
    normal, defect = fitted.predict([normal_images[11], blob_image])
    assert defect.score > normal.score + 1.0  # in standard deviations of normal map values
    row, col = np.unravel_index(np.argmax(defect.anomaly_map), defect.anomaly_map.shape)
    assert BLOB[0].start - 2 <= row < BLOB[0].stop + 2 and BLOB[1].start - 2 <= col < BLOB[1].stop + 2


def test_saved_ensemble_reloads_to_identical_outputs(fitted, normal_images, blob_image, tmp_path):
    fitted.calibrate([normal_images[11], blob_image], [0, 1])
    folder = fitted.save_pretrained(tmp_path / "ensemble")
    assert fitted.save_pretrained(folder) == folder  # an earlier save is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ScoringError, match="holds other files"):
        fitted.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ensemble"
    assert config["members"] == ["member_0_patchcore", "member_1_padim"]
    loaded = load_scorer(folder, device="cpu")
    assert isinstance(loaded, Ensemble) and loaded.threshold == fitted.threshold
    assert [type(m) for m in loaded.members] == [PatchCore, PaDiM]
    for before, after in zip(fitted.predict([blob_image, normal_images[11]]), loaded.predict([blob_image, normal_images[11]])):
        assert after.score == before.score
        np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)
        assert after.is_anomalous == before.is_anomalous
    assert before.is_anomalous is False and fitted.predict([blob_image])[0].is_anomalous


def test_load_scorer_reads_single_scorers_and_feature_scorer_points_to_it(fitted, tmp_path):
    single = fitted.members[1].save_pretrained(tmp_path / "padim")
    assert isinstance(load_scorer(single, device="cpu"), PaDiM)
    folder = fitted.save_pretrained(tmp_path / "ensemble")
    with pytest.raises(ScoringError, match="load_scorer"):
        FeatureScorer.from_pretrained(folder, device="cpu")


def test_a_damaged_config_is_refused_with_the_field_named(fitted, tmp_path):
    folder = fitted.save_pretrained(tmp_path / "ensemble")
    config = json.loads((folder / "config.json").read_text())
    for key, value, message in [("map_std", [1.0, 0.0], "map_std"), ("map_mean", [1.0], "map_mean"),
                                ("members", ["member_0_patchcore", "../elsewhere"], "plain folder name")]:
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ArtifactError, match=message):
            load_scorer(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "extra": 1}))
    with pytest.raises(ScoringError, match="unexpected keys \\['extra'\\]"):
        load_scorer(folder, device="cpu")


def test_bad_members_and_unfitted_use_get_clear_errors(tiny_cnn, normal_images):
    with pytest.raises(ScoringError, match="at least two member scorers"):
        Ensemble([PaDiM(tiny_cnn, device="cpu")])
    with pytest.raises(ScoringError, match="PatchCore or PaDiM"):
        Ensemble([PaDiM(tiny_cnn, device="cpu"), "padim"])
    with pytest.raises(ScoringError, match="held_out_every"):
        Ensemble([PaDiM(tiny_cnn, device="cpu"), PaDiM(tiny_cnn, device="cpu")], held_out_every=1)
    with pytest.raises(ScoringError, match="not fitted"):
        make_ensemble(tiny_cnn).predict(normal_images[:1])


def test_fits_on_a_dataset_s_normal_images_and_serves_the_pipeline(tiny_cnn, tmp_path, blob_image):
    root = write_mvtec_category(tmp_path / "data", n_train=6)
    ensemble = make_ensemble(tiny_cnn).fit(open_dataset(root, split="train"))
    assert ensemble.num_train_images == 6
    ensemble.calibrate(open_dataset(root, split="test"))
    models = tmp_path / "models"
    ensemble.save_pretrained(models / "scorers" / "widget")
    pipeline = InspectionPipeline.from_pretrained(models, allow_absolute_towers=True).to("cpu")
    name, = pipeline.model_names
    assert all(member.device.type == "cpu" for member in pipeline.model(name).scorer.members)
    assert name.startswith("widget · Ensemble · PatchCore ") and " + PaDiM " in name
    image = (blob_image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    result = pipeline.score(image, name)
    assert result.anomaly_map.shape == image.shape[:2]
    assert pipeline.min_image_side(name) == max(m.features.min_size for m in ensemble.members)
    assert all(key.startswith("widget · Ensemble") for key in pipeline.tensors())


def test_hub_export_of_an_ensemble_is_refused_clearly_and_the_saved_copy_stays_whole(fitted, tmp_path):
    from defectclip.sharing import CardInfo
    from defectclip.sharing.export import ExportError, export_artifact, export_pipeline

    folder = fitted.save_pretrained(tmp_path / "ensemble")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(ExportError, match="Ensemble .* not supported yet"):
        export_artifact(fitted, tmp_path / "out", CardInfo(repo_id="org/ensemble"))
    with pytest.raises(ExportError, match="save_pretrained"):
        export_pipeline(tmp_path / "pipeline", {"widget": folder})
    assert not (tmp_path / "out").exists() and not (tmp_path / "pipeline").exists()
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
