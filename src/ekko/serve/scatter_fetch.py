"""How a scatter asks one holder (``Fetch``) and how asking fails.

A ``Fetch`` (``ekko.serve.scatter_http.HttpHolders`` over HTTP, fakes in tests) either
answers or raises ``HolderFailed``; ``checked`` holds an answer to the request it answers.
What the scatter makes of failures is named here too: a partition none of whose holders
answered in time is ``PartitionUnavailable`` (HTTP 503, like any ``ModelNotReady``), a
request every holder would refuse is ``LookupRefused`` (HTTP 502).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

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


class Fetch(Protocol):
    """Looks up rows at one holder: ``tables`` maps a table to its keys int64 [n],
    ``known`` (a subset of the tables) to the versions held already (rows still at them come
    back without values, ``TableRows``); the answer maps every table asked, in order. Raises
    ``HolderFailed`` for anything but an answer."""

    async def __call__(
        self, holder: str, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray]
    ) -> Mapping[str, TableRows]: ...


def checked(
    holder: str,
    tables: Mapping[str, np.ndarray],
    known: Mapping[str, np.ndarray],
    answer: Mapping[str, TableRows],
) -> Mapping[str, TableRows]:
    """``answer`` if it answers every table asked with arrays of the request's shape, else
    ``HolderFailed`` (the holder is tried as a failed one)."""
    for table, keys in tables.items():
        rows = answer.get(table)
        if rows is None:
            raise HolderFailed(holder, f"the answer lacks table {table!r}")
        n = keys.shape[0]
        if rows.versions.shape != (n,) or rows.found.shape != (n,) or rows.values.ndim != 2:
            raise HolderFailed(holder, f"table {table!r}: the answer's arrays do not fit {n} keys")
        v = known.get(table)
        m = n if v is None else int(np.count_nonzero(rows.versions != v))
        if rows.values.shape[0] != m:
            raise HolderFailed(
                holder, f"table {table!r}: {rows.values.shape[0]} rows of values, expected {m}"
            )
    return answer
