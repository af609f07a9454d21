"""How a scatter asks one holder (``Fetch``) and how asking fails.

A ``Fetch`` (``ekko.serve.scatter_http.HttpHolders`` over HTTP, fakes in tests) either
answers or raises ``HolderFailed``; ``checked`` holds an answer to the request it answers.

Why flat: a scatter asks each partition for its keys of every table of a batch (26 tables
of a few keys, typically) and a lookup frame carries them as one key array and its answer
as one buffer each of versions and values (``ekko.client.stream_frames``). A ``TableRows``
per table and partition, checked, sliced and merged again, cost the serving node ~0.15-0.2
ms of CPU per extra partition; a ``FlatAsk`` goes out as it is, its ``FlatRows`` is checked
in one kernel call and scattered into the batch's rows with every partition's in another
(``ekko.serve.scatter_keys``). A holder answering per table (``POST /v1/lookup``, a fake)
adapts at its edge (``tables_of``, ``flat_rows``, ``PerTable``).
What the scatter makes of failures is named here too: a partition none of whose holders
answered in time is ``PartitionUnavailable`` (HTTP 503, like any ``ModelNotReady``), a
request every holder would refuse is ``LookupRefused`` (HTTP 502).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np
from numba import njit

from ekko.client.wire import TableRows
from ekko.net.httpkit import RequestError
from ekko.serve.errors import ModelNotReady


class HolderFailed(Exception):
    """One holder did not answer a lookup usefully: unreachable, an error status (``status``)
    or an answer that does not fit the request. Raised by a ``Fetch``."""

    def __init__(self, holder: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{holder}: {reason}")
        self.holder = holder
        self.reason = reason
        self.status = status

    @property
    def retriable(self) -> bool:
        """Whether another holder may answer: the network, a holder not ready or not holding
        the table yet (5xx, 404, 401/403 after its restart, 408, 429), one keeping no
        baseline for a baseline lookup (409). A 400, 413 or 415 is our request's fault and
        every holder would refuse it."""
        return self.status is None or self.status >= 500 or self.status in (
            401, 403, 404, 408, 409, 429
        )  # fmt: skip


class PartitionUnavailable(ModelNotReady):
    """No holder of a partition answered within the deadline: HTTP 503 naming the partition,
    the tables asked of it and what each holder tried did."""

    def __init__(self, partition: int, tables: Sequence[str], tried: Sequence[tuple[str, str]]):
        self.partition = partition
        self.tables = list(tables)
        self.tried = list(tried)
        shown = ", ".join(self.tables[:6]) + (" ..." if len(self.tables) > 6 else "")
        holders = "; ".join(f"{h}: {why}" for h, why in self.tried) or "none configured"
        super().__init__(
            f"partition {partition} has no live holder (tables {shown}); holders tried: {holders}"
        )


class LookupRefused(RequestError):
    """A holder refused the lookup as sent (400, 413, 415): every holder would, so it is not
    retried; HTTP 502 naming the holder and its reason."""

    def __init__(self, partition: int, failure: HolderFailed) -> None:
        super().__init__(
            f"partition {partition}: holder {failure.holder} refused the lookup: {failure.reason}",
            status=502,
        )


class FlatAsk(NamedTuple):
    """What one holder is asked: tables ``names`` (each at most once), each table's count of
    keys (int64 [tables], each >= 1), their keys table after table (int64 [n]) and, if
    given, the version of each row the caller holds (int64 [n], -1: none; rows at it come
    back without values)."""

    names: list[str]
    counts: np.ndarray
    keys: np.ndarray
    known: np.ndarray | None


class FlatRows(NamedTuple):
    """A holder's answer to a ``FlatAsk``: each table's row length and rows of values sent
    (int64 [tables] each), each key's version (int64 [n], 0: not found) and the values sent,
    table after table, row after row (float32 [sum of rows x dims])."""

    dims: np.ndarray
    rows: np.ndarray
    versions: np.ndarray
    values: np.ndarray


class Fetch(Protocol):
    """Looks up ``ask`` at one holder, in one request; raises ``HolderFailed`` for anything
    but an answer (which ``checked`` then holds to the request).

    A fetch may also have ``send(holder, ask)``: the request sent at once and a future of
    its answer (failing with ``HolderFailed``), or None when it cannot send without waiting
    (no connection yet); ``start`` uses it first."""

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows: ...


def start(fetch: Fetch, holder: str, ask: FlatAsk) -> asyncio.Future:
    """``fetch``'s lookup of ``ask`` at ``holder`` in flight: its ``send``'s future when it
    has one and sends at once (no task: a task per partition and batch cost a serving node
    a wake-up per answer), else a task of its ``lookup``."""
    send = getattr(fetch, "send", None)
    if send is not None:
        fut = send(holder, ask)
        if fut is not None:
            return fut
    return asyncio.ensure_future(fetch.lookup(holder, ask))


@njit(cache=True, nogil=True)
def _misfit(
    counts: np.ndarray,
    known: np.ndarray,
    versions: np.ndarray,
    dims: np.ndarray,
    rows: np.ndarray,
    n_values: np.int64,
) -> np.int64:
    """-1 if the answer fits; else the first table whose rows of values are not its keys
    not held at ``known`` (all of them if ``known`` is empty), or the count of tables if
    the values are not ``sum(rows x dims)`` floats."""
    check = known.shape[0] > 0
    at = 0
    total = 0
    for t in range(counts.shape[0]):
        c = counts[t]
        m = c
        if check:
            m = 0
            for i in range(at, at + c):
                if versions[i] != known[i]:
                    m += 1
        if rows[t] != m or dims[t] < 0:
            return t
        total += m * dims[t]
        at += c
    if total != n_values:
        return counts.shape[0]
    return -1


NO_KNOWN = np.zeros(0, np.int64)


def checked(holder: str, ask: FlatAsk, answer: tuple) -> FlatRows:
    """``answer`` (a ``FlatRows``, or its 4 arrays as a ``send`` resolves them) if it answers
    every table of ``ask`` with rows of values for exactly its keys not held at ``known``,
    else ``HolderFailed`` (the holder is tried as a failed one)."""
    t, n = len(ask.names), ask.keys.shape[0]
    dims, rows, versions, values = answer
    if (
        versions.shape != (n,) or dims.shape != (t,) or rows.shape != (t,) or values.ndim != 1
        or versions.dtype != np.int64 or dims.dtype != np.int64 or rows.dtype != np.int64
        or values.dtype != np.float32
    ):  # fmt: skip
        raise HolderFailed(holder, f"the answer's arrays do not fit {t} tables of {n} keys")
    known = NO_KNOWN if ask.known is None else ask.known
    bad = int(_misfit(ask.counts, known, versions, dims, rows, values.shape[0]))
    if bad < 0:
        return answer if isinstance(answer, FlatRows) else FlatRows(dims, rows, versions, values)
    if bad == t:
        raise HolderFailed(holder, f"{values.shape[0]} values, not the rows' {int(rows @ dims)}")
    a = int(ask.counts[:bad].sum())
    b = a + int(ask.counts[bad])
    m = b - a if ask.known is None else int(np.count_nonzero(versions[a:b] != known[a:b]))
    raise HolderFailed(
        holder,
        f"table {ask.names[bad]!r}: {int(rows[bad])} rows of values of dim {int(dims[bad])}, "
        f"expected {m}",
    )


def tables_of(ask: FlatAsk) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``ask`` per table: each table's keys and the versions held of the tables some of
    whose rows are held (not all -1)."""
    tables: dict[str, np.ndarray] = {}
    known: dict[str, np.ndarray] = {}
    a = 0
    for name, c in zip(ask.names, ask.counts.tolist(), strict=True):
        tables[name] = ask.keys[a : a + c]
        if ask.known is not None:
            v = ask.known[a : a + c]
            if (v != -1).any():
                known[name] = v
        a += c
    return tables, known


def flat_rows(holder: str, ask: FlatAsk, answer: Mapping[str, TableRows]) -> FlatRows:
    """A per-table answer to ``ask`` as one ``FlatRows``; ``HolderFailed`` naming a table it
    lacks or whose arrays do not fit its keys."""
    dims = np.empty(len(ask.names), np.int64)
    rows = np.empty(len(ask.names), np.int64)
    versions, values = [], []
    for t, (name, c) in enumerate(zip(ask.names, ask.counts.tolist(), strict=True)):
        got = answer.get(name)
        if got is None:
            raise HolderFailed(holder, f"the answer lacks table {name!r}")
        if got.versions.shape != (c,) or got.found.shape != (c,) or got.values.ndim != 2:
            raise HolderFailed(holder, f"table {name!r}: the answer's arrays do not fit {c} keys")
        rows[t], dims[t] = got.values.shape
        versions.append(got.versions)
        values.append(got.values.reshape(-1))
    return FlatRows(
        dims,
        rows,
        np.concatenate(versions).astype(np.int64, copy=False),
        np.concatenate(values).astype(np.float32, copy=False),
    )


PerTableFetch = Callable[
    [str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Awaitable[Mapping[str, TableRows]]
]


class PerTable:
    """A ``Fetch`` over one that asks and answers per table (``holder, tables, known`` ->
    ``TableRows`` of each table).

    Why: a holder asked per table (a test's fake, say) adapts at its edge, and the scatter
    keeps one path."""

    def __init__(self, fetch: PerTableFetch) -> None:
        self.fetch = fetch

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows:
        tables, known = tables_of(ask)
        return flat_rows(holder, ask, await self.fetch(holder, tables, known))
