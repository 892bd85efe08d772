"""One contract for every saved artifact: `save_pretrained`, `from_pretrained`, `push_to_hub`.

TAB backbones, PatchCore/PaDiM scorers, the region describer, CLIP-ADA and the inspection pipeline all
derive from `Artifact`, the way timm resolves every source through one path and huggingface_hub's
`PyTorchModelHubMixin` gives the three methods to any module. We keep our own small mixin instead of
the Hub mixin because each kind has its own strict, named-key loading and its own file set (a TAB folder
is also a timm folder; a describer holds a PEFT adapter), which the mixin's single `model.safetensors`
round trip does not cover.

A source is a local folder, or a Hub repo id (`org/name`, or `hf-hub:org/name` as tower specs write
it) with an optional `revision` and `token`. A local folder wins over a repo of the same name, so a path
never reaches the network.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from .errors import ArtifactError
from .io import atomic_dir

HUB_PREFIX = "hf-hub:"
__all__ = ["Artifact", "ArtifactError", "resolve_artifact"]


def _is_local(source: str | Path) -> bool:
    text = str(source)
    return not text.startswith(HUB_PREFIX) and Path(text).expanduser().is_dir()


def resolve_artifact(source: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                     allow_patterns: tuple[str, ...] | None = None) -> Path:
    """A local folder as it is; otherwise `source` as a Hub repo id, downloaded into (or found in) the cache."""
    text = str(source)
    if _is_local(source):
        return Path(text).expanduser()
    repo_id = text.removeprefix(HUB_PREFIX)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ArtifactError(f"{text} is neither an artifact folder on this machine nor a Hub repo id "
                            "('org/name'); check the path.") from None
    return _download(repo_id, text, revision, token, allow_patterns)


def _download(repo_id: str, name: str, revision: str | None, token: str | bool | None,
              allow_patterns: tuple[str, ...] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .towers import require_hub

    require_hub(f"{HUB_PREFIX}{repo_id}", "a local artifact folder")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token,
                                      allow_patterns=list(allow_patterns) if allow_patterns else None))
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise ArtifactError(f"{name} is not a local folder, and {repo_id} (revision {revision or 'main'}) cannot "
                            f"be fetched from the Hub: {err}") from err


class Artifact:
    """Mixin: a subclass writes its files with `_write_artifact` and reads them with `_read_artifact`."""

    # The files `_read_artifact` needs, as glob patterns: a Hub download fetches these and nothing else.
    # None downloads the whole repo (a pipeline or a describer, whose files are nested).
    hub_files: ClassVar[tuple[str, ...] | None] = None
    # Which model-card template section describes this kind (see defectclip.sharing.cards).
    card_kind: ClassVar[str] = ""

    def _write_artifact(self, folder: Path, **options: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define how it is written")

    @classmethod
    def _read_artifact(cls, folder: Path, **options: Any):
        raise NotImplementedError(f"{cls.__name__} does not define how it is read")

    def save_pretrained(self, folder: str | Path, **options: Any) -> Path:
        """Write the artifact folder atomically: a crash mid-save leaves the previous one at `folder` intact.
        `options` are the kind's own (a describer's `merged`, a TAB backbone's `step`)."""
        with atomic_dir(folder) as staging:
            self._write_artifact(staging, **options)
        return Path(folder)

    @classmethod
    def from_pretrained(cls, source: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                        **options: Any):
        """Load from a folder written by `save_pretrained` or from a Hub repo holding one; strict about keys."""
        folder = resolve_artifact(source, revision=revision, token=token, allow_patterns=cls.hub_files)
        if not _is_local(source) and "allow_absolute_tower" in inspect.signature(cls._read_artifact).parameters:
            # A downloaded artifact may only name towers inside itself: an absolute local-dir: path in a
            # repo points at someone else's machine (or at files of this one it has no business reading).
            options.setdefault("allow_absolute_tower", False)
        return cls._read_artifact(folder, **options)

    def push_to_hub(self, repo_id: str, *, card=None, token: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, echo=print):
        """Export (artifact files + model card) and push as one commit; remote files the new version no longer
        has are deleted. `card` is a `defectclip.sharing.CardInfo`; by default one naming `repo_id`."""
        from .sharing.cards import CardInfo
        from .sharing.export import export_artifact
        from .sharing.push import push_folder

        card = card or CardInfo(repo_id=repo_id)
        with tempfile.TemporaryDirectory(prefix="defectclip-push-") as work:
            folder = export_artifact(self, Path(work) / "artifact", card)
            return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message,
                               delete_stale=True, echo=echo)
