"""A quarantined source (after a rollback on a partitioned cluster) refuses every write entry
with the 409 contract a rank reads: a write stream's refusal frame (epoch and end in its
reason), HTTP row writes and deletes in JSON and binary (the ``x-ekko-quarantine-until`` and
``x-ekko-rollback-epoch`` headers); nothing is stored, and writes pass again after the end
(the port's clock, faked here)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from client_node import Source

from ekko.client import ClientError, Credentials
from ekko.client.base import Target
from ekko.client.stream import WriteStream
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupFrame, WriteFrame, encode
from ekko.node.access import ClusterAuth
from ekko.schedule.quarantine import EPOCH_HEADER, UNTIL_HEADER, Quarantine, parse_quarantine
from ekko.store.clock import FakeClock

KEYS = np.arange(7_300_000, 7_300_004, dtype=np.int64)  # no other test of the source uses these
VALUES = np.full((4, 4), 3.0, np.float32)


@pytest.fixture
def quarantined(source: Source) -> Iterator[FakeClock]:
    """``emb`` quarantined for 60 s by a fake clock put on the source's port (restored after)."""
    port = source.runner.core.port
    clock = FakeClock(wall=time.time())
    real, port._clock = port._clock, clock
    port.quarantine(["emb"], Quarantine("ctr", 2, clock.wall() + 60))
    try:
        yield clock
    finally:
        port.quarantines.set(["emb"], Quarantine("ctr", 2, 0.0))  # lifted at the next check
        port._clock = real


def test_a_stream_write_is_refused_with_the_epoch_and_end_and_passes_after_it(
    source: Source, quarantined: FakeClock
) -> None:
    before = source.digests()
    until = quarantined.wall() + 60
    with WriteStream(Target.at(source.url, Credentials(secret=source.secret))) as s:
        for send in (lambda: s.write("emb", KEYS, VALUES), lambda: s.delete("emb", KEYS)):
            with pytest.raises(ClientError, match="quarantined: model ctr rolled back") as err:
                send()
            assert err.value.status == 409
            assert parse_quarantine(str(err.value)) == (2, until)
        assert source.digests() == before
        quarantined.advance(60)
        versions = s.write("emb", KEYS, VALUES)  # the same stream, after the end
    assert versions.shape == (4,) and source.digests() != before


def test_http_writes_and_deletes_get_409_with_the_headers(
    source: Source, quarantined: FakeClock
) -> None:
    before = source.digests()
    binary = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}
    posts = [
        ("/v1/tables/emb/rows", {"json": {"keys": KEYS.tolist(), "values": VALUES.tolist()}}),
        ("/v1/tables/emb/rows", {"content": encode(WriteFrame(KEYS, VALUES)), "headers": binary}),
        ("/v1/tables/emb/delete", {"json": {"keys": KEYS.tolist()}}),
        ("/v1/tables/emb/delete", {"content": encode(LookupFrame(KEYS)), "headers": binary}),
    ]
    with httpx.Client(base_url=source.url, auth=ClusterAuth(source.secret)) as c:
        for path, kw in posts:
            r = c.post(path, **kw)
            assert r.status_code == 409, (path, r.text)
            assert r.json()["error"].startswith("quarantined: model ctr rolled back (epoch 2)")
            assert r.headers[EPOCH_HEADER] == "2"
            assert float(r.headers[UNTIL_HEADER]) == quarantined.wall() + 60
        assert source.digests() == before
        quarantined.advance(61)
        r = c.post(posts[0][0], **posts[0][1])
    assert r.status_code == 200 and source.digests() != before
