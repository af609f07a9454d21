"""The coordinator's restore commands over the node's ``GuardLink``: an answer is returned,
a refusal, a dead source or a source that never answers is named with why, within the
timeout (``GuardLink.ask``, as ``guard_sources`` uses it for the design's message 4)."""

from __future__ import annotations

import asyncio

import httpx

from ekko.node.guard_link import GuardLink
from ekko.node.supervisor import Supervisor


class _Http:
    def url(self, target: str, path: str = "") -> str:
        return f"http://{target}.test:1{path}"


def _link(handler) -> GuardLink:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return GuardLink(_Http(), b"k" * 32, Supervisor(), client=client)  # type: ignore[arg-type]


async def test_an_answer_comes_back_as_a_dict_and_a_refusal_names_its_status() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s1.test":
            return httpx.Response(200, json={"node": "s1", "epoch": 0})
        return httpx.Response(409, json={"error": "cannot roll back to 5.000"})

    link = _link(handler)
    assert await link.ask("s1", "/v1/models/ctr/guard/restore", {}, 2.0) == {
        "node": "s1",
        "epoch": 0,
    }
    refused = await link.ask("s2", "/v1/models/ctr/guard/restore", {}, 2.0)
    assert refused.startswith("409: ") and "cannot roll back" in refused
    await link.close()


async def test_a_dead_or_silent_source_is_named_within_the_timeout() -> None:
    async def dead(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def silent(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    link = _link(dead)
    why = await link.ask("s1", "/v1/models/ctr/guard/restore", {}, 0.5)
    assert why.startswith("no answer within 0.5 s (ConnectError: connection refused")
    await link.close()
    link = _link(silent)
    loop = asyncio.get_running_loop()
    start = loop.time()
    why = await link.ask("s1", "/v1/models/ctr/guard/restore", {}, 0.3)
    assert why == "no answer within 0.3 s (TimeoutError)" and loop.time() - start < 2.0
    await link.close()
