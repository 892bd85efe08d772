"""A small but complete InspectionPipeline for the app tests: tiny towers, fitted in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import textured_image
from defectclip.pipeline import InspectionPipeline
from defectclip.scoring import PatchCore

OBJECT = "widget"
CANDIDATES = ["a scratch on the widget", "a dent in the widget", "a stain on the widget"]


def defective(rng, size=(64, 64)):
    image = textured_image(rng, size)
    yy, xx = np.mgrid[20:34, 24:40]
    image[20:34, 24:40] = (((yy // 2 + xx // 2) % 2) * 255)[..., None]  # one high-contrast defect
    return image


@pytest.fixture(scope="module")
def pipeline():
    from defectclip.alphaclip import AlphaDescriber

    rng = np.random.default_rng(0)
    scorer = PatchCore("tiny:cnn", image_size=64, coreset_ratio=0.5)
    scorer.fit([textured_image(rng, (64, 64)) for _ in range(6)])
    scorer.calibrate([textured_image(rng, (64, 64)) for _ in range(3)] + [defective(rng) for _ in range(3)],
                     [0, 0, 0, 1, 1, 1])
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=64, candidates={OBJECT: CANDIDATES})
    models = {"widget · patchcore · tiny:cnn": handlers_model(scorer)}
    return InspectionPipeline(models, describer.eval(), few_shot_tower="tiny:cnn", few_shot_image_size=64)


def handlers_model(scorer):
    from defectclip.pipeline import InspectionModel

    return InspectionModel("widget · patchcore · tiny:cnn", OBJECT, "patchcore", scorer)


