"""Opening a stream: one signed ``POST`` asking the node to switch protocols (sans-IO).

Why one piece: write streams (a blocking socket) and lookup streams (asyncio) open the same
way — the request, then the node's ``101`` naming its largest frame, or a refusal with its
reason, or a request to sign again — and only how bytes move differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import h11

from ekko.client.errors import ClientError
from ekko.client.stream_frames import MAX_FRAME_HEADER
from ekko.net.signed_requests import RESIGN_HEADER


class Resign(Exception):
    """The upgrade's signature predates the node's start: sign it again."""


class Upgrade:
    """The client's side of one stream's opening: ``request()`` is what to send, then each
    ``receive(data)`` returns the node's largest frame once it switched (None: more bytes
    are needed), or raises ``ClientError`` with the node's reason (or saying its answer was
    not HTTP), or ``Resign``."""

    def __init__(self, what: str, path: str, headers: Mapping[str, str]) -> None:
        self.what = what  # "write stream at URL": how errors name the stream
        self._path = path
        self._headers = headers
        self._conn = h11.Connection(h11.CLIENT)
        self._answer: h11.Response | None = None
        self._body = b""
        self.early = b""  # bytes that came after the 101: the first answers

    def request(self) -> bytes:
        req = h11.Request(method="POST", target=self._path, headers=list(self._headers.items()))
        return self._conn.send(req) + self._conn.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> int | None:
        try:
            return self._receive(data)
        except h11.ProtocolError as exc:  # not HTTP, or cut short: the node's fault
            raise ClientError(f"{self.what}: not an HTTP answer to the upgrade: {exc}") from exc

    def _receive(self, data: bytes) -> int | None:
        self._conn.receive_data(data)
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if not data:
                    break  # the node closed before answering
                return None
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                self.early = bytes(self._conn.trailing_data[0])
                limit = dict(event.headers).get(MAX_FRAME_HEADER.encode(), b"")
                if not limit.isdigit():
                    raise ClientError(f"{self.what}: no {MAX_FRAME_HEADER}")
                return int(limit)
            if isinstance(event, h11.Response):
                self._answer = event
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        answer = self._answer
        status = answer.status_code if answer is not None else 0
        if answer is not None and status == 401 and RESIGN_HEADER.encode() in dict(answer.headers):
            raise Resign
        why = self._body[:300].decode("utf-8", "replace") or "(no reason given)"
        raise ClientError(f"{self.what}: {status} {why}", status)
