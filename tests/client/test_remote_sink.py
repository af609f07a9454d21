"""``RemoteSink``: a slow source fills the queue and the writer blocks (nothing dropped),
``flush`` returns after the acknowledgement, a failure reaches the caller, and a publisher
through it leaves the source holding the model's weights."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from client_node import MAX_BODY, Source
from torch import nn

from ekko.client import ClientError, RemoteSink, SinkFailed, TableSpec
from ekko.client.calls import FORMATS
from ekko.torch import EmbeddingPublisher, PublisherConfig


def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)  # polling another thread's state, bounded by the deadline


class GatedClient:
    """A source that acknowledges a write only when the test opens its gate: a request
    (JSON: ``write``) or a stream frame (binary: ``write_stream().send``) waits for it."""

    def __init__(self, fmt: str = "binary") -> None:
        self.target = SimpleNamespace(fmt=fmt)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.rows: dict[int, np.ndarray] = {}
        self.fail_with: Exception | None = None

    def create_table(self, spec: TableSpec) -> bool:
        return True

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        for k, v in zip(keys.tolist(), values, strict=True):
            self.rows[k] = v.copy()
        return np.arange(1, keys.size + 1)

    def delete(self, table: str, keys: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        for k in keys.tolist():
            self.rows.pop(k, None)
        return np.arange(1, keys.size + 1)

    def write_stream(self, window: int) -> GatedStream:
        return GatedStream(self)


class GatedStream:
    """``WriteStream``'s face over a ``GatedClient``: a frame is answered when it is sent."""

    def __init__(self, client: GatedClient) -> None:
        self.client = client
        self.acked_rows = 0
        self.acked_frames = 0
        self.refused_rows = 0
        self.unanswered = 0

    def rows_per_frame(self, dim: int) -> int:
        return 1 << 20

    def send(self, table: str, keys: np.ndarray, values: np.ndarray) -> int:
        self.client.write(table, keys, values)
        self.acked_rows += keys.size
        self.acked_frames += 1
        return self.acked_frames

    def send_delete(self, table: str, keys: np.ndarray) -> int:
        self.client.delete(table, keys)
        self.acked_frames += 1
        return self.acked_frames

    def drain(self) -> int:
        return 0

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_slow_source_blocks_the_writer_and_loses_nothing(fmt: str) -> None:
    client = GatedClient(fmt)
    sink = RemoteSink(client, lanes=1, depth=2)  # type: ignore[arg-type]
    sink.create_table(TableSpec("t", 2, 1))
    done = []

    def writer() -> None:
        for i in range(6):
            sink.write("t", np.array([i], np.int64), np.full((1, 2), i, np.float32))
            done.append(i)
            if i == 0:  # the first batch goes alone into the request the source holds
                client.entered.wait()

    thread = threading.Thread(target=writer)
    thread.start()
    # one batch in the request the source holds, two queued: the writer's fourth blocks
    _until(lambda: sink.statistics().queued_batches == 2 and len(done) == 3, "queue full")
    assert thread.is_alive() and len(done) == 3 and not client.rows
    client.gate.set()
    thread.join(timeout=10)
    sink.flush()
    assert sorted(client.rows) == list(range(6))
    assert all((client.rows[i] == i).all() for i in range(6))
    assert sink.statistics().rows_acked == 6
    sink.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_request_reaches_the_caller_and_the_sink_stays_failed(fmt: str) -> None:
    client = GatedClient(fmt)
    client.fail_with = ClientError("POST /v1/tables/t/rows at x: 503 not now", 503)
    client.gate.set()
    sink = RemoteSink(client, lanes=2)  # type: ignore[arg-type]
    sink.write("t", np.arange(4, dtype=np.int64), np.zeros((4, 2), np.float32))
    with pytest.raises(SinkFailed, match="503 not now") as err:
        sink.flush()
    assert isinstance(err.value.__cause__, ClientError)
    with pytest.raises(SinkFailed):
        sink.write("t", np.arange(1, dtype=np.int64), np.zeros((1, 2), np.float32))
    with pytest.raises(SinkFailed):
        sink.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_later_writes_of_a_key_win_across_merged_batches(fmt: str) -> None:
    client = GatedClient(fmt)
    sink = RemoteSink(client, lanes=3, depth=64)  # type: ignore[arg-type]
    keys = np.arange(-20, 20, dtype=np.int64)
    for step in range(10):  # queued while the gate is shut: merged into few requests
        sink.write("t", keys, np.full((keys.size, 2), step, np.float32))
    client.gate.set()
    sink.flush()
    assert sorted(client.rows) == keys.tolist()
    assert all((v == 9).all() for v in client.rows.values())
    sink.close()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.bottom = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bottom(self.emb(ids)).sum()


def test_a_publisher_through_the_remote_sink_leaves_the_models_weights_at_the_source(
    source: Source,
) -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = PublisherConfig(table_names={"emb": "tiny/emb"}, embedding_shards=2,
                             dense_interval_s=0.0, dense_prefix="tiny/dense/")  # fmt: skip
    with source.client() as c, RemoteSink(c, lanes=3, max_request_bytes=4096) as sink:
        pub = EmbeddingPublisher(model, sink, config)
        for _ in range(20):
            ids = torch.randint(0, 50, (16,))
            opt.zero_grad()
            model(ids).backward()
            opt.step()
            pub.publish()
        pub.flush()
        sink.flush()
        assert sink.statistics().requests > 20  # split to the request budget, pipelined
        touched = c.lookup("tiny/emb", np.arange(50)).found.nonzero()[0]
        rows = c.lookup("tiny/emb", touched)
        weight = c.lookup("tiny/dense/bottom.weight", np.array([0]))
        bias = c.lookup("tiny/dense/bottom.bias", np.array([0]))
    np.testing.assert_array_equal(rows.values, model.emb.weight.detach().numpy()[touched])
    np.testing.assert_array_equal(weight.values[0], model.bottom.weight.detach().numpy().ravel())
    np.testing.assert_array_equal(bias.values[0], model.bottom.bias.detach().numpy())
    assert touched.size > 30


@pytest.mark.parametrize(("fmt", "n"), [("binary", 100_000), ("json", 30_000)])
def test_requests_over_the_nodes_body_limit_are_split_until_they_fit(
    source: Source, fmt: str, n: int
) -> None:
    keys = np.arange(10_000, 10_000 + n, dtype=np.int64)  # one request of them: > MAX_BODY
    values = np.random.default_rng(5).standard_normal((n, 4)).astype(np.float32)
    with source.client(fmt=fmt) as c, RemoteSink(c, lanes=1, max_request_bytes=3 << 20) as sink:
        sink.write("emb", keys, values)
        sink.flush()
        stats = sink.statistics()
        sample = np.arange(0, n, 11)
        rows = c.lookup("emb", keys[sample])
    assert stats.rows_acked == n and stats.requests >= 2
    assert sink.rows_per_request("emb") * (8 + 4 * 4) <= MAX_BODY or fmt == "json"
    np.testing.assert_array_equal(rows.values, values[sample])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_delete_is_queued_in_its_place_between_the_writes_of_its_keys(fmt: str) -> None:
    client = GatedClient(fmt)
    sink = RemoteSink(client, lanes=3, depth=64)  # type: ignore[arg-type]
    keys = np.arange(-6, 6, dtype=np.int64)
    sink.write("t", keys, np.full((12, 2), 1, np.float32))
    sink.delete("t", keys[::2])  # queued: the caller is not held while the gate is shut
    sink.write("t", keys[:4], np.full((4, 2), 2, np.float32))  # written again after
    assert not client.rows
    client.gate.set()
    sink.flush()
    kept = sorted(set(keys[1::2].tolist()) | set(keys[:4].tolist()))
    assert sorted(client.rows) == kept
    assert all((client.rows[k] == (2 if k < -2 else 1)).all() for k in kept)
    sink.close()
