"""One artifact contract for all five kinds, over real HTTP against the fake Hub.

For TAB, PatchCore/PaDiM, the region describer, CLIP-ADA and the inspection pipeline: `push_to_hub("org/repo")`
publishes the files with a model card, `X.from_pretrained("org/repo")` (clean cache) and
`X.from_pretrained(local_dir)` give outputs equal to the pushed object's, a `revision` reads an older push,
and a push deletes the remote files its version no longer has.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured_image
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from huggingface_hub import HfApi, ModelCard

from defectclip.alphaclip import AlphaDescriber
from defectclip.artifacts import ArtifactError
from defectclip.clip_ada import ClipADA, ClipADAConfig
from defectclip.data import array_to_tensor
from defectclip.pipeline import InspectionModel, InspectionPipeline, backbone_label, plain_model_name
from defectclip.scoring import FeatureScorer, PaDiM, PatchCore
from defectclip.tab import TABBackbone, TABConfig

OBJECT = "widget"
CAPTIONS = ["a scratch on the widget", "a dent in the widget"]


def quiet(_message: str) -> None:
    pass


def perturb(parameters, seed: int) -> None:
    """Move weights off their seeded start, so a loader that rebuilt the untrained model would be caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng) for _ in range(count)]


def defect_image() -> np.ndarray:
    image = textured_image(np.random.default_rng(99))
    image[14:26, 30:44] = 250
    return image


def region() -> np.ndarray:
    mask = np.zeros((48, 64), bool)
    mask[14:26, 30:44] = True
    return mask


# ------------------------------------------------------------------------------------------ each kind's output


def tab_model() -> TABBackbone:
    model = TABBackbone.build(TABConfig(vision="tiny:cnn", text="tiny:text", objects=[OBJECT], text_dim=32))
    perturb(model.parameters(), seed=1)
    return model.eval()


def tab_output(model: TABBackbone):
    with torch.no_grad():
        return model(torch.stack([array_to_tensor(image) for image in images(2)]))


def fitted(cls):
    def build():
        options = {"d": 20} if cls is PaDiM else {"coreset_ratio": 0.5}
        model = cls("tiny:cnn", device="cpu", **options).fit(images(4))
        model.calibrate(images(2, seed=1))
        return model
    return build


def scorer_output(model: FeatureScorer):
    result = model.predict([defect_image()])[0]
    return result.anomaly_map, result.score, result.threshold


def describer_model() -> AlphaDescriber:
    model = AlphaDescriber.build("tiny:cnn", "tiny:text", candidates={OBJECT: CAPTIONS})
    model.attach_adapter(r=4, alpha=4, dropout=0.0)
    perturb([p for p in model.image.parameters() if p.requires_grad], seed=2)
    return model.eval()


def describer_output(model: AlphaDescriber):
    return model.describe(defect_image(), region(), CAPTIONS)


def clip_ada_model() -> ClipADA:
    torch.manual_seed(0)
    model = ClipADA(ClipADAConfig(vision="tiny:cnn", text="tiny:text", refine_steps=1, threshold=0.42))
    perturb(model.trainable_parameters(), seed=3)
    return model.eval()


def clip_ada_output(model: ClipADA):
    result = model.predict([defect_image()])[0]
    return result.anomaly_map, result.score


def pipeline_model() -> InspectionPipeline:
    scorer = fitted(PatchCore)()
    name = plain_model_name(OBJECT, "patchcore", backbone_label("tiny:cnn"))  # how a loaded pipeline names it
    return InspectionPipeline({name: InspectionModel(name, OBJECT, "patchcore", scorer)}, describer_model(),
                              clip_ada_model())


def pipeline_output(pipeline: InspectionPipeline):
    image = defect_image()
    maps = {name: pipeline.score(image, name).anomaly_map for name in sorted(pipeline.model_names)}
    return maps, pipeline.describe(image, region(), OBJECT)


KINDS = {
    "tab": (TABBackbone, tab_model, tab_output),
    "patchcore": (PatchCore, fitted(PatchCore), scorer_output),
    "padim": (FeatureScorer, fitted(PaDiM), scorer_output),  # the base class loads either, by model_type
    "describer": (AlphaDescriber, describer_model, describer_output),
    "clip_ada": (ClipADA, clip_ada_model, clip_ada_output),
    "pipeline": (InspectionPipeline, pipeline_model, pipeline_output),
}


def assert_same(ours, theirs) -> None:
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert_same(ours[key], theirs[key])
    elif isinstance(ours, (tuple, list)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    elif isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs)
    elif isinstance(ours, np.ndarray):
        assert np.array_equal(ours, theirs)
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)  # describer probabilities: merged LoRA, rounding
    else:
        assert ours == theirs


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_pretrained_repo_and_local_dir_give_the_pushed_objects_outputs(kind, fake_hub, tmp_path):  # noqa: F811
    cls, build, output = KINDS[kind]
    model = build()
    expected = output(model)
    repo = f"defectclip/{kind.replace('_', '-')}-tiny"

    model.push_to_hub(repo, echo=quiet)
    files = set(fake_hub.repo_files(repo))
    assert "README.md" in files and any(name.endswith(".safetensors") for name in files)
    assert ModelCard(fake_hub.repo_files(repo)["README.md"].decode()).data.license  # a card that parses

    assert_same(expected, output(cls.from_pretrained(repo)))
    assert_same(expected, output(cls.from_pretrained(model.save_pretrained(tmp_path / kind))))


def test_revision_reads_an_older_push_and_a_push_deletes_stale_files(fake_hub):  # noqa: F811
    repo = "defectclip/clip-ada-versions"
    first = clip_ada_model()
    first.push_to_hub(repo, echo=quiet)
    first_commit = HfApi().repo_info(repo).sha
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="metrics.json", repo_id=repo)  # an old run's file
    second = clip_ada_model()
    perturb(second.trainable_parameters(), seed=7)
    second.push_to_hub(repo, token=fake_hub.token, echo=quiet)

    assert "metrics.json" not in fake_hub.repo_files(repo)
    assert_same(clip_ada_output(second), clip_ada_output(ClipADA.from_pretrained(repo, token=fake_hub.token)))
    assert_same(clip_ada_output(first), clip_ada_output(ClipADA.from_pretrained(repo, revision=first_commit)))


def test_a_source_that_is_neither_folder_nor_repo_says_so(fake_hub):  # noqa: F811
    with pytest.raises(ArtifactError, match="neither an artifact folder on this machine nor a Hub repo id"):
        ClipADA.from_pretrained("./no/such/folder")
    with pytest.raises(ArtifactError, match="cannot be fetched from the Hub"):
        TABBackbone.from_pretrained("defectclip/never-pushed")


def test_every_kind_uses_the_one_contract_and_the_old_names_are_gone():
    for cls, _, _ in KINDS.values():
        for name in ("save_pretrained", "from_pretrained", "push_to_hub"):
            assert callable(getattr(cls, name)), (cls, name)
        for old in ("save", "load", "from_folder"):
            assert not hasattr(cls, old), (cls, old)
