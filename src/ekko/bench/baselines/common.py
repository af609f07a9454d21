"""What every baseline shares: topology, replicas, the result record, digests, raw links.

Each replica is an asyncio task in the bench process holding a real :class:`~ekko.store.Store`;
the source is another task in the same event loop. Latency is measured on one clock
(``time.time_ns``): the source stamps a batch when it writes it, the replica subtracts that
stamp from its clock after applying the rows.

WAN bytes are counted where they cross an emulated WAN link, in both directions: for
``ekko.net`` connections, the source-side :class:`~ekko.net.connection.Connection` stats of
links whose ``WanProfile`` is set; for Redis, the counters of each replica's
:mod:`ekko.bench.relay`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np

from ekko.bench.online_auc import OnlineAuc
from ekko.bench.trace import Trace
from ekko.net.connection import Connection
from ekko.net.framing import WireSchema
from ekko.net.transport import TcpStream
from ekko.net.wan import WanProfile
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store
from ekko.store.spec import TableSpec
from ekko.store.table import warm

HOST = "127.0.0.1"


# -- wire messages of the baselines -------------------------------------------------------------


class UpdateBatch(msgspec.Struct, frozen=True, tag=True):
    """One publisher write, fp32, as a push or log baseline sends it: keys and values only
    (order on the link replaces versions), plus the write's wall-clock stamp (8 bytes)."""

    table: str
    keys: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, dim]
    wtime_ns: int


class CheckpointPart(msgspec.Struct, frozen=True, tag=True):
    """Rows of one table in checkpoint ``ckpt`` (fp32, keys and values only); a big table is
    split into parts numbered from 0."""

    ckpt: int
    table: str
    part: int
    keys: np.ndarray
    values: np.ndarray


class End(msgspec.Struct, frozen=True, tag=True):
    """The source has nothing more to send."""


BaselineMessage = UpdateBatch | CheckpointPart | End
BASELINE_SCHEMA = WireSchema(BaselineMessage)


async def open_link(
    host: str, port: int, *, wan: WanProfile | None, peer: str, timeout: float = 5.0
) -> Connection:
    """A framed ``ekko.net`` connection speaking :data:`BaselineMessage`, with ``wan`` applied
    to what this side sends. No ekko handshake: the baselines are not ekko peers."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
    return Connection(TcpStream(reader, writer), peer=peer, wan=wan, schema=BASELINE_SCHEMA)


async def serve_links(
    on_connection: Callable[[Connection], Awaitable[None]], *, host: str = HOST
) -> asyncio.Server:
    """Listen on a free port; each accepted peer becomes a :data:`BaselineMessage` connection
    handed to ``on_connection`` (closed when it returns)."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = TcpStream(reader, writer)
        conn = Connection(stream, peer=stream.address, schema=BASELINE_SCHEMA)
        try:
            await on_connection(conn)
        finally:
            await conn.close()

    return await asyncio.start_server(accept, host, 0)


# -- topology ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCentre:
    """One inference data centre: its WAN link from the training DC and its replica count.

    Why per DC: all systems are measured on the same links; a baseline that sends to every
    replica crosses the DC's WAN once per replica, Ekko once per DC (leader, then LAN).
    """

    name: str
    wan: WanProfile | None
    replicas: int = 3


def default_topology(
    delays_ms: Iterable[float] = (25.0, 50.0, 100.0),
    *,
    mbit: float | None = 100.0,
    replicas: int = 3,
) -> list[DataCentre]:
    """3 DCs (one-way 25/50/100 ms, 100 Mbit/s) × 3 replicas, as in the bandwidth bench."""
    return [
        DataCentre(f"dc{i}", WanProfile(delay_ms=float(d), mbit=mbit), replicas)
        for i, d in enumerate(delays_ms)
    ]


# -- replicas ---------------------------------------------------------------------------------


def load_initial(store: Store, trace: Trace) -> None:
    """Create the trace's tables and write its initial state (offline bootstrap, no WAN)."""
    for spec in trace.specs:
        store.create_table(spec, initial_rows=max(trace.table_rows[spec.name], 1024))
    for batch in trace.initial:
        store.table(batch.table).write(batch.keys, batch.values, now_ns=0)


class Replica:
    """One inference replica of a baseline: a store, its latency histogram, its row count.

    Why a class: all three baselines apply, time and verify the same way, so their figures
    differ only in what crossed the WAN and when.
    """

    def __init__(self, name: str, dc: DataCentre, trace: Trace) -> None:
        self.name = name
        self.dc = dc
        self.store = Store()
        load_initial(self.store, trace)
        self.latency = LatencyHistogram()
        self.rows_applied = 0
        self.done = asyncio.get_running_loop().create_future()

    def write(self, table: str, keys: np.ndarray, values: np.ndarray, wtime_ns: int) -> None:
        """Apply an ordered update as the source wrote it: same order, same versions."""
        self.store.table(table).write(keys, values, now_ns=wtime_ns)
        now = time.time_ns()
        self.latency.record_ns(np.full(len(keys), now - wtime_ns, dtype=np.int64))
        self.rows_applied += len(keys)

    def finish(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def warm_kernels() -> None:
    """Compile the store kernels before the clock starts, also for read-only inputs (arrays
    decoded from frames are read-only, a distinct numba type), so no run pays for the JIT."""
    warm()
    table = Store().create_table(TableSpec("_warm", 4, 2), initial_rows=16)
    for writeable in (True, False):
        keys = np.arange(8, dtype=np.int64)
        values = np.ones((8, 4), dtype=np.float32)
        keys.flags.writeable = values.flags.writeable = writeable
        table.write(keys, values, now_ns=1)


def make_replicas(
    trace: Trace, topology: list[DataCentre], probe: OnlineAuc | None = None
) -> list[Replica]:
    """The replicas of every DC, loaded with the trace's initial state; ``probe`` scores
    online AUC on the last replica of each DC (a follower, where a system relays)."""
    warm_kernels()
    replicas = [
        Replica(f"{dc.name}-r{i}", dc, trace) for dc in topology for i in range(dc.replicas)
    ]
    if probe is not None:
        last = {r.dc.name: r for r in replicas}
        probe.attach([r.store for r in last.values()])
    return replicas


def on_step(probe: OnlineAuc | None) -> Callable[[int], None] | None:
    """The replay hook of ``probe`` (None without one)."""
    return None if probe is None else probe.on_step


async def wait_replicas(replicas: list[Replica], timeout_s: float) -> None:
    """Wait until every replica has finished, or raise ``TimeoutError`` naming the laggards."""
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(r.done for r in replicas))
    except TimeoutError:
        late = [r.name for r in replicas if not r.done.done()]
        raise TimeoutError(f"replicas {late} did not finish within {timeout_s} s") from None


# -- verification -------------------------------------------------------------------------------


def content_digest(store: Store) -> dict[str, str]:
    """Per table, a hash of (key, value bits) over rows sorted by key, versions ignored.

    Why besides ``Table.digest``: a checkpoint carries values, not Ekko's per-row versions, so
    "replica equals source" is judged on content for every system alike.
    """
    out = {}
    for name, table in store.tables.items():
        keys, values, *_ = table.all_rows()
        order = np.argsort(keys, kind="stable")
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(keys[order]).tobytes())
        h.update(np.ascontiguousarray(values[order]).tobytes())
        out[name] = h.hexdigest()
    return out


# -- results ----------------------------------------------------------------------------------


@dataclass
class BaselineResult:
    """Figures of one baseline run on one trace and topology.

    Why one record for all systems: the bandwidth bench lays them side by side. ``wan_bytes``
    counts both directions of every emulated WAN link; ``fp32_ratio`` divides it by what one
    fp32 copy of every update to every replica costs (``replicas * trace fp32 bytes``).
    ``digests_equal_source`` compares content (key, value) of every table of every replica with
    the source; ``strict_digests_equal`` compares ``Table.digest`` (versions included) where
    the system reproduces versions (None where it cannot, e.g. checkpoints).
    """

    system: str
    wan_bytes: int
    rows_applied_per_replica: list[int]
    latency_p50_ms: float
    latency_p99_ms: float
    digests_equal_source: bool
    duration_s: float
    replicas: int = 0
    trace_rows: int = 0
    trace_fp32_bytes: int = 0
    strict_digests_equal: bool | None = None
    wan_bytes_per_dc: dict[str, int] = field(default_factory=dict)
    latency_per_dc: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    auc: float | None = None  # online AUC on the replicas (see ekko.bench.online_auc)

    @property
    def fp32_ratio(self) -> float:
        base = self.replicas * self.trace_fp32_bytes
        return self.wan_bytes / base if base else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fp32_ratio": self.fp32_ratio}


def summarise(
    system: str,
    trace: Trace,
    source: Store,
    replicas: list[Replica],
    wan_bytes_per_replica: dict[str, int],
    duration_s: float,
    *,
    strict: bool,
    details: dict[str, Any] | None = None,
    probe: OnlineAuc | None = None,
) -> BaselineResult:
    """Merge per-replica figures into a :class:`BaselineResult`."""
    src_content = content_digest(source)
    src_strict = source.digests()
    total = LatencyHistogram()
    per_dc_hist: dict[str, LatencyHistogram] = {}
    per_dc_bytes: dict[str, int] = {}
    for r in replicas:
        total.merge(r.latency)
        per_dc_hist.setdefault(r.dc.name, LatencyHistogram()).merge(r.latency)
        per_dc_bytes[r.dc.name] = per_dc_bytes.get(r.dc.name, 0) + wan_bytes_per_replica[r.name]
    return BaselineResult(
        system=system,
        wan_bytes=sum(wan_bytes_per_replica.values()),
        rows_applied_per_replica=[r.rows_applied for r in replicas],
        latency_p50_ms=total.quantile(0.5),
        latency_p99_ms=total.quantile(0.99),
        digests_equal_source=all(content_digest(r.store) == src_content for r in replicas),
        duration_s=duration_s,
        replicas=len(replicas),
        trace_rows=trace.rows,
        trace_fp32_bytes=trace.fp32_bytes,
        strict_digests_equal=(
            all(r.store.digests() == src_strict for r in replicas) if strict else None
        ),
        wan_bytes_per_dc=per_dc_bytes,
        latency_per_dc={
            dc: {"p50_ms": h.quantile(0.5), "p99_ms": h.quantile(0.99), "rows": h.count}
            for dc, h in per_dc_hist.items()
        },
        details=details or {},
        auc=None if probe is None else probe.auc(),
    )


def link_bytes(conn: Connection) -> int:
    """Wire bytes both ways on a link (0 if it has no WAN profile: it crosses no WAN)."""
    if conn.wan is None:
        return 0
    s = conn.stats
    return s.bytes_sent + s.bytes_received


async def replica_receiver(
    replica: Replica,
    conn: Connection,
    on_message: Callable[[Replica, Any], None],
) -> None:
    """Apply every message from the source until :class:`End`, then mark the replica done."""
    try:
        while True:
            msg = await conn.recv()
            if isinstance(msg, End):
                replica.finish()
                return
            on_message(replica, msg)
    except Exception as e:  # a broken link or a bad batch: fail the run, naming the replica
        replica.finish(RuntimeError(f"replica {replica.name}: {type(e).__name__}: {e}"))
        raise
