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
    """Flatten, hidden ReLU layers, linear classifier (784-200-10 on MNIST; ``hidden=[200, 200]``
    for 784-200-200-10)."""

    def __init__(self, in_features: int, hidden: int | list[int], num_classes: int):
        super().__init__()
        sizes = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in, size_out in zip([in_features, *sizes[:-1]], sizes, strict=True):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(sizes[-1], num_classes)

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


class LeNet5(nn.Module):
    """LeNet-5: conv6(5x5, pad 2)-ReLU-pool, conv16(5x5)-ReLU-pool, fc120-ReLU, fc84-ReLU, fc(classes).

    With the first convolution padded, 28x28 inputs give LeCun's 16x5x5 feature map.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"model=lenet5 needs images of at least 10x10, got {image_size}x{image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FedAvgCNN(nn.Module):
    """McMahan et al.'s CNN as PFLlib builds it (``FedAvgCNN``, its "4-layer CNN"):
    conv32(5x5)-ReLU-pool, conv64(5x5)-ReLU-pool, fc512-ReLU, fc(classes), no padding.

    28x28 inputs give PFLlib's 1024 features (64x4x4), 32x32 its 1600 (64x5x5).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"model=fedavg_cnn needs images of at least 16x16, got "
                             f"{image_size}x{image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.ReLU(),
        )
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlockGN(nn.Module):
    """ResNet basic block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN (+ projected shortcut), ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(groups, planes), planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(groups, planes), planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.GroupNorm(_groups(groups, planes), planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _groups(groups: int, channels: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class GlobalMeanPool(nn.Module):
    """``AdaptiveAvgPool2d(1)``'s values as a mean over the spatial dimensions, whose CUDA
    backward (an expand) is deterministic; AdaptiveAvgPool2d's is not (docs/gpu.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class ResNet18GN(nn.Module):
    """ResNet-18 with GroupNorm, CIFAR-style: 3x3 stem, no max-pool, [2, 2, 2, 2] basic blocks
    of 64-128-256-512 channels (times ``width``), global average pool, fc(classes).

    GroupNorm keeps no running statistics, so the model has no BatchNorm state to share.
    """

    def __init__(self, in_channels: int, num_classes: int, groups: int = 2, width: float = 1.0):
        super().__init__()
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(_groups(groups, planes[0]), planes[0]), nn.ReLU())
        layers, in_planes = [], planes[0]
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            layers += [BasicBlockGN(in_planes, p, stride, groups), BasicBlockGN(p, p, 1, groups)]
            in_planes = p
        self.layers = nn.Sequential(*layers, GlobalMeanPool(), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(self.stem(x)))


class LogReg(nn.Module):
    """Multinomial logistic regression: flatten, one linear layer (which is the classifier)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(x))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model (McMahan et al. 2017's next-character LSTM): embedding(8), a
    2-layer LSTM of 256 units, fc(classes) on the last step's output. The input is (N, L)
    character indices of the same alphabet as the classes."""

    def __init__(self, num_classes: int, embedding: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, embedding)
        self.lstm = nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.classifier(out[:, -1])


MODELS = ("digit_cnn", "mlp", "cnn", "lenet5", "fedavg_cnn", "resnet18_gn", "logreg")  # take images (C, H, W)
TOKEN_MODELS = ("char_lstm",)  # take token sequences (L,)


def input_mismatch(model_name: str, input_shape: tuple[int, ...]) -> str | None:
    """Why ``model_name`` cannot take inputs of ``input_shape`` (images or tokens), or None."""
    tokens = len(input_shape) == 1
    if tokens and model_name in MODELS:
        return (f"model={model_name} takes images and the dataset gives token sequences of length "
                f"{input_shape[0]}: use model={TOKEN_MODELS[0]}")
    if not tokens and model_name in TOKEN_MODELS:
        return (f"model={model_name} takes token sequences and the dataset gives images of shape "
                f"{tuple(input_shape)}: use an image model ({', '.join(MODELS)})")
    return None


def build_model(model: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate the model the config names, seeded by the caller's torch RNG state."""
    mismatch = input_mismatch(str(model.name), input_shape)
    if mismatch is not None:
        raise ValueError(mismatch)
    if model.name == "char_lstm":
        return CharLSTM(num_classes, int(model.embedding), int(model.hidden), int(model.layers))
    channels, height, width = input_shape
    if model.name == "digit_cnn":
        return DigitModel(channels, height, num_classes, float(model.width))
    if model.name == "mlp":
        hidden = model.hidden
        sizes = int(hidden) if isinstance(hidden, int) else [int(h) for h in hidden]
        return MLP(channels * height * width, sizes, num_classes)
    if model.name == "cnn":
        return CNN(channels, height, num_classes)
    if model.name == "lenet5":
        return LeNet5(channels, height, num_classes)
    if model.name == "fedavg_cnn":
        return FedAvgCNN(channels, height, num_classes)
    if model.name == "resnet18_gn":
        return ResNet18GN(channels, num_classes, int(model.groups), float(model.width))
    if model.name == "logreg":
        return LogReg(channels * height * width, num_classes)
    if model.name == "custom":  # the user's own nn.Module (task/core/custom_model.py)
        from task.core.custom_model import build_custom

        return build_custom(model, input_shape, num_classes)
    raise ValueError(f"unknown model {model.name!r}; valid: {', '.join(MODELS + TOKEN_MODELS)}, custom")


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
