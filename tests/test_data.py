"""The built-in feature-shift digits federation."""

from __future__ import annotations

import pytest
import torch

from task.data.digits import DOMAINS, render_domain
from task.data.load import build_federation, load_federation

from .helpers import tiny_cfg


def test_federation_shapes_domains_and_disjoint_splits():
    fed = build_federation(tiny_cfg())
    assert len(fed.clients) == 4 and fed.input_shape == (3, 16, 16) and fed.num_classes == 10
    assert [c.domain_name for c in fed.clients] == ["plain", "plain", "inverted", "inverted"]
    for c in fed.clients:
        assert c.num_train > 0 and c.num_test > 0
        assert c.x_train.shape[1:] == (3, 16, 16) and c.x_train.dtype == torch.float32
        assert float(c.x_train.min()) >= -1.0 and float(c.x_train.max()) <= 1.0
    assert sum(c.num_train + c.num_test for c in fed.clients) == 1797


def test_same_seed_same_partitions_other_seed_differs():
    a, b = build_federation(tiny_cfg()), build_federation(tiny_cfg())
    c = build_federation(tiny_cfg("seed=1"))
    assert torch.equal(a.clients[0].x_train, b.clients[0].x_train)
    assert not torch.equal(a.clients[0].y_train, c.clients[0].y_train)


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_domain_renders_rgb_in_range_and_looks_different(domain):
    images = torch.rand(4, 1, 16, 16)
    out = render_domain(images, domain, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    if domain != "plain":
        assert not torch.allclose(out, images.expand(4, 3, 16, 16))


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="valid domains"):
        build_federation(tiny_cfg("dataset.domains=[plain,nope]"))


def test_digits_read_without_sklearn_match_load_digits():
    from sklearn.datasets import load_digits

    from task.data.digits import sklearn_digits_arrays

    pixels, labels = sklearn_digits_arrays()
    bunch = load_digits()
    assert pixels.shape == (1797, 8, 8) and (pixels == bunch.images).all()
    assert (labels == bunch.target).all()


def test_a_process_moves_only_the_clients_it_reads_to_the_device():
    # "meta" stands in for a GPU here: a device other than the CPU, without one.
    cfg = tiny_cfg()
    on_cpu, on_device = load_federation(cfg, torch.device("cpu")), load_federation(cfg, torch.device("meta"))
    assert len(on_device.clients) == len(on_cpu.clients) > 2
    assert on_device.clients.moved() == []
    served, last = on_device.clients[2], len(on_cpu.clients) - 1
    assert served.x_train.device.type == "meta" and served.y_test.device.type == "meta"
    assert served.x_train.shape == on_cpu.clients[2].x_train.shape
    assert served.domain == on_cpu.clients[2].domain
    assert on_device.clients[2] is served and on_device.clients[-1] is on_device.clients[last]
    assert on_device.clients.moved() == [2, last]
    assert on_cpu.clients[2].x_train.device.type == "cpu"  # the CPU federation is left as it is
    assert load_federation(cfg, torch.device("meta")).clients is on_device.clients  # once per process
