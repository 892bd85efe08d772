"""CLIP-ADA: what trains, the prompt insertion, refinement heads, scoring, save/load and the training script."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from defectclip.clip_ada import (
    CTX_SLOT,
    ClipADA,
    ClipADAConfig,
    clip_ada_loss,
    locate_slots,
    top_k_for,
    top_k_mean,
)
from defectclip.data import load_image, load_index_mask
from defectclip.towers import build_text_tower, build_vision_tower
from train import clip_ada as train_clip_ada

TEMPLATE = f"a photo of a {CTX_SLOT} with defects for anomaly detection"


@pytest.fixture(scope="module")
def towers():
    return build_vision_tower("tiny:cnn"), build_text_tower("tiny:text")


@pytest.fixture(scope="module")
def clip_towers():
    return build_vision_tower("tiny:clip"), build_text_tower("tiny:clip")


def make_model(towers, **overrides) -> ClipADA:
    vision, text = towers
    torch.manual_seed(0)
    return ClipADA(ClipADAConfig(vision=vision.spec, text=text.spec, **overrides), vision=vision, text=text)


def tower_snapshot(model: ClipADA) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.towers.named_parameters()}


def synthetic_batch(model: ClipADA, mvtec_root, n: int = 6) -> dict[str, torch.Tensor]:
    """A fixed batch of fixture images, every one with a seeded Perlin anomaly."""
    paths = train_clip_ada.list_normal_images([mvtec_root])
    dataset = train_clip_ada.SyntheticAnomalies(paths, model.preprocess, "perlin", anomaly_prob=1.0, seed=0)
    items = [dataset[(i % len(dataset), 0)] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def train_steps(model: ClipADA, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = clip_ada_loss(model(batch["image"]), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- training


def test_only_projections_context_and_scale_train(towers, mvtec_root):
    model = make_model(towers, refine_steps=1)
    before_towers = tower_snapshot(model)
    before_trainable = {k: v.detach().clone() for k, v in model.state_dict().items()}

    train_steps(model, synthetic_batch(model, mvtec_root, n=4), steps=3)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"log_scale", "prompt.ctx", "projections.0.weight", "projections.0.bias",
                         "projections.1.weight", "projections.1.bias"}
    assert not any(p.requires_grad for p in model.towers.parameters())
    assert all(torch.equal(before_towers[k], v) for k, v in model.towers.named_parameters())
    assert all(not torch.equal(before_trainable[k], v) for k, v in model.state_dict().items())
    assert not model.towers.training  # model.train() must not switch dropout / batch norm on in the towers


def test_twenty_steps_on_the_fixture_lower_the_loss(towers, mvtec_root):
    model = make_model(towers, refine_steps=1)
    losses = train_steps(model, synthetic_batch(model, mvtec_root), steps=20)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


# ---------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("which", ["towers", "clip_towers"])
def test_context_vectors_replace_exactly_the_placeholder_slots(which, request):
    """With the context set to the placeholder's own embedding, the prompt equals the plain sentence."""
    model = make_model(request.getfixturevalue(which))
    text = model.towers.text
    tokens, start = locate_slots(text, TEMPLATE, 4)
    with torch.no_grad():
        model.prompt.ctx.copy_(text.token_embedding(tokens.input_ids[0, start : start + 4]))
        plain = text.encode([TEMPLATE.replace(CTX_SLOT, "x x x x")])[0]
        assert torch.allclose(model.text_embedding(), plain, atol=1e-5)


def test_context_gets_gradient_through_the_frozen_text_tower(towers):
    model = make_model(towers)
    model.text_embedding().sum().backward()
    assert model.prompt.ctx.grad is not None and model.prompt.ctx.grad.abs().sum() > 0


def test_word_initialisation_starts_every_slot_at_the_word(towers):
    model = make_model(towers, ctx_init="word", ctx_word="object")
    text = model.towers.text
    word_id = text.tokenize(["object"]).input_ids[0, 1]
    expected = text.token_embedding.weight[word_id].detach()
    assert torch.allclose(model.prompt.ctx.detach(), expected.expand(4, -1))


def test_fixed_prompt_mode_has_no_context_parameters(towers):
    model = make_model(towers, learnable_prompt=False)
    names = {n for n, _ in model.named_parameters() if _.requires_grad}
    assert not any("ctx" in n for n in names)
    assert names == {"log_scale", "projections.0.weight", "projections.0.bias", "projections.1.weight", "projections.1.bias"}
    expected = model.towers.text.encode([TEMPLATE.replace(CTX_SLOT, "object")])[0]
    assert torch.allclose(model.text_embedding(), expected)


def test_a_template_without_exactly_one_slot_is_refused():
    with pytest.raises(ValueError, match=r"\[ctx\]"):
        ClipADAConfig(template="a photo of a defect")


# ---------------------------------------------------------------------------------------------- refinement


def test_refinement_steps_add_their_own_projections(towers):
    vision, text = towers
    models = [make_model(towers, refine_steps=r) for r in (0, 1, 2)]
    per_projection = vision.stages[models[0].layer].channels * text.dim + text.dim
    for steps, model in enumerate(models):
        assert len(model.projections) == steps + 1
        assert len({id(p.weight) for p in model.projections}) == steps + 1  # no shared weights
        assert len(model(torch.randn(2, 3, 64, 64))) == steps + 1
        assert model.num_trainable_parameters() == models[0].num_trainable_parameters() + steps * per_projection
    weights = [p.weight for p in models[2].projections]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_refinement_re_encodes_the_image_weighted_by_the_coarse_map(towers):
    model = make_model(towers, refine_steps=1)
    images = torch.randn(1, 3, 64, 64)
    seen = []
    original = model.stage_features
    model.stage_features = lambda x: (seen.append(x.clone()), original(x))[1]
    coarse, _ = model(images)
    attention = torch.nn.functional.interpolate(torch.sigmoid(coarse)[:, None], size=(64, 64), mode="bilinear")
    assert len(seen) == 2
    assert torch.allclose(seen[1], images * attention, atol=1e-6)


def test_loss_is_coarse_plus_lambda_times_refined():
    coarse, refined = torch.zeros(1, 4, 4), torch.full((1, 4, 4), 2.0)
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    bce_coarse, bce_refined = np.log(2.0), np.log(1 + np.exp(2.0))
    assert clip_ada_loss([coarse, refined], masks, refine_weight=0.5).item() == pytest.approx(bce_coarse + 0.5 * bce_refined, rel=1e-5)


# ---------------------------------------------------------------------------------------------- scoring


def test_top_k_score_on_a_known_map():
    assert top_k_for(256, 256) == 500
    assert top_k_for(512, 512) == 2000  # K scales with the area
    assert top_k_for(4, 4) == 1
    anomaly_map = np.zeros((512, 512), np.float32)
    anomaly_map.flat[:1000] = 1.0
    anomaly_map.flat[1000:2000] = 0.5
    anomaly_map.flat[2000:3000] = 0.25  # outside the top 2000: must not count
    assert top_k_mean(anomaly_map, top_k_for(512, 512)) == pytest.approx(0.75)
    assert top_k_mean(np.array([[1.0, 3.0]]), 10) == pytest.approx(2.0)  # fewer values than K: all of them


def test_predict_returns_results_at_each_input_size(towers):
    model = make_model(towers, threshold=0.3)
    images = [torch.rand(3, 48, 64), (np.random.default_rng(0).random((70, 50, 3)) * 255).astype(np.uint8)]
    results = model.predict(images)
    assert [r.anomaly_map.shape for r in results] == [(48, 64), (70, 50)]
    for result in results:
        assert result.anomaly_map.dtype == np.float32
        assert result.threshold == 0.3
        assert np.array_equal(result.mask, result.anomaly_map >= 0.3)
        assert result.score == pytest.approx(top_k_mean(result.anomaly_map, top_k_for(*result.anomaly_map.shape)))


def test_threshold_is_a_quantile_of_normal_scores_else_one_half(towers):
    model = make_model(towers)
    assert model.calibrate_threshold([]) == 0.5
    normals = [torch.rand(3, 64, 64) for _ in range(5)]
    scores = [r.score for r in model.predict(normals)]
    assert model.calibrate_threshold(normals, quantile=0.9) == pytest.approx(np.quantile(scores, 0.9))


def test_reference_free_model_has_a_threshold_like_every_scorer(towers):
    from defectclip.pipeline import REFERENCE_FREE, InspectionModel

    model = make_model(towers, threshold=0.37)
    assert InspectionModel(REFERENCE_FREE, "", "clip_ada", model).threshold == pytest.approx(0.37)
    model.threshold = 0.61
    assert model.config.threshold == pytest.approx(0.61) and model.predict([torch.rand(3, 64, 64)])[0].threshold == pytest.approx(0.61)


def test_synthetic_calibration_places_the_threshold_from_normal_images_alone(towers):
    from conftest import textured_image
    from defectclip.scoring.few_shot import place_threshold, synthetic_copies

    model = make_model(towers)
    rng = np.random.default_rng(0)
    normals = [textured_image(rng, (64, 64)) for _ in range(4)]
    rule = model.calibrate_synthetic(normals, seed=3)
    normal = [r.score for r in model.predict(normals)]
    defective = [r.score for r in model.predict(synthetic_copies(normals, seed=3))]
    assert model.threshold == pytest.approx(place_threshold(normal, defective)[0]) and rule
    with pytest.raises(ValueError, match="at least one defect-free image"):
        model.calibrate_synthetic([])


def test_flip_views_average_the_maps_of_the_mirror_images_mirrored_back(towers):
    plain = perturbed_model(towers)
    rng = np.random.default_rng(1)
    image = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    mirrors = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    mirrors += [np.swapaxes(m, 0, 1) for m in mirrors]  # the same four, transposed (64 x 48)
    single = [m for m in plain.clip_maps([np.ascontiguousarray(v) for v in mirrors])]
    assert single[4].shape == (64, 48)  # a transposed view's map is on the transposed grid until taken back
    back = [single[0], single[1][:, ::-1], single[2][::-1], single[3][::-1, ::-1]]
    back += [m.T[:, ::-1] if flips == 1 else m.T[::-1] if flips == 2 else m.T[::-1, ::-1] if flips == 3 else m.T
             for flips, m in enumerate(single[4:])]
    for views in (2, 4, 8):
        averaged = perturbed_model(towers, flip_views=views)
        (found,) = averaged.clip_maps([image])
        assert np.allclose(found, np.mean(back[:views], axis=0), atol=1e-6)
        # a 3 x H x W float tensor is mirrored the same way as an H x W x 3 array
        (from_tensor,) = averaged.clip_maps([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
        assert np.allclose(from_tensor, found, atol=1e-5)
        assert not np.allclose(found, single[0])  # the head is not mirror-invariant: the views add something
    # a mirror-symmetric input gives the same map however many views (each view's map is the others' mirror)
    symmetric = np.concatenate([image[:, :32], image[:, :32][:, ::-1]], axis=1)
    symmetric = np.concatenate([symmetric[:24], symmetric[:24][::-1]], axis=0)
    (two,) = perturbed_model(towers, flip_views=2).clip_maps([symmetric])
    assert np.allclose(two, two[:, ::-1], atol=1e-6)


def test_flip_views_are_saved_and_a_bad_count_is_refused(towers, tmp_path):
    model = perturbed_model(towers, flip_views=4)
    folder = model.save_pretrained(tmp_path / "flips")
    loaded = ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1])
    image = [torch.rand(3, 40, 56)]
    assert loaded.config.flip_views == 4
    assert np.array_equal(loaded.predict(image)[0].anomaly_map, model.predict(image)[0].anomaly_map)
    config = json.loads((folder / "config.json").read_text())
    del config["config"]["flip_views"]  # a config saved before the setting existed: the image alone
    (folder / "config.json").write_text(json.dumps(config))
    assert ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1]).config.flip_views == 1
    config["config"]["flip_views"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="flip_views must be one of"):
        ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1])
    with pytest.raises(ValueError, match="flip_views"):
        make_model(towers, flip_views=0)


def test_vit_towers_refuse_a_non_native_size(clip_towers):
    with pytest.raises(ValueError, match="native size"):
        make_model(clip_towers, image_size=96)


# ---------------------------------------------------------------------------------------------- saving


def perturbed_model(towers, **overrides) -> ClipADA:
    model = make_model(towers, refine_steps=2, threshold=0.42, **overrides)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_save_load_round_trip_gives_identical_maps(towers, tmp_path):
    model = perturbed_model(towers)
    folder = model.save_pretrained(tmp_path / "clip_ada")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(str(folder / "model.safetensors"))) == {n for n, p in model.named_parameters() if p.requires_grad}

    loaded = ClipADA.from_pretrained(folder)  # towers rebuilt from the specs in config.json
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 64)]
    for a, b in zip(model.predict(images), loaded.predict(images)):
        assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score
        assert b.threshold == 0.42
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["layer"] == model.layer and config["config"]["refine_steps"] == 2
    assert config["preprocess"]["size"] == [64, 64]


def test_fixed_prompt_round_trip(towers, tmp_path):
    model = perturbed_model(towers, learnable_prompt=False)
    loaded = ClipADA.from_pretrained(model.save_pretrained(tmp_path / "fixed"), vision=towers[0], text=towers[1])
    image = [torch.rand(3, 64, 64)]
    assert np.array_equal(model.predict(image)[0].anomaly_map, loaded.predict(image)[0].anomaly_map)


@pytest.mark.parametrize("damage", ["extra", "missing"])
def test_load_is_strict_about_keys(towers, tmp_path, damage):
    folder = perturbed_model(towers).save_pretrained(tmp_path / "clip_ada")
    state = load_file(str(folder / "model.safetensors"))
    if damage == "extra":
        state["projections.3.weight"] = torch.zeros(2, 2)
    else:
        del state["prompt.ctx"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=damage if damage == "missing" else "unexpected"):
        ClipADA.from_pretrained(folder, vision=towers[0], text=towers[1])


def test_state_dict_leaves_the_frozen_towers_out(towers):
    model = make_model(towers)
    state = model.state_dict()
    assert not any(k.startswith("towers.") for k in state)
    model.load_state_dict(state, strict=True)  # strict loading does not ask for tower weights either


# ---------------------------------------------------------------------------------------------- the script


def tiny_args(mvtec_root, output_dir, *extra: str) -> list[str]:
    return ["--data", str(mvtec_root / "widget"), str(mvtec_root / "gadget_box"), "--vision", "tiny:cnn",
            "--text", "tiny:text", "--batch-size", "3", "--checkpointing-steps", "2", "--calibration-images", "4",
            "--output-dir", str(output_dir), *extra]


def test_every_flag_has_help_and_enums_have_choices():
    parser = train_clip_ada.build_parser()
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert all(a.help for a in flags)
    by_name = {a.dest: a for a in flags}
    for enum_flag in ("refine_steps", "synthesis", "ctx_init", "mixed_precision"):
        assert by_name[enum_flag].choices
    assert by_name["synthesis"].default == "perlin" and "nsa" in by_name["synthesis"].choices


def test_training_script_saves_a_loadable_artifact_and_metrics(mvtec_root, tmp_path):
    metrics = train_clip_ada.main(tiny_args(mvtec_root, tmp_path / "run", "--max-steps", "3", "--synthesis", "nsa"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["train_images"] == 8 and saved == pytest.approx(metrics)
    model = ClipADA.from_pretrained(tmp_path / "run" / "model")
    assert model.config.threshold == pytest.approx(saved["threshold"])
    image = load_image(next((mvtec_root / "widget" / "test" / "scratch").glob("*.png")))
    assert model.predict([image])[0].anomaly_map.shape == tuple(image.shape[-2:])


def test_index_mask_folders_train_on_their_real_defect_masks(mvtec_root, index_root, towers):
    items = train_clip_ada.list_training_items([mvtec_root / "widget", index_root])
    real = [index for index, (_, mask) in enumerate(items) if mask is not None]
    assert len(real) == 3 and len(items) == 4 + 3  # widget's 4 train/good images, steel's 3 train images
    preprocess = make_model(towers).preprocess
    dataset = train_clip_ada.SyntheticAnomalies(items, preprocess, "perlin", anomaly_prob=0.0, seed=0)
    sample = dataset[real[0]]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(load_index_mask(items[real[0]][1]) > 0).float()[None, None], size=tuple(preprocess.size),
        mode="nearest")[0, 0].bool()
    assert torch.equal(sample["mask"], expected) and sample["mask"].any()
    assert not dataset[0]["mask"].any()  # normal images stay normal at anomaly_prob 0


def test_defect_only_training_data_keeps_the_midpoint_threshold(index_root, tmp_path):
    args = ["--data", str(index_root), "--vision", "tiny:cnn", "--text", "tiny:text", "--batch-size", "3",
            "--checkpointing-steps", "2", "--max-steps", "2", "--output-dir", str(tmp_path / "steel")]
    metrics = train_clip_ada.main(args)
    assert metrics["train_images"] == 3 and metrics["threshold"] == 0.5  # no defect-free image to calibrate on


def test_resumed_training_matches_an_uninterrupted_run(mvtec_root, tmp_path):
    straight = tmp_path / "straight"
    train_clip_ada.main(tiny_args(mvtec_root, straight, "--max-steps", "5"))
    # Pretend the run died after step 4: keep checkpoints up to step 4 and resume from there.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for step_checkpoint in ("checkpoint_0", "checkpoint_1"):  # steps 2 and 4
        (straight / "checkpoints" / step_checkpoint).rename(resumed / "checkpoints" / step_checkpoint)
    train_clip_ada.main(tiny_args(mvtec_root, resumed, "--max-steps", "5", "--resume", "latest"))
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_synthetic_samples_are_seeded_per_seed_index_and_epoch(mvtec_root):
    paths = train_clip_ada.list_normal_images([mvtec_root])
    preprocess = build_vision_tower("tiny:cnn").preprocess

    def sample(seed, key):
        return train_clip_ada.SyntheticAnomalies(paths, preprocess, "perlin", 1.0, seed)[key]

    first = sample(0, (1, 7))
    assert torch.equal(first["image"], sample(0, (1, 7))["image"]) and first["mask"].any()
    assert first["mask"].shape == (64, 64) and first["image"].shape == (3, 64, 64)
    assert not torch.equal(first["mask"], sample(0, (1, 8))["mask"])  # another epoch, another anomaly
    assert not torch.equal(first["mask"], sample(1, (1, 7))["mask"])  # another seed, another anomaly


def test_predict_reads_images_like_every_other_model_and_rejects_ambiguous_ones(towers):
    model = make_model(towers)
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # One converter (defectclip.data.image_to_tensor) for every model: uint8 tensors are 0-255, floats 0-1.
    as_uint8, as_float = model.predict([pixels, pixels.float() / 255.0])
    assert np.array_equal(as_uint8.anomaly_map, as_float.anomaly_map)
    with pytest.raises(ValueError, match="uint8"):
        model.predict([np.zeros((32, 32, 3), np.float32)])


def test_towers_must_match_the_config(towers):
    vision, text = towers
    with pytest.raises(ValueError, match="were passed"):
        ClipADA(ClipADAConfig(vision="tiny:vit", text=text.spec), vision=vision, text=text)


def test_generated_textures_join_the_training_set_as_normal_images_but_never_calibrate(mvtec_root, tmp_path):
    items = train_clip_ada.list_training_items([mvtec_root / "widget"], textures=4)
    textures = [image for image, mask in items if isinstance(image, train_clip_ada.GeneratedTexture)]
    assert len(items) == 4 + 4 and [t.kind for t in textures] == ["grain", "stripes", "weave", "grain"]
    preprocess = build_vision_tower("tiny:cnn").preprocess
    dataset = train_clip_ada.SyntheticAnomalies(items, preprocess, "nsa", anomaly_prob=1.0, seed=0)
    sample = dataset[(len(items) - 1, 0)]
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].any()  # a texture with its synthetic defect
    assert torch.equal(sample["image"], dataset[(len(items) - 1, 0)]["image"])  # made again, the same
    metrics = train_clip_ada.main(tiny_args(mvtec_root, tmp_path / "tex", "--max-steps", "2", "--textures", "3"))
    assert metrics["train_images"] == 8 + 3  # widget and gadget_box's 8 train/good images, 3 textures


def test_real_defect_images_can_also_carry_a_synthetic_anomaly(index_root, towers):
    items = train_clip_ada.list_training_items([index_root])
    preprocess = make_model(towers).preprocess
    plain = train_clip_ada.SyntheticAnomalies(items, preprocess, "nsa", 0.5, seed=0)
    both = train_clip_ada.SyntheticAnomalies(items, preprocess, "nsa", 0.5, seed=0, real_anomaly_prob=1.0)
    real, extended = plain[(0, 0)]["mask"], both[(0, 0)]["mask"]
    assert torch.equal(real & extended, real)  # the real defect stays a target
    assert extended.sum() > real.sum()  # and the synthetic one is added
    assert not torch.equal(plain[(0, 0)]["image"], both[(0, 0)]["image"])


def test_training_with_self_similarity_saves_a_blended_model(mvtec_root, tmp_path):
    metrics = train_clip_ada.main(tiny_args(mvtec_root, tmp_path / "blend", "--max-steps", "2", "--self-similarity",
                                            "--self-similarity-size", "64", "--flip-views", "2"))
    assert metrics["self_similarity"]["image_size"] == 64
    model = ClipADA.from_pretrained(tmp_path / "blend" / "model")
    assert model.config.flip_views == 2
    assert model.config.self_similarity == pytest.approx(metrics["self_similarity"])
    assert model.threshold == pytest.approx(metrics["threshold"])  # calibrated on the blended scores
    image = load_image(next((mvtec_root / "widget" / "test" / "scratch").glob("*.png")))
    assert 0 < model.predict([image])[0].score < 1


def test_build_scripts_clip_ada_step_ships_a_head_made_for_new_objects(mvtec_root, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_embedded_default.py"
    spec = importlib.util.spec_from_file_location("build_embedded_default", script)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    commands = []
    monkeypatch.setattr(build, "run", lambda step, args, artifact: commands.append(args))
    out = build.train_clip_ada(mvtec_root / "widget", tmp_path / "work", steps=2)
    (command,) = commands
    assert command[:2] == ["-m", "train.clip_ada"] and "--self-similarity" in command and "--textures" in command
    # The same flags with tiny towers (later flags win in argparse), in-process.
    train_clip_ada.main([*command[2:], "--vision", "tiny:cnn", "--text", "tiny:text", "--layer", "layer2",
                         "--image-size", "64", "--batch-size", "2", "--calibration-images", "2",
                         "--self-similarity-size", "64"])
    model = ClipADA.from_pretrained(out / "model")
    assert model.blend is not None and 0 < model.threshold < 1
