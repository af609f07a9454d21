"""Hostile HTTP requests for every route a node documents in ``/openapi.json``.

The routes come from the node's own document (generated from its route table, and checked
to list every mounted route by ``tests/node/test_openapi.py``), so a route added later is
fuzzed without anyone listing it here. A request is a documented operation with its path
parameters (a name the node knows, or junk), a body (random JSON, a valid body mutated, raw
bytes), a content type and a credential (the least role the route accepts, so the body
parser is reached; none; a role it refuses; a garbage header; a signature over other bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from ekko.net.signed_requests import ROLES, SIGNATURE_HEADER, auth_headers

CONTENT_TYPES = [
    "application/json",
    "text/plain",
    None,
    "application/x-www-form-urlencoded",
    "application/json; charset=latin-1",
]
AUTH_MODES = ["valid", "valid", "valid", "none", "wrong_role", "garbage", "other_body"]
"""How a request is signed: mostly validly (so the body parser is reached), else not."""
STRICT = ("/v1/tables/{table}/rows", "/v1/models/{model}/train")
"""Routes that change a source's rows and whose bodies have no optional part: they get only
bodies broken on purpose, so a 2xx there is a parser accepting garbage."""


@dataclass(frozen=True)
class Operation:
    """One documented (method, path) with the roles it accepts (None: open)."""

    method: str
    path: str
    roles: tuple[str, ...] | None
    body: str | None  # the component schema name of its JSON body

    @property
    def params(self) -> list[str]:
        return [p[1:-1] for p in self.path.split("/") if p.startswith("{")]


@dataclass(frozen=True)
class FuzzRequest:
    """What one example sends (``repr`` is what hypothesis prints for a failure)."""

    op: Operation
    path: str  # percent-encoded
    query: str
    body: bytes
    content_type: str | None
    auth: str  # valid | none | wrong_role | garbage | other_body

    def send(self, client: httpx.Client, secret: bytes, host: str) -> httpx.Response:
        headers: dict[str, str] = {}
        if self.content_type is not None:
            headers["content-type"] = self.content_type
        url = self.path + (f"?{self.query}" if self.query else "")  # both percent-encoded
        request = client.build_request(self.op.method, url, content=self.body, headers=headers)
        # Signed as the node will check it: the decoded path (``ClusterAuth`` does the same).
        target = request.url.path + (f"?{request.url.query.decode()}" if request.url.query else "")
        method, roles = self.op.method, self.op.roles
        sign = {
            "valid": next((r for r in ROLES if r in roles), None) if roles else None,
            "wrong_role": next((r for r in ROLES if r not in roles), None) if roles else None,
            "other_body": roles[0] if roles else None,
        }.get(self.auth)
        if sign is not None:
            body = self.body + b" " if self.auth == "other_body" else self.body
            request.headers.update(auth_headers(secret, sign, method, target, body, host=host))
        elif self.auth == "garbage":
            request.headers[SIGNATURE_HEADER] = "role=operator,t=nan,nonce=,mac=zz"
        return client.send(request)


def operations(doc: dict[str, Any]) -> list[Operation]:
    out = []
    for path, item in sorted(doc["paths"].items()):
        for method, op in sorted(item.items()):
            security = op.get("security")
            roles = tuple(security[0]["ekkoSignature"]) if security else None
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref")
            out.append(Operation(method.upper(), path, roles, ref and ref.rsplit("/", 1)[1]))
    return out


# -- bodies -------------------------------------------------------------------------------

HOSTILE_NUMBERS = [1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 2**63, -(2**63) - 1,
                   2**64, 10**30, 3.4028235e38, 3.5e38, 64.0001]  # fmt: skip
HOSTILE_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 400,
                    b"1" + b"0" * 25, b"0.1e-999", b"true", b"null", b'"\\ud800"']  # fmt: skip
FIELDS = ["keys", "values", "events", "dense", "sparse", "labels", "id", "label", "to", "why",
          "inputs", "outputs", "shape", "datatype", "data", "parameters", "binary_data_size",
          "node", "state", "epoch", "at", "healthy_wall", "watermark", "automatic", "digests",
          "reason", "x"]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(HOSTILE_NUMBERS)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)


def valid_bodies(dims: dict[str, int], num_dense: int, num_sparse: int) -> dict[str, list[Any]]:
    """Bodies a route takes, by its body schema's name: the seeds mutations start from."""
    dim = dims.get("emb", 4)
    dense = [0.5] * num_dense
    sparse = list(range(1, num_sparse + 1))
    return {
        "RowsBody": [{"keys": [1, 2], "values": [[0.25] * dim, [0.5] * dim]}],
        "EventsBody": [
            {"events": [{"dense": dense, "sparse": sparse}]},
            {"dense": [dense, dense], "sparse": [sparse, sparse], "labels": [0, 1]},
        ],
        "FeedbackBody": [{"labels": [{"id": 1, "label": 1}, {"id": 2, "label": 0}]}],
        "InferRequest": [
            {
                "inputs": [
                    {"name": "dense", "datatype": "FP32", "shape": [1, num_dense], "data": dense},
                    {
                        "name": "sparse",
                        "datatype": "INT64",
                        "shape": [1, num_sparse],
                        "data": sparse,
                    },
                ],
                "outputs": [{"name": "ctr", "parameters": {"binary_data": True}}],
            }
        ],
        "RollbackBody": [{"to": 1.0, "why": "fuzz"}],
        "RedirectBody": [{"why": "fuzz", "epoch": 0, "automatic": False}],
        "RolledBackBody": [{"healthy_wall": 1.0, "watermark": {"emb": [[0, 0, 0]]}}],
        "ReportBody": [{"node": "dc1-r0", "state": "healthy", "epoch": 0, "at": 1.0}],
        "RestoredBody": [{"node": "dc1-r0", "at": 1.0, "digests": {}}],
    }


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``doc`` (the root too)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace(doc[head], rest, value)}
    return [_replace(v, rest, value) if i == head else v for i, v in enumerate(doc)]


@st.composite
def breaking_mutation(draw: st.DrawFn, seed: Any) -> bytes:
    """``seed`` made invalid for its route: a value of another type, an unknown field, a
    non-finite or out-of-range literal, broken JSON, or nested too deep."""
    kind = draw(st.sampled_from(["retype", "extra", "literal", "syntax", "deep", "duplicate"]))
    if kind == "retype":
        paths = [p for p in _paths(seed) if p]
        path = draw(st.sampled_from(paths))
        wrong = draw(st.sampled_from([None, "x", [], {}, True, [[]], {"a": 1}]))
        return json.dumps(_replace(seed, path, wrong)).encode()
    if kind == "extra":
        return json.dumps({**seed, draw(st.sampled_from(["x", "extra", "Keys", ""])): 1}).encode()
    if kind == "literal":  # a number literal swapped for one JSON or float64 cannot hold
        text = json.dumps(seed).encode()
        digits = [i for i in range(len(text)) if text[i : i + 1].isdigit()]
        i = draw(st.sampled_from(digits))
        end = i
        while end < len(text) and text[end : end + 1] in b"0123456789.e-+":
            end += 1
        start = i
        while start > 0 and text[start - 1 : start] in b"0123456789.-":
            start -= 1
        lit = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 400]))
        return text[:start] + lit + text[end:]
    if kind == "syntax":
        text = json.dumps(seed).encode()
        cut = draw(st.integers(0, len(text) - 1))
        return draw(
            st.sampled_from([text[:cut], text[:cut] + b"\xff\xfe" + text[cut:], b"{" + text])
        )
    if kind == "deep":
        depth = draw(st.sampled_from([64, 5000, 100_000]))
        return b'{"x": ' + b"[" * depth + b"]" * depth + b"," + json.dumps(seed).encode()[1:]
    # duplicate keys: the first value valid, the second of another type (which one wins?)
    text = json.dumps(seed).encode()
    key = draw(st.sampled_from(sorted(seed)))
    return text[:-1] + b", " + json.dumps(key).encode() + b": {}}"


@st.composite
def free_mutation(draw: st.DrawFn, seed: Any) -> bytes:
    """``seed`` with any change, which may leave it valid (a route that changes no rows)."""
    kind = draw(st.sampled_from(["value", "drop", "flip", "breaking"]))
    if kind == "value":
        paths = [p for p in _paths(seed) if p]
        return json.dumps(_replace(seed, draw(st.sampled_from(paths)), draw(json_values))).encode()
    if kind == "drop" and isinstance(seed, dict) and seed:
        key = draw(st.sampled_from(sorted(seed)))
        return json.dumps({k: v for k, v in seed.items() if k != key}).encode()
    if kind == "flip":
        text = bytearray(json.dumps(seed).encode())
        i = draw(st.integers(0, len(text) - 1))
        text[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(text)
    return draw(breaking_mutation(seed))


def bodies(op: Operation, seeds: dict[str, list[Any]]) -> st.SearchStrategy[bytes]:
    raw = (
        st.just(b"")
        | st.binary(max_size=64)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.sampled_from(HOSTILE_LITERALS)
        | st.sampled_from([b"[" * 100_000, b"{" * 3000, b'"' + b"\\u0000" * 1000 + b'"'])
        | st.just(b"[" + b"1e308," * 200_000 + b"1]")  # 1.2 MB of floats
    )
    mine = seeds.get(op.body or "", [])
    if not mine:
        return raw
    seed = st.sampled_from(mine)
    mutate = breaking_mutation if op.path in STRICT else free_mutation
    return raw | seed.flatmap(mutate) | seed.flatmap(mutate)


def requests(
    ops: list[Operation], names: dict[str, list[str]], seeds: dict[str, list[Any]]
) -> st.SearchStrategy[FuzzRequest]:
    """Hostile requests for ``ops``; ``names`` are values the node knows per path parameter."""

    @st.composite
    def one(draw: st.DrawFn) -> FuzzRequest:
        op = draw(st.sampled_from(ops))
        path = op.path
        for p in op.params:
            junk = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
            value = draw(st.sampled_from(names.get(p, ["x"])) | junk)
            path = path.replace("{" + p + "}", quote(value, safe=""))
        query = ""
        if op.method == "GET":
            query = draw(
                st.sampled_from(["", "keys=1,2", "keys=", "keys=1,x", "keys=" + "9" * 30])
                | st.text(max_size=20).map(lambda s: "keys=" + quote(s))
            )
        body = b"" if op.method == "GET" else draw(bodies(op, seeds))
        ctype = draw(st.sampled_from(CONTENT_TYPES))
        auth = draw(st.sampled_from(AUTH_MODES))
        return FuzzRequest(op, path, query, body, ctype, auth)

    return one()


def check_answer(req: FuzzRequest, r: httpx.Response) -> None:
    """No 5xx; every refusal is JSON ``{"error": ...}`` naming the problem."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), r.text[:300]
        doc = r.json()
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
        why = doc["error"]
        assert isinstance(why, str) and len(why) >= 8, why
        assert why.lower() not in {"bad request", "internal server error"}, why
