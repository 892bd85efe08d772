"""Build the Hugging Face Space folder for the inspection app; `python -m hub push-space <folder> <repo>` pushes it.

The folder is self-contained: the `defectclip` and `demo` packages are copied in (a Space runs `app.py` from
its repo root, so they import from there), `app.py` starts the app with the models repo as its default,
`requirements.txt` is the repository's, and README.md carries the Space's front matter (sdk, sdk_version,
app_file, suggested_hardware, models, datasets) rendered from cards/space_readme.md.j2.

The Space follows Hugging Face's ZeroGPU pattern and runs unchanged on CPU or dedicated-GPU hardware:
`app.py` imports `spaces` before anything touches CUDA, `demo.app.prepare_for_serving` moves every model to
the GPU once at start-up and runs the model calls under `@spaces.GPU`. `requirements.txt` therefore lists
`spaces` (pinned; on other hardware it is installed but `@spaces.GPU` does nothing). `push_space` creates
the Space with its hardware requested (`suggested_hardware` in README.md is only a hint to people who
duplicate it), and asks for it again when the Space already exists.

Why `gradio` is dropped from requirements.txt: a Gradio Space installs the version named by `sdk_version`,
and a second pin could only disagree with it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from defectclip.io import atomic_dir
from defectclip.sharing.push import resolve_repo_id

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_README_TEMPLATE = REPO_ROOT / "cards" / "space_readme.md.j2"
PACKAGES = ("defectclip", "demo")
DEFAULT_MODELS_REPO = "inspection-models"
DEFAULT_HARDWARE = "zero-a10g"  # ZeroGPU: a GPU lent per call, the app's pattern
SPACES_REQUIREMENT = "spaces==0.51.3"  # the ZeroGPU helper; the newest release when the Space was last built
DEFAULT_DATASETS: tuple[str, ...] = ()
PYTHON_VERSION = "3.11"  # pyproject.toml: requires-python >=3.11,<3.12
SDK = "gradio"
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")

APP_PY = '''"""defectclip inspection app on a Hugging Face Space (written by `python -m hub build-space`).

Models come from {models_repo} unless the Space sets the DEFECTCLIP_MODELS variable (see demo/models.py).
"""

# ZeroGPU needs `spaces` imported before anything initialises CUDA (torch, the models); elsewhere it is inert.
try:
    import spaces  # noqa: F401
except ImportError:
    pass

import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("DEFECTCLIP_MODELS", "{models_repo}")

from demo.app import main  # noqa: E402  (demo reads DEFECTCLIP_MODELS when it loads the models)

if __name__ == "__main__":
    sys.exit(main())
'''


class SpaceError(ValueError):
    """The Space folder cannot be built: the message says what is missing."""


def installed_gradio_version() -> str:
    """The Space's sdk_version: the gradio the app was tested with, i.e. the one installed here."""
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise SpaceError("gradio is not installed; install the app extra (pip install -e .[app]) so the Space's "
                         "sdk_version matches the gradio the app was tested with.") from None


def space_requirements(requirements: Path) -> str:
    """The repository's requirements.txt without its gradio pin (the Space installs `sdk_version`), plus `spaces`."""
    if not requirements.is_file():
        raise SpaceError(f"{requirements} not found: the Space installs what it lists.")
    kept = [line for line in requirements.read_text().splitlines() if _requirement_name(line) not in ("gradio", "spaces")]
    note = "# gradio is installed by the Space itself, at README.md's sdk_version."
    spaces_note = "# spaces: ZeroGPU's @spaces.GPU (inert on CPU and dedicated-GPU hardware)."
    return "\n".join([*kept, spaces_note, SPACES_REQUIREMENT, note]) + "\n"


def _requirement_name(line: str) -> str:
    text = line.split("#", 1)[0].strip()
    for separator in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        text = text.split(separator, 1)[0]
    return text.strip().lower().replace("_", "-")


def render_space_readme(models: Sequence[str], datasets: Sequence[str], hardware: str, title: str,
                        license_id: str, models_repo: str, embedded_default: bool):
    from huggingface_hub import SpaceCard, SpaceCardData

    card_data = SpaceCardData(
        title=title,
        sdk=SDK,
        sdk_version=installed_gradio_version(),
        python_version=PYTHON_VERSION,
        app_file="app.py",
        license=license_id,
        models=list(models),
        datasets=list(datasets) or None,
        suggested_hardware=hardware,
        emoji="🔍",
        colorFrom="gray",
        colorTo="blue",
        pinned=False,
        short_description="Find, localise and describe defects in industrial images",
    )
    return SpaceCard.from_template(card_data, template_path=str(SPACE_README_TEMPLATE), models_repo=models_repo,
                                   hardware=hardware, dataset_ids=list(datasets), title=title,
                                   embedded_default=embedded_default)


def build_space_folder(
    out: str | Path,
    models_repo: str = DEFAULT_MODELS_REPO,
    *,
    models: Sequence[str] = (),
    datasets: Sequence[str] = DEFAULT_DATASETS,
    hardware: str = DEFAULT_HARDWARE,
    title: str = "defectclip inspection",
    license_id: str = "apache-2.0",
    repo_root: Path = REPO_ROOT,
) -> Path:
    """Write the Space folder (app.py, requirements.txt, README.md, defectclip/, demo/) to `out`, atomically.

    `models_repo` (default `<org>/inspection-models`) is what the app downloads; `models` lists further Hub
    model repos the Space uses (e.g. the TAB backbone), `datasets` the Hub datasets it shows or was built on.
    """
    models_repo = resolve_repo_id(models_repo)
    listed_models = list(dict.fromkeys([models_repo, *(resolve_repo_id(m) for m in models)]))
    with atomic_dir(out) as staging:
        for package in PACKAGES:
            source = repo_root / package
            if not (source / "__init__.py").is_file():
                raise SpaceError(f"{source} is not a Python package; the Space needs it.")
            shutil.copytree(source, staging / package, ignore=_COPY_IGNORE)
        (staging / "app.py").write_text(APP_PY.format(models_repo=models_repo))
        (staging / "requirements.txt").write_text(space_requirements(repo_root / "requirements.txt"))
        embedded_default = (staging / "demo" / "default").is_dir()  # the app's offline fallback, if built
        readme = render_space_readme(listed_models, [resolve_repo_id(d) for d in datasets], hardware, title,
                                     license_id, models_repo, embedded_default)
        readme.save(str(staging / "README.md"))
    return Path(out)


def space_hardware(folder: str | Path) -> str:
    """The hardware a Space folder asks for: its README's `suggested_hardware`, else DEFAULT_HARDWARE."""
    from huggingface_hub import SpaceCard

    readme = Path(folder) / "README.md"
    hardware = SpaceCard.load(readme).data.to_dict().get("suggested_hardware") if readme.is_file() else None
    return str(hardware or DEFAULT_HARDWARE)


def request_hardware(repo_id: str, hardware: str, *, private: bool | None = None, token: str | None = None,
                     endpoint: str | None = None, echo=print) -> None:
    """Create the Space with `hardware` requested, or request it for a Space that already exists."""
    from huggingface_hub import HfApi

    from defectclip.sharing.push import SPACE_SDK

    api = HfApi(endpoint=endpoint, token=token, library_name="defectclip")
    if api.repo_exists(repo_id, repo_type="space"):
        api.request_space_hardware(repo_id, hardware)
        echo(f"Requested {hardware} for the existing Space {repo_id}.")
        return
    api.create_repo(repo_id, repo_type="space", space_sdk=SPACE_SDK, space_hardware=hardware, private=private)
    echo(f"Created the Space {repo_id} on {hardware}.")


def push_space(folder: str | Path, repo_id: str, hardware: str | None = None, *, dry_run: bool = False,
               private: bool | None = None, token: str | None = None, endpoint: str | None = None, echo=print,
               **push_options):
    """Push a built Space folder, its hardware requested (default: the folder's suggested_hardware)."""
    from defectclip.sharing.push import push_folder

    hardware = hardware or space_hardware(folder)
    repo_id = resolve_repo_id(repo_id)
    if dry_run:
        echo(f"Dry run: would request {hardware} for the Space {repo_id}")
    else:
        request_hardware(repo_id, hardware, private=private, token=token, endpoint=endpoint, echo=echo)
    return push_folder(folder, repo_id, "space", dry_run=dry_run, private=private, token=token, endpoint=endpoint,
                       echo=echo, **push_options)
