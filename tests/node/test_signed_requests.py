"""Role credentials: what each route accepts, and every way a request is refused."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net import signed_requests as sr
from ekko.net.httpkit import MAX_BODY_BYTES, BodyRoute
from ekko.net.signed_requests import (
    RESIGN_HEADER,
    ROLES,
    SIGNATURE_HEADER,
    NonceCache,
    SignatureError,
    auth_headers,
    parse_credential,
    role_headers,
    role_key,
    signed_json,
    verify_credential,
)
from ekko.node.access import AccessPolicy, ClusterAuth, is_own_host, least_role
from ekko.node.admin import admin_app

SECRET = b"cluster-secret"
PATH = "/v1/models/ctr/guard/report"

# Every route a node serves, with the roles it must accept (None: open by default).
ROUTES: list[tuple[str, str, frozenset[str] | None]] = [
    ("GET", "/health", None),
    ("GET", "/metrics", None),
    ("GET", "/ready", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/models/ctr/predict", None),
    ("POST", "/v1/models/ctr/feedback", None),
    ("GET", "/v1/status", frozenset({"reader", "writer", "operator"})),
    ("GET", "/v1/latency", frozenset({"reader", "writer", "operator"})),
    ("GET", "/v1/tables/emb/rows", frozenset({"reader", "writer", "operator"})),
    ("GET", "/v1/models/ctr/health", frozenset({"reader", "writer", "operator"})),
    ("GET", "/v1/models/ctr/metrics", frozenset({"reader", "writer", "operator"})),
    ("GET", "/v1/models/ctr/train", frozenset({"reader", "writer", "operator"})),
    ("POST", "/v1/tables/emb/rows", frozenset({"writer", "operator"})),
    ("POST", "/v1/models/ctr/train", frozenset({"writer", "operator"})),
    ("POST", "/v1/latency/reset", frozenset({"operator"})),
    ("POST", "/v1/checkpoint/refresh", frozenset({"operator"})),
    ("POST", "/v1/models/ctr/rollback", frozenset({"operator"})),
    ("POST", "/v1/models/ctr/train/quality/reset", frozenset({"operator"})),
    ("GET", "/v1/snapshot", frozenset({"operator", "node"})),
    ("POST", "/v1/models/ctr/guard/report", frozenset({"node"})),
    ("POST", "/v1/models/ctr/guard/redirect", frozenset({"node"})),
    ("POST", "/v1/some/new/route", frozenset({"operator"})),  # unlisted: closed
]


def test_a_signature_verifies_only_the_request_it_signs() -> None:
    key = role_key(SECRET, "node")
    hdr = role_headers(key, "node", "POST", PATH, b'{"a":1}', now=1000.0, host="a:80")
    cred = parse_credential(hdr[SIGNATURE_HEADER], PATH)
    verify_credential(SECRET, cred, "POST", PATH, b'{"a":1}', now=1010.0, host="a:80")
    with pytest.raises(SignatureError, match="does not match"):  # signed for another node
        verify_credential(SECRET, cred, "POST", PATH, b'{"a":1}', now=1010.0, host="b:80")
    cases = [
        (SECRET, cred, "POST", PATH, b'{"a":2}', 1010.0, "does not match"),  # altered body
        (SECRET, cred, "POST", "/v1/models/ctr/rollback", b'{"a":1}', 1010.0, "does not match"),
        (SECRET, cred, "GET", PATH, b'{"a":1}', 1010.0, "does not match"),
        (b"other", cred, "POST", PATH, b'{"a":1}', 1010.0, "wrong key"),
        (SECRET, cred, "POST", PATH, b'{"a":1}', 1100.0, "100 s old (limit 60 s)"),
        (SECRET, cred, "POST", PATH, b'{"a":1}', 900.0, "dated 100 s ahead"),
    ]
    for secret, c, method, path, body, now, why in cases:
        with pytest.raises(SignatureError, match=re.escape(why)):
            verify_credential(secret, c, method, path, body, now=now, host="a:80")
    for header, why in [
        (None, f"missing {SIGNATURE_HEADER}"),
        ("t=x,mac=00", "malformed"),
        ("role=root,t=1,nonce=ab,mac=00", "unknown role 'root'"),
        ("role=node,t=1,nonce=,mac=00", "nonce must be"),
    ]:
        with pytest.raises(SignatureError, match=re.escape(why)):
            parse_credential(header, PATH)


@given(have=st.sampled_from(ROLES), claim=st.sampled_from(ROLES))
def test_a_role_key_signs_only_as_its_own_role(have: str, claim: str) -> None:
    """Holding one role's key (handed out by the operator) gives no other role."""
    hdr = role_headers(role_key(SECRET, have), claim, "POST", PATH, b"{}", host="a")
    cred = parse_credential(hdr[SIGNATURE_HEADER], PATH)
    if have == claim:
        verify_credential(SECRET, cred, "POST", PATH, b"{}", host="a")
    else:
        with pytest.raises(SignatureError, match="does not match"):
            verify_credential(SECRET, cred, "POST", PATH, b"{}", host="a")


def test_nonce_cache_refuses_a_replay_within_its_window_only() -> None:
    cache = NonceCache(window_s=120.0, max_entries=3)
    cache.add("a", now=0.0)
    with pytest.raises(SignatureError, match="replayed"):
        cache.add("a", now=119.0)
    cache.add("b", now=1.0)
    cache.add("c", now=2.0)
    with pytest.raises(SignatureError, match="too many"):
        cache.add("d", now=3.0)
    cache.add("a", now=120.5)  # "a" left the window: a request that old fails its time check
    assert len(cache) == 3


async def _echo(request: Request) -> Response:
    return JSONResponse({"got": (await request.body()).decode()})


def _app(policy: AccessPolicy | None = None, max_body: int = MAX_BODY_BYTES):
    """Every route echoing its body; those that take one (POST) declare ``max_body``."""
    routes = [
        BodyRoute(path, _echo, max_body=max_body)
        if method == "POST"
        else Route(path, _echo, methods=[method])
        for method, path, _ in ROUTES
    ]
    return admin_app(routes, SECRET, policy)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@settings(deadline=None, max_examples=60)
@given(route=st.sampled_from(ROUTES), role=st.sampled_from((None, *ROLES)))
async def test_every_route_accepts_exactly_its_roles(
    route: tuple[str, str, frozenset[str] | None], role: str | None
) -> None:
    method, path, need = route
    app = _app()
    headers = {} if role is None else auth_headers(SECRET, role, method, path, b"", host="test")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.request(method, path, headers=headers)
    if need is None or role in need:
        assert r.status_code == 200, (route, role, r.text)
    elif role is None:
        assert r.status_code == 401 and f"missing {SIGNATURE_HEADER}" in r.json()["error"]
    else:
        assert r.status_code == 403, (route, role, r.text)
        assert f"role {role} may not {method} {path}" in r.json()["error"]


async def test_signed_bodies_arrive_intact_and_a_replay_is_refused(
    client: httpx.AsyncClient,
) -> None:
    content, headers = signed_json(SECRET, "http://test" + PATH, {"state": "healthy"})
    r = await client.post(PATH, content=content, headers=headers)
    assert r.status_code == 200 and r.json() == {"got": content.decode()}
    r = await client.post(PATH, content=content, headers=headers)
    assert r.status_code == 401 and "replayed" in r.json()["error"]
    content, headers = signed_json(b"not-the-secret", "http://test" + PATH, {"state": "healthy"})
    r = await client.post(PATH, content=content, headers=headers)
    assert r.status_code == 401 and "does not match" in r.json()["error"]
    odd = f"role=node,t={int(time.time())},nonce=ab,mac=".encode() + b"\xe9"
    r = await client.post(PATH, content=b"{}", headers={SIGNATURE_HEADER: odd})
    # A non-ASCII MAC is refused as not matching, not a server error.
    assert r.status_code == 401 and "does not match" in r.json()["error"]
    # The query string is signed: a reader's signature for one key does not read another.
    h = auth_headers(SECRET, "reader", "GET", "/v1/tables/emb/rows?keys=1", host="test")
    r = await client.get("/v1/tables/emb/rows?keys=2", headers=h)
    assert r.status_code == 401 and "does not match" in r.json()["error"]


async def test_bodies_over_the_limit_are_refused_before_reading() -> None:
    app = _app(max_body=1000)
    received: list[int] = []

    async def counting_receive_app(scope, receive, send):  # counts what the app reads
        async def receive_counted():
            msg = await receive()
            received.append(len(msg.get("body", b"")))
            return msg

        await app(scope, receive_counted, send)

    transport = httpx.ASGITransport(app=counting_receive_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        path = "/v1/tables/emb/rows"
        body = b"x" * 5000
        h = auth_headers(SECRET, "writer", "POST", path, body, host="test")
        r = await c.post(path, content=body, headers=h)
        assert r.status_code == 413 and "5000 bytes; the limit is 1000" in r.json()["error"]
        assert received == []  # refused from content-length, nothing read

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"x" * 1000

        r = await c.post(path, content=chunks(), headers=h)
        assert r.status_code == 413 and "over 1000 bytes" in r.json()["error"]
        # Without a credential the body is never read at all.
        r = await c.post(path, content=body)
        assert r.status_code == 401


@pytest.mark.parametrize("serve_open", [True, False])
async def test_serving_is_open_or_closed_by_config(serve_open: bool) -> None:
    app = _app(AccessPolicy(serve_open=serve_open))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for path in ("/v1/models/ctr/predict", "/v1/models/ctr/feedback"):
            r = await c.post(path, content=b"{}")
            assert r.status_code == (200 if serve_open else 401), r.text
        h = auth_headers(SECRET, "reader", "POST", "/v1/models/ctr/feedback", b"{}", host="test")
        r = await c.post("/v1/models/ctr/feedback", content=b"{}", headers=h)
        assert r.status_code == (200 if serve_open else 403)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", auth=ClusterAuth(SECRET)
    ) as c:
        for method, path, _ in ROUTES:
            r = await c.request(method, path)
            assert r.status_code == 200, (method, path, r.text)


def test_least_role_is_the_weakest_accepted() -> None:
    assert least_role("GET", "/v1/status") == "reader"
    assert least_role("POST", "/v1/tables/emb/rows") == "writer"
    assert least_role("GET", "/v1/snapshot") == "operator"
    assert least_role("POST", "/v1/models/x/guard/report") == "node"
    assert least_role("GET", "/health") is None
    assert least_role("GET", "/v1/tables/emb/rows?keys=1") == "reader"


async def test_a_signature_names_its_node_and_another_node_refuses_it() -> None:
    """A header captured at one node is worthless at another: the MAC covers the Host, and a
    node accepts only a Host that is its own."""
    app = _app()
    body = b'{"keys": [1]}'
    path = "/v1/tables/emb/rows"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        for signed_for, sent_host, why in [
            ("a", None, "does not match"),  # sent as is to b: the MAC names a
            ("a", "a", "not this node"),  # Host rewritten to match the MAC: not b's
            ("b:81", "b:81", "not this node"),  # b on another port is another node
        ]:
            h = auth_headers(SECRET, "writer", "POST", path, body, host=signed_for)
            if sent_host is not None:
                h["host"] = sent_host
            r = await c.post(path, content=body, headers=h)
            assert r.status_code == 401 and why in r.json()["error"], (signed_for, r.text)
        h = auth_headers(SECRET, "writer", "POST", path, body, host="b")
        assert (await c.post(path, content=body, headers=h)).status_code == 200


def test_own_host_is_the_address_reached_or_an_advertised_name() -> None:
    server = ("127.0.0.1", 8080)
    names = frozenset({"node-a.example:8080", "node-a"})
    for host, own in [
        ("127.0.0.1:8080", True),
        ("localhost:8080", True),  # loopback
        ("127.0.0.1:8081", False),
        ("127.0.0.2:8080", False),
        ("node-a.example:8080", True),
        ("NODE-A.example:8080", True),
        ("node-a.example:9090", False),
        ("node-a:8080", True),
        ("node-b:8080", False),
        ("", False),
        ("127.0.0.1:x", False),
    ]:
        assert is_own_host(host, server, names) is own, host
    assert is_own_host("[::1]:8080", ("::1", 8080), frozenset())
    assert not is_own_host("[::1]:8080", ("10.0.0.5", 8080), frozenset())
    assert not is_own_host("localhost:8080", ("10.0.0.5", 8080), frozenset())


async def test_a_request_signed_before_the_node_started_is_refused_then_signed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nonce cache lives in memory: after a restart it cannot know what the previous
    process accepted, so a node refuses any signature dated before its start (marked
    ``RESIGN_HEADER``), and ``ClusterAuth`` signs again."""
    body = b'{"keys": [1]}'
    path = "/v1/tables/emb/rows"
    first = _app()  # the node before the restart (started before the request is signed)
    old = auth_headers(SECRET, "writer", "POST", path, body, host="test")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first), base_url="http://test"
    ) as c:
        assert (await c.post(path, content=body, headers=old)).status_code == 200
        assert (await c.post(path, content=body, headers=old)).status_code == 401
    clock = [time.time() + 5.0]  # the node restarts 5 s later (a fake clock)
    monkeypatch.setattr(sr.time, "time", lambda: clock[0])
    restarted = _app()
    sent: list[str] = []

    async def counting(scope, receive, send):
        hdrs = dict(scope["headers"])
        sent.append(hdrs[SIGNATURE_HEADER.encode()].decode())
        await restarted(scope, receive, send)
        clock[0] = restart_at  # after the first answer the client's clock has caught up

    restart_at = clock[0]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=counting), base_url="http://test"
    ) as c:
        r = await c.post(path, content=body, headers=old)
        assert r.status_code == 401 and "before this node started" in r.json()["error"]
        assert r.headers[RESIGN_HEADER] == "1"
        # A client that signs 1 s before the node started (a clock behind, or a request
        # signed while the node restarted) is refused once, signs again and is served.
        clock[0] = restart_at - 1.0
        sent.clear()
        c.auth = ClusterAuth(SECRET)
        r = await c.post(path, content=body)
        assert r.status_code == 200, r.text
        assert len(sent) == 2 and sent[0] != sent[1]
