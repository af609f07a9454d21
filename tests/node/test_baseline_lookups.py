"""Baseline lookups (the guard on a partitioned cluster): a lookup stream or ``POST
/v1/lookup`` sent with ``x-ekko-variant: baseline`` reads the node's lagged store, never its
online store; a node that keeps no lagged store refuses by name (409), and a table the lagged
store lacks yet is a 404 (the scatter fails over to the partition's next holder)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from partition_node import keys_of, lone_source

from ekko.client import ClientError
from ekko.client.credentials import Credentials
from ekko.client.lookup_stream import LookupStream
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupManyFrame, encode
from ekko.guard.baseline import LaggedStore
from ekko.node.access import ClusterAuth
from ekko.protocol.messages import Chunk
from ekko.protocol.ready import Applied
from ekko.serve.scatter_fetch import HolderFailed
from ekko.serve.scatter_http import HttpHolders


def _applied(store, keys: np.ndarray, at: float) -> Applied:
    """The rows ``keys`` hold in ``store`` now, as the apply port would report them."""
    values, versions, _ = store.table("emb").lookup(keys)
    e = np.empty(0, np.int64)
    chunk = Chunk("emb", 0, e, e, e, e, keys, values, versions, np.full(keys.size, 1, np.int64))
    return Applied((store.table("emb").spec,), (chunk,), at)


async def test_baseline_lookups_read_the_lagged_store_and_refuse_where_there_is_none(
    tmp_path: Path,
) -> None:
    async with lone_source(tmp_path) as (cfg, runner):
        name = runner.core.name
        url = f"http://127.0.0.1:{runner.core.node.admin_port}"
        creds = Credentials(secret=runner.secret)
        keys = keys_of(cfg, 0, 4)
        runner.core.write("emb", keys, np.ones((4, 4), np.float32))

        # No lagged store here: refused by name, before the stream opens and on the route.
        with pytest.raises(ClientError, match=f"node {name} keeps no baseline") as caught:
            await LookupStream.open(url, creds, variant="baseline")
        assert caught.value.status == 409
        remote = HttpHolders(creds, variant="baseline")
        with pytest.raises(HolderFailed, match="keeps no baseline"):
            await remote(url, {"emb": keys}, {})
        await remote.close()
        body = encode(LookupManyFrame(["emb"], np.array([keys.size]), keys))
        headers = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}
        async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as c:
            r = await c.post("/v1/lookup", content=body,
                             headers={**headers, "x-ekko-variant": "baseline"})  # fmt: skip
            assert r.status_code == 409 and f"node {name} keeps no baseline" in r.text, r.text
            r = await c.post("/v1/lookup", content=body,
                             headers={**headers, "x-ekko-variant": "lagged"})  # fmt: skip
            assert r.status_code == 400 and "x-ekko-variant" in r.text, r.text

        # A lagged store with no table yet: 404, a missing table as any other.
        lagged = LaggedStore(lag_s=10.0)
        runner.models.lagged = lagged
        stream = await LookupStream.open(url, creds, variant="baseline")
        try:
            with pytest.raises(ClientError, match="emb") as caught:
                await stream.lookup({"emb": keys})
            assert caught.value.status == 404
            # v1 comes of age in the baseline; v2 is online and still queued for it
            lagged.offer(_applied(runner.core.store, keys, 0.0), now=0.0)
            lagged.advance(10.0)
            runner.core.write("emb", keys, np.full((4, 4), 2.0, np.float32))
            lagged.offer(_applied(runner.core.store, keys, 11.0), now=11.0)
            lagged.advance(12.0)
            base = (await stream.lookup({"emb": keys}))["emb"]
            np.testing.assert_array_equal(base.values, np.ones((4, 4), np.float32))
            online = await LookupStream.open(url, creds)
            try:
                got = (await online.lookup({"emb": keys}))["emb"]
                np.testing.assert_array_equal(got.values, np.full((4, 4), 2.0, np.float32))
                assert (got.versions > base.versions).all()
            finally:
                await online.close()
            with pytest.raises(ClientError, match="partition 1") as caught:  # still 421
                await stream.lookup({"emb": keys_of(cfg, 1, 2)})
            assert caught.value.status == 421
        finally:
            await stream.close()
        posted = HttpHolders(creds, variant="baseline", streams=False)
        try:
            rows = (await posted(url, {"emb": keys}, {}))["emb"]
            np.testing.assert_array_equal(rows.values, np.ones((4, 4), np.float32))
        finally:
            await posted.close()
