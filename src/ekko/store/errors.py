"""Errors raised by the store; each message names the table, file or array at fault."""

from __future__ import annotations

NAME_SHOWN = 120
"""Characters of a table name an error quotes: a 10 kB name from a request is not echoed."""


class StoreError(Exception):
    """Base of every store error, so callers can catch the store's failures as one kind."""


class UnknownTableError(StoreError, KeyError):
    """A table name the store does not hold; a KeyError too, so mapping-style code works."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        name = self.name if len(self.name) <= NAME_SHOWN else self.name[:NAME_SHOWN] + "..."
        return f"unknown table {name!r}" + (
            f" ({len(self.name)} characters)" if len(self.name) > NAME_SHOWN else ""
        )


class TableConflictError(StoreError):
    """A table was created again with a different spec; silently keeping either would let two
    nodes shard or size the same table differently."""


class SnapshotError(StoreError):
    """A snapshot file is missing, truncated or corrupted; the store was not loaded."""


class WalError(StoreError):
    """A write-ahead log file is corrupt (not just a torn tail) or the log cannot write; the
    message names the file and offset. A node refuses to start on it rather than lose rows."""


class BadRowsError(StoreError, ValueError):
    """Rows, cursors or indices of the wrong dtype, shape or range; nothing was changed."""
