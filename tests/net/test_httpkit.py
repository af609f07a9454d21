"""The shared HTTP toolkit: bodies bounded in size and time, JSON refused by name."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from ekko.net.httpkit import RequestError, bounded_receive, guarded_by, parse_json, receive_body
from ekko.node.table_routes import parse_write
from ekko.store import UnknownTableError


async def test_a_body_that_stops_arriving_is_408() -> None:
    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never sends the rest
        raise AssertionError

    with pytest.raises(RequestError, match="not received within") as err:
        await receive_body(bounded_receive(receive, {}, 100), timeout=0.05)
    assert err.value.status == 408


async def test_a_chunked_body_is_cut_as_it_passes_the_limit() -> None:
    sent = 0

    async def receive() -> dict:
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": b"x" * 40, "more_body": True}

    with pytest.raises(RequestError, match="over 100 bytes") as err:
        await receive_body(bounded_receive(receive, {}, 100))
    assert err.value.status == 413 and sent == 3  # never read past the limit


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "body: JSON nested too deeply"),
        (b'{"keys": [' + b"9" * 5000 + b'], "values": [[0]]}', "a 5000-digit number"),
        (b'{"keys": [1], "values": [[' + b"9" * 5000 + b"]]}", "values[0]: every element"),
        (b'{"keys": [' + b"9" * 20 + b'], "values": [[0]]}', "keys: a key does not fit"),
        (b"\xff\xfe", "body: not valid JSON"),
    ],
)
def test_malformed_write_bodies_name_the_problem(body: bytes, needle: str) -> None:
    with pytest.raises(RequestError, match=needle.replace("[", r"\[")) as err:
        parse_write(body, 1)
    assert err.value.status == 400


def test_ints_keep_their_value_up_to_int64_width() -> None:
    assert parse_json(b"[-9223372036854775808, 9223372036854775807]") == [-(2**63), 2**63 - 1]


async def test_a_key_error_with_its_own_message_keeps_it_whole() -> None:
    """``unknown table 'emb'`` lost its closing quote (the quotes of a bare KeyError's repr
    were stripped from every KeyError's message); found by the HTTP fuzz."""

    async def raising(exc: Exception) -> tuple[int, bytes]:
        @guarded_by({KeyError: 404})
        async def handler(request: Request):
            raise exc

        r = await handler(Request({"type": "http", "method": "GET", "headers": []}))
        return r.status_code, r.body

    assert await raising(UnknownTableError("emb")) == (404, b'{"error":"unknown table \'emb\'"}')
    assert await raising(KeyError("x")) == (404, b'{"error":"x"}')
