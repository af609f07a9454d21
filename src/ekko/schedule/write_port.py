"""The source's one write port: every row that enters a source store comes through here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from ekko.schedule.quarantine import Quarantine, Quarantines
from ekko.schedule.scheduler import ReleasedRows, UpdateScheduler
from ekko.store import Store, Table, check_keys, check_values, check_write_values
from ekko.store.clock import SYSTEM_CLOCK, Clock
from ekko.store.spec import HIGH_LANE, TableSpec

PreimageHook = Callable[[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], None]
"""``hook(table, keys, old_values, old_versions, existed, now)``: the rows a write is about to
overwrite, as the table holds them (the guard's ``PreimageLog.record``)."""


class WritePort:
    """Writes rows into a source ``store``: HTTP writes (``write_rows``, which returns the
    versions issued), the trainer's publisher (``write``: the port is its ``Sink``), held rows
    the scheduler releases (``release``, ``flush``), a rollback's ``restore`` and deletes
    (``delete``: HTTP deletes and the trainer's evictions).

    Why one port: each of those must validate the rows in full before anything changes, look
    the keys up once for the pre-image hook and the scheduler, write in the lanes the scheduler
    chooses or hold the row, and wake parked pulls. Written in four places they drifted apart
    (a restore that left deferred rows to be released over it later); later writers (deletes,
    evictions, remote clients) come in here too. Nothing else calls ``Table.write`` on a source.

    ``scheduler`` None: every row is written at once in the high lane. ``on_written()`` is
    called after each call that moved the store (the node wakes parked long-poll pulls); inside
    ``batch()`` once, at its end. ``clock``: its nanoseconds stamp the trainer's writes
    (and, divided, are the scheduler's seconds for them). Not thread-safe: one per source, on the
    node's event loop.
    """

    def __init__(
        self,
        store: Store,
        scheduler: UpdateScheduler | None = None,
        *,
        on_written: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self._on_written = on_written
        self._clock = clock
        self._preimage_hooks: dict[str, PreimageHook] = {}
        self._batch_depth = 0
        self._moved = False
        self.quarantines = Quarantines()

    # -- the publisher's Sink ---------------------------------------------------------------

    def create_table(self, spec: TableSpec) -> None:
        """Create ``spec.name`` (idempotent for the same spec; a conflicting spec raises
        ``TableConflictError``)."""
        self.store.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """A trainer's rows, stamped with the port's clock; the scheduler may hold them (a
        step is acknowledged to no one)."""
        now_ns = self._clock.ns()
        self.write_rows(table, keys, values, now=now_ns / 1e9, now_ns=now_ns, hold=True)

    def delete(
        self, table: str, keys: np.ndarray, now_ns: int | None = None, *, restoring: bool = False
    ) -> np.ndarray:
        """Delete ``keys`` of ``table`` (stamped ``now_ns``, default the port's clock); returns
        the versions their tombstones took. A key the table does not hold is no error: it
        gets a tombstone too (a replica may hold an older row of it).

        Past the scheduler, in the high lane: a delete is never held. Rows the scheduler
        holds for these keys are dropped (released later, they would bring the keys back).
        The pre-image hook sees the rows deleted, so a rollback restores them as new
        versions. Bad keys or an unknown table raise before anything is recorded; so does a
        quarantined table (``QuarantinedError``), unless ``restoring`` (a rollback's own
        deletes of rows created since its restore point)."""
        t = self.store.table(table)
        if not restoring:
            self.quarantines.check(table, self._clock.wall())
        k = check_keys(keys)
        if now_ns is None:
            now_ns = self._clock.ns()
        hook = self._preimage_hooks.get(table)
        if hook is not None:
            old, old_versions, found = t.lookup(k)
            hook(table, k, old, old_versions, found, now_ns / 1e9)
        if self.scheduler is not None:
            self.scheduler.deleted(table, k)
        versions = t.delete(k, now_ns=now_ns)
        self._moved_rows(versions.shape[0])
        return versions

    def stored(self, table: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of every (key, value) the store holds of ``table``, None when it holds none:
        what a trainer restarted over this store resumes from (``TrainingService.bootstrap``)."""
        t = self.store.tables.get(table)
        if t is None or t.rows == 0:
            return None
        keys, values, *_ = t.all_rows()
        return keys.copy(), values.copy()

    # -- writes -----------------------------------------------------------------------------

    def write_rows(
        self,
        table: str,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        now: float,
        now_ns: int,
        hold: bool = False,
    ) -> np.ndarray:
        """Write a batch at ``now`` (seconds, the scheduler's clock) stamped ``now_ns``; returns
        the versions of the rows written now. Bad rows (unknown table, wrong dtype or shape,
        NaN/inf, beyond ``max_abs``) raise before anything is recorded, held or written.

        ``hold``: the scheduler may hold rows (not written yet, no version returned). A held
        row is in no write-ahead log until released, so a write someone is told is durable
        (the HTTP route answers after the log's fsync) must not be held: by default every
        row is written now, in its lane, and an earlier hold of its keys ends.

        A quarantined table (``quarantine``) refuses every write (``QuarantinedError``)
        until its wall time, before anything is recorded."""
        t = self.store.table(table)
        self.quarantines.check(table, self._clock.wall())
        hook = self._preimage_hooks.get(table)
        lanes: np.ndarray | int = HIGH_LANE
        k, v = keys, values  # unplanned and unrecorded: Table.write checks them in full
        if self.scheduler is not None or hook is not None:
            k, v = self._checked(t, keys, values)
            old, old_versions, found = t.lookup(k)  # the one lookup: pre-images and the plan
            if hook is not None:
                hook(table, k, old, old_versions, found, now)
            if self.scheduler is not None:
                plan = self.scheduler.plan(table, k, old, v, found, now, hold=hold)
                lanes = plan.lanes
                send = plan.send_now_mask
                if not send.all():
                    k, v, lanes = k[send], v[send], lanes[send]
        versions = t.write(k, v, now_ns=now_ns, lanes=lanes)
        self._moved_rows(versions.shape[0])
        return versions

    def restore(self, table: str, keys: np.ndarray, values: np.ndarray, now_ns: int) -> np.ndarray:
        """Write a rollback's restored rows now, in the high lane, past the scheduler: they
        must reach every replica. Rows the scheduler holds for these keys are dropped (released
        later, they would overwrite the restored values) and their drift starts from zero. No
        pre-image is recorded: the guard cuts its log back to the restore point instead."""
        t = self.store.table(table)
        k, v = keys, values
        if self.scheduler is not None:
            k, v = self._checked(t, keys, values)  # before the scheduler forgets anything
            self.scheduler.restored(table, k)
        versions = t.write(k, v, now_ns=now_ns, lanes=HIGH_LANE)
        self._moved_rows(versions.shape[0])
        return versions

    def release(self, now: float, now_ns: int) -> int:
        """Write the held rows whose staleness bound is reached; returns how many."""
        if self.scheduler is None:
            return 0
        return self._write_released(self.scheduler.due(now), now_ns)

    def flush(self, now_ns: int) -> int:
        """Write every held row (shutdown, or the end of a replay)."""
        if self.scheduler is None:
            return 0
        return self._write_released(self.scheduler.flush(), now_ns)

    def next_due(self) -> float | None:
        """When ``release`` should next be called (the scheduler's seconds; None: nothing
        held)."""
        return None if self.scheduler is None else self.scheduler.next_due()

    def quarantine(self, tables: Iterable[str], q: Quarantine) -> None:
        """Refuse every write and delete of ``tables`` (``write``, ``write_rows``,
        ``delete``) until ``q.until`` by this port's wall clock: a rolled-back model's
        trainers may still send poisoned steps. ``restore`` and a restore's deletes pass."""
        self.quarantines.set(list(tables), q)

    # -- hooks ------------------------------------------------------------------------------

    def record_preimages(self, tables: Iterable[str], hook: PreimageHook) -> None:
        """Hand ``hook`` the rows every later write to ``tables`` overwrites (one model's
        guard records them for a rollback)."""
        tables = list(tables)
        for name in tables:
            other = self._preimage_hooks.get(name)
            if other is not None and other != hook:
                raise ValueError(f"table {name!r}: its pre-images are recorded already")
        for name in tables:
            self._preimage_hooks[name] = hook

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Writes inside wake parked pulls once, at the end: a trainer's publish of many
        tables, or a restore, is then one answer per pull, not one per table."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._moved:
                self._moved = False
                self._wake()

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _checked(t: Table, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The checks ``Table.write`` makes, made before the hook or the scheduler sees a row
        (a refused batch must leave no pre-image, hold or drift behind)."""
        k = check_keys(keys)
        v = check_values(values, k.shape[0], t.dim)
        check_write_values(v, t.name, t.max_abs)
        return k, v

    def _write_released(self, released: list[ReleasedRows], now_ns: int) -> int:
        n = 0
        for r in released:
            self.store.table(r.table).write(r.keys, r.values, now_ns=now_ns, lanes=r.lanes)
            n += len(r)
        self._moved_rows(n)
        return n

    def _moved_rows(self, n: int) -> None:
        if not n:
            return
        if self._batch_depth:
            self._moved = True
        else:
            self._wake()

    def _wake(self) -> None:
        if self._on_written is not None:
            self._on_written()
