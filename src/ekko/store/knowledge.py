"""How a holder's knowledge moves: ``knowledge[shard, lane]`` is the highest version of that
lane it holds complete (DESIGN.md §3). Knowledge only rises, and every move bumps the
shard's version, so a responder that skips unmoved shards sees it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ekko.store._validate import check_int64
from ekko.store.errors import BadRowsError


def merge_many(
    knowledge: np.ndarray,
    shard_version: np.ndarray,
    shards: np.ndarray,
    lane: int,
    values: np.ndarray,
) -> np.ndarray:
    """Raise ``knowledge[shards, lane]`` to ``values`` in one numpy pass. A shard listed twice
    takes the higher value. Returns the shards whose knowledge moved (each bumped once)."""
    num_shards = knowledge.shape[0]
    s = np.asarray(shards)
    if s.ndim != 1:
        raise BadRowsError(f"shards must be 1-D, got shape {s.shape}")
    s = check_int64(s, s.shape[0], "shards")
    k = check_int64(values, s.shape[0], "knowledge")
    if s.shape[0] and (int(s.min()) < 0 or int(s.max()) >= num_shards):
        raise BadRowsError(f"shards must be in [0, {num_shards}), got [{s.min()}, {s.max()}]")
    col = knowledge[:, lane]  # a view: updated in place
    up = k > col[s]
    if not up.any():
        return s[:0]
    s, k = s[up], k[up]
    if s.shape[0] > 1 and not (s[1:] > s[:-1]).all():  # not strictly increasing
        np.maximum.at(col, s, k)  # duplicates: the highest wins
        s = np.unique(s)
    else:
        col[s] = k
    shard_version[s] += 1
    return s


def after_origin_write(
    knowledge: np.ndarray,
    touched: np.ndarray,
    top: np.ndarray,
    row_shards: Callable[[], np.ndarray],
    lanes: np.ndarray,
    *,
    replay: bool,
) -> None:
    """The origin holds everything it wrote: in each lane it wrote to, up to ``top`` (the
    shard's counter after the write). A lane it did not write keeps its knowledge, so pulls
    carry no knowledge-only chunk for a lane with nothing new. A replay only raises
    knowledge, so replaying an older record again changes nothing. ``touched``: the shards
    written (bool); ``row_shards()``: each written row's shard, asked only when the rows span
    several lanes (a write to one lane, the usual case, needs no gather)."""
    one_lane = bool((lanes == lanes[0]).all())
    for lane in [int(lanes[0])] if one_lane else np.unique(lanes).tolist():
        s = touched if one_lane else np.unique(row_shards()[lanes == lane])
        new = top[s]
        if replay:
            new = np.maximum(knowledge[s, lane], new)
        knowledge[s, lane] = new


def complete_to(knowledge: np.ndarray, counter: np.ndarray, shard_version: np.ndarray) -> None:
    """The shard's counter raised to its highest knowledge, then every lane's knowledge to the
    counter: a source that recovered holds every version up to its counters, and issues no
    version a replica already claims to hold (its knowledge, absorbed, may run above every
    row it holds: an answer cut by its budget carried one lane's knowledge, not the rest)."""
    np.maximum(counter, knowledge.max(axis=1), out=counter)
    before = knowledge.copy()
    np.maximum(knowledge, counter[:, None], out=knowledge)
    shard_version[(knowledge != before).any(axis=1)] += 1
