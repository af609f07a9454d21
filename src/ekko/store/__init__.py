"""Versioned, sharded embedding tables with an update cache (DESIGN.md §2–§3).

Public names: ``Store`` (a node's tables, snapshots), ``Table`` (one table), ``KeyIndex``
and ``shard_of`` (the key index and the shard hash every node shares), ``ReferenceTable``
(the naive model tests compare against), ``check_keys``, ``check_values`` and
``check_write_values`` (what a source write must satisfy, for writers that plan before they
write), result dataclasses and errors.
"""

from ekko.store._validate import DEFAULT_MAX_ABS, check_keys, check_values, check_write_values
from ekko.store.errors import (
    BadRowsError,
    SnapshotError,
    StoreError,
    TableConflictError,
    UnknownTableError,
    WalError,
)
from ekko.store.index import KeyIndex, shard_of
from ekko.store.reference import ReferenceTable
from ekko.store.store import Store
from ekko.store.table import Table, warm
from ekko.store.table_groups import TableShardGroups
from ekko.store.table_records import Collected, TableStats

__all__ = [
    "DEFAULT_MAX_ABS",
    "BadRowsError",
    "Collected",
    "KeyIndex",
    "ReferenceTable",
    "SnapshotError",
    "Store",
    "StoreError",
    "Table",
    "TableConflictError",
    "TableShardGroups",
    "TableStats",
    "UnknownTableError",
    "WalError",
    "check_keys",
    "check_values",
    "check_write_values",
    "shard_of",
    "warm",
]
