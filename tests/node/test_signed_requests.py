"""Signed admin requests: what the guard's routes accept, and every way a request is refused."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.node.admin import admin_app
from ekko.node.signed_requests import (
    MAX_SIGNED_BODY,
    SIGNATURE_HEADER,
    SignatureError,
    sign_request,
    signed_json,
    verify_request,
)

SECRET = b"cluster-secret"
PATH = "/v1/models/ctr/guard/report"


def test_a_signature_verifies_only_the_request_it_signs() -> None:
    header = sign_request(SECRET, "POST", PATH, b'{"a":1}', now=1000.0)
    verify_request(SECRET, "POST", PATH, b'{"a":1}', header, now=1010.0)
    cases = [
        (SECRET, PATH, b'{"a":2}', header, 1010.0, "does not match"),  # altered body
        (SECRET, "/v1/models/ctr/rollback", b'{"a":1}', header, 1010.0, "does not match"),
        (b"other", PATH, b'{"a":1}', header, 1010.0, "wrong secret"),
        (SECRET, PATH, b'{"a":1}', header, 1100.0, "100 s old (limit 60 s)"),
        (SECRET, PATH, b'{"a":1}', None, 1010.0, f"missing {SIGNATURE_HEADER}"),
        (SECRET, PATH, b'{"a":1}', "t=x,mac=00", 1010.0, "malformed"),
    ]
    for secret, path, body, hdr, now, why in cases:
        with pytest.raises(SignatureError, match=re.escape(why)):
            verify_request(secret, "POST", path, body, hdr, now=now)
    # So is a signature from a clock 100 s ahead of this node's.
    with pytest.raises(SignatureError, match="dated 100 s ahead"):
        verify_request(SECRET, "POST", PATH, b'{"a":1}', header, now=900.0)


async def _echo(request: Request) -> Response:
    return JSONResponse({"got": (await request.body()).decode()})


def _client() -> httpx.AsyncClient:
    routes = [
        Route(PATH, _echo, methods=["POST"]),
        Route("/v1/models/ctr/predict", _echo, methods=["POST"]),
    ]
    app = admin_app(routes, SECRET)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_guard_routes_refuse_unsigned_requests_and_get_signed_bodies_intact() -> None:
    async with _client() as client:
        r = await client.post(PATH, json={"state": "healthy"})
        assert r.status_code == 401 and SIGNATURE_HEADER in r.json()["error"]
        content, headers = signed_json(b"not-the-secret", PATH, {"state": "healthy"})
        r = await client.post(PATH, content=content, headers=headers)
        assert r.status_code == 401 and "does not match" in r.json()["error"]
        content, headers = signed_json(SECRET, PATH, {"state": "healthy"})
        r = await client.post(PATH, content=content, headers=headers)
        assert r.status_code == 200 and r.json() == {"got": content.decode()}
        odd = f"t={int(time.time())},mac=".encode() + b"\xe9"
        r = await client.post(PATH, content=b"{}", headers={SIGNATURE_HEADER: odd})
        # A non-ASCII MAC is refused as not matching, not a server error.
        assert r.status_code == 401 and "does not match" in r.json()["error"]
        r = await client.post(PATH, content=b"x" * (MAX_SIGNED_BODY + 1), headers=headers)
        assert r.status_code == 413 and "body over" in r.json()["error"]
        # Serving routes stay open to the application's servers.
        r = await client.post("/v1/models/ctr/predict", content=b"{}")
        assert r.json() == {"got": "{}"}
