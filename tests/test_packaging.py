"""`pip install .` installs exactly one top-level package, `defectclip`, and that installed copy exports a model
card from outside the repository (the template travels as package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout holds at the top level that could become a package, and what the build reads.
COPIED = ("pyproject.toml", "README.md", "defectclip", "hub", "train", "demo", "cards", "benchmarks", "scripts")

EXPORT_FROM_OUTSIDE = """
import sys
from pathlib import Path

import defectclip
from defectclip.clip_ada import ClipADA, ClipADAConfig
from defectclip.sharing import CardInfo
from defectclip.sharing.export import export_clip_ada

assert Path(defectclip.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), defectclip.__file__
model = ClipADA(ClipADAConfig(vision="tiny:cnn", text="tiny:text"))
out = export_clip_ada(model, Path("export"), CardInfo(repo_id="defectclip/clip-ada-installed"))
print((out / "README.md").read_text())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The repository installed with pip into a bare target folder (no dependencies, no index: offline).

    Built from a copy, because setuptools writes build/ into the source folder it builds."""
    source, target = tmp_path_factory.mktemp("checkout"), tmp_path_factory.mktemp("site")
    for name in COPIED:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "results")}
                                            if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def test_pip_install_puts_exactly_one_top_level_package(installed):
    top_level = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info"))
    assert top_level == ["defectclip"]
    assert (installed / "defectclip" / "sharing" / "templates" / "model_card.md.j2").is_file()


def test_the_installed_copy_exports_a_model_card_from_outside_the_repository(installed, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    result = subprocess.run([sys.executable, "-c", EXPORT_FROM_OUTSIDE, str(installed)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "defectclip/clip-ada-installed" in result.stdout and "ClipADA.from_pretrained" in result.stdout
    assert (tmp_path / "export" / "model.safetensors").is_file()
