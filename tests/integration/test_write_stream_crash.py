"""A write stream to a source killed -9 in its middle: the publisher learns it (the sink
fails, it is never told rows were stored that were not), every row acknowledged before the
kill is at the restarted source and its replica, and a new stream writes again."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_checks import until, wait_converged

from ekko.client import Client, ClientError, RemoteSink, SinkFailed, TableSpec

pytestmark = pytest.mark.integration
DIM = 8


def _written(client: Client) -> bool:
    try:
        with client.write_stream() as stream:
            stream.write("emb", np.array([7], np.int64), np.ones((1, DIM), np.float32))
        return True
    except ClientError as exc:
        assert exc.status in (0, 503), exc  # still starting or recovering, nothing else
        return False


def test_acknowledged_rows_survive_a_source_killed_with_a_stream_open(make_cluster) -> None:
    cluster = make_cluster(dcs=1, replicas=1, tables=[], sync={"snapshot_interval_s": 0})
    cluster.start(timeout=120)
    rng = np.random.default_rng(11)
    acked: dict[int, np.ndarray] = {}
    with Client.from_config(cluster.config_path) as client:
        client.create_table(TableSpec("emb", DIM, 4))
        with pytest.raises(SinkFailed) as err, RemoteSink(client) as sink:
            for _ in range(20):
                keys = rng.choice(1 << 40, 2_000, replace=False).astype(np.int64)
                values = rng.standard_normal((2_000, DIM)).astype(np.float32)
                sink.write("emb", keys, values)
                acked.update(zip(keys.tolist(), values, strict=True))
            sink.flush()  # every row so far acknowledged: on the source's disk
            assert sink.statistics().rows_acked == 40_000
            cluster.kill("source")
            for _ in range(50):  # frames into a dead source: the sink must fail
                sink.write("emb", np.arange(100, dtype=np.int64), np.zeros((100, DIM), np.float32))
            sink.flush()
        assert isinstance(err.value.__cause__, ClientError)
        cluster.restart("source", timeout=120)
        until("a new stream writes to the restarted source", lambda: _written(client), 60)
    wait_converged(cluster, deadline_s=90)
    keys = np.fromiter(acked, dtype=np.int64)
    want = np.stack([acked[k] for k in keys.tolist()])
    for node in ("source", "dc1-r0"):
        with Client.from_config(cluster.config_path, node) as client:
            got = client.lookup("emb", keys)
        assert got.found.all(), node
        np.testing.assert_array_equal(got.values, want)
