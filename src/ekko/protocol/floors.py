"""Which tombstones every holder has: floors reported up the sync tree, and the source's purge.

Why: a tombstone must travel to every holder of its key before anyone forgets it, or a holder
that never saw the delete keeps the row for ever. Each puller reports, every few seconds, its
*floors* — per (table, shard, lane) the lowest settled knowledge of itself and of every holder
pulling from it — on its pull requests, as traffic counts travel (a DC leader reports for its
followers). The source purges, per shard, the tombstones at or below the highest version every
reported holder holds in every lane (``purge_point``), and tells its pullers its purge floors;
each holder purges its own tombstones at or below its upstream's floors.

Settled knowledge, not knowledge: a delete a holder reports must be on the source's disk, or
a source restarted without it would hold the row again while its holders had forgotten the
delete. A holder that stops reporting for ``horizon_s`` (gone, asleep, restored from an old
snapshot) no longer holds the purge back; when it pulls again below a purge floor, its
upstream sends it the shard's full key list and it drops what the upstream no longer has
(``ShardKeys``, ``Table.drop_absent``): it can never keep a deleted row.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ekko.protocol.messages import ShardKeys
from ekko.store import Store, Table
from ekko.store.spec import LANES

Scope = Callable[[Table], "np.ndarray | None"]
"""A session's shards of a table (bool [shards]; None: every shard)."""

NUM_LANES = len(LANES)
INT64_MAX = 2**63 - 1

Floors = dict[str, np.ndarray]


class BadFloorsError(ValueError):
    """A floors report that does not fit the responder's tables."""


def check_floors(store: Store, floors: Mapping[str, np.ndarray]) -> Floors:
    """``floors`` checked against ``store``'s tables: int64 [shards, lanes], each >= 0.
    A table the store does not hold is skipped (the puller may know a newer catalog)."""
    out: Floors = {}
    for name, f in floors.items():
        table = store.tables.get(name)
        if table is None:
            continue
        a = np.asarray(f)
        if a.shape != (table.num_shards, NUM_LANES) or a.dtype.kind not in "iu":
            raise BadFloorsError(
                f"floors of table {name!r} must be integer ({table.num_shards}, {NUM_LANES}),"
                f" got {a.dtype} {a.shape}"
            )
        if a.size and (int(a.min()) < 0 or int(a.max()) > INT64_MAX):
            raise BadFloorsError(f"floors of table {name!r} must be in [0, 2**63)")
        out[name] = a.astype(np.int64, copy=True)
    return out


def lowest(*reports: Mapping[str, np.ndarray] | None) -> Floors | None:
    """Per table, the element-wise least of the reports that name it (None: none do)."""
    out: Floors = {}
    for rep in reports:
        for name, f in (rep or {}).items():
            have = out.get(name)
            if have is None:
                out[name] = f.copy()
            elif have.shape == f.shape:
                np.minimum(have, f, out=have)
    return out or None


def purge_point(knowledge: np.ndarray, floors: np.ndarray | None) -> np.ndarray:
    """Per shard, the highest version every holder holds in every lane, at the source whose
    knowledge (int64 [shards, lanes], the highest version written in each lane) is given.
    A lane where every holder caught up does not bound it; a lane some holder lags in does,
    at what that holder has. ``floors`` None: no holder to wait for."""
    top = knowledge.max(axis=1)
    if floors is None:
        return top
    behind = floors < knowledge
    bound = np.where(behind, floors, top[:, None]).min(axis=1)
    return np.minimum(bound, top)


# Closed sessions kept apart at most: a link that flaps (or a peer reconnecting in a loop)
# closes one per connection, and each would be kept, floors of every table, for the horizon.
MAX_CLOSED_HOLDERS = 32


@dataclass
class _Holder:
    opened_at: float
    reported_at: float | None = None
    floors: Floors = field(default_factory=dict)
    closed_at: float | None = None


def _merged(a: _Holder, b: _Holder) -> _Holder:
    """Two closed holders as one that holds purges back at least as far as either, for as
    long as the later: per table the least of their floors, and a table only one of them
    reported is dropped (a holder without a table's floors holds it back entirely)."""
    floors = {
        name: np.minimum(f, b.floors[name])
        for name, f in a.floors.items()
        if name in b.floors and b.floors[name].shape == f.shape
    }
    closed = max(a.closed_at or 0.0, b.closed_at or 0.0)
    return _Holder(min(a.opened_at, b.opened_at), closed, floors, closed)


class HolderFloors:
    """The floors a responder's sessions reported, and the least of them over the holders
    that still count: a session that reported within ``horizon_s`` (or, before its first
    report, opened within it: it holds everything back, as zero), and a closed one for
    ``horizon_s`` after it closed (a restart or a reconnect within the horizon keeps its
    floors; after it, the holder reconciles). Sessions the caller does not ``open`` (a
    recovering source absorbing) are not holders."""

    def __init__(self, horizon_s: float = 600.0) -> None:
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.horizon_s = horizon_s
        self._holders: dict[Hashable, _Holder] = {}
        self._closed: list[_Holder] = []

    def open(self, session: Hashable, now: float) -> None:
        self._holders.setdefault(session, _Holder(now))

    def report(self, session: Hashable, floors: Floors, now: float) -> None:
        h = self._holders.setdefault(session, _Holder(now))
        h.floors.update(floors)
        h.reported_at = now

    def close(self, session: Hashable, now: float) -> None:
        h = self._holders.pop(session, None)
        if h is not None and h.reported_at is not None:
            h.closed_at = now
            self._closed.append(h)
            if len(self._closed) > MAX_CLOSED_HOLDERS:
                self._closed[:2] = [_merged(self._closed[0], self._closed[1])]

    def latest(self, session: Hashable) -> Floors | None:
        """The floors ``session`` last reported (None: none yet)."""
        h = self._holders.get(session)
        return None if h is None or h.reported_at is None else h.floors

    def _counts(self, h: _Holder, now: float) -> bool:
        if h.closed_at is not None:
            return now - h.closed_at < self.horizon_s
        since = h.reported_at if h.reported_at is not None else h.opened_at
        return now - since < self.horizon_s

    def lowest(self, name: str, num_shards: int, now: float) -> np.ndarray | None:
        """The least floors of table ``name`` over the holders that count (zero for one
        that has not reported it yet); None when no holder counts."""
        self._closed = [h for h in self._closed if self._counts(h, now)]
        out: np.ndarray | None = None
        for h in [*self._holders.values(), *self._closed]:
            if not self._counts(h, now):
                continue
            f = h.floors.get(name)
            if f is None or f.shape[0] != num_shards:
                return np.zeros((num_shards, NUM_LANES), np.int64)
            out = f.copy() if out is None else np.minimum(out, f, out=out)
        return out

    def all_lowest(self, store: Store, now: float) -> Floors | None:
        """``lowest`` of every table of ``store`` that has a holder: what a relay reports
        upstream for the holders below it."""
        out = {}
        for name, t in store.tables.items():
            f = self.lowest(name, t.num_shards, now)
            if f is not None:
                out[name] = f
        return out or None


class TombstonePurger:
    """At the source: purge every table's tombstones up to its purge point over the holders
    ``floors`` counts, each ``tick``. Returns the tombstones purged."""

    def __init__(self, store: Store, floors: Callable[[str, int, float], np.ndarray | None]):
        self.store = store
        self.floors = floors
        self.purged = 0

    def tick(self, now: float) -> int:
        n = 0
        for name, t in self.store.tables.items():
            point = purge_point(t.knowledge, self.floors(name, t.num_shards, now))
            if (point > t.purge_floor).any() or t.tombstones:
                n += t.purge(np.maximum(point, t.purge_floor))  # [shards]: the source's
        self.purged += n
        return n


class PurgeNotices:
    """What one session is owed of its responder's purges: the purge floors that rose since
    it last heard them, and the shards it must reconcile — those its knowledge (restated, or
    the rows sent to it) is below a purge floor in some lane, so it may have missed deletes
    whose tombstones are gone."""

    def __init__(self) -> None:
        self.seen: dict[str, np.ndarray] = {}  # table -> the purge bar last told
        self.dropped: dict[str, np.ndarray] = {}  # table -> its reconcile epochs last seen
        self.reconcile: dict[str, set[int]] = {}  # table -> shards owed a key list
        # table -> the knowledge the puller restated (zero where it restated none): the
        # floors of a session that reports none, a recovering source's (``absorb``).
        self.restated_knowledge: Floors = {}

    def restated(self, table: Table, shard: int, lane: int, knowledge: int) -> None:
        """The puller restated a cursor (a new session, or after a loss, which may have
        been an answer telling bars): tell them again, and owe a list if it is below."""
        self.seen.pop(table.name, None)
        known = self.restated_knowledge.get(table.name)
        if known is None or known.shape != table.purge_bar.shape:
            known = self.restated_knowledge[table.name] = np.zeros_like(table.purge_bar)
        known[shard, lane] = knowledge
        if knowledge < int(table.purge_bar[shard, lane]):
            self.reconcile.setdefault(table.name, set()).add(int(shard))
        self.dropped.setdefault(table.name, table.reconcile_epoch.copy())

    def owes(self, store: Store, scope: Scope | None = None) -> bool:
        """Whether bars or key lists are owed, of the shards ``scope`` gives (None: all)."""
        for name, shards in self.reconcile.items():
            t = store.tables.get(name)
            if t is not None and shards and _ready(t, _in_scope(shards, t, scope)).size:
                return True
        for name, t in store.tables.items():
            mask = scope(t) if scope is not None else None
            told = self.seen.get(name)
            if (_scoped_bar(t, mask) > (0 if told is None else told)).any():
                return True
            seen = self.dropped.get(name)
            if seen is None:  # a table new to the session: it holds none of its rows
                self.dropped[name] = t.reconcile_epoch.copy()
            elif (_moved(seen, t, mask)).size:
                return True
        return False

    def take(
        self,
        store: Store,
        floors: Mapping[str, np.ndarray] | None,
        budget: int,
        scope: Scope | None = None,
    ) -> tuple[Floors | None, list[ShardKeys] | None]:
        """The purge bars to tell and the key lists to send now: at least one list, then
        as many as ``budget`` bytes hold (the rest wait for the next answer). A shard whose
        bar rose above the session's last reported ``floors`` (or any whose bar rose, if
        it reported none) is owed a list: the holder, or one below it, may lack deletes
        whose tombstones are gone, and rows sent to it may still be on their way.

        ``scope`` (a session naming partitions: its shard mask per table) keeps both to the
        session's shards: bars of the others are sent as 0, their lists never (a store of
        several sources' partitions would send one source's recovery the other's lists)."""
        purge: Floors = {}
        for name, table in store.tables.items():
            mask = scope(table) if scope is not None else None
            seen = self.dropped.get(name)
            if seen is not None and not np.array_equal(seen, table.reconcile_epoch):
                # This holder dropped rows a reconcile found deleted: we may hold them too.
                moved = _moved(seen, table, mask)
                self.reconcile.setdefault(name, set()).update(moved.tolist())
                np.copyto(seen, table.reconcile_epoch)
            told = self.seen.get(name)
            bar = _scoped_bar(table, mask)
            rose = (bar > (0 if told is None else told)).any(axis=1)
            if not rose.any():
                continue
            self.seen[name] = bar.copy()
            purge[name] = bar.copy()
            f = (floors or {}).get(name)
            below = rose if f is None else rose & (f < bar).any(axis=1)
            if below.any():
                self.reconcile.setdefault(name, set()).update(np.flatnonzero(below).tolist())
        keys: list[ShardKeys] = []
        for name in list(self.reconcile):
            table = store.tables.get(name)
            if table is None:
                del self.reconcile[name]
                continue
            if scope is not None:
                self.reconcile[name] = set(_in_scope(self.reconcile[name], table, scope))
            shards = _ready(table, self.reconcile[name])
            held = table.shard_keys(shards) if shards.size else []
            for s, k in zip(shards.tolist(), held, strict=True):
                if keys and budget <= 0:
                    break
                keys.append(ShardKeys(name, s, table.purge_bar[s].tolist(), k))
                self.reconcile[name].discard(s)
                budget -= 8 * k.shape[0] + 32
        return purge or None, keys or None


def _scoped_bar(table: Table, mask: np.ndarray | None) -> np.ndarray:
    """``table``'s purge bar on the shards of ``mask`` (None: all), 0 elsewhere."""
    return table.purge_bar if mask is None else np.where(mask[:, None], table.purge_bar, 0)


def _moved(seen: np.ndarray, table: Table, mask: np.ndarray | None) -> np.ndarray:
    """The shards (of ``mask``) whose reconcile epoch moved since ``seen``."""
    moved = seen != table.reconcile_epoch
    return np.flatnonzero(moved if mask is None else moved & mask)


def _in_scope(shards: set[int], table: Table, scope: Scope | None) -> list[int]:
    mask = scope(table) if scope is not None else None
    return sorted(s for s in shards if mask is None or (0 <= s < mask.shape[0] and mask[s]))


def _nonnegative_int64(a: object, shape: tuple[int, ...]) -> np.ndarray | None:
    """``a`` as an int64 array if it is an integer array of ``shape`` whose values are all
    in [0, 2**63); None otherwise."""
    arr = np.asarray(a)
    if arr.shape != shape or arr.dtype.kind not in "iu":
        return None
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > INT64_MAX):
        return None
    return arr.astype(np.int64)


def _checked_keys(sk: ShardKeys, table: Table) -> ShardKeys | None:
    """``sk`` with an int64 bar and keys, if it fits ``table``; None otherwise."""
    if not 0 <= sk.shard < table.num_shards:
        return None
    bar = _nonnegative_int64(sk.bar, (table.purge_bar.shape[1],))
    keys = np.asarray(sk.keys)
    if bar is None or keys.ndim != 1 or keys.dtype.kind not in "iu":
        return None
    if keys.dtype.kind == "u" and keys.size and int(keys.max()) > INT64_MAX:
        return None
    return ShardKeys(sk.table, int(sk.shard), bar.tolist(), keys.astype(np.int64))


def _ready(table: Table, shards: Iterable[int]) -> np.ndarray:
    """The ``shards`` whose key lists may be sent: those this holder holds complete up to
    their purge bar in every lane (a list missing rows below the bar would make a holder
    drop rows it should keep). The others wait for this holder's own pulls."""
    s = np.asarray(sorted(shards), dtype=np.int64)
    return s[(table.knowledge[s] >= table.purge_bar[s]).all(axis=1)] if s.size else s


def holder_floors(store: Store) -> Floors:
    """A holder's own floors: per table, its settled knowledge (zero where nothing settled)."""
    out = {}
    for name, t in store.tables.items():
        s = store.settled_of(name)  # each shard by its own source's history
        out[name] = (
            np.minimum(s, t.knowledge) if s is not None and s.shape == t.knowledge.shape
            else np.zeros_like(t.knowledge)
        )  # fmt: skip
    return out


class Reconciles:
    """A holder's key lists waiting to be applied: a list is applied once this holder holds
    its shard complete up to the list's bar in every lane. Before that, a row cut before a
    delete may still be on its way (a slow lane, a late copy) and would bring the key back
    after the list was applied; after it, such a row is at or below the holder's knowledge
    and the purge floor, and is not applied (``Table.redundant``). Rows that arrive in the
    meantime are covered by the list: its upstream held every row up to the bar."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], ShardKeys] = {}
        self.shards = 0  # shards reconciled
        self.rows = 0  # live rows those reconciles dropped
        self.refused = 0  # bars and key lists that did not fit this holder's tables

    def __len__(self) -> int:
        return len(self._waiting)

    def clear(self) -> None:
        self._waiting.clear()

    def follow(
        self,
        store: Store,
        purge: Mapping[str, np.ndarray] | None,
        reconcile: list[ShardKeys] | None,
    ) -> tuple[Floors, list[ShardKeys]]:
        """Take the upstream's key lists and purge bars, and apply the lists now due; returns
        the bars followed and the lists applied. A table this holder does not know is
        skipped (the catalog will come); a bar or list that does not fit the table (shape,
        shard, lanes, negative or not int64, keys not 1-D integers) is refused and counted
        (``refused``), never applied: it would raise in the store or drop rows by a bar
        that means nothing."""
        for sk in reconcile or ():
            table = store.tables.get(sk.table)
            if table is None:
                continue
            checked = _checked_keys(sk, table)
            if checked is None:
                self.refused += 1
                continue
            self._waiting[(sk.table, int(sk.shard))] = checked
        followed: Floors = {}
        for name, bar in (purge or {}).items():
            table = store.tables.get(name)
            if table is None:
                continue
            b = _nonnegative_int64(bar, table.purge_bar.shape)
            if b is None:
                self.refused += 1
                continue
            table.purge(b)
            followed[name] = b
        return followed, self.apply_due(store)

    def apply_due(self, store: Store, *, every: bool = False) -> list[ShardKeys]:
        """Apply the lists whose shard this holder now holds up to their bar; ``every``: all
        of them, now (a recovering source once every replica was absorbed: no row can still
        be on its way, and its knowledge is not raised by what it absorbs)."""
        done = []
        for key, sk in list(self._waiting.items()):
            table = store.tables.get(sk.table)
            if table is None:
                del self._waiting[key]
                continue
            bar = np.asarray(sk.bar, np.int64)
            if every or (table.knowledge[sk.shard] >= bar).all():
                del self._waiting[key]
                self.rows += table.drop_absent(sk.shard, bar, sk.keys)
                self.shards += 1
                done.append(sk)
        return done
