"""Shared fixtures: small images and dataset folders written by the tests themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests never touch the network: towers that need the Hub must fail fast instead of retrying.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny_cnn():
    """A random tiny CNN tower (built in well under a second), one per test module."""
    from defectclip.towers import build_vision_tower

    return build_vision_tower("tiny:cnn")


def textured_image(rng: np.random.Generator, size=(48, 64)) -> np.ndarray:
    """A smooth gradient plus noise: something a model can tell apart from a pasted blob."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 90 + 40 * np.sin(xx / 7.0) + 30 * np.cos(yy / 5.0)
    noisy = base[..., None] + rng.normal(0, 6, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


BLOB = (slice(14, 26), slice(30, 44))  # rows, columns of the pasted defect in a 48 x 64 image


def normal_tensors(count: int) -> list:
    """`count` textured normal images as tensors, the same ones in every test module."""
    from defectclip.data import array_to_tensor

    rng = np.random.default_rng(0)
    return [array_to_tensor(textured_image(rng)) for _ in range(count)]


@pytest.fixture(scope="module")
def normal_images():
    return normal_tensors(6)


@pytest.fixture(scope="module")
def blob_image():
    """A normal-looking image with a bright square pasted in at BLOB: the defect."""
    from defectclip.data import array_to_tensor

    image = textured_image(np.random.default_rng(99))
    image[BLOB] = 250
    return array_to_tensor(image)


def save_png(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def write_mvtec_category(root: Path, name="widget", n_train=4, n_good_test=2, defects=("scratch",), seed=0):
    """A tiny MVTec AD category: train/good, test/good, test/<type> with masks in ground_truth."""
    rng = np.random.default_rng(seed)
    category = root / name
    for i in range(n_train):
        save_png(textured_image(rng), category / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good_test):
        save_png(textured_image(rng), category / "test" / "good" / f"{i:03d}.png")
    for defect in defects:
        for i in range(2):
            image = textured_image(rng)
            mask = np.zeros(image.shape[:2], np.uint8)
            mask[10 + 5 * i : 20 + 5 * i, 12:30] = 255
            image[mask > 0] = 250
            save_png(image, category / "test" / defect / f"{i:03d}.png")
            save_png(mask, category / "ground_truth" / defect / f"{i:03d}_mask.png")
    return category


def write_index_mask_dataset(root: Path, n=3, seed=0):
    """A tiny index-mask dataset with two defect classes; image 0 holds both classes."""
    rng = np.random.default_rng(seed)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"object": "steel strip", "classes": {"0": "background", "1": "inclusion", "2": "scratches"}}))
    for split in ("train", "test"):
        for i in range(n):
            gray = textured_image(rng, (40, 40))[..., 0]
            mask = np.zeros((40, 40), np.uint8)
            mask[5:12, 5:12] = 1
            if i == 0:
                mask[25:35, 20:38] = 2
            save_png(gray, root / "images" / split / f"{i:04d}.png")
            save_png(mask, root / "masks" / split / f"{i:04d}.png")
    return root


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    write_mvtec_category(root, "widget")
    write_mvtec_category(root, "gadget_box", defects=("crack", "hole"), seed=1)
    return root


@pytest.fixture
def index_root(tmp_path) -> Path:
    return write_index_mask_dataset(tmp_path / "steel")
