"""An in-memory reference ``Sink`` (the protocol itself is ``ekko.store.spec.Sink``)."""

from __future__ import annotations

import numpy as np

from ekko.store.spec import TableSpec


class MemorySink:
    """Dict-backed sink: the reference for tests and examples, not for speed.

    Why: tests compare what the publisher wrote with the model's weights, and a serving
    model can read rows back through ``lookup``. Keeps a log of the keys of every write.
    """

    def __init__(self) -> None:
        self.specs: dict[str, TableSpec] = {}
        self.tables: dict[str, dict[int, np.ndarray]] = {}
        self.writes: list[tuple[str, np.ndarray]] = []

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
