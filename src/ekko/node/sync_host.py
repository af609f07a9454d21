"""The asyncio side of the sans-IO sync protocol: serving pull sessions and running a pull
link over ``ekko.net`` connections.

Why apart from the runner: a node serves and pulls this way, and so does every bench that
runs Ekko in one process (``ekko bench bandwidth``); one host keeps them the same protocol
driver, with the same pacing and timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping

from ekko.net.errors import LocalFrameError, TransportError
from ekko.net.framing import WireSchema
from ekko.net.transport import Connection
from ekko.net.wan import WanProfile
from ekko.protocol.messages import (
    PROTOCOL_VERSION,
    SHARED_PARTS,
    Message,
    PullRequest,
    PullResponse,
)
from ekko.protocol.puller import Puller
from ekko.protocol.ready import Applied, Ready
from ekko.protocol.responder import Responder
from ekko.store.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

SYNC_SCHEMA = WireSchema(Message, PROTOCOL_VERSION, encode_once=SHARED_PARTS)
"""What sync connections speak once authenticated: the protocol's messages at its version,
each shared chunk encoded once however many sessions it is sent to."""

PACE_HEADROOM = 0.9
"""Share of a WAN link's bandwidth a paced session answers at. Below 1 so the link's queue
drains: the pacer counts the rows' bytes, the link also carries frame headers and requests,
and a queue that only grows delays every later high-lane row behind it."""


MAX_UNFRAMED = 1
"""Answers with rows a paced session may have waiting in its send queue: one, so what a
stalled loop or a bandwidth drop finds queued is one answer, not a pile chosen earlier."""


def pace_rate(profile: WanProfile | None) -> float | None:
    """Bytes/s to pace a session on a link with ``profile`` at (None: not paced)."""
    if profile is None or profile.mbit is None:
        return None
    return PACE_HEADROOM * profile.mbit * 1e6 / 8


class Timer:
    """One rescheduleable wake-up on the loop, at a wall-clock time from ``Ready.wake_at``
    (on ``clock``)."""

    def __init__(self, fire: Callable[[], None], clock: Clock = SYSTEM_CLOCK) -> None:
        self._fire = fire
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def set(self, wake_at: float | None) -> None:
        if wake_at is None or (self._at is not None and self._at <= wake_at and self._handle):
            return
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._at = wake_at
        self._handle = loop.call_at(loop.time() + max(0.0, wake_at - self._clock.wall()), self._run)

    def _run(self) -> None:
        self._handle = self._at = None
        self._fire()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None


class Outbox:
    """Messages for one connection, sent in order by one task (sends may wait on the WAN).
    ``on_sent(msg, frame_bytes)`` sees each message once it is framed and queued."""

    def __init__(
        self, conn: Connection, on_sent: Callable[[Message, int], None] | None = None
    ) -> None:
        self.conn = conn
        self.on_sent = on_sent
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, msg: Message) -> None:
        self.queue.put_nowait(msg)

    async def _run(self) -> None:
        try:
            while True:
                msg = await self.queue.get()
                size = await self.conn.send(msg)
                if self.on_sent is not None:
                    self.on_sent(msg, size)
        except LocalFrameError:
            # A message of ours that cannot be framed: everything queued after it would wait
            # forever on an open link, so the link closes and is dialled again.
            log.exception("send to %s failed; closing the link", self.conn.peer)
            with contextlib.suppress(TransportError, OSError):
                await self.conn.close()
        except TransportError as exc:
            log.info("send to %s stopped: %s", self.conn.peer, exc)

    async def close(self) -> None:
        """Stop sending and close the connection. A cancellation of the caller meanwhile
        goes on to it (suppressed here, a replica's upstream link kept dialing after its
        node's shutdown had cancelled it)."""
        self.task.cancel()
        try:
            await asyncio.gather(self.task, return_exceptions=True)  # its end, not ours
        finally:
            with contextlib.suppress(TransportError, OSError):
                await self.conn.close()


class ResponderHost:
    """Serves every pull session of one responder: reads requests, sends answers in order,
    wakes parked pulls when the store moves or a timer fires.

    ``pace_for(peer)``: the bytes/s to pace a session from ``peer`` at (its WAN link's
    bandwidth), or None for an unpaced link; ``set_rate`` changes it for connected peers.
    ``on_traffic(peer, counts)``: a pull carried an inference-traffic report. ``clock``: the
    wall time the responder is driven with.
    """

    def __init__(
        self,
        responder: Responder,
        pace_for: Callable[[str], float | None] = lambda peer: None,
        on_traffic: Callable[[str, Mapping[str, int]], None] = lambda peer, counts: None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.responder = responder
        self.pace_for = pace_for
        self.on_traffic = on_traffic
        self._sessions: dict[int, tuple[str, Outbox]] = {}
        self._ids = itertools.count(1)
        self.clock = clock
        self._timer = Timer(self._tick, clock)

    def use(self, responder: Responder) -> None:
        """Answer with ``responder`` from now on (a checkpoint replica loaded a new copy)."""
        self.responder = responder

    def notify_written(self) -> None:
        """The store moved (a local write or applied rows): wake parked pulls."""
        self._dispatch(self.responder.store_changed(self.clock.wall()))

    def set_rate(self, peer: str, rate_bytes_per_s: float | None) -> None:
        """Pace ``peer``'s sessions at a new rate (its link's bandwidth changed)."""
        now = self.clock.wall()
        for sid, (name, _) in self._sessions.items():
            if name == peer:
                self.responder.pace(sid, rate_bytes_per_s, now, max_unframed=MAX_UNFRAMED)
        self._dispatch(self.responder.tick(now))

    async def serve_session(self, conn: Connection) -> None:
        """Answer ``conn``'s pulls until it breaks."""
        sid = next(self._ids)
        outbox = Outbox(
            conn,
            lambda msg, size: self._dispatch(
                self.responder.framed(sid, msg, size, self.clock.wall())
            ),
        )
        self._sessions[sid] = (conn.peer, outbox)
        rate = self.pace_for(conn.peer)
        if rate is not None:
            self.responder.pace(sid, rate, self.clock.wall(), max_unframed=MAX_UNFRAMED)
        paced = "off" if rate is None else f"{rate:,.0f} B/s"
        log.info("puller %s connected (session %d, pacing %s)", conn.peer, sid, paced)
        try:
            while True:
                msg = await conn.recv()
                if isinstance(msg, PullRequest) and msg.traffic:
                    self.on_traffic(conn.peer, msg.traffic)
                self._dispatch(self.responder.receive(sid, msg, self.clock.wall()))
        except TransportError as exc:
            log.info("puller %s session %d ended: %s", conn.peer, sid, exc)
        finally:
            self.responder.close_session(sid, self.clock.wall())
            self._sessions.pop(sid, None)
            await outbox.close()

    def connections(self, peer: str) -> list[Connection]:
        """The connections of ``peer``'s sessions (to change their WAN profile)."""
        return [outbox.conn for name, outbox in self._sessions.values() if name == peer]

    async def close(self) -> None:
        self._timer.cancel()
        for _, outbox in list(self._sessions.values()):
            await outbox.close()

    def _dispatch(self, ready: Ready) -> None:
        for sid, msg in ready.sends:
            entry = self._sessions.get(sid)
            if entry is not None:
                entry[1].put(msg)
        self._timer.set(ready.wake_at)

    def _tick(self) -> None:
        self._dispatch(self.responder.tick(self.clock.wall()))


async def run_pull_link(
    conn: Connection,
    puller: Puller,
    on_response: Callable[[PullResponse], None],
    until: Awaitable[object] | None = None,
    on_applied: Callable[[Applied], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Drive ``puller`` over ``conn`` until the link breaks (returns False) or ``until``
    completes (returns True). ``on_applied`` sees the rows each step applied (the puller's
    ``Ready.applied``); ``on_response`` then sees every response."""
    outbox = Outbox(conn)
    timer = Timer(lambda: handle(puller.tick(clock.wall())), clock)

    def handle(ready: Ready) -> None:
        for _link, msg in ready.sends:
            outbox.put(msg)
        timer.set(ready.wake_at)
        if ready.applied is not None and on_applied is not None:
            on_applied(ready.applied)

    stop = asyncio.ensure_future(until) if until is not None else None
    recv: asyncio.Future[Message] | None = None
    handle(puller.start(clock.wall()))
    # A healthy upstream answers each pull within wait + poll + request timeout (the
    # puller's own bound, past which it counts the pull lost); silent for twice that, with
    # the connection still open (a stopped or wedged process), the link is dropped so the
    # caller fails over, rather than waiting on it for ever.
    c = puller.config
    silence_s = 2 * (c.wait_ms + c.poll_interval_ms + c.request_timeout_ms) / 1000
    try:
        while True:
            recv = asyncio.ensure_future(conn.recv())
            waits = {recv} | ({stop} if stop is not None else set())
            done, _ = await asyncio.wait(
                waits, timeout=silence_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                recv.cancel()
                log.warning("pull link to %s silent for %.1f s (its pulls timed out): "
                            "dropping it", conn.peer, silence_s)  # fmt: skip
                return False
            if recv not in done:
                recv.cancel()
                assert stop is not None
                stop.result()  # a failed ``until`` (the failover probe) raises to the caller
                return True
            msg = recv.result()
            handle(puller.receive(msg, clock.wall()))
            if isinstance(msg, PullResponse):
                on_response(msg)
    except TransportError as exc:
        log.warning("pull link to %s broke: %s", conn.peer, exc)
        return False
    finally:
        timer.cancel()
        for fut in (stop, recv):
            if fut is not None and not fut.done():
                fut.cancel()
        await outbox.close()
