"""TAB that transfers: pretraining sources (textures, mask-free crops, leave-one-out), the three ways to
keep the start's features (frozen stages, distillation, WiSE with its rule), and the script end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import write_index_mask_dataset, write_mvtec_category

from defectclip.data import load_index_mask
from defectclip.synth.textures import TEXTURE_KINDS, make_texture
from defectclip.tab import SyntheticPairs, TABBackbone
from defectclip.tab_sources import (
    ImageCrop, SourceError, TextureImage, collect_sources, crop_windows, index_mask_crops, steel_validation,
)
from defectclip.tab_transfer import (
    FeatureDistillation, TransferError, captured_stages, choose_alpha, early_stage_parameters, freeze_early_stages,
    interpolate_state, interpolated_trunk, worst_method_gain,
)
from defectclip.towers import build_vision_tower, wrap_timm
from train.tab_pretrain import main

TINY = ["--vision", "tiny:cnn", "--text", "tiny:text"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("transfer")
    write_mvtec_category(base / "mvtec", "magnetic_tile")
    return base / "mvtec", write_index_mask_dataset(base / "steel", n=6)


# --------------------------------------------------------------------------------------------------
# sources


def test_textures_are_deterministic_gray_and_of_distinct_kinds():
    for kind in TEXTURE_KINDS:
        first, again = make_texture(kind, 64, seed=3), make_texture(kind, 64, seed=3)
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        assert np.array_equal(first, again)
        assert not np.array_equal(first, make_texture(kind, 64, seed=4))
        assert (first[..., 0] == first[..., 2]).all() and first.std() > 5  # gray, and not flat
    assert not np.array_equal(make_texture("grain", 64, 0), make_texture("stripes", 64, 0))
    with pytest.raises(ValueError, match="valid kinds: grain, stripes, weave"):
        make_texture("marble", 64, 0)


def test_mask_free_crops_hold_no_defect_pixel_and_defect_crops_do(roots):
    _, steel = roots
    crops = index_mask_crops(steel, "train", cap=None)
    assert len(crops) == 6 and all(c.object == "steel strip" and c.size == 20 for c in crops)
    for crop in crops:
        mask = load_index_mask(steel / "masks" / "train" / f"{crop.path.stem}.png")
        assert not mask[crop.top:crop.top + crop.size, crop.left:crop.left + crop.size].any()
        assert crop.load().shape == (20, 20, 3)
    defects = index_mask_crops(steel, "test", cap=None, defective=True)
    for crop in defects:
        mask = load_index_mask(steel / "masks" / "test" / f"{crop.path.stem}.png")
        assert mask[crop.top:crop.top + crop.size, crop.left:crop.left + crop.size].mean() > 0
    # An image whose mask covers everything gives no mask-free window.
    assert crop_windows(np.ones((40, 40), np.int64), defective=False) == []


def test_leave_one_out_excludes_by_object_name_and_refuses_a_typo(roots):
    mvtec, steel = roots
    everything = collect_sources([mvtec, steel], textures_per_kind=2)
    assert {s.object for s in everything} == {"magnetic tile", "steel strip", "grainy metal surface",
                                             "brushed metal surface", "woven fabric"}
    without = collect_sources([mvtec, steel], textures_per_kind=2, exclude=["Magnetic_Tile"])
    assert "magnetic tile" not in {s.object for s in without}
    assert len(without) == len(everything) - 4  # the 4 train/good images
    with pytest.raises(SourceError, match="no such object.*'steel strip'"):
        collect_sources([mvtec, steel], exclude=["magnetic tiles"])
    capped = collect_sources([steel], max_per_object=3)
    assert len(capped) == 3


def test_synthetic_pairs_read_crops_and_textures_and_mix_syntheses(roots):
    _, steel = roots
    sources = [*index_mask_crops(steel, "train", cap=2), TextureImage("weave", 0, "woven fabric", size=48),
               TextureImage("weave", 1, "woven fabric", size=48)]
    pairs = SyntheticPairs(sources, [0, 0, 1, 1], image_size=32, synthesis="mix", seed=0)
    for index in range(4):
        pair = pairs.pair(index)
        assert pair["normal"].shape == (3, 32, 32) and pair["anomalous"].shape == (3, 32, 32)
        assert not torch.equal(pair["normal"], pair["anomalous"])
    assert torch.equal(pairs.pair(2)["anomalous"], pairs.pair(2)["anomalous"])  # reproducible


def test_steel_validation_reads_the_test_split_only(roots):
    _, steel = roots
    fit, normal, defective = steel_validation(steel, count=2)
    assert all(isinstance(c, ImageCrop) and c.path.parent.name == "test" for c in fit + normal + defective)
    assert not set(fit) & set(normal)
    with pytest.raises(SourceError, match="lower the count"):
        steel_validation(steel, count=50)


# --------------------------------------------------------------------------------------------------
# keeping the start's features


def test_frozen_early_stages_do_not_move_and_later_ones_do(tiny_cnn):
    import copy

    trunk = copy.deepcopy(tiny_cnn)
    frozen = freeze_early_stages(trunk, 1)
    assert frozen > 0
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], lr=0.5)
    trunk.train()
    trunk(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    frozen_names = {f"model.{name}" for name, _ in early_stage_parameters(trunk, 1)}
    moved = {k for k, v in trunk.state_dict().items() if not torch.equal(v, before[k]) and "running" not in k
             and "num_batches" not in k}
    assert moved and not moved & frozen_names
    with pytest.raises(TransferError, match="between 0 and"):
        freeze_early_stages(trunk, 99)


def test_frozen_stages_follow_resnet_stage_names():
    trunk = wrap_timm(timm.create_model("resnet18", pretrained=False, features_only=False), "timm:resnet18")
    names = {name for name, _ in early_stage_parameters(trunk, 2)}  # stem (act1) + layer1
    assert "conv1.weight" in names and any(n.startswith("layer1.") for n in names)
    assert not any(n.startswith("layer2.") for n in names)


def test_distillation_is_zero_at_the_start_and_grows_as_the_trunk_moves(tiny_cnn):
    import copy

    trunk = copy.deepcopy(tiny_cnn).eval()
    distillation = FeatureDistillation(trunk)
    images = torch.randn(2, 3, 32, 32)
    with captured_stages(trunk, distillation.stages) as student:
        trunk(images)
    assert distillation.loss(student, images).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for param in trunk.parameters():
            param.add_(0.05 * torch.randn_like(param))
    with captured_stages(trunk, distillation.stages) as student:
        trunk(images)
    assert distillation.loss(student, images).item() > 1e-3
    assert not any(p.requires_grad for p in distillation.teacher.parameters())


def test_interpolation_ends_at_the_two_trunks_and_halves_between(tiny_cnn):
    import copy

    start, tuned = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(1.0)
    key = next(k for k, v in start.state_dict().items() if v.is_floating_point() and v.numel() > 1)
    for alpha, expected in ((0.0, start), (1.0, tuned)):
        assert torch.allclose(interpolated_trunk(start, tuned, alpha).state_dict()[key], expected.state_dict()[key])
    middle = interpolate_state(start.state_dict(), tuned.state_dict(), 0.5)[key]
    assert torch.allclose(middle, (start.state_dict()[key] + tuned.state_dict()[key]) / 2)
    with pytest.raises(TransferError, match=r"\[0, 1\]"):
        interpolate_state(start.state_dict(), tuned.state_dict(), 1.5)


def test_choose_alpha_prefers_the_start_within_the_tolerance():
    assert choose_alpha({0.0: 0.80, 0.5: 0.86, 1.0: 0.85}, tolerance=0.01) == 0.5
    assert choose_alpha({0.0: 0.80, 0.5: 0.86, 1.0: 0.85}, tolerance=0.02) == 0.5
    assert choose_alpha({0.0: 0.855, 0.5: 0.86, 1.0: 0.85}, tolerance=0.01) == 0.0
    assert choose_alpha({0.0: 0.70, 0.5: 0.80, 1.0: 0.90}, tolerance=0.0) == 1.0


def test_an_alpha_that_costs_padim_what_it_gives_patchcore_is_not_kept():
    aurocs = {"patchcore": {0.0: 0.83, 0.5: 0.86, 1.0: 0.84}, "padim": {0.0: 0.79, 0.5: 0.77, 1.0: 0.80}}
    gains = worst_method_gain(aurocs)
    assert gains == pytest.approx({0.0: 0.0, 0.5: -0.02, 1.0: 0.01})
    assert choose_alpha(gains, tolerance=0.005) == 1.0
    assert choose_alpha(gains, tolerance=0.02) == 0.0  # 1.0 gains less than the tolerance: the start stays
    # one method alone chooses exactly as choose_alpha on its own AUROCs
    assert choose_alpha(worst_method_gain({"patchcore": aurocs["patchcore"]}), 0.01) == choose_alpha(aurocs["patchcore"], 0.01)
    with pytest.raises(TransferError, match="alpha = 0"):
        worst_method_gain({"patchcore": {0.5: 0.9}})


# --------------------------------------------------------------------------------------------------
# the script


def test_leave_one_out_run_with_every_safeguard_writes_its_recipe(roots, tmp_path):
    mvtec, steel = roots
    out = tmp_path / "unseen"
    metrics = main(["--data", str(mvtec), str(steel), "--textures", "2", "--exclude-object", "magnetic tile",
                    "--loss", "paper", "--synthesis", "mix", "--freeze-stages", "1", "--distill-weight", "0.5",
                    "--wise-alphas", "0.5", "1", "--validation", str(steel), "--validation-count", "2",
                    "--validation-size", "32", "--batch-size", "2", "--max-steps", "2", "--no-freeze-bn",
                    "--output-dir", str(out), *TINY])
    model = TABBackbone.from_pretrained(out)
    assert "magnetic tile" not in model.config.objects and "steel strip" in model.config.objects
    recipe = model.config.recipe
    assert recipe["excluded_objects"] == ["magnetic tile"] and recipe["freeze_stages"] == 1
    assert recipe["wise"]["alpha"] in (0.0, 0.5, 1.0) and set(recipe["wise"]["validation_auroc"]) == {"0.00", "0.50", "1.00"}
    assert metrics["wise"] == recipe["wise"]
    assert json.loads((out / "tab_config.json").read_text())["recipe"]["distill_weight"] == 0.5


def test_alpha_validated_on_both_scorers_records_each(roots, tmp_path):
    mvtec, steel = roots
    out = tmp_path / "both"
    metrics = main(["--data", str(mvtec), "--textures", "2", "--wise-alphas", "1", "--validation", str(steel),
                    "--validation-count", "2", "--validation-size", "32", "--validation-methods", "patchcore", "padim",
                    "--batch-size", "2", "--max-steps", "2", "--no-freeze-bn", "--output-dir", str(out), *TINY])
    wise = TABBackbone.from_pretrained(out).config.recipe["wise"]
    assert wise["validation_methods"] == ["patchcore", "padim"]
    by_method = wise["validation_auroc_by_method"]
    assert set(by_method) == {"patchcore", "padim"} and all(set(v) == {"0.00", "1.00"} for v in by_method.values())
    assert wise["validation_auroc"] == by_method["patchcore"] and metrics["wise"] == wise
    gains = {a: min(by_method[m][a] - by_method[m]["0.00"] for m in by_method) for a in ("0.00", "1.00")}
    assert wise["alpha"] == (1.0 if gains["1.00"] > wise["tolerance"] else 0.0)


def test_wise_alphas_without_validation_data_is_refused(roots, tmp_path):
    mvtec, _ = roots
    with pytest.raises(SystemExit, match="needs --validation"):
        main(["--data", str(mvtec), "--wise-alphas", "0.5", "--output-dir", str(tmp_path / "x"), *TINY])
    with pytest.raises(SystemExit, match="not an index-mask root"):
        main(["--data", str(mvtec), "--wise-alphas", "0.5", "--validation", str(mvtec), "--output-dir", str(tmp_path / "x"), *TINY])


# --------------------------------------------------------------------------------------------------
# the card


def test_card_states_what_it_was_pretrained_on_and_the_leave_one_out_numbers(tmp_path):
    from huggingface_hub import ModelCard

    from defectclip.tab import TABConfig
    from hub.__main__ import main as hub_main

    recipe = {"data": ["neu_seg"], "textures_per_kind": 200, "excluded_objects": ["magnetic tile"], "freeze_stages": 0,
              "distill_weight": 1.0, "freeze_bn": True,
              "wise": {"alpha": 0.5, "tolerance": 0.01, "validation": "neu_seg",
                       "validation_auroc": {"0.00": 0.81, "0.50": 0.84, "1.00": 0.83}}}
    model = TABBackbone.build(TABConfig(vision="tiny:cnn", text="tiny:text", objects=["steel strip", "woven fabric"],
                                        text_dim=32, loss="paper", recipe=recipe))
    model.save_pretrained(tmp_path / "tab")
    results = tmp_path / "tab_transfer.json"
    results.write_text(json.dumps({"machine": "2-core CPU dev machine, Test CPU, one torch thread", "seeds": [0, 1],
                                   "unseen_delta": {"patchcore": {"image": {"mean": 0.42, "std": 0.1}}}}))
    code = hub_main(["export-tab", str(tmp_path / "tab"), str(tmp_path / "card"), "--repo-id", "defectclip/tab-effnet-lite0",
                     "--training-data", "neu_seg", "--benchmark", str(results), "--eval-dataset-type", "magnetic_tile",
                     "--metric", "roc_auc:PatchCore image AUROC change on an unseen object=unseen_delta.patchcore.image.mean"])
    assert code == 0
    card = ModelCard.load(tmp_path / "card" / "README.md")
    text = " ".join(card.text.split())
    assert "**Pretrained on:** steel strip, woven fabric" in text
    assert "**leaving out magnetic tile**" in text
    assert "feature distillation towards the start (weight 1.0)" in text
    assert "α = 0.5, chosen on held-out real defects of neu_seg" in text and "0.50 → 0.84" in text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("PatchCore image AUROC change on an unseen object", 0.42)]
    assert "exactly the weights" not in text  # only said when the rule kept the start (alpha = 0)
    recipe["wise"]["alpha"] = 0.0
    model.config.recipe = recipe
    model.save_pretrained(tmp_path / "tab0")
    assert hub_main(["export-tab", str(tmp_path / "tab0"), str(tmp_path / "card0"), "--repo-id", "x/tab0"]) == 0
    assert "these are exactly the weights of `tiny:cnn`" in " ".join((tmp_path / "card0" / "README.md").read_text().split())


# --------------------------------------------------------------------------------------------------
# the embedded default's TAB step


def test_build_scripts_tab_step_runs_the_general_recipe(tmp_path, monkeypatch):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("build_embedded_default", root / "scripts" / "build_embedded_default.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    tile = write_mvtec_category(tmp_path / "data", "magnetic_tile")
    write_index_mask_dataset(tmp_path / "data" / "neu_seg", n=6)
    commands = []
    monkeypatch.setattr(build, "run", lambda step, args, artifact: commands.append(args))
    out = build.pretrain_tab(tile, tmp_path / "work", steps=1)
    (command,) = commands
    assert command[:2] == ["-m", "train.tab_pretrain"] and str(tmp_path / "data" / "neu_seg") in command
    # The same flags with tiny towers and a tiny validation (later flags win in argparse), in-process.
    main([*command[2:], *TINY, "--batch-size", "2", "--validation-count", "2", "--validation-size", "32",
          "--no-freeze-bn", "--textures", "2"])
    config = json.loads((out / "tab_config.json").read_text())
    assert "magnetic tile" in config["objects"] and "steel strip" in config["objects"]
    assert config["loss"] == "paper" and config["recipe"]["wise"]["alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_an_interrupted_general_run_resumes_to_the_same_weights_and_alpha(roots, tmp_path):
    from safetensors.torch import load_file

    mvtec, steel = roots
    flags = ["--data", str(mvtec), str(steel), "--textures", "2", "--loss", "paper", "--synthesis", "mix",
             "--distill-weight", "0.5", "--freeze-stages", "1", "--wise-alphas", "0.5", "1", "--validation", str(steel),
             "--validation-count", "2", "--validation-size", "32", "--batch-size", "2", "--lr-schedule", "constant",
             "--lr", "0.05", "--log-every", "1", "--no-freeze-bn", *TINY]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    main([*flags, "--output-dir", str(interrupted), "--max-steps", "3", "--checkpointing-steps", "3"])
    resumed = main([*flags, "--output-dir", str(interrupted), "--max-steps", "6", "--checkpointing-steps", "3",
                    "--resume", "latest"])
    whole = main([*flags, "--output-dir", str(straight), "--max-steps", "6", "--checkpointing-steps", "100"])
    assert resumed["micro_batches_this_run"] == 3 and resumed["loss_history"] == whole["loss_history"]
    assert resumed["wise"] == whole["wise"]
    mine, theirs = load_file(str(interrupted / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_tab_wise_writes_a_finished_run_at_another_alpha(roots, tmp_path):
    from safetensors.torch import load_file

    from train import tab_wise

    _, steel = roots
    run = tmp_path / "run"
    main(["--data", str(steel), "--textures", "2", "--loss", "paper", "--wise-alphas", "1", "--wise-tolerance", "1",
          "--validation", str(steel), "--validation-count", "2", "--validation-size", "32", "--batch-size", "2",
          "--max-steps", "2", "--lr", "0.05", "--no-freeze-bn", "--output-dir", str(run), *TINY])
    chosen = TABBackbone.from_pretrained(run)
    assert chosen.config.recipe["wise"]["alpha"] == 0.0  # a tolerance of 1 always keeps the start
    start = build_vision_tower("tiny:cnn").state_dict()
    tuned = tab_wise.tuned_model(run).trunk.state_dict()
    assert any(not torch.equal(tuned[k], start[k]) for k in start)
    out = tab_wise.main([str(run), str(tmp_path / "alpha1"), "--alpha", "1"])
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[k.removeprefix("model.")], v) for k, v in tuned.items() if k.startswith("model."))
    config = json.loads((out / "tab_config.json").read_text())
    assert config["recipe"]["wise"]["alpha"] == 1.0 and "hand" in config["recipe"]["wise"]["chosen_by"]
    with pytest.raises(SystemExit, match="exists"):
        tab_wise.main([str(run), str(out), "--alpha", "0.5"])


# --------------------------------------------------------------------------------------------------
# the benchmark's arithmetic


def test_transfer_deltas_are_paired_by_seed_and_judged_against_the_targets():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import eval_tab_transfer as bench

    def report(values):
        return {"runs": [{"method": "patchcore", "seed": seed, "image_auroc": image, "pixel_auroc": pixel}
                         for seed, (image, pixel) in enumerate(values)]}

    start = report([(0.80, 0.70), (0.90, 0.72)])
    unseen = report([(0.81, 0.69), (0.91, 0.72)])
    seen = report([(0.83, 0.75), (0.92, 0.75)])
    delta = bench.paired_delta(unseen, start, "patchcore", "image_auroc")
    assert delta["mean"] == pytest.approx(1.0) and delta["std"] == pytest.approx(0.0)
    result = {"unseen_delta": bench.deltas(unseen, start, ["patchcore"]), "seen_delta": bench.deltas(seen, start, ["patchcore"])}
    assert result["unseen_delta"]["patchcore"]["pixel"]["mean"] == pytest.approx(-0.5)
    # unseen: the image gain does not excuse the pixel loss; seen: +2.5 image points >= +1.5.
    assert bench.targets_met(result, ["patchcore"]) == {"unseen_patchcore": False, "seen_patchcore": True}


def test_several_pretraining_runs_are_judged_together(tmp_path, monkeypatch):
    """One lucky pretraining seed must not pass the target: the role's delta pools every run and seed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import eval_tab_transfer as bench

    def report(values):
        return {"machine": "test CPU", "wall_s": 1.0,
                "runs": [{"method": "patchcore", "seed": seed, "image_auroc": image, "pixel_auroc": pixel,
                          "num_train": 4, "num_test": 6} for seed, (image, pixel) in enumerate(values)]}

    reports = {"offline:start": report([(0.80, 0.70), (0.90, 0.72)]),
               "local-dir:lucky": report([(0.83, 0.71), (0.93, 0.73)]),    # +3 image points
               "local-dir:unlucky": report([(0.79, 0.71), (0.89, 0.73)])}  # -1
    monkeypatch.setattr(bench, "trunk_report", lambda spec, name, args, imagenet: reports[spec])
    monkeypatch.setattr(bench, "cached_run", lambda spec, name, args: reports[spec])
    out = tmp_path / "transfer"
    result = bench.main(["--data", str(tmp_path), "--imagenet", "offline:start", "--methods", "patchcore",
                         "--seeds", "0", "1", "--unseen", "local-dir:lucky", "local-dir:unlucky", "--out", str(out)])
    assert set(result["trunks"]) == {"imagenet", "unseen_s0", "unseen_s1"}
    assert result["unseen_s0_delta"]["patchcore"]["image"]["mean"] == pytest.approx(3.0)
    pooled = result["unseen_delta"]["patchcore"]["image"]
    assert pooled["mean"] == pytest.approx(1.0) and pooled["std"] == pytest.approx(2.0)
    assert pooled["trunks"] == 2 and pooled["pairs"] == 4
    assert result["absolute"]["unseen"]["patchcore"]["image"]["mean"] == pytest.approx(86.0)
    assert result["pooled"] == {"unseen": ["unseen_s0", "unseen_s1"]}
    assert "| **unseen** (pooled: unseen_s0, unseen_s1) | patchcore | 86.00 ± 5.38 | 72.00 ± 1.00 | +1.00 ± 2.00 |" \
        in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="taken"):
        bench.main(["--data", str(tmp_path), "--imagenet", "offline:start", "--unseen", "local-dir:lucky",
                    "--extra", "unseen=local-dir:unlucky", "--out", str(out)])
