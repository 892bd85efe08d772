"""The Space: ZeroGPU pattern (spaces imported first, models moved once, model calls under @spaces.GPU), its
requirements and hardware, and device placement of every model. CUDA itself is exercised only where present."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from app_fixtures import OBJECT, PATCHCORE, build_pipeline, defective
from conftest import save_png
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from defectclip.pipeline import InspectionPipeline
from demo import app as demo_app
from demo import handlers
from hub.space import DEFAULT_HARDWARE, SPACES_REQUIREMENT, build_space_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_pipeline():
    return make_full_pipeline()


def make_full_pipeline() -> InspectionPipeline:
    """The test pipeline plus a tiny CLIP-ADA head, so every kind of model is there to be placed."""
    from defectclip.clip_ada import ClipADA, ClipADAConfig
    from defectclip.towers import build_text_tower, build_vision_tower

    pipeline = build_pipeline()
    vision, text = build_vision_tower("tiny:cnn"), build_text_tower("tiny:text")
    clip_ada = ClipADA(ClipADAConfig(vision=vision.spec, text=text.spec), vision=vision, text=text).eval()
    return InspectionPipeline(pipeline.models, pipeline.describer, clip_ada, few_shot_tower="tiny:cnn",
                              few_shot_image_size=64)


@pytest.fixture
def fake_spaces(monkeypatch):
    """A stand-in for Hugging Face's `spaces` package: GPU(fn) records which functions it wrapped and runs them."""
    module = types.ModuleType("spaces")
    module.wrapped, module.calls = [], []

    def gpu(fn):
        module.wrapped.append(fn.__name__)

        def on_gpu(*args, **kwargs):
            module.calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return on_gpu

    module.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", module)
    return module


def test_every_model_moves_with_the_pipeline():
    """`to` reaches every tensor: scorer towers and banks/statistics, the describer, CLIP-ADA ("meta" stands in
    for CUDA on a machine without one: a tensor left behind would stay on the CPU). A pipeline of its own,
    since meta tensors keep no values."""
    pipeline = make_full_pipeline()
    before = pipeline.tensors()
    kinds = {name.split("/")[0] for name in before}
    assert kinds == {*pipeline.models, "describer"}  # both scorers, CLIP-ADA ("reference-free") and describer
    assert len(pipeline.models) == 3
    assert any(name.endswith("/memory_bank") for name in before) and any(name.endswith("/mean") for name in before)
    pipeline.to("meta")
    left_behind = [name for name, tensor in pipeline.tensors().items() if tensor.device.type != "meta"]
    assert left_behind == [] and len(pipeline.tensors()) == len(before)
    assert all(model.scorer.device.type == "meta" for model in pipeline.models.values()
               if hasattr(model.scorer, "features"))


def test_zero_gpu_start_up_moves_models_once_and_runs_model_calls_under_spaces_gpu(
        full_pipeline, fake_spaces, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what ZeroGPU reports once `spaces` is imported
    assert demo_app.serving_device() == "cuda"
    pipeline = InspectionPipeline(dict(full_pipeline.models), full_pipeline.describer, None)
    moved = []
    monkeypatch.setattr(pipeline, "to", lambda device: moved.append(device) or pipeline)
    demo_app.prepare_for_serving(pipeline)
    demo_app.prepare_for_serving(pipeline)  # a second start-up call must not wrap twice
    assert moved == ["cuda", "cuda"] and sorted(fake_spaces.wrapped) == sorted(demo_app.GPU_MODEL_CALLS)

    session = handlers.Session()
    path = str(save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png"))
    view = handlers.score_upload(pipeline, session, path, PATCHCORE)
    handlers.describe_point(pipeline, session, 32, 27)
    assert view.verdict.startswith("DEFECT") and fake_spaces.calls == ["score", "describe"]


def test_without_spaces_the_app_runs_on_the_cpu_unwrapped(full_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` fails, as on a plain machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipeline = InspectionPipeline(dict(full_pipeline.models), full_pipeline.describer, None)
    demo_app.prepare_for_serving(pipeline)
    assert str(pipeline.device) == "cpu" and "score" not in vars(pipeline)
    assert all(t.device.type == "cpu" for t in pipeline.tensors().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_model_runs_there_and_agrees_with_the_cpu(full_pipeline):
    pipeline = InspectionPipeline(dict(full_pipeline.models), full_pipeline.describer, None)
    image = defective(np.random.default_rng(5))
    on_cpu = pipeline.score(image, PATCHCORE)
    try:
        pipeline.to("cuda")
        assert all(t.device.type == "cuda" for t in pipeline.tensors().values())
        on_gpu = pipeline.score(image, PATCHCORE)
        assert on_gpu.score == pytest.approx(on_cpu.score, rel=1e-3)
        assert pipeline.describe(image, on_gpu.mask, OBJECT)
    finally:
        pipeline.to("cpu")


def _imports_in_order(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append((node.lineno, node.module))
    return [name for _, name in sorted(names)]


def test_spaces_is_imported_before_anything_that_can_touch_cuda(tmp_path):
    for source in ((REPO / "demo" / "app.py").read_text(),
                   (build_space_folder(tmp_path / "space") / "app.py").read_text()):
        imports = [name for name in _imports_in_order(source) if name not in ("__future__",)]
        assert imports[0] == "spaces", imports


def test_the_space_installs_spaces_and_asks_for_zero_gpu(tmp_path):
    folder = build_space_folder(tmp_path / "space")
    assert SPACES_REQUIREMENT in (folder / "requirements.txt").read_text().splitlines()
    assert f"suggested_hardware: {DEFAULT_HARDWARE}" in (folder / "README.md").read_text()


def test_push_space_creates_the_space_with_its_hardware_then_requests_a_change(fake_hub, tmp_path):
    from huggingface_hub import HfApi

    from hub.__main__ import main

    folder = build_space_folder(tmp_path / "space")
    assert main(["push-space", str(folder), "defectclip/inspection"]) == 0
    assert fake_hub.repo("defectclip/inspection", "space").hardware == DEFAULT_HARDWARE
    assert main(["push-space", str(folder), "defectclip/inspection", "--hardware", "t4-small"]) == 0
    assert fake_hub.repo("defectclip/inspection", "space").hardware == "t4-small"
    assert HfApi().space_info("defectclip/inspection").runtime.requested_hardware == "t4-small"
    assert "demo/app.py" in fake_hub.repo_files("defectclip/inspection", "space")
