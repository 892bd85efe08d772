"""The shipped app, as a user meets it: the embedded default (demo/default/) on the shipped examples.

Clicking a defect of each example reads its true type first; clicking clean surface reads "no defect";
on the mixed example, two regions and a clean area give three different, correct answers. The click
points come from the examples' ground truth (demo/examples/clicks.json, written with the examples by
scripts/make_examples.py); the clicks go through the app's own handler, so the region described is
the one the app selects (a predicted region near the click, else a disk around it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defectclip.captions import NO_DEFECT
from defectclip.errors import UnknownObjectError
from demo import handlers
from demo.models import EMBEDDED_DEFAULT

EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"
CLICKS = json.loads((EXAMPLES / "clicks.json").read_text()) if (EXAMPLES / "clicks.json").is_file() else {}
def example_params():
    # Examples are cases the shipped models handle (scripts/make_examples.py); this guards that they still do
    # after a rebuild. How often they do on held-out data is benchmarks/results/describer_regions.json.
    return sorted(CLICKS)


@pytest.fixture(scope="module")
def default_pipeline():
    from defectclip.pipeline import InspectionPipeline

    if not (EMBEDDED_DEFAULT / "describer" / "describer_config.json").is_file():
        pytest.fail(f"{EMBEDDED_DEFAULT} has no describer: run scripts/build_embedded_default.py")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield InspectionPipeline.from_pretrained(EMBEDDED_DEFAULT)
    torch.set_num_threads(previous)


def scored(pipeline, name: str) -> handlers.Session:
    session = handlers.Session()
    handlers.score_upload(pipeline, session, str(EXAMPLES / name), pipeline.model_names[0])
    return session


def top_caption(pipeline, session, xy) -> str:
    _view, ranked = handlers.describe_point(pipeline, session, *xy)
    return max(ranked, key=ranked.get)


def test_every_example_has_its_clicks():
    assert set(CLICKS) == {p.name for p in EXAMPLES.glob("*.png")}
    assert any(len({d["type"] for d in entry["defects"]}) >= 2 for entry in CLICKS.values())  # a mixed-type example


@pytest.mark.parametrize("name", example_params())
def test_clicking_a_defect_reads_its_type_and_clean_surface_reads_no_defect(default_pipeline, name):
    entry = CLICKS[name]
    session = scored(default_pipeline, name)
    answers = [top_caption(default_pipeline, session, d["xy"]) for d in entry["defects"]]
    assert answers == [d["caption"] for d in entry["defects"]]
    assert top_caption(default_pipeline, session, entry["clean_xy"]).startswith(NO_DEFECT)


def test_two_regions_and_a_clean_area_of_one_image_give_three_different_right_answers(default_pipeline):
    name = next(n for n, e in sorted(CLICKS.items()) if len({d["type"] for d in e["defects"]}) >= 2)
    entry = CLICKS[name]
    session = scored(default_pipeline, name)
    clicks = [d["xy"] for d in entry["defects"][:2]] + [entry["clean_xy"]]
    answers = [top_caption(default_pipeline, session, xy) for xy in clicks]
    assert len(set(answers)) == 3
    assert answers[:2] == [d["caption"] for d in entry["defects"][:2]] and answers[2].startswith(NO_DEFECT)


def test_the_default_describer_knows_both_objects_and_refuses_others(default_pipeline):
    objects = handlers.object_choices(default_pipeline)
    assert {"magnetic tile", "steel strip"} <= set(objects)
    steel = default_pipeline.candidates("steel strip")
    assert steel and all("steel strip" in c for c in steel) and any(c.startswith(NO_DEFECT) for c in steel)
    with pytest.raises(UnknownObjectError, match="wooden plank"):
        default_pipeline.candidates("wooden plank")


def test_reference_free_mode_flags_every_shipped_defect_example_and_passes_the_good_one(default_pipeline):
    from defectclip.pipeline import REFERENCE_FREE

    verdicts = {}
    for name, entry in sorted(CLICKS.items()):
        view = handlers.score_upload(default_pipeline, handlers.Session(), str(EXAMPLES / name), REFERENCE_FREE)
        verdicts[name] = (bool(entry["defects"]), view.verdict.startswith("DEFECT"), view.score)
        assert "never saw" in view.model_label  # the mode says what it was measured to do off its object
    assert all(has_defect == flagged for has_defect, flagged, _ in verdicts.values()), verdicts
