"""Issue 13 §4 against real node processes: every door needs its credential, the HTTP port
has deadlines and body limits, and the sync port refuses hostile frames before the handshake.

One cluster (source, one serving replica, one checkpoint replica, guard on) with the default
``[http]`` settings, shared by the tests of this module.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import zstandard

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 1.0}
HEADER_TIMEOUT_S = 10.0  # [http] defaults
IDLE_TIMEOUT_S = 5.0
REFRESH_SPACING_S = 10.0
MAX_BODY = 16 << 20

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], checkpoint_every_s=300.0,
                      tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = {"enabled": True}
    config = write_cluster(doc, tmp_path_factory.mktemp("doors") / "cluster.toml")
    with LocalCluster(config) as c:
        c.start(timeout=180)
        yield c


def _signed(
    cluster: LocalCluster,
    role: str,
    method: str,
    path: str,
    body: bytes = b"",
    node: str = "source",
) -> dict:
    """Headers signing one request to ``node`` (the source unless named)."""
    try:
        from ekko.net.signed_requests import auth_headers, host_of
    except ImportError:  # the code before credentials: unsigned, so these tests show its faults
        return {}
    host = host_of(cluster.url(node, path))
    return auth_headers(cluster.secret, role, method, path, body, host=host)


def test_every_door_needs_its_credential(cluster: LocalCluster) -> None:
    src = lambda p: cluster.url("source", p)  # noqa: E731
    row = json.dumps({"keys": [7], "values": [[1.0, 2.0, 3.0, 4.0]]}).encode()
    train = json.dumps({"dense": [[0.0] * 13], "sparse": [[0] * 26], "labels": [1]}).encode()
    no_credential = [
        ("POST", src("/v1/tables/emb/rows"), row),
        ("GET", src("/v1/snapshot"), b""),
        ("POST", src("/v1/models/ctr/train"), train),
        ("POST", src("/v1/models/ctr/rollback"), b"{}"),
        ("POST", src("/v1/latency/reset"), b""),
        ("POST", cluster.url("ckpt-r0", "/v1/checkpoint/refresh"), b""),
        ("GET", src("/v1/status"), b""),
        ("GET", src("/v1/tables/emb/rows?keys=7"), b""),
    ]
    for method, url, body in no_credential:
        r = httpx.request(method, url, content=body, timeout=10)
        assert r.status_code == 401, (method, url, r.status_code, r.text[:200])
        assert "missing x-ekko-signature" in r.json()["error"]
    for path in ("/health", "/metrics", "/ready"):
        assert httpx.get(src(path), timeout=10).status_code == 200
    # A writer writes, but cannot take the model away; an operator can.
    path = "/v1/tables/emb/rows"
    headers = _signed(cluster, "writer", "POST", path, row)
    r = httpx.post(src(path), content=row, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.get(src("/v1/snapshot"), headers=_signed(cluster, "writer", "GET", "/v1/snapshot"))
    assert r.status_code == 403 and "needs node or operator" in r.json()["error"], r.text
    r = httpx.get(src("/v1/snapshot"), headers=_signed(cluster, "operator", "GET", "/v1/snapshot"))
    assert r.status_code == 200 and len(r.content) > 0
    # The same signed write sent again is refused, and nothing changes.
    r = httpx.post(src(path), content=row.replace(b"1.0", b"9.0"), headers=headers, timeout=10)
    assert r.status_code == 401 and "does not match" in r.json()["error"]
    r = httpx.post(src(path), content=row, headers=headers, timeout=10)
    assert r.status_code == 401 and "replayed" in r.json()["error"], r.text
    got = cluster.get("source", "/v1/tables/emb/rows?keys=7")
    assert got["rows"][0]["value"] == [1.0, 2.0, 3.0, 4.0], got


def test_a_refresh_flood_is_coalesced(cluster: LocalCluster) -> None:
    """20 refresh requests made 17 full copies; copies now start a spacing apart."""

    def copies() -> int:
        return cluster.get("ckpt-r0", "/v1/status")["links"]["source"]["responses"]

    before = copies()
    for _ in range(20):
        r = cluster.post("ckpt-r0", "/v1/checkpoint/refresh", {})
        assert r.status_code == 202, r.text
    end = time.monotonic() + REFRESH_SPACING_S + 20
    while copies() == before:
        assert time.monotonic() < end, "the requested copy never came"
        time.sleep(0.2)
    # Watch for 1.5 spacings more: at most one more copy (a request that arrived while the
    # first copy was being taken asks for a later one), never one per request.
    end = time.monotonic() + 1.5 * REFRESH_SPACING_S
    while time.monotonic() < end:
        assert copies() <= before + 2
        time.sleep(0.5)


def _closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``drip`` a byte every 0.5 s), or
    None if it is still open after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(0.5)
    i = 0
    while time.monotonic() - started < seconds:
        try:
            if i < len(drip):
                sock.send(drip[i : i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


def test_slow_and_idle_http_clients_are_disconnected(cluster: LocalCluster) -> None:
    node = cluster.config.node("source")
    addr = (node.host, node.admin_port)
    drip = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
    with socket.create_connection(addr) as slow, socket.create_connection(addr) as idle:
        took = _closed_within(slow, HEADER_TIMEOUT_S + 5, drip)
        assert took is not None and took < HEADER_TIMEOUT_S + 2, took
        took = _closed_within(idle, 3)  # already past the header deadline
        assert took is not None, "a connection that never sent a request is still open"
    with socket.create_connection(addr) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        took = _closed_within(kept, IDLE_TIMEOUT_S + 5)
        assert took is not None and took < IDLE_TIMEOUT_S + 2, took


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Status line and body of one HTTP/1.1 response read from ``sock``."""
    f = sock.makefile("rb")
    status = f.readline()
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, f.read(length)


def test_a_61_mb_body_is_refused_and_the_loop_keeps_serving(cluster: LocalCluster) -> None:
    path = "/v1/tables/emb/rows"
    body = b'{"keys": [' + b"1," * (61 << 19) + b'1], "values": []}'
    assert len(body) > 61 << 20
    headers = _signed(cluster, "writer", "POST", path, body)
    # Declared: refused from the header, before the body is sent.
    node = cluster.config.node("source")
    with socket.create_connection((node.host, node.admin_port), timeout=10) as s:
        auth = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{auth}\r\n")  # fmt: skip
        s.sendall(head.encode())
        status, answer = _response(s)
        assert status.startswith(b"HTTP/1.1 413"), status
        assert "the limit is" in json.loads(answer)["error"]
    # Chunked: cut at the limit, while /ready keeps answering promptly.
    result: dict = {}

    def send() -> None:
        chunks = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))
        try:
            r = httpx.post(cluster.url("source", path), content=chunks, headers=headers,
                           timeout=60)  # fmt: skip
            result["status"], result["text"] = r.status_code, r.text
        except httpx.HTTPError as exc:  # the server may hang up while we still send
            result["error"] = repr(exc)

    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    with httpx.Client(timeout=30) as client:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert client.get(cluster.url("source", "/ready")).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
    sender.join()
    assert result.get("status") == 413 or "error" in result, result
    # The old code parsed it on the loop: /health stalled for seconds (8 s at the source).
    assert worst < 1.0, f"/ready took {worst:.2f} s while the body arrived"


def test_malformed_bodies_are_400_naming_the_problem(cluster: LocalCluster) -> None:
    cases = [
        ("source", "/v1/tables/emb/rows", "writer", b"[" * 100_000 + b"]" * 100_000,
         "nested too deeply"),
        ("source", "/v1/tables/emb/rows", "writer",
         b'{"keys": [' + b"9" * 5000 + b'], "values": [[0, 0, 0, 0]]}', "keys: every key"),
        ("source", "/v1/models/ctr/train", "writer", b"[" * 100_000, "body"),
        ("source", "/v1/models/ctr/rollback", "operator", b'{"a":' * 50_000, "nested too deeply"),
        ("dc1-r0", "/v1/models/ctr/predict", None,
         b'{"dense": [[0]], "sparse": [[' + b"9" * 5000 + b"]]}", "sparse[0][0]"),
    ]  # fmt: skip
    for node, path, role, body, needle in cases:
        headers = {} if role is None else _signed(cluster, role, "POST", path, body)
        r = httpx.post(cluster.url(node, path), content=body, headers=headers, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert needle in r.json()["error"], (path, r.text[:300])
    r = httpx.get(cluster.url("source", "/v1/tables/emb/rows?keys=" + "9" * 5000),
                  headers=_signed(cluster, "reader", "GET",
                                  "/v1/tables/emb/rows?keys=" + "9" * 5000))  # fmt: skip
    assert r.status_code == 400 and r.json()["error"].startswith("keys:"), r.text[:300]


def test_hostile_frames_on_the_sync_port(cluster: LocalCluster) -> None:
    node = cluster.config.node("source")
    proc = psutil.Process(cluster.procs["source"].proc.pid)
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(60 << 20))
    frame = (len(bomb)).to_bytes(4, "big") + b"\x01" + bomb

    async def attack(payload: bytes) -> bytes:
        """What the source answers (the challenge, then EOF; or a reset when more than 64
        handshakes are pending)."""
        reader, writer = await asyncio.open_connection(node.host, node.sync_port)
        try:
            writer.write(payload)
            async with asyncio.timeout(10):
                return await reader.read()
        except (ConnectionResetError, BrokenPipeError):
            return b""
        finally:
            writer.close()

    async def run() -> list[bytes]:
        return await asyncio.gather(*(attack(frame) for _ in range(80)))

    rss_before = proc.memory_info().rss
    answers = asyncio.run(run())
    grown = (proc.memory_info().rss - rss_before) / 2**20
    assert all(len(a) < 4096 for a in answers)  # nothing but the challenge
    assert grown < 100, f"source RSS grew {grown:.0f} MiB from 80 small frames"
    # A frame declaring 59 MB: the source hangs up on the 5-byte header.
    t0 = time.monotonic()
    asyncio.run(attack((59 << 20).to_bytes(4, "big") + b"\x00"))
    assert time.monotonic() - t0 < 3  # the handshake timeout (5 s) would be the old answer
    log = Path(cluster.procs["source"].log_path).read_text(errors="replace")
    assert "compressed frame before authentication" in log
    assert f"frame length {59 << 20} above the limit 4096" in log


def test_a_finite_but_absurd_row_is_refused_naming_table_row_and_column(
    cluster: LocalCluster,
) -> None:
    """A writer's 3e38 in a model's embedding table used to spread to every replica and
    saturate every prediction at 1.0; the write boundary refuses it (the table's max_abs)."""
    path = "/v1/tables/emb_0/rows"
    before = cluster.get("source", f"{path}?keys=3,4")["rows"]
    row = [0.0] * MODEL["embedding_dim"]
    body = json.dumps({"keys": [3, 4], "values": [row, [*row[:5], 3e38, *row[6:]]]}).encode()
    r = httpx.post(cluster.url("source", path), content=body,
                   headers=_signed(cluster, "writer", "POST", path, body), timeout=10)  # fmt: skip
    assert r.status_code == 400, r.text
    assert "table 'emb_0': values[1][5] is 3.00000001e+38, beyond ±10000" in r.json()["error"]
    assert cluster.get("source", f"{path}?keys=3,4")["rows"] == before  # nothing written
