"""IFCA's options where the authors' code differs from the paper: weighting and selection."""

from __future__ import annotations

import pytest
import torch

from task.core.messages import TrainReply

from .helpers import client, server, tiny_cfg


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_ifca_weighting_is_the_papers_mean_or_by_samples(weighting):
    st = server(tiny_cfg(f"strategy=ifca strategy.num_clusters=2 strategy.weighting={weighting}"))
    key = next(k for k, v in st.models[0].items() if v.is_floating_point())
    ups = [{k: torch.full_like(v, float(c)) if v.is_floating_point() else v
            for k, v in st.models[0].items()} for c in (0, 1)]
    st.aggregate_replies(1, [TrainReply(0, ups[0], 10, {"cluster": 0}),
                             TrainReply(1, ups[1], 30, {"cluster": 0})])
    expected = 0.5 if weighting == "uniform" else 0.75
    assert torch.allclose(st.models[0][key], torch.full_like(st.models[0][key], expected))


def test_ifca_selects_on_one_batch_when_told():
    from task.core.training import batches, evaluate

    cfg = tiny_cfg("strategy=ifca strategy.num_clusters=2 strategy.select_on=batch batch_size=4")
    c = client(cfg, 0)
    models = server(cfg).models
    _, losses = c.choose(models, 3)
    idx = batches(c.data.num_train, 4, c.generator(3, 5), c.data.x_train.device)[0]
    want = [evaluate(c.model("main", m), c.data.x_train[idx], c.data.y_train[idx])[0] for m in models]
    assert losses == pytest.approx(want) and len(idx) == 4
    whole = client(tiny_cfg("strategy=ifca strategy.num_clusters=2"), 0).choose(models, 3)[1]
    assert whole != pytest.approx(losses)
