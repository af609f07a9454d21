"""A stream's opening (``ekko.client.upgrade.Upgrade``, sans-IO) fed whatever a broken or
hostile node answers: every outcome is the node's limit, ``Resign`` or a ``ClientError``
naming the stream — never an h11 error, which neither stream's caller expects (a serving
node's scatter took one for its own fault: a 500, no other holder tried)."""

from __future__ import annotations

import pytest

from ekko.client.errors import ClientError
from ekko.client.upgrade import Upgrade

OK = (
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: ekko-lookup/1\r\n"
    b"ekko-max-frame-bytes: 4096\r\n\r\n"
)


def _opening() -> Upgrade:
    headers = {"host": "h:1", "connection": "upgrade", "upgrade": "ekko-lookup/1"}
    up = Upgrade("lookup stream at http://h:1", "/v1/streams/lookup", headers)
    up.request()
    return up


def _feed(up: Upgrade, data: bytes, step: int) -> int | None:
    """``data`` in pieces of ``step`` bytes, then the node closing the connection."""
    for i in range(0, len(data), step):
        got = up.receive(data[i : i + step])
        if got is not None:
            return got
    return up.receive(b"")


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_a_switch_gives_the_nodes_limit_whole_or_byte_at_a_time(step: int) -> None:
    assert _feed(_opening(), OK, step) == 4096


@pytest.mark.parametrize(
    "answer",
    [
        b"FOO BAR BAZ\r\n\r\n",
        b"",
        b"HTTP/1.1 101 Switching Protocols\r\nx-a: " + b"a" * 100_000,  # never ends
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
        b"HTTP/1.1 500 x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
    ids=["garbage-status", "closed-at-once", "huge-head", "bad-length", "bad-chunk", "tls-hello"],
)
@pytest.mark.parametrize("step", [1, 1 << 20])
def test_an_answer_that_is_not_http_is_a_client_error_naming_the_stream(
    answer: bytes, step: int
) -> None:
    with pytest.raises(ClientError, match=r"lookup stream at http://h:1: "):
        _feed(_opening(), answer, step)
