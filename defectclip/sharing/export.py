"""Export trained artifacts as Hub-ready folders: the artifact's files, written atomically, plus a model card.

Every exported folder loads with the same call from a local path and from the Hub (after
`python -m hub push-model <folder> <repo>`, or `<model>.push_to_hub(<repo>)`), and loading stays strict about missing or unexpected keys:

- `export_tab_backbone`: timm format at the root (`config.json` with architecture, num_features and
  pretrained_cfg incl. mean/std; `model.safetensors`), so `timm.create_model("hf-hub:<repo>", pretrained=True,
  features_only=True)` and anomalib use it unchanged, plus `projection.safetensors` and `tab_config.json` for
  `TABBackbone.from_pretrained("<repo>")`. The export is checked with timm itself before it is kept. A trunk
  saved without its projection head (the app's embedded default) exports in timm format alone, and its card
  says that no head is included.
- `export_scorer`: a PatchCore or PaDiM folder (config.json + model.safetensors: memory bank or Gaussian
  statistics, threshold, tower spec). A tower that is a local folder travels with it in `tower/`, and the
  config names it `local-dir:tower`, which the loader resolves against the scorer's own folder.
- `export_describer`: the AlphaCLIP region describer (PEFT adapter, alpha convolution, describer_config.json).
- `export_clip_ada`: the CLIP-ADA head (config.json + model.safetensors; towers rebuilt from their specs).
- `export_pipeline`: the app's models folder (`scorers/<name>/`, `describer/`, `clip_ada/`) as one repo.

Sources are a saved folder or an in-memory model; a folder is loaded first, which checks it strictly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DefectclipError
from ..alphaclip import OFFICIAL_WEIGHTS, AlphaDescriber
from ..clip_ada import ClipADA
from ..io import atomic_dir, read_json, write_json_atomic
from ..scoring import Ensemble, FeatureScorer, default_layers
from ..tab import CONFIG_NAME as TAB_CONFIG_NAME, TABBackbone, TABConfig, has_projection_head, read_trunk
from ..towers import VisionTower, split_spec
from .cards import ALPHACLIP_WEIGHTS, CardInfo, write_model_card

TOWER_DIR = "tower"
BUNDLED_TOWER_SPEC = f"local-dir:{TOWER_DIR}"
CONFIG_NAME = "config.json"
# What a tower folder's loader reads (timm format, or open_clip's), plus a TAB folder's tab_config.json, which
# records the tower's own base weights (so the card of a re-export can still credit them). A bundled tower gets
# these files and nothing else: a TAB training folder's checkpoints/ or metrics never ride along.
TOWER_FILES = ("config.json", "model.safetensors", "pytorch_model.bin",
               "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
               "tab_config.json")
TOWER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin")
SCORER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
METHOD_NAMES = {"patchcore": "PatchCore", "padim": "PaDiM"}
# The stride-8 and stride-16 stages: PatchCore's and PaDiM's usual choice, suggested in the TAB card.
SUGGESTED_REDUCTIONS = (8, 16)


class ExportError(DefectclipError):
    """An artifact that cannot be exported as asked: the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# TAB backbone


def export_tab_backbone(source: str | Path | TABBackbone, out: str | Path, card: CardInfo) -> Path:
    """Write a TAB backbone in timm format (+ its TAB head and config) with a model card to `out`.

    A local folder that holds the trunk without its projection head exports the trunk alone: the timm
    format needs nothing else, and the card then offers only the timm and PatchCore ways to load it.
    """
    if not isinstance(source, TABBackbone) and Path(source).is_dir() and not has_projection_head(source):
        return export_tab_trunk(source, out, card)
    model = source if isinstance(source, TABBackbone) else TABBackbone.from_pretrained(source)
    with atomic_dir(out) as staging:
        model._write_artifact(staging)
        finish_tab_export(staging, model.trunk, model.config, card, head=True)
    return Path(out)


def export_tab_trunk(folder: str | Path, out: str | Path, card: CardInfo) -> Path:
    """Write a TAB trunk kept without its projection head: timm format + `tab_config.json` + card."""
    trunk, config = read_trunk(folder)
    with atomic_dir(out) as staging:
        # Saved from the loaded trunk rather than copied, so the files are the timm format this code writes
        # (and a half-precision trunk comes back as the float32 weights every loader expects).
        trunk.save_pretrained(staging)
        write_json_atomic(staging / TAB_CONFIG_NAME, config.to_dict())
        finish_tab_export(staging, trunk, config, card, head=False)
    return Path(out)


def finish_tab_export(staging: Path, trunk: VisionTower, config: TABConfig, card: CardInfo, head: bool) -> None:
    """Check the timm-format files just written, then add the card and share the folder."""
    check_timm_features(staging, trunk)
    write_model_card(staging, "tab", card, tab_facts(trunk, config, head), [config.vision, config.text])
    make_readable(staging)


def tab_facts(trunk: VisionTower, config: TABConfig, head: bool) -> dict[str, Any]:
    preprocess = trunk.preprocess
    return {
        "head": head,
        "architecture": trunk.timm_args["architecture"],
        "num_features": trunk.num_features,
        "input_size": list(preprocess.size),
        "mean": [round(v, 6) for v in preprocess.mean],
        "std": [round(v, 6) for v in preprocess.std],
        "interpolation": preprocess.interpolation,
        "stages": [{"name": s.name, "channels": s.channels, "reduction": s.reduction} for s in trunk.stages.values()],
        "suggested_layers": default_layers(trunk, SUGGESTED_REDUCTIONS),
        "objects": list(config.objects),
        "vision": config.vision,
        "text": config.text,
        "loss": config.loss,
        "synthesis": config.synthesis,
        "steps": config.step,
        "recipe": dict(config.recipe),  # data, left-out objects, anti-forgetting settings, WiSE choice
    }


@torch.no_grad()
def check_timm_features(folder: Path, trunk: VisionTower) -> None:
    """timm's own `features_only` loader must rebuild the trunk from `folder` and give its feature maps.

    This is the promise of the timm format (and what anomalib relies on), so it is checked on the files
    just written rather than assumed from the writer.
    """
    import timm

    was_training = trunk.training
    trunk.eval()
    try:
        with quiet_logger("timm"):  # features_only drops the classifier, whose weights timm reports as unexpected
            extractor = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
        names = list(extractor.feature_info.module_name())
        images = torch.rand(1, 3, *trunk.preprocess.size, generator=torch.Generator().manual_seed(0))
        device = next(trunk.parameters()).device
        expected = trunk.forward_features(images.to(device), names)
        for name, got in zip(names, extractor(images)):
            if not torch.allclose(got, expected[name].cpu(), atol=1e-5, rtol=1e-4):
                raise ExportError(f"timm's features_only model from {folder} differs from the trunk at {name}.")
    finally:
        trunk.train(was_training)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def make_readable(folder: Path) -> None:
    """safetensors writes its files owner-only (0600); an exported folder is meant to be shared."""
    for path in Path(folder).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# --------------------------------------------------------------------------------------------------
# PatchCore / PaDiM


def export_scorer(source: str | Path | FeatureScorer, out: str | Path, card: CardInfo,
                  object_name: str | None = None) -> Path:
    """Write a fitted, calibrated PatchCore/PaDiM (bundling a local tower in `tower/`) with a card to `out`."""
    scorer = as_scorer(source)
    with atomic_dir(out) as staging:
        facts = write_scorer(scorer, staging, object_name)
        write_model_card(staging, "scorer", card, facts, [facts["tower_spec_origin"]])
        make_readable(staging)
    return Path(out)


ENSEMBLE_NOT_EXPORTED = ("Exporting an Ensemble with a model card is not supported yet: save it with "
                         "save_pretrained (it loads with defectclip.scoring.load_scorer, and from a pipeline's "
                         "scorers/ folder), or export each member scorer on its own.")


def as_scorer(source: str | Path | FeatureScorer) -> FeatureScorer:
    if isinstance(source, FeatureScorer):
        return source
    if isinstance(source, Ensemble) or load_config_if_any(source).get("model_type") == "ensemble":
        raise ExportError(ENSEMBLE_NOT_EXPORTED)
    # Exporting never needs a GPU: the folder is read on the CPU whatever the machine has.
    return FeatureScorer.from_pretrained(source, device="cpu")


def load_config_if_any(source: str | Path) -> dict[str, Any]:
    """A local scorer folder's config.json, or {} (a Hub id, or a folder without one: the loader explains)."""
    path = Path(source) / CONFIG_NAME
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_scorer(scorer: FeatureScorer, folder: Path, object_name: str | None = None) -> dict[str, Any]:
    """Save `scorer` into the empty or new `folder`, bundle a local tower, and return the card's facts."""
    if scorer.threshold is None:
        raise ExportError("The scorer has no threshold: call calibrate(validation images) before exporting, "
                          "so the exported model can flag defects, not only rank images.")
    scorer.save_pretrained(folder)
    config_path = Path(folder) / CONFIG_NAME
    config = read_json(config_path)
    origin = config["tower"]
    kind, location = split_spec(origin)
    if kind == "local-dir":
        bundle_tower(Path(location), Path(folder) / TOWER_DIR)
        config["tower"] = BUNDLED_TOWER_SPEC
        write_json_atomic(config_path, config)
    return scorer_facts(config, origin, object_name)


def bundle_tower(source: Path, target: Path) -> None:
    """Copy the files a tower folder's loader reads (timm or open_clip format) into `target`."""
    files = [source / name for name in TOWER_FILES if (source / name).is_file()]
    if not any(path.name in TOWER_WEIGHTS for path in files):
        raise ExportError(f"Tower folder {source} holds no weights ({', '.join(TOWER_WEIGHTS)}); cannot bundle it.")
    target.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, target / path.name)


def scorer_facts(config: dict[str, Any], origin: str, object_name: str | None) -> dict[str, Any]:
    kind, location = split_spec(origin)
    # A bundled tower is named by its folder, not by a path on the exporting machine.
    shown_origin = Path(location).name if kind == "local-dir" else origin
    return {
        "method": METHOD_NAMES.get(config["model_type"], config["model_type"]),
        "model_type": config["model_type"],
        "object": object_name or "the objects it was fitted on",
        "tower": config["tower"],
        "tower_origin": shown_origin,
        "tower_spec_origin": origin,
        "bundled_tower": kind == "local-dir",
        "layers": list(config["layers"]),
        "image_size": list(config["preprocess"]["size"]),
        "threshold": round(float(config["threshold"]), 6),
        "calibration_text": calibration_text(config.get("calibration")),
        "exposure_text": exposure_text(config.get("photometric")),
        "num_train_images": config["num_train_images"],
        "tags": [config["model_type"]],
    }


def exposure_text(photometric: dict[str, Any] | None) -> str:
    """What the card says of exposure matching ("" when images are used as they are)."""
    if not photometric or photometric.get("mode") != "match":
        return ""
    return (f"Each image is first brought to the training images' median brightness and contrast (luminance mean "
            f"{photometric['mean']:.3f}, standard deviation {photometric['std']:.3f} on a 0-1 scale) by one gain and one offset.")


def calibration_text(calibration: str | None) -> str:
    if calibration == "f1":
        return "the F1-optimal image score on labelled validation images"
    if calibration and calibration.startswith("quantile:"):
        return f"the {calibration.partition(':')[2]} quantile of normal validation images' scores"
    return "a value set by hand"


# --------------------------------------------------------------------------------------------------
# region describer and CLIP-ADA: their towers are rebuilt from specs, which must work on any machine


def require_portable_specs(specs: Mapping[str, str], what: str) -> None:
    """A `local-dir:` tower spec names a path on this machine, which nobody downloading the repo has."""
    local = {role: spec for role, spec in specs.items() if spec and spec.startswith("local-dir:")}
    if local:
        raise ExportError(
            f"The {what} names local tower folders {local}; a downloaded copy could not rebuild them. "
            "Push those towers as their own repos and use hf-hub:<repo> specs, or train on a spec that works "
            "anywhere (offline:..., open_clip:..., timm:...)."
        )


def export_describer(source: str | Path | AlphaDescriber, out: str | Path, card: CardInfo) -> Path:
    """Write an AlphaCLIP region describer (adapter, alpha conv, config with captions) with a card to `out`.

    A describer whose tower was loaded from official AlphaCLIP weights (`load_alphaclip_checkpoint`) records
    it in its config; its card then credits them and is CC BY-NC 4.0 without anyone having to say so.
    """
    describer = as_describer(source)
    if describer_weights_from(describer) == OFFICIAL_WEIGHTS and ALPHACLIP_WEIGHTS not in card.base_weights:
        card = dataclasses.replace(card, base_weights=(*card.base_weights, ALPHACLIP_WEIGHTS))
    return export_with_towers(describer, out, card, "describer", write_describer)


def describer_weights_from(describer: AlphaDescriber) -> str | None:
    return getattr(describer.image, "weights_from", None) or describer.config.get("weights_from")


def as_describer(source: str | Path | AlphaDescriber) -> AlphaDescriber:
    if isinstance(source, AlphaDescriber):
        return source
    # Unmerged: the export re-saves the adapter exactly as trained (merging only speeds up inference).
    return AlphaDescriber.from_pretrained(source, merge_adapter=False)


def write_describer(describer: AlphaDescriber, folder: Path) -> dict[str, Any]:
    config = describer.config
    require_portable_specs({"vision": config["vision"], "text": config["text"]}, "describer")
    candidates = config.get("candidates") or {}
    if not candidates or not all(candidates.values()):
        raise ExportError("The describer has no candidate captions for some object; it could not name any "
                          "region. Build it with candidates={object: [captions]} (the dataset's candidates.json).")
    describer.save_pretrained(folder, merged=bool(config.get("merged")))
    objects = list(candidates)
    return {
        "vision": config["vision"],
        "text": config["text"],
        "objects": objects,
        "example_caption": candidates[objects[0]][0],
        "lora": config.get("lora"),
        "temperature": config["temperature"],
        "merged": bool(config.get("merged")),
    }


def export_clip_ada(source: str | Path | ClipADA, out: str | Path, card: CardInfo) -> Path:
    """Write a CLIP-ADA head (trainable tensors + config naming its towers) with a card to `out`."""
    return export_with_towers(as_clip_ada(source), out, card, "clip_ada", write_clip_ada)


def export_with_towers(model: Any, out: str | Path, card: CardInfo, kind: str, write) -> Path:
    """`write(model, folder)` -> facts naming the vision and text towers, whose base weights the card credits."""
    with atomic_dir(out) as staging:
        facts = write(model, staging)
        write_model_card(staging, kind, card, facts, [facts["vision"], facts["text"]])
        make_readable(staging)
    return Path(out)


def as_clip_ada(source: str | Path | ClipADA) -> ClipADA:
    return source if isinstance(source, ClipADA) else ClipADA.from_pretrained(source)


def write_clip_ada(model: ClipADA, folder: Path) -> dict[str, Any]:
    saved = model.config_dict()
    config = saved["config"]
    require_portable_specs({"vision": config["vision"], "text": config["text"]}, "CLIP-ADA model")
    model.save_pretrained(folder)
    return {
        "vision": config["vision"],
        "text": config["text"],
        "layer": config["layer"],
        "refine_steps": config["refine_steps"],
        "learnable_prompt": config["learnable_prompt"],
        "image_size": config["image_size"],
        "threshold": config["threshold"],
        "trainable_parameters": saved["trainable_parameters"],
        "self_similarity": config.get("self_similarity"),
    }


# --------------------------------------------------------------------------------------------------
# the app's models repo


def export_pipeline(
    out: str | Path,
    scorers: Mapping[str, str | Path | FeatureScorer] | Sequence[str | Path],
    describer: str | Path | AlphaDescriber | None = None,
    clip_ada: str | Path | ClipADA | None = None,
    card: CardInfo | None = None,
    objects: Mapping[str, str] | None = None,
) -> Path:
    """Write the folder `InspectionPipeline.from_pretrained` (and so the app) reads, with a card, to `out`.

    `scorers` maps folder names (the app shows "magnetic_tile" as "magnetic tile") to scorer folders or
    models; a list of folders is named by each folder's name. `objects` names the object a scorer inspects
    where its folder name does not (written to the scorer's inspection.json).
    """
    named = name_scorers(scorers)
    if not named and clip_ada is None:
        raise ExportError("A pipeline needs at least one scorer or a CLIP-ADA model; the app has nothing to run.")
    card = card or CardInfo(repo_id="inspection-models", title="defectclip inspection models")
    with atomic_dir(out) as staging:
        facts: dict[str, Any] = {"scorers": [], "describer": None, "clip_ada": None}
        specs: list[str] = []
        for name, source in named.items():
            object_name = (objects or {}).get(name, name.replace("_", " "))
            scorer_facts_ = write_scorer(as_scorer(source), staging / "scorers" / name, object_name)
            if objects and name in objects:
                write_json_atomic(staging / "scorers" / name / "inspection.json", {"object": object_name})
            facts["scorers"].append({"name": name, **scorer_facts_})
            specs.append(scorer_facts_["tower_spec_origin"])
        if describer is not None:
            describer = as_describer(describer)
            if describer_weights_from(describer) == OFFICIAL_WEIGHTS and ALPHACLIP_WEIGHTS not in card.base_weights:
                card = dataclasses.replace(card, base_weights=(*card.base_weights, ALPHACLIP_WEIGHTS))
            facts["describer"] = write_describer(describer, staging / "describer")
            specs += [facts["describer"]["vision"], facts["describer"]["text"]]
        if clip_ada is not None:
            facts["clip_ada"] = write_clip_ada(as_clip_ada(clip_ada), staging / "clip_ada")
            specs += [facts["clip_ada"]["vision"], facts["clip_ada"]["text"]]
        write_model_card(staging, "pipeline", card, facts, specs)
        make_readable(staging)
    return Path(out)


def name_scorers(scorers: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    if isinstance(scorers, Mapping):
        named = dict(scorers)
    else:
        if any(isinstance(source, FeatureScorer) for source in scorers):
            raise ExportError("Scorer models need names: pass scorers as {name: model}.")
        named = {Path(source).name: source for source in scorers}
        if len(named) < len(scorers):
            raise ExportError("Two scorer folders share a name; pass scorers as {name: folder} instead.")
    for name in named:
        if not SCORER_NAME.fullmatch(name):
            raise ExportError(f"Scorer name {name!r} is not a plain folder name (letters, digits, _ . -).")
    return named


# --------------------------------------------------------------------------------------------------
# any artifact: what `Artifact.push_to_hub` pushes


def export_artifact(artifact: Any, out: str | Path, card: CardInfo) -> Path:
    """Export any defectclip artifact with its card, by kind (see `defectclip.artifacts.Artifact`)."""
    from ..pipeline import InspectionPipeline

    if isinstance(artifact, TABBackbone):
        return export_tab_backbone(artifact, out, card)
    if isinstance(artifact, FeatureScorer):
        return export_scorer(artifact, out, card)
    if isinstance(artifact, Ensemble):
        raise ExportError(ENSEMBLE_NOT_EXPORTED)
    if isinstance(artifact, AlphaDescriber):
        return export_describer(artifact, out, card)
    if isinstance(artifact, ClipADA):
        return export_clip_ada(artifact, out, card)
    if isinstance(artifact, InspectionPipeline):
        folders = artifact.scorer_folders()
        return export_pipeline(out, {name: model.scorer for name, model in folders.items()}, artifact.describer,
                               artifact.clip_ada, card, objects={name: model.object for name, model in folders.items()})
    raise ExportError(f"Cannot export a {type(artifact).__name__}: not a defectclip artifact.")
