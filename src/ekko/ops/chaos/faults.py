"""The nemesis's hands: each fault kind injected and healed on real processes, files and
proxies, and the executor that runs a schedule with them.

Nothing here reaches into a node: processes get signals, a node's wall clock is an offset
file read by a ``sitecustomize`` the harness puts on its path, its disk is a tmpfs the harness
mounted, its links are the harness's proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekko.ops.chaos.disk import TmpfsDisk
from ekko.ops.chaos.history import History
from ekko.ops.chaos.proxy import LinkState, ProxyMesh
from ekko.ops.chaos.schedule import Fault, FaultKind
from ekko.ops.launcher import LaunchError, LocalCluster

log = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 180.0


# A node's wall clock: real time plus the offset in its clock file, re-read every 50 ms.
# The harness puts this module first on the node's PYTHONPATH, so Python runs it at start
# (``sitecustomize``) before any of the node's code; ``time.monotonic`` stays real, as an
# NTP step leaves it, and every wall-clock read of the node (its ``Clock``, signatures,
# logs) goes through ``time.time`` / ``time.time_ns``.
#
# Why not libfaketime (the first choice): Debian's 0.9.10 moves absolute CLOCK_MONOTONIC
# deadlines even with DONT_FAKE_MONOTONIC, so Python 3.11's time.sleep raises EINVAL
# (wolfcw/libfaketime#426; it killed the source's write-ahead log thread in the first chaos
# run), and with a preloaded shim for that, a node's thread waits still stalled: an
# acknowledged write's p90 went from 20 ms to 209 ms, max 32 ms to 2.3 s, at offset +0.
_SITECUSTOMIZE = '''"""Written by the ekko chaos harness (ekko.ops.chaos.faults): this
process's wall clock is real time plus the offset (seconds) in $EKKO_CHAOS_CLOCK_FILE."""
import os as _os
import time as _time

_path = _os.environ.get("EKKO_CHAOS_CLOCK_FILE")
if _path:
    _real_time, _real_ns, _mono = _time.time, _time.time_ns, _time.monotonic
    _state = [0.0, -1.0]  # offset, when it was read (monotonic)

    def _offset():
        now = _mono()
        if now - _state[1] > 0.05:
            try:
                with open(_path) as f:
                    _state[0] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _state[1] = now
        return _state[0]

    def _fake_time():
        return _real_time() + _offset()

    def _fake_time_ns():
        return _real_ns() + int(_offset() * 1e9)

    _time.time, _time.time_ns = _fake_time, _fake_time_ns
'''


def clock_env(offset_file: Path) -> dict[str, str]:
    """The environment that puts a node's wall clock under ``offset_file`` (its content,
    e.g. ``+30.0``, is the offset in seconds)."""
    directory = offset_file.parent
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    if not offset_file.exists():
        _write_offset(offset_file, 0.0)
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "EKKO_CHAOS_CLOCK_FILE": str(offset_file)}


@dataclass
class NodeState:
    up: bool = True  # expected running (not killed by the nemesis)
    paused: bool = False


class Hands:
    """Injects and heals each fault kind. ``expected`` tells the crash monitor which nodes
    the nemesis has taken down on purpose."""

    def __init__(
        self,
        cluster: LocalCluster,
        mesh: ProxyMesh,
        history: History,
        data_dirs: dict[str, Path],
        clock_files: dict[str, Path],
        disk: TmpfsDisk,
        copies_dir: Path,
        at_risk: Callable[[], Awaitable[list[list[int]]]],
    ) -> None:
        self.cluster = cluster
        self.mesh = mesh
        self.history = history
        self.data_dirs = data_dirs
        self.clock_files = clock_files
        self.disk = disk
        self.copies_dir = copies_dir
        self.at_risk = at_risk  # acked writes no replica holds (read after the source died)
        self.state = {n: NodeState() for n in data_dirs}
        self.closing = False
        self.source = cluster.config.source.name

    def up(self, node: str) -> bool:
        s = self.state[node]
        return s.up and not s.paused

    def copy_data_dirs(self) -> None:
        """The early copies an ``old_snapshot`` fault restores (replicas only)."""
        for node, d in self.data_dirs.items():
            if node != self.source and d.exists():
                shutil.copytree(d, self.copies_dir / node, dirs_exist_ok=True)

    async def inject(self, f: Fault) -> dict[str, Any]:
        """Start fault ``f``; returns what the history should note about it."""
        k = f.kind
        if k in (FaultKind.KILL, FaultKind.KILL_WIPE, FaultKind.OLD_SNAPSHOT):
            self.state[f.target].up = False
            await asyncio.to_thread(self._kill, f.target)
            note: dict[str, Any] = {}
            if k is FaultKind.KILL_WIPE:
                if f.target == self.source:
                    # answers the source sent before it died may still be in our sockets:
                    # let the writers read them, so every acknowledgement is in the history
                    await asyncio.sleep(0.2)
                    risk = await self.at_risk()
                    self.history.wipes.append(
                        {"t": self.history.now(), "fault": f.id, "at_risk": risk}
                    )
                    note["at_risk"] = len(risk)
                await asyncio.to_thread(self._wipe, f.target)
            if k is FaultKind.OLD_SNAPSHOT:
                await asyncio.to_thread(self._restore_copy, f.target)
            return note
        if k is FaultKind.PAUSE:
            self.state[f.target].paused = True
            self._signal(f.target, signal.SIGSTOP)
            return {}
        if k is FaultKind.CLOCK_JUMP:
            _write_offset(self.clock_files[f.target], f.params["jump_s"])
            return {}
        if k is FaultKind.DISK_FULL:
            return {"ballast_bytes": await asyncio.to_thread(self.disk.fill)}
        link = self.mesh.by_key(f.target)
        if k is FaultKind.PARTITION:
            link.set(LinkState(cut=frozenset({(link.a, link.b), (link.b, link.a)})))
        elif k is FaultKind.PARTITION_ONE_WAY:
            fwd = f.params["drop"] == "forward"
            link.set(LinkState(cut=frozenset({(link.a, link.b) if fwd else (link.b, link.a)})))
        elif k is FaultKind.DELAY:
            link.set(LinkState(delay_s=f.params["delay_ms"] / 1000))
        elif k is FaultKind.BANDWIDTH:
            link.set(LinkState(rate_bytes_s=f.params["rate_bytes_s"]))
        return {}

    async def heal(self, f: Fault) -> dict[str, Any]:
        k = f.kind
        if k in (FaultKind.KILL, FaultKind.KILL_WIPE, FaultKind.OLD_SNAPSHOT):
            return await self.restart(f.target)
        if k is FaultKind.PAUSE:
            self._signal(f.target, signal.SIGCONT)
            self.state[f.target].paused = False
            return {}
        if k is FaultKind.CLOCK_JUMP:
            _write_offset(self.clock_files[f.target], 0.0)
            return {}
        if k is FaultKind.DISK_FULL:
            self.disk.free()
            return {}
        self.mesh.by_key(f.target).heal()
        return {}

    async def restart(self, node: str) -> dict[str, Any]:
        """Start ``node`` again; a node that does not come back is an unplanned crash."""
        started = self.history.now()
        if self.closing:  # the run is ending (or interrupted): start nothing it will not stop
            return {"restart_skipped": True}
        try:
            await asyncio.to_thread(self.cluster.restart, node, RESTART_TIMEOUT_S)
        except LaunchError as exc:
            self.history.crashes.append(
                {"node": node, "t": self.history.now(), "code": None, "log_tail": str(exc)}
            )
            return {"restart_failed": True}
        self.state[node].up = True
        return {"restart_s": round(self.history.now() - started, 3)}

    async def heal_everything(self) -> None:
        """After the schedule: every link passes, clocks are true, the disk has room, every
        node runs."""
        self.mesh.heal_all()
        self.disk.free()
        for node, f in self.clock_files.items():
            _write_offset(f, 0.0)
            if self.state[node].paused:
                self._signal(node, signal.SIGCONT)
                self.state[node].paused = False
        for node, s in self.state.items():
            if not s.up or not self.cluster.procs[node].alive:
                await self.restart(node)

    def _kill(self, node: str) -> None:
        p = self.cluster.procs[node]
        if p.alive:
            if self.state[node].paused:
                self.state[node].paused = False
            self.cluster.kill(node)

    def _wipe(self, node: str) -> None:
        if node == self.source:
            self.disk.wipe()
        else:
            shutil.rmtree(self.data_dirs[node], ignore_errors=True)

    def _restore_copy(self, node: str) -> None:
        shutil.rmtree(self.data_dirs[node], ignore_errors=True)
        copy = self.copies_dir / node
        if copy.exists():
            shutil.copytree(copy, self.data_dirs[node])

    def _signal(self, node: str, sig: signal.Signals) -> None:
        p = self.cluster.procs[node]
        if p.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.proc.pid, sig)


def _write_offset(path: Path, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{seconds:+.1f}\n")
    os.replace(tmp, path)


class Nemesis:
    """Runs a schedule: each fault starts at its time (or once its node or link is free of
    the fault before it), holds, heals; an exclusive fault waits for every running fault to
    heal, and nothing starts until it has healed."""

    def __init__(
        self,
        hands: Hands,
        history: History,
        on_heal: Callable[[Fault, float], None],
        on_fault: Callable[[Fault], Awaitable[None]] | None = None,
    ) -> None:
        self.hands = hands
        self.history = history
        self.on_heal = on_heal
        self.on_fault = on_fault  # per-kind checks while a fault holds (the full disk's)
        self._locks: dict[str, asyncio.Lock] = {}
        self.injected: dict[str, int] = {k.value: 0 for k in FaultKind}

    async def run(self, faults: list[Fault], stop: asyncio.Event, t0: float) -> None:
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task] = set()
        for f in faults:
            wait = t0 + f.at - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                break
            if f.exclusive and running:
                await asyncio.gather(*running, return_exceptions=True)
            task = asyncio.ensure_future(self._one(f))
            running.add(task)
            task.add_done_callback(running.discard)
            if f.exclusive:
                await task
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def _one(self, f: Fault) -> None:
        lock = self._locks.setdefault(f.target, asyncio.Lock())
        async with lock:
            base = {"fault": f.id, "kind": f.kind.value, "target": f.target}
            start = self.history.event("fault_start", **base, params=f.params)
            try:
                start.update(await self.hands.inject(f))
                self.injected[f.kind.value] += 1
                held = asyncio.sleep(f.hold)  # the fault's planned duration
                if self.on_fault is not None:
                    await asyncio.gather(held, self.on_fault(f))
                else:
                    await held
            finally:
                heal = await self.hands.heal(f)
                e = self.history.event("fault_heal", **base, **heal)
        self.on_heal(f, e["t"])


TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*?(?=\n\S[^\n]*\n\d{4}-|\Z)", re.S)


def last_traceback(log_path: Path) -> str:
    """The last traceback in a node's log (empty when none)."""
    try:
        text = log_path.read_text(errors="replace")[-200_000:]
    except FileNotFoundError:
        return ""
    found = TRACEBACK.findall(text)
    return found[-1][-4000:] if found else text[-2000:]


def traceback_counts(log_paths: list[Path]) -> dict[str, int]:
    """Every traceback's last line in the nodes' logs, counted: the supervised task failures
    a run caused (a full disk's are expected), for the report to show what to look at."""
    out: dict[str, int] = {}
    for path in log_paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        inside = False
        for i, line in enumerate(lines):
            if line.startswith("Traceback (most recent call last):"):
                inside = True
                continue
            last = i + 1 >= len(lines) or not lines[i + 1].startswith((" ", "\t"))
            if inside and line and not line[0].isspace() and not line.startswith("During") and last:
                key = line[:200]  # the exception that ended the traceback
                out[key] = out.get(key, 0) + 1
                inside = False
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
