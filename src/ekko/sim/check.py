"""The invariant after writes stop and links heal: every replica equals the source.

Equal means the same tables and lineage, the same keys, and per key the same version, write
time and lane, and whether it is deleted (a tombstone: so a deleted key is absent from every
replica as from the source), the same knowledge per (shard, lane), and values exact over
lossless links.
Over a lossy link a replica holds what the codec made of its upstream's row: within the
codec's documented bound (``codec.max_abs_error``: half a quantisation step of the row for
int8/int4, 2**-11 relative for fp16), summed over the links between it and the source. A
source that recovered from replicas holds rows as a replica held them (README, "Restart
without the data dir"), so each of its restarts adds the widest path's bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.codec import max_abs_error
from ekko.protocol.testing import rows_by_key
from ekko.sim.scenario import SOURCE
from ekko.store import Store, Table, shard_of

MAX_REPORTED = 12  # differences a failure report lists
# float16 codec parameters widen a row's step by at most 1/32 (``codec.rows``); the slack
# also covers rounding the widened row to float32 here.
_PARAM_SLACK = 1.0 + 1.0 / 16


@dataclass(frozen=True)
class Difference:
    """One way a replica differs from the source, worded for the failure report."""

    replica: str
    table: str
    what: str
    key: int | None = None  # the row it is about, if one
    version: int | None = None  # the source's version of that row (None: it has none)
    replica_version: int | None = None  # the replica's (None: it has none)
    knowledge: bool = False  # a knowledge value differs (no row named)

    def __str__(self) -> str:
        return f"{self.replica} {self.table}: {self.what}"


def overclaims(nodes: dict[str, Store], replicas: list[str]) -> list[Difference]:
    """Rows the source holds that a replica's knowledge claims (version at or below its
    knowledge of the row's shard and lane) but the replica lacks or holds older. Knowledge
    must never run ahead of the rows, at any moment (``Puller``): a replica would never pull
    them again. Replicas of another lineage (rebuilding) are not compared. A replica that
    has not yet met the source's current process is held to its settled knowledge (what
    the old process's disk backed): the rest it takes back when it does
    (``ekko.store.settled``)."""
    src = nodes[SOURCE]
    mark = src.mark()
    out: list[Difference] = []
    for name in replicas:
        rep = nodes[name]
        if rep.lineage != src.lineage:
            continue
        informed = mark is None or rep.settled.epoch == mark.epoch
        for tname, t in src.tables.items():
            r = rep.tables.get(tname)
            if r is None or r.spec != t.spec or t.rows + t.tombstones == 0:
                continue
            knowledge = r.knowledge if informed else rep.settled.settled.get(tname)
            if knowledge is None or knowledge.shape != r.knowledge.shape:
                continue  # nothing settled: it takes everything back
            keys, _, versions, _, lanes, _ = t.all_slots()
            claimed = versions <= knowledge[shard_of(keys, t.num_shards), lanes]
            if not claimed.any():
                continue
            k, v = keys[claimed], versions[claimed]
            have, _ = r.versions_of(k)  # a tombstone is a row here: a delete to hold
            found = have > 0
            for i in np.flatnonzero(have < v).tolist():
                out.append(
                    Difference(
                        name,
                        tname,
                        f"knowledge claims key {int(k[i])} v{int(v[i])}: replica has "
                        f"{_row(r, int(k[i]))}",
                        int(k[i]),
                        int(v[i]),
                        int(have[i]) if found[i] else None,
                    )
                )
    return out


def knowledge_converged(nodes: dict[str, Store], replicas: list[str]) -> bool:
    """Cheap test run while settling: same tables, row counts and knowledge everywhere."""
    src = nodes[SOURCE]
    for name in replicas:
        rep = nodes[name]
        if rep.lineage != src.lineage or set(rep.tables) != set(src.tables):
            return False
        for tname, t in src.tables.items():
            r = rep.tables[tname]
            if r.rows != t.rows:
                return False
            floor = np.minimum(t.purge_floor, r.purge_floor)
            if _kept(t, floor)[0].shape != _kept(r, floor)[0].shape:
                return False
            if not np.array_equal(r.knowledge, t.knowledge):
                return False
    return True


Path = tuple[str | None, ...]  # the link codecs from the source down to a replica


def differences(
    nodes: dict[str, Store], paths: dict[str, set[Path]], source_restarts: int
) -> list[Difference]:
    """Every replica (a key of ``paths``, each with every codec path its rows may have come
    down) against the source: every difference, row by row."""
    src = nodes[SOURCE]
    out: list[Difference] = []
    every_path: set[Path] = set().union(*paths.values())
    for name in paths:
        rep = nodes[name]
        if rep.lineage != src.lineage:
            out.append(Difference(name, "*", f"lineage {rep.lineage}, source {src.lineage}"))
        for tname in sorted(set(rep.tables) - set(src.tables)):
            out.append(Difference(name, tname, "table the source does not hold"))
        for tname, t in src.tables.items():
            r = rep.tables.get(tname)
            if r is None:
                out.append(Difference(name, tname, f"missing ({t.rows} rows at the source)"))
                continue
            out += _table_differences(name, t, r, paths[name], every_path, source_restarts)
    return out


def _table_differences(
    name: str, src: Table, rep: Table, paths: set[Path], every_path: set[Path], restarts: int
) -> list[Difference]:
    out: list[Difference] = []
    if rep.spec != src.spec:
        return [Difference(name, src.name, f"spec {rep.spec}, source {src.spec}")]
    floor = np.minimum(src.purge_floor, rep.purge_floor)
    sk, sv, sver, swt, sln, sdead = _kept(src, floor)
    rk, rv, rver, rwt, rln, rdead = _kept(rep, floor)
    missing = np.setdiff1d(sk, rk)
    extra = np.setdiff1d(rk, sk)
    sver_of = dict(zip(sk.tolist(), sver.tolist(), strict=True))
    rver_of = dict(zip(rk.tolist(), rver.tolist(), strict=True))
    for k in missing.tolist():
        what = f"key {k} missing: source has {_row(src, k)}"
        out.append(Difference(name, src.name, what, k, sver_of[k], None))
    for k in extra.tolist():
        what = f"key {k} not at the source: {_row(rep, k)}"
        out.append(Difference(name, src.name, what, k, None, rver_of[k]))
    keys, si, ri = np.intersect1d(sk, rk, assume_unique=True, return_indices=True)
    values = sv[si]
    # A source that recovered holds rows as some replica held them: any path, per restart.
    source_err = restarts * _widest(values, every_path, np.zeros(values.shape[0]))
    err = _widest(values, paths, source_err)
    bad = (
        (sver[si] != rver[ri])
        | (swt[si] != rwt[ri])
        | (sln[si] != rln[ri])
        | (sdead[si] != rdead[ri])
        | (np.abs(sv[si].astype(np.float64) - rv[ri]).max(axis=1, initial=0.0) > err)
    )
    for k, tol in zip(keys[bad].tolist(), err[bad].tolist(), strict=True):
        what = (
            f"key {k}: source {_row(src, k)}, replica {_row(rep, k)}"
            f" (tolerance {tol:.3g}, codec paths {sorted(paths, key=str)})"
        )
        out.append(Difference(name, src.name, what, k, sver_of[k], rver_of[k]))
    diff = np.argwhere(src.knowledge != rep.knowledge)
    for s, lane in diff.tolist():
        what = (
            f"knowledge[shard {s}, lane {lane}] {int(rep.knowledge[s, lane])},"
            f" source {int(src.knowledge[s, lane])}"
        )
        out.append(Difference(name, src.name, what, knowledge=True))
    return out


def _kept(table: Table, floor: np.ndarray) -> tuple[np.ndarray, ...]:
    """``rows_by_key`` without the tombstones at or below ``floor`` (per shard): a node may
    hold those or have purged them, as its purge floor says (both nodes' floors are above)."""
    cols = rows_by_key(table)
    keys, versions, dead = cols[0], cols[2], cols[5]
    gone = (dead != 0) & (versions <= floor[shard_of(keys, table.num_shards)])
    return tuple(c[~gone] for c in cols) if gone.any() else cols


def _widest(values: np.ndarray, paths: set[Path], start: np.ndarray) -> np.ndarray:
    """Per row: the largest ``_bound`` over ``paths``."""
    out = start.copy()
    for path in paths:
        out = np.maximum(out, _bound(values, path, start))
    return out


def _bound(values: np.ndarray, path: Path, start: np.ndarray) -> np.ndarray:
    """Per row: how far a copy of ``values`` already ``start`` away may be after passing the
    link codecs of ``path`` in turn, each encoding a row up to the error so far away (its
    range that much wider). Plain and fp32 links copy exactly."""
    err = start.copy()
    if values.shape[0] == 0:
        return err
    x = values.astype(np.float64)
    for codec in (c for c in path if c not in (None, "fp32")):
        wide = np.column_stack([x, x.min(axis=1) - err, x.max(axis=1) + err]).astype(np.float32)
        err = err + max_abs_error(wide, codec) * _PARAM_SLACK + 1e-30
    return err


def _row(table: Table, key: int) -> str:
    values, versions, found = table.lookup(np.array([key], np.int64))
    keys, _, all_versions, wtimes, lanes, dead = table.all_slots()
    if not found[0]:
        at = np.flatnonzero(keys == key)
        if at.size and dead[at[0]]:
            i = int(at[0])
            return (
                f"a tombstone v{int(all_versions[i])} lane {int(lanes[i])} wtime {int(wtimes[i])}"
            )
        return "nothing"
    i = int(np.flatnonzero(keys == key)[0])
    vals = ", ".join(f"{x:.6g}" for x in values[0][:4].tolist())
    more = ", ..." if values.shape[1] > 4 else ""
    return f"v{int(versions[0])} lane {int(lanes[i])} wtime {int(wtimes[i])} [{vals}{more}]"
