"""Every model builds for every input shape, and its classifier is its last nn.Linear."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from task.core.models import MODELS, build_model, last_linear

CONFIGS = {"digit_cnn": {"width": 0.125}, "mlp": {"hidden": 16}, "cnn": {}, "lenet5": {}, "fedavg_cnn": {},
           "resnet18_gn": {"groups": 2, "width": 0.125}, "logreg": {}}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("shape", "classes"), [((1, 28, 28), 10), ((3, 32, 32), 100), ((3, 16, 16), 10)])
def test_model_shapes_and_last_linear_is_the_classifier(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": name, **CONFIGS[name]}), shape, classes).eval()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert last_linear(model) is model.classifier and model.classifier.out_features == classes


def test_resnet18_gn_has_groupnorm_and_no_batchnorm():
    cfg = OmegaConf.create({"name": "resnet18_gn", "groups": 2, "width": 0.125})
    model = build_model(cfg, (3, 32, 32), 10)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, 3 projections


def test_lenet5_refuses_tiny_images():
    with pytest.raises(ValueError, match="lenet5"):
        build_model(OmegaConf.create({"name": "lenet5"}), (1, 8, 8), 10)


def test_fedavg_cnn_is_pfllibs_four_layer_cnn():
    """PFLlib's FedAvgCNN: 1024 features from 28x28 grey, 1600 from 32x32 RGB; 582,026 values on FMNIST."""
    grey = build_model(OmegaConf.create({"name": "fedavg_cnn"}), (1, 28, 28), 10)
    assert sum(p.numel() for p in grey.parameters()) == 832 + 51_264 + 524_800 + 5_130
    rgb = build_model(OmegaConf.create({"name": "fedavg_cnn"}), (3, 32, 32), 10)
    assert rgb.features[-2].in_features == 1600 and rgb.classifier.in_features == 512
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model(OmegaConf.create({"name": "fedavg_cnn"}), (1, 15, 15), 10)


def test_global_mean_pool_is_adaptive_avg_pool_to_one_and_raises_no_determinism_error():
    """On CUDA (where AdaptiveAvgPool2d's backward would raise) this checks the whole model."""
    from task.core.device import apply_determinism
    from task.core.models import GlobalMeanPool

    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    assert torch.allclose(GlobalMeanPool()(x), torch.nn.AdaptiveAvgPool2d(1)(x), atol=1e-6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(OmegaConf.create({"name": "resnet18_gn", **CONFIGS["resnet18_gn"]}),
                        (3, 16, 16), 10).to(device)
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())
    torch._C._set_deterministic_algorithms(True, warn_only=False)  # a non-deterministic kernel raises
    try:
        model(torch.randn(2, 3, 16, 16, device=device)).sum().backward()
    finally:
        apply_determinism(True)  # tests/conftest.py's setting
