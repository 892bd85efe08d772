"""anomalib's PatchCore takes our exported TAB backbone as its timm backbone, unchanged (DESIGN.md "Saved artifacts").

The backbone is exported with defectclip.sharing.export, pushed to the fake Hub, and named to anomalib as `hf-hub:<repo>`, the
way a user would; anomalib then builds it with timm's `features_only` API. Needs the optional extra
(`pip install -e .[anomalib]`); skipped without it.
"""

from __future__ import annotations

import pytest

anomalib = pytest.importorskip("anomalib", reason="anomalib is an optional extra: pip install -e .[anomalib]")

import torch  # noqa: E402
from fake_hub import fake_hub  # noqa: E402,F401  (pytest fixture)

from defectclip.tab import TABBackbone, TABConfig  # noqa: E402
from defectclip.sharing.cards import CardInfo  # noqa: E402
from defectclip.sharing.export import export_tab_backbone  # noqa: E402
from defectclip.sharing.push import RetryPolicy, push_folder  # noqa: E402

REPO = "defectclip/tab-anomalib"
LAYERS = ["layer2", "layer3"]


@pytest.fixture
def pushed_backbone(fake_hub, tmp_path) -> TABBackbone:  # noqa: F811
    model = TABBackbone.build(TABConfig(vision="tiny:cnn", text="tiny:text", objects=["widget"], text_dim=32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights, so a loader that fell back to the seeded tiny tower would differ
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.eval()
    folder = export_tab_backbone(model, tmp_path / "tab", CardInfo(repo_id=REPO))
    push_folder(folder, REPO, retry=RetryPolicy(attempts=2, base_delay=0.01), echo=lambda _: None)
    return model


def test_anomalib_feature_extractor_gives_the_tab_trunk_features(pushed_backbone):
    from anomalib.models import Patchcore

    lightning_model = Patchcore(backbone=f"hf-hub:{REPO}", layers=LAYERS, pre_trained=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = lightning_model.model.feature_extractor(images)
        expected = pushed_backbone.trunk.forward_features(images, LAYERS)
    assert list(features) == LAYERS
    for layer in LAYERS:
        assert torch.allclose(features[layer], expected[layer], atol=1e-6), layer


def test_anomalib_patchcore_fits_and_scores_on_the_tab_backbone(pushed_backbone):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=LAYERS, backbone=f"hf-hub:{REPO}", pre_trained=True, num_neighbors=1)
    generator = torch.Generator().manual_seed(2)
    normal = 0.5 + 0.05 * torch.randn(4, 3, 64, 64, generator=generator)
    defective = normal[:1].clone()
    defective[:, :, 20:36, 20:36] = 1.0  # a bright square: the defect

    model.train()
    model(normal)
    model.subsample_embedding(sampling_ratio=0.5)
    model.eval()
    with torch.no_grad():
        result = model(torch.cat([normal[:1], defective]))
    assert result.anomaly_map.shape[-2:] == (64, 64)
    assert result.pred_score[1] > result.pred_score[0]
