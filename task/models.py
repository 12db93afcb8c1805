"""Models, built from the config's ``model`` group for a dataset's input shape and classes."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn


class DigitModel(nn.Module):
    """FedBN's DigitModel (the CNN of LG-Mix's code), optionally narrower by ``width``.

    conv(64)-BN-ReLU-pool, conv(64)-BN-ReLU-pool, conv(128)-BN-ReLU, fc(2048)-BN-ReLU,
    fc(512)-BN-ReLU, fc(classes); width scales every channel and hidden size.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (64, 64, 128))
        h1, h2 = (max(1, round(h * width)) for h in (2048, 512))
        pooled = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, 1, 2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, 1, 2), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5, 1, 2), nn.BatchNorm2d(c3), nn.ReLU(), nn.Flatten(),
            nn.Linear(c3 * pooled * pooled, h1), nn.BatchNorm1d(h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.ReLU(),
        )
        self.classifier = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer, linear classifier (784-200-10 on MNIST)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """conv32-pool-conv64-pool-fc128-classes (FedCLUP's MNIST CNN)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        pooled = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * pooled * pooled, 128), nn.ReLU(),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(model: DictConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate the model the config names, seeded by the caller's torch RNG state."""
    channels, height, width = input_shape
    if model.name == "digit_cnn":
        return DigitModel(channels, height, num_classes, float(model.width))
    if model.name == "mlp":
        return MLP(channels * height * width, int(model.hidden), num_classes)
    if model.name == "cnn":
        return CNN(channels, height, num_classes)
    raise ValueError(f"unknown model {model.name!r}; valid: digit_cnn, mlp, cnn")


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer: its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


def batchnorm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of BatchNorm layers: affine parameters and running statistics."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys |= {f"{prefix}.{k}" if prefix else k for k in module.state_dict()}
    return keys
