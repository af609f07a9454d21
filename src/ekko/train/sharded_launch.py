"""Start W training ranks as real processes under ``torch.distributed`` (gloo, CPU), and name
the rank that failed when one does.

The launcher hosts the rendezvous ``TCPStore`` itself (port 0: the kernel picks a free port,
so nothing races for one), so the store outlives any rank. A watcher thread records each
rank's exit in the store (``dead/{rank}``) as it happens; a rank whose collective fails (the
peer's socket closed, or the process group's timeout passed) reads those records, and which
peers failed as it did (``failed/{rank}``), to say which peer it lost, instead of only gloo's
"connection reset by peer".
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"
_DEAD_WAIT_S = 3.0  # how long a failed rank waits for the launcher to record a peer's exit


class ShardedRunError(RuntimeError):
    """A sharded run failed: which ranks died or failed, and each survivor's own error.

    Why one error for the run: a lost rank makes every other rank fail too; the caller needs
    the rank that started it (``dead``: rank -> how it exited) and what the others said.
    """

    def __init__(self, message: str, dead: dict[int, str], errors: dict[int, str]) -> None:
        super().__init__(message)
        self.dead = dead
        self.errors = errors


class RankLostError(RuntimeError):
    """A collective failed on this rank because a peer rank died or stopped answering."""


@dataclass(frozen=True)
class RankContext:
    """What a rank function gets: its rank, the world size and the launcher's store.

    ``dead_wait_s``: how long a failed collective waits for the launcher to record a peer's
    exit before looking for a silent peer instead."""

    rank: int
    world_size: int
    store: dist.Store
    dead_wait_s: float = _DEAD_WAIT_S

    def mark_step(self, step: int) -> None:
        """Record that this rank started ``step`` (read back when a peer must name a laggard)."""
        self.store.set(f"step/{self.rank}", str(step))

    def lost(self, error: BaseException, what: str, step: int) -> RankLostError:
        """The error to raise when the collective ``what`` of ``step`` failed with ``error``:
        names the peers the launcher saw exit, else the peers that did not fail as this rank
        did (alive but silent past the timeout: stopped, or stuck), else says none was found
        (the network failed)."""
        try:
            self.store.set(f"failed/{self.rank}", str(step))
            culprits = _dead_peers(self, deadline=time.monotonic() + self.dead_wait_s)
            if not culprits:
                culprits = _silent_peers(self)
        except Exception as store_error:  # the launcher (the store's host) is gone too
            culprits = f"unknown (the launcher's store is unreachable: {store_error})"
        return RankLostError(
            f"rank {self.rank}: {what} of step {step} failed: {culprits or 'no peer seen dead'}"
            f" ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
        )


def _dead_peers(ctx: RankContext, deadline: float) -> str:
    while True:
        found = [
            f"rank {r} {ctx.store.get(f'dead/{r}').decode()}"
            for r in range(ctx.world_size)
            if r != ctx.rank and ctx.store.check([f"dead/{r}"])
        ]
        if found or time.monotonic() >= deadline:
            return "; ".join(found)
        time.sleep(0.05)  # the launcher records an exit within its watcher's wake-up


def _silent_peers(ctx: RankContext) -> str:
    silent = []
    for r in range(ctx.world_size):
        if r == ctx.rank or ctx.store.check([f"failed/{r}"]):
            continue
        step = int(ctx.store.get(f"step/{r}")) if ctx.store.check([f"step/{r}"]) else -1
        silent.append(f"rank {r} is alive but did not answer (last started step {step})")
    return "; ".join(silent)


def _exit_text(proc: mp.Process) -> str:  # type: ignore[name-defined]
    code = proc.exitcode
    if code is not None and code < 0:
        return f"(pid {proc.pid}) was killed by signal {signal.Signals(-code).name}"
    return f"(pid {proc.pid}) exited with code {code}"


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    out_dir: str,
) -> None:
    torch.set_num_threads(threads)
    out = Path(out_dir)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(_HOST, port, world_size + 1, is_master=False, timeout=timeout)
    try:
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        result = fn(RankContext(rank, world_size, store), *args)
        (out / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException as e:
        (out / f"{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ShardedRun:
    """W rank processes running ``fn(RankContext, *args)``; ``join`` returns their results.

    Why a handle: a caller (a test, a bench) may watch progress (``step_of``) and signal a
    rank (``pids``) while the ranks run.

    Args:
        fn: a picklable top-level function, run once per rank after the process group is up.
        world_size: number of ranks W.
        args: picklable arguments after the context.
        timeout_s: the process group's timeout: a collective waiting longer for a peer fails.
        threads: torch threads per rank (``torch.set_num_threads``).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        world_size: int,
        args: tuple = (),
        timeout_s: float = 60.0,
        threads: int = 1,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            _HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        self._dir = tempfile.TemporaryDirectory(prefix="ekko-sharded-")
        ctx = mp.get_context("spawn")
        self.processes = [
            ctx.Process(
                target=_rank_main,
                args=(r, world_size, self.store.port, timeout_s, threads, fn, args, self._dir.name),
                name=f"ekko-rank-{r}",
                daemon=True,  # a launcher that exits without join takes its ranks along
            )
            for r in range(world_size)
        ]
        for p in self.processes:
            p.start()
        self.dead: dict[int, str] = {}
        self._first_failure: float | None = None
        self._watcher = threading.Thread(target=self._watch, name="ekko-rank-watcher", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        """Process id of each rank."""
        return [p.pid for p in self.processes]  # type: ignore[misc]

    def step_of(self, rank: int) -> int:
        """The last step ``rank`` started (-1 before its first)."""
        key = f"step/{rank}"
        return int(self.store.get(key)) if self.store.check([key]) else -1

    def _watch(self) -> None:
        running = {p.sentinel: (r, p) for r, p in enumerate(self.processes)}
        while running:
            for sentinel in wait(list(running)):
                rank, proc = running.pop(sentinel)  # type: ignore[index]
                proc.join()
                if proc.exitcode != 0:
                    self.dead[rank] = _exit_text(proc)
                    self.store.set(f"dead/{rank}", self.dead[rank])
                    if self._first_failure is None:
                        self._first_failure = time.monotonic()

    def _wait(self, limit_s: float) -> None:
        """Until every rank exited, ``limit_s`` passed, or the others had the process group's
        timeout (and the time to name the failure) since the first rank failed."""
        end = time.monotonic() + limit_s
        while self._watcher.is_alive():
            if self._first_failure is not None:
                end = min(end, self._first_failure + self.timeout_s + _DEAD_WAIT_S + 5.0)
            left = end - time.monotonic()
            if left <= 0:
                return
            self._watcher.join(min(left, 0.2))

    def terminate(self) -> list[int]:
        """Kill the ranks still running; their ranks."""
        alive = [r for r, p in enumerate(self.processes) if p.is_alive()]
        for r in alive:
            os.kill(self.processes[r].pid, signal.SIGKILL)  # type: ignore[arg-type]
        for r in alive:
            self.processes[r].join()
        self._watcher.join()
        return alive

    def __enter__(self) -> ShardedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
        self._dir.cleanup()

    def join(self, timeout_s: float | None = None) -> list[Any]:
        """Each rank's return value, in rank order, once all exited; raises ``ShardedRunError``
        naming the failed ranks when one did. A rank still running ``timeout_s`` from now
        (default: the process group's timeout plus 30 s), or longer than the others needed to
        fail after the first failure, is killed and named hung."""
        self._wait(self.timeout_s + 30.0 if timeout_s is None else timeout_s)
        hung = self.terminate()
        out = Path(self._dir.name)
        errors = {
            r: (out / f"{r}.err").read_text().splitlines()[0]
            for r in range(self.world_size)
            if (out / f"{r}.err").exists()
        }
        try:
            if self.dead or hung:
                first = {r: t for r, t in self.dead.items() if r not in errors and r not in hung}
                parts = [f"rank {r} {t}" for r, t in sorted(first.items())]
                parts += [f"rank {r} did not exit and was killed (hung)" for r in hung]
                parts += [f"rank {r} failed: {e}" for r, e in sorted(errors.items())]
                raise ShardedRunError(
                    "sharded run failed: " + "; ".join(parts), dict(self.dead), errors
                )
            return [pickle.loads((out / f"{r}.pkl").read_bytes()) for r in range(self.world_size)]
        finally:
            self._dir.cleanup()
