"""AlphaDescriber: ranks candidate captions for one region of an image; an artifact (save / load / push)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..artifacts import Artifact
from ..data.images import image_to_tensor
from ..data.transforms import build_transform, normalize, resize
from ..errors import DefectclipError
from ..io import read_json_object, read_safetensors, write_json_atomic
from ..towers import TextTower, build_text_tower
from .config import ADAPTER_DIR, AlphaClipError, UnknownObjectError, CONFIG_NAME, DEFAULT_TEMPERATURE, FORMAT, MERGED_WEIGHTS_NAME, WEIGHTS_NAME
from .alpha import coverage_to_alpha, mask_coverage
from .view import region_views
from .tower import AlphaImageTower, _check_keys, build_alpha_tower
from .lora import apply_lora, lora_config


# --------------------------------------------------------------------------------------------------
# the describer


class AlphaDescriber(Artifact, nn.Module):
    """Rank captions for one region of an image.

    - `embed_regions(images, masks)` -> L2-normalised region embeddings (N, D)
    - `describe(image, mask, candidates)` -> [(caption, probability), ...] best first
    - `candidates_for(object)` -> the caption set saved with the model for that object
    Probabilities are softmax(cosine / temperature) over the candidates, temperature from training.
    """

    card_kind = "describer"  # hub_files stays None: the adapter is a nested folder

    def __init__(self, image: AlphaImageTower, text: TextTower, config: dict):
        super().__init__()
        self.image = image
        self.text = text
        self.config = config
        self.transform = build_transform(image.preprocess)
        self._caption_cache: dict[str, torch.Tensor] = {}
        self._set_peft_model(None)

    def _set_peft_model(self, peft_model) -> None:
        # The PeftModel wraps the image tower's own model (LoRA is injected in place), so registering
        # it as a submodule would list every weight twice; it is kept as a plain attribute instead.
        self.__dict__["peft_model"] = peft_model

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(cls, vision: str, text: str, image_size: int | None = None, seed: int = 0,
              temperature: float = DEFAULT_TEMPERATURE, candidates: dict[str, list[str]] | None = None,
              view: dict | None = None, no_defect: dict[str, str] | None = None,
              flip_average: bool = False, quarter_turn_average: bool = False) -> "AlphaDescriber":
        """A fresh, untuned describer: alpha conv zero, no adapter, projection initialised from `seed`.

        `view` ({"context": .., "min_side": ..}) makes it look at a crop around each region (see
        `view.region_view`); None keeps the whole-image view of describers saved before crops existed.
        `no_defect` names, per object, the candidate caption that means "no defect here".
        `flip_average` makes a region's embedding the mean over the four flips of its view, and
        `quarter_turn_average` over each of those turned a quarter too (see `embed_regions`).
        """
        text_tower = build_text_tower(text)
        image_tower = build_alpha_tower(vision, text_tower.dim, image_size, projection_seed=seed)
        config = {
            "format": FORMAT, "version": 1, "vision": vision, "text": text, "image_size": image_size,
            "preprocess": image_tower.preprocess.to_dict(), "projection_seed": seed,
            "temperature": temperature, "candidates": dict(candidates or {}), "merged": False, "lora": None,
            "view": dict(view) if view is not None else None, "no_defect": dict(no_defect or {}),
            "flip_average": bool(flip_average), "quarter_turn_average": bool(quarter_turn_average),
        }
        return cls(image_tower.eval(), text_tower.eval(), config)

    def attach_adapter(self, r: int = 64, alpha: int = 64, dropout: float = 0.1, pattern: str | None = None):
        """Add fresh LoRA layers (the paper's r/alpha/dropout) to the image tower; return the PeftModel."""
        config = lora_config(self.image, r, alpha, dropout, pattern)
        targets = sorted(config.target_modules)  # before PEFT rewrites the set into shorter suffixes
        self._set_peft_model(apply_lora(self.image, config))
        self.config["lora"] = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
        return self.peft_model

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    # -- inference ---------------------------------------------------------------------------------

    @property
    def view(self) -> dict | None:
        """The region view's settings ({"context", "min_side"}), or None for the whole-image view."""
        return self.config.get("view")

    def region_inputs(self, images: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] images (N x 3 x H x W) and masks (N x H x W) -> [0, 1] views and mask coverage at the model size.

        The one function that makes what the describer sees, in training, evaluation and the app.
        """
        preprocess = self.image.preprocess
        if self.view is None:
            return resize(images.float(), preprocess.size, preprocess.interpolation), mask_coverage(masks, preprocess.size)
        return region_views(images, masks, preprocess.size, preprocess.interpolation, **self.view)

    def prepare(self, images: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] images (N x 3 x H x W) and masks (N x H x W) -> model pixels and alpha map."""
        views, coverage = self.region_inputs(images, masks)
        return normalize(views, self.image.preprocess), coverage_to_alpha(coverage)

    @property
    def flip_average(self) -> bool:
        """Whether a region's embedding is the mean over the four flips of its view."""
        return bool(self.config.get("flip_average", False))

    @property
    def quarter_turn_average(self) -> bool:
        """Whether a region's embedding also averages its view turned by 90 degrees (with each flip, if any)."""
        return bool(self.config.get("quarter_turn_average", False))

    @torch.no_grad()
    def embed_regions(self, images: torch.Tensor, masks) -> torch.Tensor:
        """One embedding per (image, mask) pair; images N x 3 x H x W in [0, 1], masks N x H x W."""
        if images.dim() == 3:
            images = images[None]
        device = next(self.image.parameters()).device
        pixels, alpha = self.prepare(images.float(), masks)
        pixels, alpha = pixels.to(device), alpha.to(device)
        if not (self.flip_average or self.quarter_turn_average):
            return self.image(pixels, alpha)
        return view_averaged_embeddings(self.image, pixels, alpha, self.flip_average, self.quarter_turn_average)

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Text embeddings, cached per caption (the text tower is frozen)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._caption_cache]
        if missing:
            for caption, embedding in zip(missing, self.text.encode(missing)):
                self._caption_cache[caption] = embedding
        return torch.stack([self._caption_cache[c] for c in captions])

    @property
    def objects(self) -> list[str]:
        """The objects this describer has captions for."""
        return sorted(self.config["candidates"])

    def candidates_for(self, object_name: str) -> list[str]:
        """The object's own candidate captions (its defect types and, when trained with it, its no-defect caption)."""
        try:
            return list(self.config["candidates"][object_name])
        except KeyError:
            raise UnknownObjectError(
                f"This describer does not know the object {object_name!r}: it was trained on {self.objects}. "
                "Choose one of those, or train a describer on a dataset of this object."
            ) from None

    def no_defect_caption(self, object_name: str) -> str | None:
        """The caption meaning 'no defect here' for the object, or None if the describer was trained without one."""
        return (self.config.get("no_defect") or {}).get(object_name)

    @torch.no_grad()
    def caption_probabilities(self, region_embeddings: torch.Tensor, candidates: Sequence[str]) -> torch.Tensor:
        text = self.embed_captions(candidates).to(region_embeddings.device)
        return (region_embeddings @ text.T / self.temperature).softmax(dim=-1)

    @torch.no_grad()
    def describe(self, image, mask, candidates: Sequence[str]) -> list[tuple[str, float]]:
        """Candidate captions for the region `mask` of `image`, with probabilities, best first."""
        if not candidates:
            raise AlphaClipError("describe() needs at least one candidate caption.")
        mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask).astype(bool)
        if not mask.any():
            raise AlphaClipError("The region mask is empty: mark at least one pixel.")
        tensor = image_to_tensor(image)
        if tuple(mask.shape) != tuple(tensor.shape[-2:]):
            raise AlphaClipError(f"Mask {mask.shape} and image {tuple(tensor.shape[-2:])} differ in size.")
        probabilities = self.caption_probabilities(self.embed_regions(tensor[None], mask[None]), candidates)[0]
        ranked = sorted(zip(candidates, probabilities.tolist()), key=lambda pair: -pair[1])
        return [(caption, float(p)) for caption, p in ranked]

    # -- saving and loading --------------------------------------------------------------------------

    def _write_artifact(self, folder: Path, merged: bool = False) -> None:
        """The describer folder (see the module docstring); `merged` folds the adapter into the tower weights."""
        from safetensors.torch import save_file

        config = dict(self.config, merged=merged)
        weights_from = getattr(self.image, "weights_from", None) or config.get("weights_from")
        if weights_from:
            config["weights_from"] = weights_from  # so the export credits (and licenses after) those weights
        if merged:
            save_file(_contiguous(self._merged_tower_state()), str(folder / MERGED_WEIGHTS_NAME))
            save_file(_contiguous(self._projection_state()), str(folder / WEIGHTS_NAME))
        else:
            save_file(_contiguous(self.image.describer_state()), str(folder / WEIGHTS_NAME))
            if self.peft_model is not None:
                self.peft_model.save_pretrained(str(folder / ADAPTER_DIR))
        write_json_atomic(folder / CONFIG_NAME, config)

    def _projection_state(self) -> dict[str, torch.Tensor]:
        return {f"projection.{k}": v for k, v in self.image.projection.state_dict().items()}

    def _merged_tower_state(self) -> dict[str, torch.Tensor]:
        """Every image-tower weight with LoRA folded in, computed on a copy so this model keeps its adapter."""
        if self.peft_model is None:
            return dict(self.image.base.model.state_dict())
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        return dict(merged.state_dict())

    @classmethod
    def _read_artifact(cls, folder: Path, *, untuned: bool = False, keep_head: bool = False,
                       merge_adapter: bool = True, root: str | Path | None = None,
                       allow_absolute_tower: bool = True) -> "AlphaDescriber":
        """Reload a saved describer; outputs equal the saved model's.

        The adapter is merged into the base weights once (`merge_adapter=False` keeps it separate, to
        train on): faster, and steady. Unmerged, PEFT's MultiheadAttention LoRA adds the LoRA delta
        to the packed q/k/v weight before every forward and subtracts it after, so the base weights
        pick up float rounding on every call. Merged outputs equal unmerged ones to float rounding.
        `untuned=True` rebuilds the same base towers without what training changed (alpha conv zero,
        no adapter, base RGB conv, projection at its seeded initial value): the zero-shot baseline.
        `keep_head=True` with it keeps the trained projection: a mask-blind linear-probe baseline.
        """
        folder = _describer_folder(folder)
        config = read_json_object(folder / CONFIG_NAME, "an AlphaCLIP describer")
        if config.get("format") != FORMAT:
            raise AlphaClipError(f"{folder} is not an AlphaCLIP describer folder (format {config.get('format')!r}).")
        vision, text = check_describer_config(config, folder, root, allow_absolute_tower)
        try:
            describer = cls.build(vision, text, config.get("image_size"), config["projection_seed"],
                                  config["temperature"], config["candidates"])
        except DefectclipError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged bundled tower fails inside timm / json
            raise AlphaClipError(f"Cannot build the describer of {folder}: {type(err).__name__}: {err}") from err
        describer.config = dict(config)
        try:
            return describer._load_weights(folder, untuned, keep_head, merge_adapter)
        except (RuntimeError, KeyError) as err:  # torch's load_state_dict on misshapen tensors
            raise AlphaClipError(f"The weights in {folder} do not fit its describer_config.json: {err}") from err

    def _load_weights(self, folder: Path, untuned: bool, keep_head: bool, merge_adapter: bool) -> "AlphaDescriber":
        describer, config = self, self.config
        if untuned:
            if keep_head:
                describer.image.projection.load_state_dict(_read_projection(folder / WEIGHTS_NAME), strict=True)
            describer.config.update(lora=None, merged=False)
            return describer
        if config.get("merged"):
            describer._load_merged(folder)
        else:
            describer._load_adapter(folder, merge_adapter)
        return describer.eval()

    def _load_adapter(self, folder: Path, merge_adapter: bool) -> None:
        self.image.load_describer_state(read_safetensors(folder / WEIGHTS_NAME))
        if self.config.get("lora"):
            from peft import PeftModel

            adapter = folder / ADAPTER_DIR
            if not (adapter / "adapter_model.safetensors").is_file() or any(adapter.glob("*.bin")):
                # PEFT falls back to torch.load for adapter_model.bin: weights are read from safetensors only.
                raise AlphaClipError(f"{adapter} must hold adapter_model.safetensors (and no .bin pickle files).")
            try:
                peft_model = PeftModel.from_pretrained(self.image.base.model, str(adapter))
            except Exception as err:  # noqa: BLE001 - PEFT raises many kinds for a damaged adapter folder
                raise AlphaClipError(f"Cannot load the LoRA adapter in {adapter}: {type(err).__name__}: {err}") from err
            self._set_peft_model(peft_model)
            if merge_adapter:
                with warnings.catch_warnings():
                    # PEFT merges a MultiheadAttention's out_proj together with the attention, then visits
                    # the out_proj layer again and warns that it is merged already: expected, harmless.
                    warnings.filterwarnings("ignore", message="All adapters are already merged")
                    self.peft_model.merge_adapter()

    def _load_merged(self, folder: Path) -> None:
        state = read_safetensors(folder / MERGED_WEIGHTS_NAME)
        _check_keys(set(state), set(self.image.base.model.state_dict()), f"merged weights in {folder}")
        self.image.base.model.load_state_dict(state, strict=True)
        self.image.projection.load_state_dict(_read_projection(folder / WEIGHTS_NAME), strict=True)
        self.config["lora"] = None


def check_describer_config(config: dict, folder: Path, root: str | Path | None,
                           allow_absolute_tower: bool) -> tuple[str, str]:
    """Types and ranges of describer_config.json; returns the vision and text specs, confined to the artifact."""
    from ..schema import MAX_MODEL_SIDE, Config, confine_local_dir

    schema = Config(config, folder / CONFIG_NAME)
    schema.number("image_size", 1, MAX_MODEL_SIDE, integer=True, optional=True)
    schema.number("projection_seed", 0, None, integer=True)
    schema.number("temperature", 0.0, 100.0, low_open=True)
    candidates = schema.require("candidates")
    if not isinstance(candidates, dict) or not all(
        isinstance(name, str) and isinstance(captions, list) and captions and all(isinstance(c, str) and c for c in captions)
        for name, captions in candidates.items()
    ):
        schema.fail("must map object names to non-empty lists of captions", "candidates")
    if config.get("view") is not None:
        view = schema.sub("view")
        view.number("context", 1.0, 16.0)
        view.number("min_side", 1, MAX_MODEL_SIDE, integer=True)
        if set(config["view"]) != {"context", "min_side"}:
            schema.fail("must hold exactly 'context' and 'min_side'", "view")
    for key in ("flip_average", "quarter_turn_average"):
        if not isinstance(config.get(key, False), bool):
            schema.fail("must be true or false", key)
    size = (config.get("preprocess") or {}).get("size")
    if config.get("quarter_turn_average") and not (isinstance(size, list) and len(size) == 2 and size[0] == size[1]):
        schema.fail(f"needs a square model input (a turned view must keep its shape), but preprocess.size is {size}",
                    "quarter_turn_average")
    no_defect = config.get("no_defect") or {}
    if not isinstance(no_defect, dict) or not all(
        isinstance(name, str) and caption in candidates.get(name, ()) for name, caption in no_defect.items()
    ):
        schema.fail("must map object names to one of that object's candidate captions", "no_defect")
    lora = config.get("lora")
    if lora is not None:
        sub = schema.sub("lora")
        sub.number("r", 1, 1024, integer=True)
        sub.number("alpha", 0.0, None, low_open=True)
        sub.number("dropout", 0.0, 1.0)
        sub.strings("targets")
    vision, text = (
        confine_local_dir(schema.string(role), folder, root, allow_absolute=allow_absolute_tower, where=f"{role} tower")
        for role in ("vision", "text")
    )
    return vision, text


FLIPS = ((), (-1,), (-2,), (-2, -1))  # none, horizontal, vertical, both: the flips training draws


def view_averaged_embeddings(tower: nn.Module, pixels: torch.Tensor, alpha: torch.Tensor,
                             flips: bool = True, quarter_turns: bool = False) -> torch.Tensor:
    """The tower's embedding of each view averaged over its four flips (`flips`) and over the view and
    its quarter turn (`quarter_turns`; with flips, all eight symmetries of the square), L2-normalised again.

    Training shows every view flipped each way at random (and, with --rot90-prob, turned a quarter), so
    these are all views the describer knows; their mean is steadier than any one. On the validation
    split the four flips read mixed-type magnetic-tile regions better than one view, and the eight
    better than the four (benchmarks/results/describer_regions.md, sessions 8 and 11).
    """
    count = len(pixels)
    if quarter_turns:  # views are square (the config check and training insist), so a turn keeps their shape
        pixels = torch.cat([pixels, torch.rot90(pixels, 1, dims=(-2, -1))])
        alpha = torch.cat([alpha, torch.rot90(alpha, 1, dims=(-2, -1))])
    if flips:
        pixels = torch.cat([pixels.flip(dims) if dims else pixels for dims in FLIPS])
        alpha = torch.cat([alpha.flip(dims) if dims else alpha for dims in FLIPS])
    embeddings = tower(pixels, alpha).reshape(len(pixels) // count, count, -1)
    return torch.nn.functional.normalize(embeddings.mean(dim=0), dim=-1)


def _describer_folder(folder: Path) -> Path:
    """A describer folder itself, or a training --output-dir holding one in `model/`."""
    if not (folder / CONFIG_NAME).is_file() and (folder / "model" / CONFIG_NAME).is_file():
        return folder / "model"
    return folder


def _read_projection(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("projection."): v for k, v in read_safetensors(path).items() if k.startswith("projection.")}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or non-contiguous storage; saved tensors are independent copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
