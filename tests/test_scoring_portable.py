"""A scorer that carries its own backbone (`local-dir:tower`) loads wherever its folder is moved."""

import json
import shutil

import numpy as np

from conftest import textured_image
from defectclip.scoring import FeatureScorer, PatchCore
from defectclip.towers import build_vision_tower


def test_relative_tower_spec_resolves_against_the_model_folder(tmp_path):
    rng = np.random.default_rng(0)
    build_vision_tower("tiny:cnn").save_pretrained(tmp_path / "model" / "tower")
    scorer = PatchCore(f"local-dir:{tmp_path / 'model' / 'tower'}", image_size=64, coreset_ratio=0.5)
    scorer.fit([textured_image(rng, (64, 64)) for _ in range(3)])
    scorer.save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "model" / "tower", tmp_path / "saved" / "tower")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["tower"] = "local-dir:tower"
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    moved = shutil.move(tmp_path / "saved", tmp_path / "elsewhere")
    probe = [textured_image(rng, (64, 64))]
    reloaded = FeatureScorer.from_pretrained(moved)
    assert np.array_equal(reloaded.predict(probe)[0].anomaly_map, scorer.predict(probe)[0].anomaly_map)
