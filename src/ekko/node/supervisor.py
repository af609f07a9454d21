"""Supervision of a node's background tasks: none of them may stop silently.

A node runs a handful of long-lived asyncio tasks (the upstream puller, the guard loop,
snapshots, the release of held rows, checkpoint copies, the admin server). Before this, a
task that raised simply ended: its exception surfaced only at shutdown, gathered with
``return_exceptions=True``, and the node kept answering as if nothing had happened (the
replica guard died on its first codec chunk and the replica reported "healthy" for good).

``Supervisor`` runs each task from a factory. When one raises, it logs the traceback,
counts the restart, marks the task down (``/ready`` answers 503 naming it) and starts it
again after an exponential backoff; a task that ran long enough before failing starts from
the smallest backoff again. One-shot tasks (a guard message being delivered) are not
restarted, but their failure is logged and counted the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Factory = Callable[[], Awaitable[None]]


@dataclass
class TaskState:
    """What the supervisor knows of one named task (JSON-ready through ``as_json``)."""

    name: str
    up: bool = True
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_failed_at: float | None = None  # wall time

    def as_json(self) -> dict[str, object]:
        return {
            "up": self.up,
            "restarts": self.restarts,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_failed_at": self.last_failed_at,
        }


@dataclass(frozen=True)
class TaskStats:
    """One task's counts at a moment, for the exporter (``ekko.node.metrics``)."""

    up: bool
    restarts: int
    failures: int


class Supervisor:
    """Starts, watches and restarts a node's background tasks.

    Why one supervisor for all of them: the failure handling (traceback in the log, a
    restart with backoff, the count in ``/metrics``, the name in ``/ready``) must be the
    same for every task, and a task added later gets it by being started here.

    Args:
        backoff_s: wait before the first restart; doubled per consecutive failure.
        max_backoff_s: the longest wait between restarts.
        stable_s: a task that ran this long before failing restarts after ``backoff_s``.
        clock: monotonic seconds (a fake clock in tests).
        sleep: ``await sleep(seconds)`` (a fake one in tests).
    """

    def __init__(
        self,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not (backoff_s > 0 and max_backoff_s >= backoff_s):
            raise ValueError(
                f"Supervisor: need 0 < backoff_s <= max_backoff_s, got {backoff_s}, {max_backoff_s}"
            )
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self._clock = clock
        self._sleep = sleep
        self.tasks: dict[str, TaskState] = {}
        self._running: dict[str, asyncio.Task] = {}
        self._once: set[asyncio.Task] = set()
        self._stopping = False

    # -- starting -----------------------------------------------------------------------

    def start(self, name: str, factory: Factory) -> asyncio.Task:
        """Run ``factory()`` under supervision until it returns or the supervisor stops;
        an exception restarts it (a fresh ``factory()``) after the backoff."""
        if name in self._running and not self._running[name].done():
            raise ValueError(f"Supervisor: a task named {name!r} is already running")
        self.tasks.setdefault(name, TaskState(name))
        task = asyncio.get_running_loop().create_task(self._keep(name, factory), name=name)
        self._running[name] = task
        return task

    def spawn(self, name: str, awaitable: Awaitable[None]) -> asyncio.Task:
        """Run a one-shot ``awaitable``; a failure is logged and counted, not retried."""
        state = self.tasks.setdefault(name, TaskState(name))

        async def once() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(state, exc)
                state.up = True  # nothing stays down: the next one runs afresh

        task = asyncio.get_running_loop().create_task(once(), name=name)
        self._once.add(task)
        task.add_done_callback(self._once.discard)
        return task

    async def _keep(self, name: str, factory: Factory) -> None:
        state = self.tasks[name]
        streak = 0
        while not self._stopping:
            started = self._clock()
            try:
                await factory()
                state.up = True
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                self._failed(state, exc)
            streak = 1 if self._clock() - started >= self.stable_s else streak + 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (streak - 1))
            log.error("task %s restarts in %.2f s (restart %d)", name, delay, state.restarts + 1)
            await self._sleep(delay)
            state.restarts += 1
            state.up = True

    def _failed(self, state: TaskState, exc: BaseException) -> None:
        state.up = False
        state.failures += 1
        state.last_error = f"{type(exc).__name__}: {exc}"
        state.last_failed_at = time.time()
        log.error("task %s failed", state.name, exc_info=exc)

    # -- reading ------------------------------------------------------------------------

    def down(self) -> dict[str, str]:
        """Tasks that failed and wait for their restart, with their last error."""
        return {n: s.last_error or "failed" for n, s in self.tasks.items() if not s.up}

    def status(self) -> dict[str, dict[str, object]]:
        return {n: s.as_json() for n, s in self.tasks.items()}

    def statistics(self) -> dict[str, TaskStats]:
        return {n: TaskStats(s.up, s.restarts, s.failures) for n, s in self.tasks.items()}

    # -- stopping -----------------------------------------------------------------------

    async def cancel(self, name: str) -> None:
        """Stop the task ``name`` for good (not a failure: it is not restarted) and wait."""
        task = self._running.pop(name, None)
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.tasks.pop(name, None)

    async def stop(self, keep: tuple[str, ...] = ()) -> None:
        """Cancel every task but those named in ``keep`` (they must end by themselves) and
        wait for all of them."""
        self._stopping = True
        tasks = [*self._running.values(), *self._once]
        for name, task in self._running.items():
            if name not in keep:
                task.cancel()
        for task in self._once:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
