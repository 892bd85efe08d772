"""Readers for both layouts, image modes, clear errors, and the shared transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_png, write_mvtec_category
from defectclip.data import (
    DataError,
    IndexMaskDataset,
    MVTecDataset,
    Preprocess,
    build_transform,
    load_image,
    open_dataset,
)


def test_mvtec_reader_counts_labels_and_masks(mvtec_root):
    train = MVTecDataset(mvtec_root, "train")
    assert len(train) == 8 and set(train.labels) == {0}
    test = MVTecDataset(mvtec_root, "test")
    assert len(test) == (2 + 2) + (2 + 2 + 2)  # widget: good + one type; gadget_box: good + two types
    assert test.objects == ["gadget box", "widget"]
    defective = next(s for s in test if s.label == 1)
    assert defective.image.shape == (3, 48, 64) and defective.image.dtype == torch.float32
    (name, mask), = defective.masks.items()
    assert mask.dtype == torch.bool and mask.sum() == 10 * 18
    assert torch.equal(defective.mask, mask)
    good = next(s for s in test if s.label == 0)
    assert good.masks == {} and not good.mask.any()


def test_mvtec_reader_accepts_a_category_folder_and_filters_categories(mvtec_root):
    assert len(MVTecDataset(mvtec_root / "widget", "train")) == 4
    assert len(MVTecDataset(mvtec_root, "train", categories=["gadget_box"])) == 4
    with pytest.raises(DataError, match="Unknown categories"):
        MVTecDataset(mvtec_root, "train", categories=["nope"])


def test_index_mask_reader_gives_masks_per_type(index_root):
    dataset = IndexMaskDataset(index_root, "train")
    first = dataset[0]
    assert first.object == "steel strip"
    assert set(first.masks) == {"inclusion", "scratches"} and first.defect == "inclusion+scratches"
    assert first.masks["inclusion"].sum() == 49 and first.masks["scratches"].sum() == 10 * 18
    assert first.image.shape == (3, 40, 40)  # grayscale became RGB
    assert open_dataset(index_root, "test").__class__ is IndexMaskDataset


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P"])
def test_any_image_mode_becomes_rgb_float(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 4096, (10, 12))).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    tensor = load_image(tmp_path / "x.png")
    assert tensor.shape == (3, 10, 12) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    if mode == "I;16":
        # Scaled by the container's bit depth (65535 = white), the same for every image: 12-bit data
        # is neither clipped to white nor stretched by its own maximum.
        expected = torch.from_numpy(np.round(np.asarray(img, dtype=np.float64) * 255 / 65535) / 255).float()
        assert torch.allclose(tensor[0], expected, atol=1e-6)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MVTecDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an MVTec AD layout"):
        MVTecDataset(tmp_path / "empty")


def test_anomalous_image_without_mask_is_named(mvtec_root):
    (mvtec_root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="001.png has no mask"):
        MVTecDataset(mvtec_root, "test")


def test_mask_of_another_size_is_named(mvtec_root):
    save_png(np.zeros((10, 10), np.uint8), mvtec_root / "widget" / "ground_truth" / "scratch" / "000_mask.png")
    dataset = MVTecDataset(mvtec_root / "widget", "test")
    index = next(i for i, ref in enumerate(dataset.refs) if ref.defect == "scratch")
    with pytest.raises(DataError, match="000_mask.png is 10x10 but its image .* is 64x48"):
        dataset[index]


def test_unreadable_file_is_named(mvtec_root):
    bad = mvtec_root / "widget" / "train" / "good" / "000.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="000.png"):
        MVTecDataset(mvtec_root / "widget", "train")[0]


def test_empty_split_is_an_error(tmp_path):
    write_mvtec_category(tmp_path, "widget", n_train=0)
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="No images"):
        MVTecDataset(tmp_path / "widget", "train")


def test_index_mask_with_unnamed_class_is_an_error(index_root):
    save_png(np.full((40, 40), 7, np.uint8), index_root / "masks" / "train" / "0001.png")
    with pytest.raises(DataError, match=r"class indices \[7\]"):
        IndexMaskDataset(index_root, "train")[1]


def test_transform_resizes_and_normalises():
    preprocess = Preprocess(size=(32, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform = build_transform(preprocess)
    out = transform(torch.full((3, 100, 50), 0.75))
    assert out.shape == (3, 32, 16) and torch.allclose(out, torch.ones_like(out))
    assert transform(torch.rand(4, 3, 10, 10)).shape == (4, 3, 32, 16)
    mask = torch.zeros(100, 50, dtype=torch.bool)
    mask[:50] = True
    small = transform.mask(mask)
    assert small.dtype == torch.bool and small[:16].all() and not small[16:].any()
    with pytest.raises(ValueError, match="RGB images"):
        transform(torch.rand(1, 10, 10))
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess
