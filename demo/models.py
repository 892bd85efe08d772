"""Where the app's models come from: a Hub repo when it can be reached, else the embedded default.

`DEFECTCLIP_MODELS` may name a local folder or a Hub repo (`<org>/<name>`); without it the app tries
`<DEFECTCLIP_ORG or defectclip>/inspection-models` and falls back to `demo/default/`, which ships in
this repository and is written by `python scripts/build_embedded_default.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from defectclip.pipeline import InspectionPipeline, PipelineError
from defectclip.towers import hub_offline_mode, hub_reachable

EMBEDDED_DEFAULT = Path(__file__).resolve().parent / "default"


def default_repo() -> str:
    return f"{os.environ.get('DEFECTCLIP_ORG', 'defectclip')}/inspection-models"


def _download(repo_id: str) -> Path | None:
    """The repo's files in the local cache, or None when the Hub cannot serve them."""
    if hub_offline_mode() or not hub_reachable():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id))
    except (HfHubHTTPError, OSError) as err:
        print(f"defectclip: cannot download {repo_id} ({err}); using the embedded default.")
        return None


def models_folder() -> Path:
    chosen = os.environ.get("DEFECTCLIP_MODELS")
    if chosen and Path(chosen).is_dir():
        return Path(chosen)
    downloaded = _download(chosen or default_repo())
    if downloaded is not None:
        return downloaded
    if not EMBEDDED_DEFAULT.is_dir():
        raise PipelineError(
            f"No models: {EMBEDDED_DEFAULT} is missing. Build it with `python scripts/build_embedded_default.py`."
        )
    return EMBEDDED_DEFAULT


def load_pipeline() -> InspectionPipeline:
    folder = models_folder()
    print(f"defectclip: loading models from {folder}")
    return InspectionPipeline.from_pretrained(folder)
