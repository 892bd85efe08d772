"""A small but complete InspectionPipeline for the app tests: tiny towers, fitted in seconds.

Two installed models (PatchCore and PaDiM on the same tiny tower), so switching the model can be tested.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import textured_image
from defectclip.pipeline import InspectionModel, InspectionPipeline
from defectclip.scoring import PaDiM, PatchCore

OBJECT = "widget"
CANDIDATES = ["a scratch on the widget", "a dent in the widget", "a stain on the widget"]
PATCHCORE = "widget · PatchCore · tiny cnn"
PADIM = "widget · PaDiM · tiny cnn"


def defective(rng, size=(64, 64)):
    image = textured_image(rng, size)
    yy, xx = np.mgrid[20:34, 24:40]
    image[20:34, 24:40] = (((yy // 2 + xx // 2) % 2) * 255)[..., None]  # one high-contrast defect
    return image


def fitted(scorer, rng):
    scorer.fit([textured_image(rng, (64, 64)) for _ in range(6)])
    scorer.calibrate([textured_image(rng, (64, 64)) for _ in range(3)] + [defective(rng) for _ in range(3)],
                     [0, 0, 0, 1, 1, 1])
    return scorer


def build_pipeline(candidates: list[str] = CANDIDATES) -> InspectionPipeline:
    from defectclip.alphaclip import AlphaDescriber

    rng = np.random.default_rng(0)
    patchcore = fitted(PatchCore("tiny:cnn", image_size=64, coreset_ratio=0.5, device="cpu"), rng)
    padim = fitted(PaDiM("tiny:cnn", image_size=64, device="cpu"), np.random.default_rng(1))
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=64, candidates={OBJECT: list(candidates)})
    models = {PATCHCORE: InspectionModel(PATCHCORE, OBJECT, "patchcore", patchcore),
              PADIM: InspectionModel(PADIM, OBJECT, "padim", padim)}
    return InspectionPipeline(models, describer.eval(), few_shot_tower="tiny:cnn", few_shot_image_size=64)


@pytest.fixture(scope="module")
def pipeline():
    return build_pipeline()
