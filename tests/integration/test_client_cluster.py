"""The client SDK against real node processes: a model published from this process through
``RemoteSink`` (its tables created through the API, ``dense/...`` ones included) reaches the
source and a replica, whose lookups then equal the model's weights."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from ekko.client import Client, RemoteSink, TableSpec
from ekko.torch import EmbeddingPublisher, PublisherConfig

pytestmark = pytest.mark.integration


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(200, 8)
        self.top = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.top(self.emb(ids)).sum()


def test_a_model_published_through_the_client_is_read_back_from_a_replica(make_cluster) -> None:
    cluster = make_cluster(dcs=1, replicas=1, tables=[])
    cluster.start(timeout=120)
    torch.manual_seed(1)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = PublisherConfig(dense_interval_s=0.0)
    with Client.from_config(cluster.config_path) as client:
        assert client.target.reads.name == "dc1-r0"
        with RemoteSink(client) as sink:
            pub = EmbeddingPublisher(model, sink, config)
            for _ in range(30):
                opt.zero_grad()
                model(torch.randint(0, 200, (64,))).backward()
                opt.step()
                pub.publish()
            pub.flush()
        source = client.status(at="writes")["tables"]
        assert set(source) == {"emb", "dense/top.weight", "dense/top.bias"}
        deadline = time.monotonic() + 60
        while {t: v["digest"] for t, v in client.status()["tables"].items()} != {
            t: v["digest"] for t, v in source.items()
        }:
            assert time.monotonic() < deadline, "the replica did not converge"
            time.sleep(0.1)  # a replica in another process pulls; bounded by the deadline
        assert client.tables()["dense/top.weight"] == TableSpec("dense/top.weight", 16, 1)
        rows = client.lookup("emb", np.arange(200))
        weight = client.lookup("dense/top.weight", np.array([0])).values[0]
    held = rows.found.nonzero()[0]
    assert held.size > 150
    np.testing.assert_array_equal(rows.values[held], model.emb.weight.detach().numpy()[held])
    np.testing.assert_array_equal(weight, model.top.weight.detach().numpy().ravel())
