"""How far a replica is behind the source, in row versions and in seconds, per table.

Why at the node and over HTTP: a replica learns from the sync protocol only what its
upstream sent it, never the source's counters (a relay's answers stop at what the relay
holds), so it cannot tell from its pulls how much it lacks. Every non-source node therefore
asks the source what it holds complete (``GET /v1/knowledge``: per table, shard and lane)
once a second, over the cluster's HTTP port with the node's credential, and compares.

The two figures, read as Kafka consumer lag is read:

- **versions**: per shard, the source's counter minus the highest version below which the
  replica holds every version (a lane it has caught up in does not hold it back), summed
  over shards. One write issues one version, so this is the number of writes the replica may
  still lack (exact when the table's writes go to one lane, an upper bound otherwise).
- **seconds**: the age of the oldest source state the replica does not hold whole: the
  source's knowledge is sampled at each probe; the oldest sample the replica has not reached
  in every (shard, lane) was taken ``seconds`` ago (0 when it holds the latest sample). As
  Kafka's time lag is the age of the oldest message not yet consumed, this is a lower bound of
  the age of the oldest write not yet applied, within one probe interval.

A replica on another lineage than the source (rebuilding after a source lost its data) holds
none of the source's versions: its knowledge counts as zero. A replica holding partitions of
several sources (issue 17) asks each of them, and compares each one's shards only, against
the lineage of that source's partitions.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import httpx
import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net.signed_requests import auth_headers, host_of, needs_resign
from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.node.http_client import ClusterHttp
from ekko.store import Store
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

KNOWLEDGE_PATH = "/v1/knowledge"
PROBE_INTERVAL_S = 1.0
MAX_SAMPLES = 256
"""Source samples kept per table while a replica lags (the oldest is always kept, so the
seconds stay right however long the replica is cut; samples between are thinned)."""


def knowledge_doc(core: NodeCore) -> dict:
    """What ``core`` holds complete: per table, ``knowledge[shard][lane]``, and its lineage."""
    return {
        "node": core.name,
        "lineage": core.lineage_text(),
        "tables": {name: t.knowledge.tolist() for name, t in core.store.tables.items()},
    }


def knowledge_route(core: NodeCore) -> Route:
    async def knowledge(request: Request) -> Response:
        """Per table, shard and lane, the highest version this node holds complete (what a
        replica compares its own with to report its lag)."""
        return JSONResponse(knowledge_doc(core))

    return Route(KNOWLEDGE_PATH, knowledge, methods=["GET"])


def versions_behind(source: np.ndarray, mine: np.ndarray) -> int:
    """Sum over shards of the source's counter minus the version below which ``mine`` holds
    everything (``[shards, lanes]`` knowledge each)."""
    counter = source.max(axis=1)
    held = np.where(mine >= source, counter[:, None], mine).min(axis=1)
    return int(np.maximum(counter - held, 0).sum())


@dataclass(frozen=True)
class TableLag:
    """One table's lag at one replica (see the module's docstring for the definitions)."""

    versions: int
    seconds: float


class LagTracker:
    """Source samples per table and the lag of a store against them.

    Why samples and not the newest only: the lag in seconds is the age of the oldest source
    state not yet held, which the newest sample alone cannot date.
    """

    def __init__(
        self, max_samples: int = MAX_SAMPLES, partitions: tuple[int, ...] | None = None
    ) -> None:
        self.max_samples = max(2, max_samples)
        # The partitions of the source this tracker samples, in a store holding several
        # sources' (None: the store's one source): the lineage compared is theirs.
        self.partitions = partitions
        self.lineage = 0
        self.seen_at: float | None = None  # when the source last answered
        self._latest: dict[str, np.ndarray] = {}
        self._unheld: dict[str, deque[tuple[float, np.ndarray]]] = {}

    def observe(
        self, now: float, lineage: int, tables: Mapping[str, np.ndarray], store: Store
    ) -> None:
        """The source held ``tables`` (knowledge per table) at ``now``."""
        if lineage != self.lineage:
            self._unheld.clear()
            self._latest.clear()
        self.lineage = lineage
        self.seen_at = now
        for name in set(self._latest) - set(tables):
            del self._latest[name], self._unheld[name]
        for name, k in tables.items():
            prev = self._latest.get(name)
            self._latest[name] = k
            q = self._unheld.setdefault(name, deque())
            if prev is None or not np.array_equal(prev, k):  # the source moved
                q.append((now, k))
                if len(q) > self.max_samples:
                    del q[1]  # thin the middle; the oldest dates the lag
        self._forget_held(store)

    def lag(self, store: Store, now: float) -> dict[str, TableLag]:
        """Per table the source has, the lag of ``store`` behind the last sample."""
        self._forget_held(store)
        out = {}
        for name, src in self._latest.items():
            q = self._unheld[name]
            seconds = round(max(0.0, now - q[0][0]), 3) if q else 0.0
            out[name] = TableLag(versions_behind(src, self._mine(store, name, src)), seconds)
        return out

    def behind_in(self, store: Store, shards: Callable[[str, int], np.ndarray]) -> int:
        """Versions ``store`` lacks of the last sample, over the shards ``shards(table,
        num_shards)`` selects (a partition's: issue 17), summed over tables."""
        total = 0
        for name, src in self._latest.items():
            sel = shards(name, src.shape[0])
            total += versions_behind(src[sel], self._mine(store, name, src)[sel])
        return total

    def _mine(self, store: Store, name: str, like: np.ndarray) -> np.ndarray:
        t = store.tables.get(name)
        parts = self.partitions if store.multi_source else None
        if (
            t is None
            or t.knowledge.shape != like.shape
            or (store.history(parts).lineage != self.lineage)
        ):
            return np.zeros_like(like)
        return t.knowledge

    def _forget_held(self, store: Store) -> None:
        for name, q in self._unheld.items():
            if not q:
                continue
            mine = self._mine(store, name, q[0][1])
            while q and bool((mine >= q[0][1]).all()):
                q.popleft()


class LagProbe(Driver):
    """Asks the source what it holds once per ``interval_s`` and keeps this node's lag.

    Why a driver: the source may be unreachable (then the lag is against the last answer
    and ``/v1/status`` says how old that answer is); a failed probe is logged once per
    outage, and the loop goes on.

    Args:
        core: this (non-source) node.
        http: the cluster's HTTP ports (the source's URL, TLS checked).
        secret: signs the request as a node.
        interval_s: time between probes.
        clock: the probe interval and the sample times.
    """

    name = "lag_probe"

    def __init__(
        self,
        core: NodeCore,
        http: ClusterHttp,
        secret: bytes,
        interval_s: float = PROBE_INTERVAL_S,
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.core = core
        self.http = http
        self.secret = secret
        self.interval_s = interval_s
        self.clock = clock
        # One tracker per source of this node's partitions (several: ``config_partitions``),
        # each comparing that source's partitions only (``probe``).
        cfg = core.config
        by_source: dict[str, list[int]] = {}
        for p in cfg.held(core.name):
            by_source.setdefault(cfg.source_of(p).name, []).append(p)
        self.trackers = {
            name: LagTracker(partitions=tuple(parts)) for name, parts in by_source.items()
        }
        self._failing: set[str] = set()

    @property
    def tracker(self) -> LagTracker:
        """The first source's tracker (the only one unless several sources)."""
        return next(iter(self.trackers.values()))

    async def run(self) -> None:
        urls = {name: self.http.url(name, KNOWLEDGE_PATH) for name in self.trackers}
        async with self.http.async_client(timeout=max(5.0, self.interval_s)) as client:
            while True:
                for name, url in urls.items():
                    await self.probe(client, url, name)
                await self.clock.sleep(self.interval_s)

    async def probe(self, client: httpx.AsyncClient, url: str, source: str | None = None) -> None:
        """One question to ``source`` (None: the first); its answer becomes a sample."""
        source = source if source is not None else next(iter(self.trackers))
        tracker = self.trackers[source]
        try:
            for _ in range(2):  # again if the source started after we signed
                headers = auth_headers(self.secret, "node", "GET", KNOWLEDGE_PATH,
                                       host=host_of(url))  # fmt: skip
                resp = await client.get(url, headers=headers)
                if not needs_resign(resp):
                    break
            resp.raise_for_status()
            doc = resp.json()
            tables = {n: np.asarray(k, dtype=np.int64) for n, k in doc["tables"].items()}
            lineage = int(doc["lineage"], 16)
            holding = self.core.store.holding
            if holding is not None and holding.scoped:  # shards held elsewhere: not lacked
                placement = self.core.config.placement()
                for n, k in tables.items():
                    mine = np.isin(placement.partitions_of(n, k.shape[0]), tracker.partitions)
                    k[~(holding.held_shards(n, k.shape[0]) & mine)] = 0
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if source not in self._failing:
                log.warning("%s: cannot read %s's knowledge (%s); lag is against the "
                            "last answer", self.core.name, source, exc)  # fmt: skip
            self._failing.add(source)
            return
        if source in self._failing:
            log.info("%s: %s answers the lag probe again", self.core.name, source)
        self._failing.discard(source)
        tracker.observe(self.clock.wall(), lineage, tables, self.core.store)

    def lag(self) -> dict[str, TableLag]:
        """Per table: the versions lacked summed over sources, the oldest unheld age."""
        out: dict[str, TableLag] = {}
        now = self.clock.wall()
        for tracker in self.trackers.values():
            for name, lag in tracker.lag(self.core.store, now).items():
                was = out.get(name)
                out[name] = (
                    lag
                    if was is None
                    else TableLag(was.versions + lag.versions, max(was.seconds, lag.seconds))
                )
        return out

    def partitions(self) -> dict[str, dict]:
        """Per held partition: where it is pulled from now, and the versions this node
        lacks of it (as of the source's last answer)."""
        cfg, core = self.core.config, self.core
        placement = cfg.placement()
        out = {}
        for p in cfg.held(core.name):

            def shards(name: str, n: int, p: int = p) -> np.ndarray:
                return placement.partitions_of(name, n) == p

            behind = self.trackers[cfg.source_of(p).name].behind_in(core.store, shards)
            out[str(p)] = {"upstream": core.upstream_of.get(p), "versions_behind": behind}
        return out

    def status(self) -> dict:
        times = [t.seen_at for t in self.trackers.values()]
        seen = None if None in times else min(t for t in times if t is not None)
        return {
            "replica_lag": {
                "source_answered_s_ago": None
                if seen is None
                else round(self.clock.wall() - seen, 3),
                "tables": {n: vars(lag) for n, lag in self.lag().items()},
                "partitions": self.partitions(),
            }
        }

    def metrics(self) -> Iterator[Metric]:
        """``ekko_replica_lag_versions`` and ``ekko_replica_lag_seconds`` per table."""
        lags = self.lag()
        versions = GaugeMetricFamily(
            "ekko_replica_lag_versions",
            "Writes this replica may lack behind the source (sum over shards of the source's "
            "counter minus the version below which the replica holds everything)",
            labels=["node", "table"],
        )
        seconds = GaugeMetricFamily(
            "ekko_replica_lag_seconds",
            "Age of the oldest source state this replica does not hold whole (0: caught up)",
            labels=["node", "table"],
        )
        for table, lag in lags.items():
            versions.add_metric([self.core.name, table], lag.versions)
            seconds.add_metric([self.core.name, table], lag.seconds)
        yield versions
        yield seconds
