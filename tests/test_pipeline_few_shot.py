"""The pipeline's few-shot build: counts checked first, merges and outliers told to the user, and no
pipeline-wide lock held while it runs (other sessions keep scoring)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from app_fixtures import OBJECT, defective, pipeline  # noqa: F401  (pytest fixture)
from conftest import textured_image
from defectclip.pipeline import PipelineError


def refs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [textured_image(rng, (64, 64)) for _ in range(count)]


def test_count_is_checked_before_any_image_is_looked_at(pipeline):
    with pytest.raises(PipelineError, match="got 17"):
        pipeline.fit_few_shot(["not an image"] * 17)
    with pytest.raises(PipelineError, match="got 0"):
        pipeline.fit_few_shot([])


def test_duplicates_and_blank_references_are_told_to_the_user(pipeline):
    images = refs(3)
    model = pipeline.fit_few_shot(images + [images[1].copy(), np.zeros_like(images[0])], OBJECT)
    assert model.name.endswith("(3 refs)") and model.object == OBJECT
    notes = "\n".join(model.notes)
    assert "Reference 4 is identical to reference 2" in notes and "Reference 5 left out: blank" in notes
    assert model.scorer.predict([defective(np.random.default_rng(7))])[0].is_anomalous


def test_build_runs_while_another_session_holds_the_scoring_lock(pipeline):
    pipeline.few_shot_tower_model()  # built once per pipeline, as the app does at its first build
    done = threading.Event()
    with pipeline._lock:  # another session's score in progress
        worker = threading.Thread(target=lambda: (pipeline.fit_few_shot(refs(4, seed=1)), done.set()))
        worker.start()
        worker.join(timeout=120)
    assert done.is_set(), "the few-shot build waited for the scoring lock"


def test_low_priority_runs_return_values_and_raise_errors_in_the_caller():
    import os

    from defectclip.pipeline import BUILD_NICENESS, run_at_low_priority

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    assert run_at_low_priority(niceness) == min(19, before + BUILD_NICENESS) or os.name != "posix"
    assert niceness() == before  # the caller's thread keeps its priority
    with pytest.raises(ZeroDivisionError):
        run_at_low_priority(lambda: 1 / 0)
