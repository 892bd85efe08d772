"""The split-mask caption dataset builder on tiny sources written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hub import datasets as builder
from defectclip.region_dataset import label_decoders
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from hub.datasets import BuildConfig, RegionParams, build_dataset, main, push_dataset

SIZE = (48, 64)  # height, width


def noise_image(rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    image = rng.integers(90, 160, SIZE + (() if gray else (3,)), dtype=np.uint8)
    return image


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def blobs(boxes) -> np.ndarray:
    mask = np.zeros(SIZE, dtype=np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


TWO_BLOBS = [(4, 14, 4, 16), (30, 42, 40, 58)]
ONE_BLOB = [(10, 26, 20, 40)]


def write_mvtec(root: Path) -> Path:
    """Category 'metal_plate': 3 normal train images, 2 normal test images, 5 'crack' images with two
    blobs each, 3 'hole' images with one blob."""
    rng = np.random.default_rng(0)
    category = root / "metal_plate"
    for i in range(3):
        save(noise_image(rng), category / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save(noise_image(rng), category / "test" / "good" / f"{i:03d}.png")
    for defect, count, boxes in (("crack", 5, TWO_BLOBS), ("hole", 3, ONE_BLOB)):
        for i in range(count):
            mask = blobs(boxes)
            image = noise_image(rng)
            image[mask > 0] = 20
            save(image, category / "test" / defect / f"{i:03d}.png")
            save(mask, category / "ground_truth" / defect / f"{i:03d}_mask.png")
    return category


def write_index_masks(root: Path) -> Path:
    """'steel strip', classes inclusion (1) and patches (2). Train: 6 images, image 0 holds both types
    (inclusion as two blobs), image 5 only a 4-pixel speck (its region is dropped, the image skipped).
    Test: 2 images with one inclusion blob."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    classes = {"object": "steel strip", "classes": {"0": "background", "1": "inclusion", "2": "patches"}}
    (root / "classes.json").write_text(json.dumps(classes))
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            index = np.zeros(SIZE, dtype=np.uint8)
            if split == "train" and i == 0:
                index[blobs(TWO_BLOBS) > 0] = 1
                index[20:28, 20:34] = 2
            elif split == "train" and i == 5:
                index[20:22, 20:22] = 1
            else:
                index[blobs(ONE_BLOB) > 0] = 1
            save(noise_image(rng, gray=True), root / "images" / split / f"{i:04d}.jpg")
            save(index, root / "masks" / split / f"{i:04d}.png")
    return root


def load(out_dir: Path):
    from datasets import load_from_disk

    return load_from_disk(str(out_dir))


@pytest.fixture(scope="module")
def mvtec_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    source = write_mvtec(root)
    out = root / "out" / "plates"
    config = BuildConfig(source=source, out_dir=out, val_fraction=0.2, test_fraction=0.3, seed=0,
                         repo_id="acme/plates")
    return source, out, build_dataset(config)


@pytest.fixture(scope="module")
def index_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    source = write_index_masks(root / "steel")
    out = root / "out" / "steel_regions"
    assert main(["build", str(source), str(out), "--val-fraction", "0.34", "--seed", "1"]) == 0
    return source, out, json.loads((out / "stats.json").read_text())


def test_mvtec_defective_test_images_are_divided_per_type(mvtec_build):
    _, out, stats = mvtec_build
    dataset = load(out)
    # crack: 5 -> test round(1.5)=2, validation round(1.0)=1, train 2; hole: 3 -> 1, 1, 1. No normals.
    assert {split: len(dataset[split]) for split in dataset} == {"train": 3, "validation": 2, "test": 3}
    assert {s: stats["splits"][s]["regions"] for s in builder.SPLITS} == {"train": 5, "validation": 3, "test": 5}
    assert stats["splits"]["train"]["regions_by_defect"] == {"crack": 4, "hole": 1}
    assert stats["splits"]["test"]["images_by_region_count"] == {"1": 1, "2": 2}
    sources = [s for split in dataset for s in dataset[split]["source"]]
    assert len(set(sources)) == 8 and all(s.startswith("test/") for s in sources)


def test_records_carry_object_captions_bboxes_and_pixel_exact_masks(mvtec_build):
    source, out, _ = mvtec_build
    dataset = load(out)
    for split in dataset:
        object_name, defect_name = label_decoders(dataset[split])
        assert dataset[split].features["object"].names == ["metal plate"]  # a ClassLabel, not free text
        for record in dataset[split]:
            assert object_name(record["object"]) == "metal plate"
            truth = np.array(Image.open(source / record["source"].replace("test/", "ground_truth/", 1)
                                        .replace(".png", "_mask.png"))) > 0
            masks = [np.array(r["mask"]) for r in record["regions"]]
            assert all(set(np.unique(m)) <= {0, 255} for m in masks)
            assert (np.sum([m > 0 for m in masks], axis=0) == truth).all()  # round trip, pixel-exact
            for region, mask in zip(record["regions"], masks):
                ys, xs = np.nonzero(mask)
                assert region["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                expected = {"crack": "a crack in the metal plate", "hole": "a hole in the metal plate"}
                assert region["caption"] == expected[defect_name(region["defect"])]
            image = np.array(record["image"])
            assert image.shape[:2] == SIZE


def test_mvtec_card_candidates_and_stats_files(mvtec_build):
    _, out, stats = mvtec_build
    assert json.loads((out / "candidates.json").read_text()) == {
        "metal plate": ["a crack in the metal plate", "a hole in the metal plate"]}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: other" in card
    assert "| metal plate | 3 | 2 | 3 | 8 |" in card  # images per object x split
    assert "| 2 | 2 | 1 | 2 | 5 |" in card  # images with two regions per split
    assert 'load_dataset("acme/plates")' in card and 'load_from_disk("plates")' in card
    assert "path: train/data-*.arrow" in card  # the build folder's own files: load_dataset(<folder>) reads them
    assert "license_name: not-stated" in card and "license_link: LICENSE.md" in card  # the Hub's licence block
    assert "Not stated" in (out / "LICENSE.md").read_text()  # an unknown source's terms, said plainly
    assert "eps` | 5.0 px" in card and stats["dropped_regions"] == 0


def test_index_mask_build_counts_drops_and_types(index_build):
    _, out, stats = index_build
    dataset = load(out)
    # train 6 -> validation round(6 * 0.34) = 2, train 4; the speck-only image is skipped wherever it went.
    assert sum(len(dataset[s]) for s in ("train", "validation")) == 5
    assert len(dataset["test"]) == 2
    assert stats["dropped_regions"] == 1 and stats["skipped_without_regions"] == 1
    records = [r for s in ("train", "validation") for r in dataset[s]]
    both = next(r for r in records if r["source"] == "images/train/0000.jpg")
    _, defect_name = label_decoders(dataset["train"])
    assert dataset["train"].features["regions"].feature["defect"].names == ["inclusion", "patches"]
    assert [defect_name(r["defect"]) for r in both["regions"]] == ["inclusion", "inclusion", "patches"]
    assert both["regions"][2]["caption"] == "a patch on the steel strip"
    assert both["image"].format == "JPEG"  # the source's own bytes, not re-encoded
    card = (out / "README.md").read_text()
    assert "NEU" not in card and "Not stated" in card  # an unknown source says so
    assert "| steel strip |" in card and "| **Total** |" in card
    assert json.loads((out / "candidates.json").read_text()) == {
        "steel strip": ["an inclusion in the steel strip", "a patch on the steel strip"]}


def test_validation_split_is_seeded(tmp_path, index_build):
    source, out, _ = index_build
    again = tmp_path / "again"
    config = BuildConfig(source=source, out_dir=again, val_fraction=0.34, seed=1)
    build_dataset(config)
    assert load(again)["validation"]["source"] == load(out)["validation"]["source"]


def test_include_normal_keeps_normal_images_with_no_regions(tmp_path):
    source = write_mvtec(tmp_path / "src")
    stats = build_dataset(BuildConfig(source=source, out_dir=tmp_path / "out", val_fraction=0.2,
                                      test_fraction=0.3, include_normal=True))
    # defective as before (3 / 2 / 3) plus train/good 3 -> validation round(0.6) = 1, train 2; test/good 2 -> test
    assert {s: stats["splits"][s]["images"] for s in builder.SPLITS} == {"train": 5, "validation": 3, "test": 5}
    assert stats["splits"]["test"]["images_by_region_count"]["0"] == 2
    normal = [r for r in load(tmp_path / "out")["train"] if r["source"].startswith("train/good/")]
    assert len(normal) == 2 and all(r["regions"] == [] for r in normal)


def test_transplant_adds_training_images_with_one_region(tmp_path):
    source = write_mvtec(tmp_path / "src")
    out = tmp_path / "out"
    stats = build_dataset(BuildConfig(source=source, out_dir=out, val_fraction=0.2, test_fraction=0.3,
                                      transplant=4, regions=RegionParams(min_area=16)))
    train = load(out)["train"]
    made = [r for r in train if r["source"].startswith("transplant:")]
    assert len(made) == 4 and stats["splits"]["train"]["transplanted"] == 4
    for record in made:
        assert len(record["regions"]) == 1 and np.array(record["regions"][0]["mask"]).any()
        assert "-> train/good/" in record["source"]


def test_transplant_without_normal_images_is_refused(tmp_path):
    source = write_index_masks(tmp_path / "steel")
    code = main(["build", str(source), str(tmp_path / "out"), "--transplant", "2"])
    assert code == 2


def test_existing_output_needs_overwrite(index_build):
    source, out, _ = index_build
    assert main(["build", str(source), str(out)]) == 2
    (out.parent / "foreign").mkdir()
    (out.parent / "foreign" / "notes.txt").write_text("keep me")
    assert main(["build", str(source), str(out.parent / "foreign"), "--overwrite"]) == 2
    assert (out.parent / "foreign" / "notes.txt").exists()


def test_load_dataset_reads_the_local_build_folder_with_its_class_labels(tmp_path, index_build):
    from datasets import load_dataset

    _, out, _ = index_build
    local = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))  # resolves the splits through the card
    built = load(out)
    assert {s: len(local[s]) for s in local} == {s: len(built[s]) for s in built if len(built[s])}
    assert local["train"].features == built["train"].features  # ClassLabels survive
    assert (np.array(local["test"][0]["regions"][0]["mask"]) == np.array(built["test"][0]["regions"][0]["mask"])).all()


def test_push_goes_through_datasetdict_push_to_hub_and_loads_back(fake_hub, index_build, tmp_path):  # noqa: F811
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    _, out, _ = index_build
    push_dataset(out, "defectclip/steel-regions", echo=lambda _: None)
    files = set(fake_hub.repo_files("defectclip/steel-regions", "dataset"))
    assert {"README.md", "candidates.json", "stats.json", "LICENSE.md"} <= files
    assert any(name.startswith("data/train-") and name.endswith(".parquet") for name in files)
    card = DatasetCard.load("defectclip/steel-regions", repo_type="dataset")
    assert card.data.dataset_info is not None and card.data.license == "other" and card.data.license_link
    assert "split-mask captions" in card.text  # our card's body, with the metadata datasets wrote

    pulled = load_dataset("defectclip/steel-regions")
    built = load(out)
    assert {s: len(pulled[s]) for s in pulled} == {s: len(built[s]) for s in built if len(built[s])}
    assert pulled["train"].features["object"].names == built["train"].features["object"].names

    # Pushed again: the README datasets rewrote in between still counts as ours, so our card replaces it.
    assert not push_dataset(out, "defectclip/steel-regions", echo=lambda _: None).readme_kept
    # A README a person edited on the Hub is kept.
    fake_hub.commit_files("defectclip/steel-regions", {"README.md": b"# edited by hand\n"}, "dataset")
    assert push_dataset(out, "defectclip/steel-regions", echo=lambda _: None).readme_kept


def test_push_dry_run_lists_the_exported_files(index_build, capsys):
    _, out, _ = index_build
    assert main(["push", str(out), "acme/steel-regions", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "acme/steel-regions" in printed and "train (" in printed and "candidates.json" in printed


def test_empty_splits_are_saved_and_left_out_of_the_hub_export(tmp_path):
    source = write_index_masks(tmp_path / "steel")
    out = tmp_path / "out"
    stats = build_dataset(BuildConfig(source=source, out_dir=out, val_fraction=0.0))
    assert stats["splits"]["validation"]["images"] == 0 and len(load(out)["validation"]) == 0
    assert "validation" not in (out / "README.md").read_text().split("---")[1]  # not in the card's configs
    from datasets import load_dataset

    assert sorted(load_dataset(str(out), cache_dir=str(tmp_path / "cache"))) == ["test", "train"]
    # a split whose every image lost its regions is empty too, not an error
    nothing = build_dataset(BuildConfig(source=source, out_dir=tmp_path / "none", regions=RegionParams(min_area=10**6)))
    assert all(s["images"] == 0 for s in nothing["splits"].values()) and nothing["skipped_without_regions"] == 8
