"""Partitioners: disjoint, complete, seeded, test splits that follow the training split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from task.data.load import build_federation
from task.data.partitions import (
    allocate_test,
    partition_source,
    plan,
    split_validation,
    write_partition_report,
)
from task.data.sources import Source
from task.run.config import ConfigError, compose_config

from .helpers import tiny_cfg

C = 10


def source(per_class: int = 60, domains: int = 0) -> Source:
    """A synthetic source with the same class counts in train and test (so quotas are exact)."""
    gen = torch.Generator().manual_seed(0)
    y_tr = torch.arange(C).repeat(per_class)[torch.randperm(C * per_class, generator=gen)]
    y_te = torch.arange(C).repeat(per_class)[torch.randperm(C * per_class, generator=gen)]
    x_tr = torch.rand(len(y_tr), 1, 6, 6, generator=gen) * 2 - 1
    x_te = torch.rand(len(y_te), 1, 6, 6, generator=gen) * 2 - 1
    if not domains:
        return Source("synthetic", x_tr, y_tr, x_te, y_te, C)
    d_tr, d_te = torch.arange(len(y_tr)) % domains, torch.arange(len(y_te)) % domains
    return Source("synthetic", x_tr, y_tr, x_te, y_te, C, d_tr, d_te, tuple(f"d{i}" for i in range(domains)))


def part(name: str, **kw):
    defaults = {"iid": {"num_clients": 6},
                "dirichlet": {"num_clients": 6, "alpha": 0.5, "min_partition_size": 5},
                "pathological": {"num_clients": 10, "classes_per_client": 2},
                "rotation": {"num_clients": 8, "num_clusters": 4},
                "relabel": {"num_clients": 6, "num_clusters": 3},
                "class_groups": {"num_clients": 6, "num_clusters": 2},
                "domains": {"clients_per_domain": 2}}
    return OmegaConf.create({"name": name, "val_fraction": 0.0, **defaults[name], **kw})


def hist(labels) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=C)


LABEL_PARTITIONS = ["iid", "dirichlet", "pathological", "class_groups", "rotation", "relabel"]


@pytest.mark.parametrize("name", LABEL_PARTITIONS)
def test_disjoint_complete_and_test_follows_train(name):
    src = source()
    specs, _ = plan(src, part(name), seed=0)
    train = np.concatenate([s.train for s in specs])
    test = np.concatenate([s.test for s in specs])
    assert len(np.unique(train)) == len(train) == len(src.y_train)  # disjoint and complete
    assert len(np.unique(test)) == len(test) == len(src.y_test)
    for s in specs:
        # same class counts in the source's train and test set: the test histogram is the train one
        assert (hist(src.y_test[s.test]) == hist(src.y_train[s.train])).all()


@pytest.mark.parametrize("name", LABEL_PARTITIONS + ["domains"])
def test_same_seed_same_split_other_seed_differs(name):
    src = source(domains=2)
    a, b, c = (plan(src, part(name), seed) for seed in (0, 0, 1))
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test)
               for x, y in zip(a[0], b[0], strict=True))
    assert any(not np.array_equal(x.train, y.train) for x, y in zip(a[0], c[0], strict=True))


def test_test_split_follows_train_proportions_with_a_different_test_size():
    src = source()
    src.x_test, src.y_test = src.x_test[:200], src.y_test[:200]  # a test set a third the size
    specs, _ = plan(src, part("dirichlet", alpha=0.3), seed=3)
    for s in specs:
        p_train = hist(src.y_train[s.train]) / len(s.train)
        p_test = hist(src.y_test[s.test]) / len(s.test)
        assert np.abs(p_train - p_test).sum() < 0.35
        assert set(np.flatnonzero(hist(src.y_test[s.test]))) <= set(np.flatnonzero(p_train))


def test_small_alpha_gives_few_classes_per_client():
    src = source()

    def classes_per_client(alpha):
        specs, _ = plan(src, part("dirichlet", alpha=alpha, min_partition_size=1), seed=0)
        return np.mean([(hist(src.y_train[s.train]) >= 3).sum() for s in specs])

    assert classes_per_client(0.05) <= 4 < 9 <= classes_per_client(100.0)


def test_self_balancing_caps_what_a_client_gets_once_it_holds_its_share():
    src = source()
    share = len(src.y_train) / 6

    def largest(balanced: bool) -> list[int]:
        return [max(len(s.train) for s in plan(src, part("dirichlet", alpha=0.1, min_partition_size=1,
                                                          self_balancing=balanced), seed=seed)[0])
                for seed in range(5)]

    # a client stops receiving once over N/clients: it can overshoot by at most one class's samples
    assert all(n <= share + len(src.y_train) / C for n in largest(True))
    assert max(largest(False)) > max(largest(True))


def test_pathological_gives_exactly_k_classes():
    src = source()
    specs, _ = plan(src, part("pathological"), seed=0)
    assert all((hist(src.y_train[s.train]) > 0).sum() == 2 for s in specs)
    assert all((hist(src.y_test[s.test]) > 0).sum() <= 2 for s in specs)


def test_rotation_clusters_rotate_train_and_test_by_k_quarter_turns():
    src = source()
    specs, names = plan(src, part("rotation"), seed=0)
    fed = partition_source(src, part("rotation"), seed=0)
    assert names == ("rot0", "rot90", "rot180", "rot270") and fed.domain_names == names
    assert [c.domain for c in fed.clients] == [0, 0, 1, 1, 2, 2, 3, 3]
    for c, s in zip(fed.clients, specs, strict=True):
        assert torch.equal(c.x_train, torch.rot90(src.x_train[s.train], c.domain, dims=(2, 3)))
        assert torch.equal(c.x_test, torch.rot90(src.x_test[s.test], c.domain, dims=(2, 3)))
        assert torch.equal(c.y_train, src.y_train[s.train])


def test_relabel_clusters_shift_labels_mod_c():
    src = source()
    specs, _ = plan(src, part("relabel"), seed=0)
    fed = partition_source(src, part("relabel"), seed=0)
    assert [c.domain for c in fed.clients] == [0, 0, 1, 1, 2, 2]
    for c, s in zip(fed.clients, specs, strict=True):
        assert torch.equal(c.y_train, (src.y_train[s.train] + c.domain) % C)
        assert torch.equal(c.y_test, (src.y_test[s.test] + c.domain) % C)
        assert torch.equal(c.x_train, src.x_train[s.train])


def test_class_groups_hold_disjoint_classes():
    fed = partition_source(source(), part("class_groups"), seed=0)
    assert [c.domain for c in fed.clients] == [0, 0, 0, 1, 1, 1]
    classes = [set(torch.cat([c.y_train, c.y_test]).tolist()) for c in fed.clients]
    assert all(cl <= set(range(5)) for cl in classes[:3])
    assert all(cl <= set(range(5, 10)) for cl in classes[3:])


def test_domains_partition_keeps_each_client_in_one_domain():
    src = source(domains=3)
    specs, names = plan(src, part("domains"), seed=0)
    assert names == ("d0", "d1", "d2") and [s.domain for s in specs] == [0, 0, 1, 1, 2, 2]
    for s in specs:
        assert (src.domain_train[s.train] == s.domain).all() and (src.domain_test[s.test] == s.domain).all()
    assert sum(len(s.train) for s in specs) == len(src.y_train)


def test_allocate_test_splits_each_class_in_proportion():
    y_train = np.array([0] * 30 + [1] * 10)
    parts = [np.arange(0, 20), np.arange(20, 40)]  # client 0: 20 of class 0; client 1: 10 of 0 and 10 of 1
    y_test = np.array([0] * 9 + [1] * 4 + [2] * 3)
    out = allocate_test(parts, y_train, np.arange(len(y_test)), y_test, np.random.default_rng(0))
    assert hist(y_test[out[0]])[:3].tolist() == [6, 0, 0] and hist(y_test[out[1]])[:3].tolist() == [3, 4, 0]


def test_validation_split_comes_out_of_train():
    fed = partition_source(source(), part("iid"), seed=0)
    before = [c.num_train for c in fed.clients]
    split_validation(fed, 0.25, seed=0)
    for c, n in zip(fed.clients, before, strict=True):
        assert c.num_val == round(n * 0.25) and c.num_train + c.num_val == n


def test_built_in_digits_unchanged_and_clients_per_domain_override():
    fed = build_federation(tiny_cfg())
    assert len(fed.clients) == 4 and sum(c.num_train + c.num_test for c in fed.clients) == 1797
    fed3 = build_federation(tiny_cfg("partition.clients_per_domain=3 partition.val_fraction=0.1"))
    assert [c.domain_name for c in fed3.clients] == ["plain"] * 3 + ["inverted"] * 3
    assert all(c.num_val > 0 for c in fed3.clients)


def test_write_partition_report(tmp_path):
    fed = partition_source(source(), part("rotation"), seed=0)
    json_path, png_path = write_partition_report(fed, tmp_path / "run")
    report = json.loads(json_path.read_text())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["num_clients"] == 8 and report["domain_names"][1] == "rot90"
    first = report["clients"][0]
    assert first["num_train"] == fed.clients[0].num_train and sum(first["train_labels"]) == first["num_train"]
    assert first["num_test"] == sum(first["test_labels"]) and report["clients"][7]["domain"] == 3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "key"), [
    ("partition=dirichlet partition.alpha=0", "partition.alpha"),
    ("partition=dirichlet partition.alpha=-1", "partition.alpha"),
    ("partition=iid partition.num_clients=0", "partition.num_clients"),
    ("partition=rotation partition.num_clusters=5", "partition.num_clusters"),
    ("partition=iid partition.val_fraction=1.0", "partition.val_fraction"),
    ("partition=iid partition.bogus=1", "partition.bogus"),
    ("model=resnet18_gn model.groups=0", "model.groups"),
])
def test_config_refuses_bad_values(overrides, key):
    with pytest.raises(ConfigError, match=key):
        compose_config(f"dataset=mnist5k {overrides}")


@pytest.mark.parametrize(("name", "kw", "key"), [
    ("iid", {"num_clients": 601}, "partition.num_clients"),
    ("pathological", {"classes_per_client": 11}, "partition.classes_per_client"),
    ("rotation", {"num_clients": 6, "num_clusters": 4}, "partition.num_clusters"),
    ("class_groups", {"num_clients": 6, "num_clusters": 3}, "partition.num_clusters"),
    ("relabel", {"num_clients": 11, "num_clusters": 11}, "partition.num_clusters"),
    ("dirichlet", {"alpha": 0.01, "min_partition_size": 100}, "partition.alpha"),
    ("domains", {}, "partition=domains"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # flwr-datasets warns at every failed Dirichlet draw
def test_builders_refuse_bad_partitions_naming_the_key(name, kw, key):
    with pytest.raises(ValueError, match=key):
        partition_source(source(), part(name, **kw), seed=0)


def test_too_many_clients_per_domain_is_refused():
    with pytest.raises(ValueError, match="partition.clients_per_domain"):
        partition_source(source(domains=3), part("domains", clients_per_domain=201), seed=0)


def test_too_small_test_set_is_refused():
    src = source()
    src.x_test, src.y_test = src.x_test[:5], src.y_test[:5]
    with pytest.raises(ValueError, match="no test samples"):
        partition_source(src, part("iid", num_clients=20), seed=0)


def test_digits_takes_only_the_domains_partition():
    with pytest.raises(ValueError, match="partition=domains"):
        build_federation(compose_config("partition=iid"))
