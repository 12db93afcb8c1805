"""task/core/split.py: the body/head split of every model in the zoo and of a user's own."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from task.core.models import MODELS, build_model
from task.core.split import split_model, trainable

# Small enough for the CPU; each model's own config keys.
SETTINGS = {"digit_cnn": {"width": 0.25}, "mlp": {"hidden": 16}, "resnet18_gn": {"groups": 2, "width": 0.125}}


def _zoo(name: str) -> nn.Module:
    cfg = OmegaConf.create({"name": name, **SETTINGS.get(name, {})})
    torch.manual_seed(0)
    return build_model(cfg, (3, 16, 16), 10)


@pytest.mark.parametrize("name", [m for m in MODELS if m != "logreg"])
def test_every_zoo_model_splits_at_its_declared_classifier(name):
    model = _zoo(name)
    split = split_model(model)
    keys = set(model.state_dict())
    assert split.prefix == "classifier"
    assert split.head == {"classifier.weight", "classifier.bias"}
    assert split.body == keys - split.head and split.body
    # The head is the last Linear: its input is the penultimate feature.
    assert model.classifier.weight.shape[0] == 10
    state = model.state_dict()
    assert set(split.of(state, "head")) | set(split.of(state, "body")) == keys


def test_logreg_has_no_body_and_says_so():
    with pytest.raises(ValueError, match="there is no body"):
        split_model(_zoo("logreg"))


def test_a_layer_name_prefix_moves_more_layers_into_the_head():
    model = _zoo("digit_cnn")  # features: ..., 12 Linear, 13 BN1d, 14 ReLU, 15 Linear, 16 BN1d, 17 ReLU
    split = split_model(model, "features.15")
    assert split.head == {"features.15.weight", "features.15.bias"}
    with pytest.raises(ValueError, match="names no module"):
        split_model(model, "nonexistent")
    with pytest.raises(ValueError, match="has no parameters"):
        split_model(model, "features.17")  # a ReLU


class _OwnHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))

    def forward(self, x):
        return self.head(self.body(x))


def test_a_users_model_splits_by_its_head_attribute_or_its_last_linear():
    assert split_model(_OwnHead()).head == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    split = split_model(plain)
    assert split.prefix == "3" and split.head == {"3.weight", "3.bias"}
    assert split.body == {"1.weight", "1.bias"}


def test_a_model_without_a_head_or_a_linear_is_refused_with_the_way_out():
    convs = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="strategy.head="):
        split_model(convs)
    assert split_model(convs, "2").head == {"2.weight", "2.bias"}


def test_trainable_freezes_the_other_part_and_restores_the_flags():
    model = _zoo("mlp")
    split = split_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with trainable(model, split.head):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in split.body)
    assert not all(torch.equal(before[k], after[k]) for k in split.head)
    assert all(p.requires_grad for p in model.parameters())
