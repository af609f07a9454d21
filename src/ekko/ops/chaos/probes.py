"""What the harness reads while the nemesis works: replicas' rows (staleness, catching up
after a heal) and the guard's verdicts. Each probe only records; the checker judges."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Callable
from typing import Any

import httpx

from ekko.ops.chaos.history import AckedWrite, History

READ_TIMEOUT_S = 2.0


class RowReader:
    """Reads versions of keys at a node's admin API (``None``: the node did not answer)."""

    def __init__(self, client: httpx.AsyncClient, urls: dict[str, str], table: str) -> None:
        self.client = client
        self.urls = urls
        self.table = table

    async def versions(self, node: str, keys: list[int]) -> dict[int, int] | None:
        """Key -> version at ``node`` (-1: not found)."""
        try:
            rows = await self.rows(node, keys)
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        return {k: v[0] for k, v in rows.items()}

    async def rows(self, node: str, keys: list[int]) -> dict[int, tuple[int, list[float] | None]]:
        """Key -> (version, value) at ``node`` ((-1, None): not found); raises on errors."""
        out: dict[int, tuple[int, list[float] | None]] = {}
        for i in range(0, len(keys), 400):
            part = ",".join(map(str, keys[i : i + 400]))
            url = f"{self.urls[node]}/v1/tables/{self.table}/rows?keys={part}"
            r = await self.client.get(url, timeout=READ_TIMEOUT_S)
            r.raise_for_status()
            for row in r.json()["rows"]:
                out[row["key"]] = (row["version"], row["value"]) if row["found"] else (-1, None)
        return out


def behind(w: AckedWrite, got: dict[int, int]) -> int:
    """How many of write ``w``'s keys ``got`` holds at an older version than acknowledged."""
    return sum(got.get(k, -1) < v for k, v in zip(w.keys, w.versions, strict=True))


def _at(w: AckedWrite) -> float:
    return w.at


def last_acked_before(history: History, t: float) -> AckedWrite | None:
    i = bisect.bisect_right(history.writes, t, key=_at)
    return history.writes[i - 1] if i else None


class StalenessProbe:
    """Every ``every_s``, reads at each replica that is up the keys of the last write
    acknowledged at least its bound ago, and records how many it holds older."""

    def __init__(
        self,
        history: History,
        reader: RowReader,
        replicas: dict[str, dict[str, Any]],  # name -> {"bound_s", "path"}
        up: Callable[[str], bool],
        every_s: float = 0.5,
    ) -> None:
        self.history = history
        self.reader = reader
        self.replicas = replicas
        self.up = up
        self.every_s = every_s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
            await asyncio.gather(*(self._probe(n, r) for n, r in self.replicas.items()))

    async def _probe(self, name: str, replica: dict[str, Any]) -> None:
        t = self.history.now()
        w = last_acked_before(self.history, t - replica["bound_s"])
        if w is None or not self.up(name):
            return
        got = await self.reader.versions(name, w.keys)
        if got is None:
            return
        self.history.reads.append(
            {
                "replica": name,
                "t": t,
                "t_end": self.history.now(),
                "acked_at": w.at,
                "write": f"{w.writer}/{w.n}",
                "behind": behind(w, got),
                "bound_s": replica["bound_s"],
                "path": replica["path"],
            }
        )


class HealProbe:
    """After a fault heals: the time until each replica holds the first write acknowledged
    after the heal (each replica has caught up to then), counted from the heal or, when the
    source acknowledged nothing for a while (it was down), from that write."""

    def __init__(
        self,
        history: History,
        reader: RowReader,
        replicas: dict[str, dict[str, Any]],
        bound_s: float,
        every_s: float = 0.2,
    ) -> None:
        self.history = history
        self.reader = reader
        self.replicas = replicas
        self.bound_s = bound_s
        self.every_s = every_s

    async def after_heal(self, fault: dict[str, Any], heal_t: float, stop: asyncio.Event) -> None:
        deadline = heal_t + self.bound_s
        w = None
        while w is None and self.history.now() < deadline and not stop.is_set():
            i = bisect.bisect_left(self.history.writes, heal_t, key=_at)
            w = self.history.writes[i] if i < len(self.history.writes) else None
            if w is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_s)
        await asyncio.gather(
            *(
                self._replica(n, r, fault, heal_t, deadline, w, stop)
                for n, r in self.replicas.items()
            )
        )

    async def _replica(self, name, replica, fault, heal_t, deadline, w, stop) -> None:
        record = {
            "fault": fault["id"],
            "kind": fault["kind"],
            "target": fault["target"],
            "replica": name,
            "heal_t": heal_t,
            "path": replica["path"],
            "seconds": None,
        }
        if w is not None:
            record["write_at"] = w.at
        while w is not None and self.history.now() < deadline:
            got = await self.reader.versions(name, w.keys)
            if got is not None and behind(w, got) == 0:
                # from the heal, or from the write if the source took none until then
                record["seconds"] = round(self.history.now() - max(heal_t, w.at), 3)
                break
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
        record["outcome"] = self._outcome(record, stop)
        self.history.convergence.append(record)

    def _outcome(self, record: dict[str, Any], stop: asyncio.Event) -> str:
        if record["seconds"] is not None:
            return "converged"
        if stop.is_set():
            return "cut_short"  # the run ended first; the final check covers it
        path = set(record["path"])
        touched = any(
            target in path and end >= record["heal_t"]
            for _k, target, _start, end in self.history.fault_windows()
        )
        # another fault on its path since: the next heal's probe (or the final check) judges
        return "superseded" if touched else "timeout"


class GuardWatch:
    """Polls the guard's health at every node: an incident at the source or a replica in
    state ``corrupted`` on clean training data is a false alarm."""

    def __init__(
        self,
        history: History,
        client: httpx.AsyncClient,
        urls: dict[str, str],
        source: str,
        model: str,
        up: Callable[[str], bool],
        every_s: float = 1.0,
    ) -> None:
        self.history = history
        self.client = client
        self.urls = urls
        self.source = source
        self.model = model
        self.up = up
        self.every_s = every_s
        self.seen: set[str] = set()
        self.polls = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
            await asyncio.gather(*(self._poll(n) for n in self.urls if self.up(n)))

    async def _poll(self, node: str) -> None:
        url = f"{self.urls[node]}/v1/models/{self.model}/health"
        try:
            r = await self.client.get(url, timeout=READ_TIMEOUT_S)
            doc = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return
        if doc is None:
            return
        self.polls += 1
        alarms = []
        for inc in doc.get("incidents", []) if node == self.source else []:
            alarms.append((f"incident {inc.get('epoch')} {inc.get('at')}", f"incident: {inc}"))
        if doc.get("state") == "corrupted":
            alarms.append((f"{node} corrupted", f"state corrupted: {doc.get('score')}"))
        for key, what in alarms:
            if key not in self.seen:
                self.seen.add(key)
                self.history.alarms.append({"t": self.history.now(), "node": node, "what": what})


async def at_risk(history: History, reader: RowReader, replicas: list[str]) -> list[list[int]]:
    """The source is dead and about to lose its disk: ``[key, writer, n]`` of each key's
    last acknowledged write that none of ``replicas`` holds (the contract lets those go)."""
    last: dict[int, tuple[int, int, int]] = {}
    for w in history.writes:
        for k, v in zip(w.keys, w.versions, strict=True):
            last[k] = (w.writer, w.n, v)
    keys = sorted(last)
    best = dict.fromkeys(keys, -1)
    for r in replicas:
        got = await reader.versions(r, keys)
        for k, v in (got or {}).items():
            best[k] = max(best[k], v)
    return [[k, last[k][0], last[k][1]] for k in keys if best[k] < last[k][2]]


async def converge(
    history: History,
    client: httpx.AsyncClient,
    urls: dict[str, str],
    source: str,
    since: float,
    bound_s: float,
) -> None:
    """Writes have stopped at ``since``: each replica's seconds from then to first holding
    the source's digests (None: never within ``bound_s``), and every node's digests once all
    equal the source's at one poll (or at the bound)."""
    replicas = [n for n in urls if n != source]
    converged: dict[str, float | None] = dict.fromkeys(replicas)
    while True:
        digests = {}
        for n, url in urls.items():
            try:
                r = await client.get(f"{url}/v1/status", timeout=READ_TIMEOUT_S)
                digests[n] = {t: v["digest"] for t, v in r.json()["tables"].items()}
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        want = digests.get(source)
        for r in replicas:
            if converged[r] is None and want is not None and digests.get(r) == want:
                converged[r] = round(history.now() - since, 3)
        same = want is not None and all(digests.get(r) == want for r in replicas)
        if same or history.now() > since + bound_s:
            break
        await asyncio.sleep(0.2)  # polling other processes, bounded by the deadline
    history.final["digests"] = digests
    history.final["converge_s"] = converged


async def final_rows(history: History, reader: RowReader, source: str) -> None:
    """Every acknowledged key's row at the source: ``[version, write n, writer]``."""
    keys = sorted({k for w in history.writes for k in w.keys})
    try:
        rows = await reader.rows(source, keys)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        history.final["source_rows_error"] = str(exc)
        rows = {}
    history.final["source_rows"] = {
        str(k): [v, int(val[0]), int(val[1])] for k, (v, val) in rows.items() if val is not None
    }
