"""Every refusal of a binary row write is a 4xx naming the problem, and the table's digest
does not move: shape, dtype, dim, NaN/inf, unknown table, credentials, truncated or
oversized bodies."""

from __future__ import annotations

import struct

import httpx
import msgspec
import numpy as np
import pytest
from client_node import MAX_BODY, Source

from ekko.client import Client, ClientError, Credentials
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupFrame, WriteFrame, encode
from ekko.net.arrays import ARRAY_EXT
from ekko.net.signed_requests import SIGNATURE_HEADER, auth_headers, host_of, role_key

KEYS = np.array([11, 12], dtype=np.int64)
GOOD = np.ones((2, 4), dtype=np.float32)


def _post(source: Source, path: str, body: bytes, *, role: str | None = "writer",
          secret: bytes | None = None) -> httpx.Response:  # fmt: skip
    url = source.url + path
    headers = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}
    if role is not None:
        key = secret or source.secret
        headers.update(auth_headers(key, role, "POST", path, body, host=host_of(url)))
    return httpx.post(url, content=body, headers=headers, timeout=30)


def _nan() -> np.ndarray:
    v = GOOD.copy()
    v[1, 2] = np.nan
    return v


def _inf() -> np.ndarray:
    v = GOOD.copy()
    v[0, 3] = -np.inf
    return v


F64 = GOOD.astype(np.float64)
DIM5 = np.ones((2, 5), np.float32)
CASES = {
    "keys int32": (WriteFrame(KEYS.astype(np.int32), GOOD), 400, "keys: dtype must be int64"),
    "keys 2-D": (WriteFrame(KEYS.reshape(2, 1), GOOD), 400, "keys: expected shape [n]"),
    "no keys": (WriteFrame(KEYS[:0], GOOD[:0]), 400, "n >= 1"),
    "values float64": (WriteFrame(KEYS, F64), 400, "values: dtype must be float32"),
    "wrong dim": (WriteFrame(KEYS, DIM5), 400, "values: expected shape [2, 4]"),
    "rows != keys": (WriteFrame(KEYS, GOOD[:1]), 400, "values: expected shape [2, 4]"),
    "NaN": (WriteFrame(KEYS, _nan()), 400, "values[1][2] is NaN or inf"),
    "inf": (WriteFrame(KEYS, _inf()), 400, "values[0][3] is NaN or inf"),
    "lookup body": (LookupFrame(KEYS), 400, "body:"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_binary_write_is_refused_by_name_and_stores_nothing(
    source: Source, case: str
) -> None:
    frame, status, why = CASES[case]
    before = source.digests()
    r = _post(source, "/v1/tables/emb/rows", encode(frame))
    assert r.status_code == status, r.text
    assert why in r.json()["error"], r.json()
    assert source.digests() == before


def _lying_values(shape: list[int]) -> bytes:
    """A write whose ``values`` header claims ``shape``: no elements (so no bytes are
    needed), but more than numpy can hold."""
    header = msgspec.msgpack.encode(["<f4", shape])
    ext = msgspec.msgpack.Ext(ARRAY_EXT, struct.pack(">H", len(header)) + header)
    keys = msgspec.msgpack.decode(encode(WriteFrame(KEYS, GOOD)))["keys"]
    return msgspec.msgpack.encode({"keys": msgspec.msgpack.Ext(ARRAY_EXT, keys.data),
                                   "values": ext})  # fmt: skip


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**64 - 1], [2**32, 2**32, 0]])
def test_an_array_header_with_an_impossible_shape_is_a_400(source: Source, shape: list) -> None:
    before = source.digests()
    r = _post(source, "/v1/tables/emb/rows", _lying_values(shape))
    assert r.status_code == 400, r.text  # was a 500: numpy's reshape ValueError escaped
    assert r.json()["error"].startswith("body: bad array shape"), r.text
    assert source.digests() == before


def test_refused_requests_leave_the_store_as_it_was(source: Source) -> None:
    before = source.digests()
    body = encode(WriteFrame(KEYS, GOOD))
    checks = [
        (_post(source, "/v1/tables/nope/rows", body), 404, "unknown table 'nope'"),
        (_post(source, "/v1/tables/emb/rows", body, role=None), 401, f"missing {SIGNATURE_HEADER}"),
        (_post(source, "/v1/tables/emb/rows", body, secret=b"not-the-secret"), 401,
         "signature does not match"),
        (_post(source, "/v1/tables/emb/rows", body, role="reader"), 403, "role reader may not"),
        (_post(source, "/v1/tables/emb/rows", body[:-7]), 400, "body:"),
        (_post(source, "/v1/tables/emb/rows", b"\x00" * (MAX_BODY + 1)), 413, "the limit is"),
    ]  # fmt: skip
    for r, status, why in checks:
        assert (r.status_code, why in r.json()["error"]) == (status, True), r.text
    assert source.digests() == before


def test_the_client_raises_the_nodes_reason(source: Source) -> None:
    with source.client() as c:
        with pytest.raises(ClientError, match="404 unknown table 'nope'") as err:
            c.write("nope", KEYS, GOOD)
        assert err.value.status == 404
        with pytest.raises(ClientError, match="NaN or inf"):
            c.write("emb", KEYS, _nan())
        too_many = np.arange(MAX_BODY // 16, dtype=np.int64)
        with pytest.raises(ClientError, match="413"):
            c.write("emb", too_many, np.zeros((too_many.size, 4), np.float32))
    wrong = Credentials(secret=b"wrong")
    with Client.at(source.url, wrong) as c, pytest.raises(ClientError, match="401 signature"):
        c.lookup("emb", KEYS)


def test_a_writer_key_writes_and_reads(source: Source) -> None:
    creds = Credentials(key=role_key(source.secret, "writer"), role="writer")
    with Client.at(source.url, creds) as c:
        c.write("emb", KEYS + 100, GOOD)
        assert c.lookup("emb", KEYS + 100).found.all()
    with (
        Client.at(
            source.url, Credentials(key=role_key(source.secret, "reader"), role="reader")
        ) as c,
        pytest.raises(ClientError, match="403 role reader may not POST"),
    ):
        c.write("emb", KEYS + 100, GOOD)


def test_a_lookup_whose_answer_would_pass_the_body_limit_is_a_413(source: Source) -> None:
    """A lookup's body of keys is small, its answer is not: keys x (dim floats, a version, a
    found flag). 400 k keys of a dim-32 table (a 2.6 MB JSON body) took a node to a 900 MB
    peak rendering its answer; the limit of the body also holds for the answer."""
    fits = MAX_BODY // (4 * 4 + 8 + 1)  # the "emb" table has dim 4
    with source.client() as c:
        assert c.lookup("emb", np.arange(fits, dtype=np.int64)).found.shape == (fits,)
        with pytest.raises(ClientError) as err:
            c.lookup("emb", np.arange(fits + 1, dtype=np.int64))
    assert err.value.status == 413
    assert f"keys: {fits + 1} rows of dim 4 would answer" in str(err.value)
