"""Guard messages between nodes: signed POSTs to another node's admin API, with retries."""

from __future__ import annotations

import asyncio
import logging

import httpx

from ekko.net.signed_requests import needs_resign, signed_json
from ekko.node.http_client import ClusterHttp
from ekko.node.supervisor import Supervisor
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

ATTEMPTS = 5
RETRY_S = 0.2  # wait before attempt n+1: RETRY_S * n


class GuardLink:
    """Delivers the guards' messages (reports, redirects, rollbacks) to other nodes.

    Why fire-and-forget under the supervisor: a guard decides on the loop and must never
    wait for a peer; each message is one supervised task (``guard_message``) that signs,
    posts, signs again if the target restarted after the signature, and retries a 5xx or a
    network error ``ATTEMPTS`` times with a growing wait. A failure is logged and counted in
    ``ekko_task_failures_total{task="guard_message"}``; a 4xx is logged and not retried.

    Args:
        http: the cluster's HTTP ports (target names to URLs, TLS checked).
        secret: the cluster secret the messages are signed with.
        supervisor: runs each delivery.
        client: the HTTP client (created here when None; closed by ``close``).
        clock: the waits between attempts.
    """

    task = "guard_message"

    def __init__(
        self,
        http: ClusterHttp,
        secret: bytes,
        supervisor: Supervisor,
        client: httpx.AsyncClient | None = None,
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.http = http
        self.secret = secret
        self.supervisor = supervisor
        self.client = client if client is not None else http.async_client(timeout=5.0)
        self.clock = clock
        self.dropped = 0

    def send(self, target: str, path: str, body: dict) -> None:
        """Post ``body`` to ``path`` on node ``target``'s admin API, in the background."""
        url = self.http.url(target, path)
        self.supervisor.spawn(self.task, self.deliver(url, body))

    async def deliver(self, url: str, body: dict) -> bool:
        """Post until accepted or refused (True), or ``ATTEMPTS`` tries failed (False)."""
        for attempt in range(ATTEMPTS):
            try:
                content, headers = signed_json(self.secret, url, body)
                r = await self.client.post(url, content=content, headers=headers)
                if needs_resign(r):
                    continue  # the target started after we signed: sign again
                if r.status_code < 500:
                    if r.status_code >= 400:
                        log.warning("guard message to %s refused: %s", url, r.text[:200])
                    return True
            except httpx.HTTPError as exc:
                log.info("guard message to %s failed (%s); retrying", url, exc)
            await self.clock.sleep(RETRY_S * (attempt + 1))
        self.dropped += 1
        log.error("guard message to %s dropped after %d attempts", url, ATTEMPTS)
        return False

    async def ask(self, target: str, path: str, body: dict, timeout_s: float) -> dict | str:
        """Post ``body`` to ``path`` on node ``target`` and return its JSON answer, or why
        there is none (a refusal's status and reason, a network error, no answer within
        ``timeout_s``): a command whose answer the guard needs (a partition's restore)."""
        url = self.http.url(target, path)
        deadline = self.clock.mono() + timeout_s
        why = "no attempt"
        for _ in range(ATTEMPTS):
            left = deadline - self.clock.mono()
            if left <= 0:
                break
            try:
                content, headers = signed_json(self.secret, url, body)
                r = await asyncio.wait_for(
                    self.client.post(url, content=content, headers=headers), left
                )
            except (TimeoutError, httpx.HTTPError) as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                await self.clock.sleep(min(RETRY_S, max(deadline - self.clock.mono(), 0)))
                continue
            if needs_resign(r):
                continue
            if r.status_code != 200:
                return f"{r.status_code}: {r.text[:300]}"
            try:
                doc = r.json()
            except ValueError:
                return f"answer not JSON: {r.text[:100]!r}"
            return doc if isinstance(doc, dict) else f"answer not a JSON object: {doc!r:.100}"
        return f"no answer within {timeout_s:g} s ({why})"

    async def close(self) -> None:
        await self.client.aclose()
