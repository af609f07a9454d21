"""An in-memory reference ``Sink``, and ``DeletingSink``: a sink that also takes deletes.

The write protocol itself is ``ekko.store.spec.Sink`` (the store layer, which this layer may
not change); a dynamic table that evicts needs ``delete`` as well, named here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ekko.store.spec import Sink, TableSpec


@runtime_checkable
class DeletingSink(Sink, Protocol):
    """A ``Sink`` that also removes rows: what a publisher of evicting tables needs.

    ``delete`` receives unique int64 keys [n] of a created table; keys the table does not
    hold are no error (a replica may hold an older row of them). The source's ``WritePort``
    and the client's ``RemoteSink`` implement it as versioned deletes that reach every
    replica.
    """

    def delete(self, table: str, keys: np.ndarray) -> None: ...


class MemorySink:
    """Dict-backed sink: the reference for tests and examples, not for speed.

    Why: tests compare what the publisher wrote with the model's weights, and a serving
    model can read rows back through ``lookup``. Keeps a log of the keys of every write and
    every delete.
    """

    def __init__(self) -> None:
        self.specs: dict[str, TableSpec] = {}
        self.tables: dict[str, dict[int, np.ndarray]] = {}
        self.writes: list[tuple[str, np.ndarray]] = []
        self.deletes: list[tuple[str, np.ndarray]] = []

    def create_table(self, spec: TableSpec) -> None:
        if spec.name in self.specs and self.specs[spec.name] != spec:
            raise ValueError(f"table {spec.name!r} exists as {self.specs[spec.name]}, not {spec}")
        self.specs[spec.name] = spec
        self.tables.setdefault(spec.name, {})

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        spec = self.specs.get(table)
        if spec is None:
            raise KeyError(f"write to table {table!r} before create_table")
        if values.shape != (len(keys), spec.dim):
            raise ValueError(
                f"table {table!r}: values shape {values.shape}, expected ({len(keys)}, {spec.dim})"
            )
        rows = self.tables[table]
        rows.update(zip(keys.tolist(), values, strict=True))
        self.writes.append((table, keys.copy()))

    def delete(self, table: str, keys: np.ndarray) -> None:
        """Remove ``keys`` from ``table`` (absent keys are no error); logged in ``deletes``."""
        if table not in self.specs:
            raise KeyError(f"delete from table {table!r} before create_table")
        rows = self.tables[table]
        for key in np.asarray(keys, dtype=np.int64).tolist():
            rows.pop(key, None)
        self.deletes.append((table, np.asarray(keys, dtype=np.int64).copy()))

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """float32 [n, dim] rows for ``ids``; zeros for keys never written."""
        dim = self.specs[table].dim
        rows = self.tables[table]
        out = np.zeros((len(ids), dim), dtype=np.float32)
        for i, key in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            row = rows.get(key)
            if row is not None:
                out[i] = row
        return out

    def written_keys(self, table: str) -> set[int]:
        """Every key ever written to ``table``."""
        return {k for name, keys in self.writes if name == table for k in keys.tolist()}
