"""What the source takes from a replica's or holder's message, checked before it stores any.

A report's ``state`` moves the source (``corrupted`` starts a rollback; the rest decides
whether a healthy checkpoint is marked) and a ``restored`` report's digests decide an
incident's ``replica_table_mismatches`` and ``good_rows_lost``. Both were taken as sent: a
state outside the guard's enum was kept and counted as "not healthy" on the health page,
and a digest that is not one (not hex, another length) counted as a mismatch — good rows
lost that were never lost. A bug or a hostile node could so fake an incident's outcome;
such a message is refused instead (HTTP 400), naming the field and what it may hold, and
nothing the source keeps changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ekko.guard.state import State

STATES = tuple(s.value for s in State)
"""The states a replica may report: the guard's health enum."""

_HEX = frozenset("0123456789abcdef")
_DIGEST = "16 lowercase hex digits, as the store's digest is written"


class ReportError(ValueError):
    """A replica's or holder's message the source refuses before storing anything from it.

    Why a type: the routes answer it with 400 and its message, which names the field (a
    ``ValueError``, so callers that catch those keep working)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check_state(body: Mapping[str, Any]) -> None:
    """``ReportError`` unless the report's ``state`` is absent or one of ``STATES``."""
    state = body.get("state")
    if state is not None and (not isinstance(state, str) or state not in STATES):
        raise ReportError(
            f"state: {_shown(state)} is not a guard state (one of {', '.join(STATES)})"
        )


def check_digest(where: str, value: Any) -> None:
    """``ReportError`` naming ``where`` unless ``value`` is a digest as the guard writes it
    (``f"{digest:016x}"``): compared as a string, an upper-case one could never match."""
    if not (isinstance(value, str) and len(value) == 16 and _HEX.issuperset(value)):
        raise ReportError(f"{where}: {_shown(value)} is not a digest ({_DIGEST})")


def check_digests(digests: Any, *, partitioned: bool) -> None:
    """A ``restored`` report's digests: per table a digest, or on a partitioned cluster per
    table ``{partition: digest}``; ``ReportError`` naming the first that is not."""
    if not isinstance(digests, Mapping):
        raise ReportError(f"digests: expected an object, got {_shown(digests)}")
    for table, per in digests.items():
        if not partitioned:
            check_digest(f"digests.{table}", per)
            continue
        if not isinstance(per, Mapping):
            raise ReportError(
                f"digests.{table}: expected {{partition: hex16}} on a partitioned cluster"
            )
        for p, d in per.items():
            check_digest(f"digests.{table}.{p}", d)
