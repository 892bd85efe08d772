"""AlphaCLIP describer: alpha stem, LoRA training, SupCon, save/reload, official checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectclip.alphaclip import (
    AlphaClipError,
    AlphaDescriber,
    AlphaImageTower,
    load_alphaclip_checkpoint,
    mask_to_alpha,
)
from defectclip.towers import build_vision_tower
from conftest import save_png
from train.alphaclip_lora import main as train_main
from train.alphaclip_lora import make_optimizer, supervised_contrastive_loss

PAIRS = [("tiny:clip", "tiny:clip"), ("tiny:cnn", "tiny:text")]
OBJECT = "steel strip"
DEFECTS = {"blob": "a bright blob on the steel strip", "line": "a dark line on the steel strip"}


def square_mask(size, top, left, side):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def images_and_masks(tower_size, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, *tower_size, generator=generator)
    masks = torch.stack([square_mask(tower_size, 4 + 8 * i, 8, 16) for i in range(count)])
    return images, masks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads contending with other work made the
    tiny models' steps 10-30x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# the alpha stem


@pytest.mark.parametrize("vision, text", PAIRS)
def test_alpha_conv_starts_at_zero_and_untuned_tower_equals_base(vision, text):
    describer = AlphaDescriber.build(vision, text)
    stem = describer.image.stem
    assert stem.alpha.bias is None and stem.alpha.in_channels == 1
    assert stem.alpha.weight.shape[0] == stem.rgb.out_channels and stem.alpha.kernel_size == stem.rgb.kernel_size
    assert torch.count_nonzero(stem.alpha.weight) == 0

    base = build_vision_tower(vision)
    images, masks = images_and_masks(describer.image.preprocess.size)
    with torch.no_grad():
        expected = base(images)
        for region in (masks, ~masks):
            assert torch.equal(describer.image.pooled(images, mask_to_alpha(region, images.shape[-2:])), expected)


def test_alpha_map_is_the_normalised_mask():
    mask = square_mask((8, 8), 2, 2, 4)
    alpha = mask_to_alpha(mask, (8, 8))
    assert alpha.shape == (1, 1, 8, 8)
    assert torch.allclose(alpha[0, 0][mask], torch.tensor((1 - 0.5) / 0.26))
    assert torch.allclose(alpha[0, 0][~mask], torch.tensor((0 - 0.5) / 0.26))
    # a speck smaller than the resize factor keeps a partial alpha instead of vanishing
    speck = torch.zeros(64, 64, dtype=torch.bool)
    speck[10, 10] = True
    assert mask_to_alpha(speck, (16, 16)).max() > (0 - 0.5) / 0.26


def test_alpha_tower_refuses_to_run_without_a_mask():
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text")
    with pytest.raises(AlphaClipError, match="needs a mask"):
        describer.image.base(torch.rand(1, 3, *describer.image.preprocess.size))


@pytest.mark.parametrize("vision, text", PAIRS)
def test_a_different_mask_changes_the_embedding_after_a_few_steps(vision, text):
    torch.manual_seed(0)
    describer = AlphaDescriber.build(vision, text)
    describer.attach_adapter(r=8, alpha=8, dropout=0.0)
    images, masks = images_and_masks(describer.image.preprocess.size)
    image = images[:1].expand(2, -1, -1, -1)
    pair = torch.stack([masks[0], ~masks[0]])  # a region and everything but it
    assert torch.equal(*describer.embed_regions(image, pair))  # alpha conv zero: the mask is ignored

    args = type("Args", (), {"alpha_lr": 1e-2, "rgb_lr": 1e-6, "lr": 1e-3, "weight_decay": 1e-4})()
    optimizer = make_optimizer(describer, args)
    pixels, alpha = describer.prepare(image, pair)
    text_embeddings = F.normalize(torch.randn(2, describer.text.dim), dim=-1)
    describer.image.train()
    for _ in range(3):
        loss = supervised_contrastive_loss(describer.image(pixels, alpha), text_embeddings, torch.tensor([0, 1]), 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    describer.image.eval()
    assert torch.count_nonzero(describer.image.stem.alpha.weight) > 0
    first, second = describer.embed_regions(image, pair)
    assert not torch.allclose(first, second, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the loss


def test_supcon_matches_a_hand_computed_four_sample_case():
    # Unit vectors at 0, 90, 180 and 45 degrees in 2-D; captions: samples 0 and 1 share caption A.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 2])
    temperature = 0.5

    expected = 0.0
    for i in range(4):
        logits = [float(images[i] @ texts[a]) / temperature for a in range(4)]
        log_denominator = math.log(sum(math.exp(v) for v in logits))
        positives = [p for p in range(4) if labels[p] == labels[i]]
        expected += -sum(logits[p] - log_denominator for p in positives) / len(positives)
    expected /= 4

    loss = supervised_contrastive_loss(images, texts, labels, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # by hand: e.g. anchor 2 (180 deg) has logits -2, -2, 0, -1.6 and its one positive at 0, so its
    # term is log(2 e^-2 + 1 + e^-1.6) = 0.3870; the four terms average to 0.95249
    assert loss.item() == pytest.approx(0.95249, abs=1e-4)


def test_supcon_is_lower_when_regions_match_their_captions():
    texts = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    aligned = supervised_contrastive_loss(torch.eye(3), texts, labels, 0.1)
    shuffled = supervised_contrastive_loss(torch.eye(3)[[1, 2, 0]], texts, labels, 0.1)
    assert aligned < shuffled


# --------------------------------------------------------------------------------------------------
# describe()


def test_describe_ranks_candidates_with_probabilities():
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text")
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:15, 5:20] = True
    ranked = describer.describe(image, mask, list(DEFECTS.values()))
    assert sorted(c for c, _ in ranked) == sorted(DEFECTS.values())
    probabilities = [p for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(AlphaClipError, match="empty"):
        describer.describe(image, np.zeros_like(mask), list(DEFECTS.values()))


# --------------------------------------------------------------------------------------------------
# training end to end, on a dataset built by `hub.datasets`


def write_two_defect_source(root: Path, n_train=16, n_test=6, size=48, seed=0) -> Path:
    """An index-mask source: bright square 'inclusion' blobs and dark thin 'scratches', 1-2 per image.

    Images alternate between one region and two regions of different types, so telling the
    regions of one image apart needs the mask.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    classes = {"0": "background", "1": "inclusion", "2": "scratches"}
    (root / "classes.json").write_text(json.dumps({"object": OBJECT, "classes": classes}))
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            gray = rng.normal(120, 8, (size, size))
            mask = np.zeros((size, size), np.uint8)
            blob_top = int(rng.integers(2, 14))
            if i % 2 == 0 or i % 4 == 1:
                gray[blob_top : blob_top + 8, 4:12] = 230
                mask[blob_top : blob_top + 8, 4:12] = 1
            if i % 2 == 1:
                row = int(rng.integers(28, 44))
                gray[row : row + 2, 16:44] = 20
                mask[row : row + 2, 16:44] = 2
            save_png(np.clip(gray, 0, 255).astype(np.uint8), root / "images" / split / f"{i:04d}.png")
            save_png(mask, root / "masks" / split / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def region_dataset(tmp_path_factory) -> Path:
    from hub.datasets import BuildConfig, build_dataset

    base = tmp_path_factory.mktemp("regions")
    source = write_two_defect_source(base / "source")
    build_dataset(BuildConfig(source=source, out_dir=base / "dataset", val_fraction=0.1))
    return base / "dataset"


def tiny_run_args(dataset: Path, output: Path, steps: int, *extra: str) -> list[str]:
    # The tiny ViT: the random tiny ResNet's pooled features hardly depend on its input (zero-initialised
    # last BatchNorm of every block), so it cannot learn in 30 steps. MiniLM rather than the random
    # tiny text tower: its two captions are far enough apart (cosine 0.68 against 0.93) to separate.
    return ["--dataset", str(dataset), "--output-dir", str(output), "--vision", "tiny:clip", "--text", "offline:minilm",
            "--max-steps", str(steps), "--batch-size", "8", "--lr", "3e-3", "--alpha-lr", "3e-3",
            "--lora-r", "4", "--lora-alpha", "4", "--warmup-steps", "2", "--temperature", "0.1", *extra]


def test_region_table_reads_the_built_dataset(region_dataset):
    from defectclip.region_dataset import load_region_table, read_dataset_candidates

    candidates = read_dataset_candidates(region_dataset)
    assert candidates == {OBJECT: ["an inclusion in the steel strip", "a scratch on the steel strip"]}
    table = load_region_table(region_dataset, "train", build_vision_tower("tiny:cnn").preprocess.with_size(32))
    assert table.images.dtype == torch.uint8 and table.images.shape[1:] == (3, 32, 32)
    assert table.coverage.shape == (len(table.region_image), 32, 32)
    assert set(table.captions) == set(candidates[OBJECT])
    assert len(table.region_image) > table.images.shape[0]  # some images hold two regions


def test_region_views_add_normal_regions_captioned_no_defect(region_dataset):
    """Training reads each region through the describer's own view, plus one normal region per image."""
    from defectclip.captions import no_defect_caption
    from defectclip.region_dataset import iter_region_records, load_region_views

    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16})
    caption = no_defect_caption(OBJECT)
    table = load_region_views(region_dataset, "train", describer.region_inputs, {OBJECT: caption})
    records = list(iter_region_records(region_dataset, "train"))
    defect_regions = sum(len(r.masks) for r in records)
    normal = [i for i, c in enumerate(table.caption_index.tolist()) if table.captions[c] == caption]
    assert 0 < len(normal) <= len(records) and len(table.region_image) == defect_regions + len(normal)
    assert table.images.shape[1:] == (3, 32, 32) and table.coverage.shape[1:] == (32, 32)
    assert all(table.region_defect[i] == "good" for i in normal)
    assert table.coverage[normal].float().mean() > 0  # a normal region is a region, not an empty mask
    plain = load_region_views(region_dataset, "train", describer.region_inputs)
    assert caption not in plain.captions and len(plain.region_image) == defect_regions


def test_two_datasets_in_one_view_table_equal_their_concatenated_tables(region_dataset, tmp_path):
    """Training adds every dataset to one table (half the peak memory); it must be the same table."""
    import shutil

    from defectclip.region_dataset import ViewTable, add_region_views, cat_releasing, concat_region_tables, load_region_views

    second = Path(shutil.copytree(region_dataset, tmp_path / "second"))
    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16})
    options = {"no_defect": {OBJECT: "no defect: a normal area"}, "mixed": 1, "loose": True}
    expected = concat_region_tables([load_region_views(region_dataset, "train", describer.region_inputs, **options),
                                     load_region_views(second, "train", describer.region_inputs, **options, seed=1)])
    table = ViewTable()
    add_region_views(table, region_dataset, "train", describer.region_inputs, **options)
    add_region_views(table, second, "train", describer.region_inputs, **options, seed=1)
    shared = table.finish()
    for field in ("images", "region_image", "coverage", "caption_index"):
        assert torch.equal(getattr(shared, field), getattr(expected, field)), field
    assert (shared.captions, shared.region_object, shared.region_defect) == \
        (expected.captions, expected.region_object, expected.region_defect)
    chunks = [torch.arange(6).reshape(3, 2), torch.arange(4).reshape(2, 2)]
    assert torch.equal(cat_releasing(chunks), torch.cat([torch.arange(6), torch.arange(4)]).reshape(5, 2))
    assert chunks == []  # each chunk let go as soon as it was copied


def test_each_mixed_copy_adds_regions_of_other_types(region_dataset):
    from defectclip.region_dataset import iter_region_records, load_region_views

    describer = AlphaDescriber.build("tiny:cnn", "tiny:text", image_size=32, view={"context": 2.0, "min_side": 16})
    defect_regions = sum(len(r.masks) for r in iter_region_records(region_dataset, "train"))
    counts = [len(load_region_views(region_dataset, "train", describer.region_inputs, mixed=copies).region_image)
              for copies in (0, 1, 2)]
    assert counts[0] == defect_regions, counts
    # every mixed copy repeats its image's own regions and adds at least one blended region of another type
    assert counts[1] >= 2 * defect_regions and counts[2] - counts[1] >= counts[1] - counts[0] - 2, counts


def test_thirty_step_run_lowers_the_loss_and_reloads_to_identical_outputs(region_dataset, tmp_path):
    result = train_main(tiny_run_args(region_dataset, tmp_path / "run", 30, "--export-merged", "--checkpointing-steps", "100"))
    losses = result["losses"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05

    trained = result["describer"]
    assert torch.count_nonzero(trained.image.stem.alpha.weight) > 0
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (model_dir / "describer.safetensors").is_file() and (model_dir / "describer_config.json").is_file()
    config = json.loads((model_dir / "describer_config.json").read_text())
    assert config["vision"] == "tiny:clip" and config["candidates"][OBJECT] and config["training"]["max_steps"] == 30
    assert config["lora"]["r"] == 4 and "transformer.resblocks.0.attn" in config["lora"]["targets"]

    images, masks = images_and_masks((48, 48), count=3, seed=1)
    assert not torch.allclose(*trained.embed_regions(images[:1].expand(2, -1, -1, -1), torch.stack([masks[0], ~masks[0]])))
    expected = trained.embed_regions(images, masks)
    # Equal to float rounding, not bit for bit: the reload merges the adapter once, and during training
    # PEFT's MultiheadAttention LoRA added and subtracted its delta around every forward.
    reloaded = [AlphaDescriber.from_pretrained(folder).embed_regions(images, masks) for folder in (tmp_path / "run", model_dir)]
    assert torch.equal(reloaded[0], reloaded[1])  # the training output dir or the model folder itself
    assert torch.allclose(reloaded[0], expected, atol=1e-5)
    unmerged = AlphaDescriber.from_pretrained(model_dir, merge_adapter=False).embed_regions(images, masks)
    assert torch.allclose(unmerged, expected, atol=1e-5)
    merged = AlphaDescriber.from_pretrained(tmp_path / "run" / "merged")
    assert merged.peft_model is None
    assert torch.allclose(merged.embed_regions(images, masks), expected, atol=1e-5)
    untuned = AlphaDescriber.from_pretrained(model_dir, untuned=True)
    assert torch.count_nonzero(untuned.image.stem.alpha.weight) == 0 and untuned.peft_model is None


class Crash(RuntimeError):
    """Stands in for a killed job."""


def test_resumed_run_matches_an_uninterrupted_one(region_dataset, tmp_path, monkeypatch):
    import train.common as loop  # the one training loop checkpoints through it

    augmented = ("--photometric", "0.3", "--rot90-prob", "0.5")  # drawn per step, so a resumed run sees the same
    whole = train_main(tiny_run_args(region_dataset, tmp_path / "whole", 6, *augmented))

    real_checkpoint = loop.maybe_checkpoint

    def checkpoint_then_crash(accelerator, progress, args, last_step):
        real_checkpoint(accelerator, progress, args, last_step)
        if progress.step == 3:
            raise Crash("killed after the step-3 checkpoint")

    monkeypatch.setattr(loop, "maybe_checkpoint", checkpoint_then_crash)
    with pytest.raises(Crash):
        train_main(tiny_run_args(region_dataset, tmp_path / "split", 6, *augmented, "--checkpointing-steps", "3"))
    monkeypatch.setattr(loop, "maybe_checkpoint", real_checkpoint)
    resumed = train_main(tiny_run_args(region_dataset, tmp_path / "split", 6, *augmented, "--checkpointing-steps", "3",
                                       "--resume", "latest"))
    assert resumed["losses"] == pytest.approx(whole["losses"][3:], rel=1e-5)
    images, masks = images_and_masks((48, 48), count=2, seed=2)
    assert torch.allclose(resumed["describer"].embed_regions(images, masks), whole["describer"].embed_regions(images, masks), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# official AlphaCLIP checkpoints


def official_layout(tower: AlphaImageTower, alpha_weight: torch.Tensor, attention_style="mha", prefix="") -> dict:
    """The tiny ViT's weights under AlphaCLIP's released key names (plus a given conv1_alpha)."""
    state = {}
    for key, value in tower.base.model.state_dict().items():
        if key == "conv1.rgb.weight":
            key = "conv1.weight"
        elif key == "conv1.alpha.weight":
            continue
        elif attention_style == "linear":  # AlphaCLIP's own Attention: in_proj is an nn.Linear
            key = key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
        state[prefix + key] = value.clone()
    state[prefix + "conv1_alpha.weight"] = alpha_weight
    return state


def reference_embedding(plain_visual, alpha_weight, pixels, alpha):
    """What AlphaCLIP computes: the plain ViT with conv1(x) + conv1_alpha(alpha) as its patch embedding."""
    stride = plain_visual.conv1.stride
    hook = plain_visual.conv1.register_forward_hook(lambda _m, _i, out: out + F.conv2d(alpha, alpha_weight, stride=stride))
    try:
        with torch.no_grad():
            return plain_visual(pixels)
    finally:
        hook.remove()


@pytest.mark.parametrize("attention_style, prefix", [("mha", ""), ("mha", "visual."), ("linear", "")])
def test_official_checkpoint_loads_into_the_open_clip_vit(tmp_path, attention_style, prefix):
    plain = build_vision_tower("tiny:clip")
    source = AlphaImageTower(plain, plain.num_features)
    torch.manual_seed(1)
    for parameter in source.base.model.parameters():  # weights unlike tiny:clip's, so a no-op load would fail
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    alpha_weight = 0.1 * torch.randn_like(source.stem.alpha.weight)
    path = tmp_path / "alpha_clip_tiny.pth"
    torch.save(official_layout(source, alpha_weight, attention_style, prefix), path)

    loaded = load_alphaclip_checkpoint(path, build_vision_tower("tiny:clip"))
    assert torch.equal(loaded.stem.alpha.weight, alpha_weight)
    images, masks = images_and_masks(loaded.preprocess.size)
    alpha = mask_to_alpha(masks, images.shape[-2:])
    source_visual = source.base.model
    import copy

    plain_visual = copy.deepcopy(build_vision_tower("tiny:clip").model)
    plain_visual.conv1 = copy.deepcopy(source_visual.conv1.rgb)
    plain_visual.load_state_dict({k.replace("conv1.rgb.", "conv1."): v for k, v in source_visual.state_dict().items() if "conv1.alpha" not in k})
    with torch.no_grad():
        got = loaded.pooled(images, alpha)
    assert torch.allclose(got, reference_embedding(plain_visual, alpha_weight, images, alpha), atol=1e-5)
    assert not torch.allclose(got, build_vision_tower("tiny:clip")(images), atol=1e-3)


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_official_checkpoint_loader_rejects_extra_missing_or_misshapen_keys(tmp_path, damage):
    tower = AlphaImageTower(build_vision_tower("tiny:clip"), 32)
    state = official_layout(tower, torch.zeros_like(tower.stem.alpha.weight))
    if damage == "extra":
        state["transformer.resblocks.0.attn.lora_A"] = torch.zeros(4, 32)
    elif damage == "missing":
        del state["ln_post.weight"]
    else:
        state["proj"] = torch.zeros(32, 16)
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    with pytest.raises(AlphaClipError, match={"extra": "lora_A", "missing": "ln_post.weight", "shape": "proj"}[damage]):
        load_alphaclip_checkpoint(path, tower)
