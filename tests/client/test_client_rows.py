"""The client against a real source: rows written come back equal, in binary and JSON,
sync and async; table names holding "/" work in both URL forms; tables are created by API."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from client_node import Source

from ekko.client import AsyncClient, ClientError, Credentials, TableSpec
from ekko.client.calls import FORMATS
from ekko.net.signed_requests import auth_headers, host_of


def _rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.choice(1 << 40, size=n, replace=False).astype(np.int64) - (1 << 39)
    return keys, rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_then_lookup_round_trips(source: Source, fmt: str) -> None:
    keys, values = _rows(500, 4, seed=len(fmt))
    with source.client(fmt=fmt) as c:
        versions = c.write("emb", keys, values)
        assert versions.shape == (500,) and (versions > 0).all()
        missing = np.array([7_000_000_000_001], dtype=np.int64)
        got_values, got_versions, found = c.lookup("emb", np.concatenate([keys, missing]))
    assert found.tolist() == [True] * 500 + [False]
    np.testing.assert_array_equal(got_values[:500], values)
    np.testing.assert_array_equal(got_versions[:500], versions)
    assert got_versions[500] == 0 and not got_values[500].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_deleted_key_is_not_found_and_a_later_write_brings_it_back(
    source: Source, fmt: str
) -> None:
    keys, values = _rows(50, 4, seed=20 + len(fmt))
    with source.client(fmt=fmt) as c:
        written = c.write("emb", keys, values)
        deleted = c.delete("emb", np.concatenate([keys[:10], [123_456_789_000]]))
        assert deleted.shape == (11,) and (deleted[:10] > written[:10]).all()
        _, versions, found = c.lookup("emb", keys)
        assert found.tolist() == [False] * 10 + [True] * 40 and not versions[:10].any()
        again = c.write("emb", keys[:2], values[:2])
        assert (again > deleted[:2]).all()
        assert c.lookup("emb", keys[:3]).found.tolist() == [True, True, False]
        with pytest.raises(ClientError, match="404"):
            c.delete("no-such-table", keys[:1])


def test_async_client_round_trips(source: Source) -> None:
    keys, values = _rows(64, 4, seed=9)

    async def run() -> tuple:
        async with AsyncClient.at(source.url, Credentials(secret=source.secret)) as c:
            versions = await c.write("emb", keys, values)
            deleted = await c.delete("emb", keys[:1])
            assert (deleted > versions[:1]).all()
            return versions, await c.lookup("emb", keys[1:]), await c.tables()

    versions, (got, got_versions, found), tables = asyncio.run(run())
    keys, values, versions = keys[1:], values[1:], versions[1:]
    assert found.all()
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(got_versions, versions)
    assert tables["emb"] == TableSpec("emb", 4, 4)


def test_a_table_named_with_slashes_is_read_and_written_in_both_url_forms(source: Source) -> None:
    table = "dense/bottom.0.weight"
    keys, values = _rows(3, 6, seed=3)
    with source.client() as c:
        c.write(table, keys, values)
        np.testing.assert_array_equal(c.lookup(table, keys).values, values)
    for path in (f"/v1/tables/{table}/rows", f"/v1/tables/{quote(table, safe='')}/rows"):
        url = source.url + path + f"?keys={keys[0]}"
        request = httpx.Request("GET", url)
        target = f"{request.url.path}?{request.url.query.decode()}"  # as the node checks it
        headers = auth_headers(source.secret, "reader", "GET", target, host=host_of(url))
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["rows"][0]["value"] == pytest.approx(values[0].tolist())


def test_create_table_is_idempotent_and_a_conflict_names_both_specs(source: Source) -> None:
    spec = TableSpec("dense/top.1.bias", 1, 1)
    with source.client() as c:
        assert c.create_table(spec) is True
        assert c.create_table(spec) is False
        with pytest.raises(ClientError) as err:
            c.create_table(TableSpec("dense/top.1.bias", 2, 1))
        assert c.tables()["dense/top.1.bias"] == spec
        c.write(spec.name, np.array([0]), np.array([[0.5]], dtype=np.float32))
    assert err.value.status == 409
    assert "dim=1" in str(err.value) and "dim=2" in str(err.value)


def test_status_of_the_source(source: Source) -> None:
    with source.client() as c:
        doc = c.status(at="writes")
    assert doc["role"] == "source" and "emb" in doc["tables"]


@pytest.mark.parametrize("name", [".", "..", "x/../emb", "a/./b", "a/.."])
def test_a_name_with_a_dot_segment_is_refused(source: Source, name: str) -> None:
    """URLs drop dot segments (httpx sends ``/v1/tables/x/../emb/rows`` as ``.../emb/rows``),
    so such a table, once created, could not be written through the client (its signature
    was for the path it meant, 401) or was another route (``..``). The name is refused when
    the table would be created, naming the rule; names merely holding dots stay fine."""
    with source.client() as c:
        with pytest.raises(ClientError) as err:
            c.create_table(TableSpec(name, 4, 1))
        assert err.value.status == 400
        assert "name: " in str(err.value) and "'.' or '..'" in str(err.value)
        assert name not in c.tables()
        c.create_table(TableSpec("v.1/..x/a..", 4, 1))  # dots inside a segment: fine
        c.write("v.1/..x/a..", np.array([1]), np.ones((1, 4), np.float32))
