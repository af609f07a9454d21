"""Sync messages: the only things that cross a link between two Ekko nodes.

Messages are plain msgspec structs tagged by type; arrays travel as numpy arrays and are
serialised by ``ekko.net`` as dtype + shape + raw buffer (never pickle). The protocol version
is checked during the handshake (the node hands it, with :data:`Message`, to the transport);
a peer with another major version is refused.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

from ekko.codec.block import RowBlock
from ekko.store.settled import Mark
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE, TableSpec

PROTOCOL_VERSION = 5
"""2: a third lane, for new keys; 3: answers carry the source's Mark; 4: chunks carry
tombstones (deletes); 5: pulls report holders' floors, answers carry purge floors and
reconcile key lists (tombstones are purged)."""

DRAIN_ORDER = (NEW_LANE, HIGH_LANE, LOW_LANE)

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""An integer a store holds in an int64 (a shard, a lane, a version): a frame with one out
of that range is refused when it is decoded, not by an overflow in the responder."""
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Cursor(msgspec.Struct, frozen=True):
    """What a puller holds of one (table, shard, lane): every row of that lane with a version
    at or below ``knowledge``."""

    table: str
    shard: Int64
    lane: Int64
    knowledge: Int64


class CatalogRequest(msgspec.Struct, frozen=True, tag=True):
    req_id: int


class Catalog(msgspec.Struct, frozen=True, tag=True):
    req_id: int
    version: int
    tables: list[TableSpec]


class PullRequest(msgspec.Struct, frozen=True, tag=True):
    """Ask for rows newer than what the session already sent.

    ``cursors`` (re)states the puller's knowledge: on the first pull of a session, and after a
    gap. Without cursors the responder continues from what it already sent on this session.
    ``wait_ms`` > 0 parks the pull at the responder until something moves (long-poll).
    """

    req_id: int
    max_bytes: int
    wait_ms: int = 0
    cursors: list[Cursor] | None = None
    # Row codec for this session's answers (``ekko.codec.CODECS``): rows then travel as one
    # RowBlock per chunk (delta-coded keys, varint versions, zstd). None: plain arrays, the
    # cheapest to produce, for LAN links.
    codec: str | None = None
    # Predictions served per model since the puller's last report, its own and its pullers'
    # (``TrafficTally``): what the source's p_m is made of.
    traffic: dict[str, Count] | None = None
    # The puller holds nothing of the responder's lineage (it is rebuilding): forget what
    # this session was sent and answer from nothing.
    reset: bool = False
    # A restarting source recovering from this replica: every row above the cursors, also
    # rows above the replica's knowledge (a transfer in progress) — it takes all it can get.
    absorb: bool = False
    # Only the shards of these partitions, under the responder's placement (the cluster's,
    # ``ekko.store.placement``), from now on in this session; None: every shard (issue 17).
    partitions: list[Count] | None = None
    # table -> int64 [shards, lanes]: the lowest settled knowledge of the puller and of every
    # holder pulling from it (``ekko.protocol.floors``), sent every few seconds: what lets
    # the source purge the tombstones every holder has.
    floors: dict[str, np.ndarray] | None = None


class ShardKeys(msgspec.Struct, frozen=True, array_like=True):
    """Every key (live or a tombstone) the responder holds in one shard, and the shard's
    purge bar per lane (the responder holds each lane complete up to it): a holder that may
    have missed deletes whose tombstones were purged drops each row it holds at or below its
    lane's bar that is not listed (``Table.drop_absent``)."""

    table: str
    shard: Int64
    bar: list[Int64]  # per lane
    keys: np.ndarray  # int64 [n]


class ShardMeta(msgspec.Struct, frozen=True, array_like=True):
    """A block chunk's per-shard columns (shards, bases, knowledge - bases, counts) as
    msgpack integers: a few bytes per shard instead of 32 plus array headers."""

    shards: list[int]
    bases: list[int]
    spans: list[int]
    counts: list[int]


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    """Rows of one (table, lane) for several shards, grouped by shard in ``shards`` order.

    For shard ``shards[i]``: a puller holding every row of the lane with version <= ``bases[i]``
    holds, after applying the ``counts[i]`` rows of its group, every row with version <=
    ``knowledge[i]``. A puller whose knowledge is below ``bases[i]`` has a gap: it applies the
    rows (apply is idempotent, last-version-wins) but cannot advance its knowledge.

    A row may be a tombstone (``dead[i]`` 1: the key was deleted at that version; its values
    are zeros): it travels, is budgeted and applied like any row, by version order.
    """

    table: str
    lane: int
    shards: np.ndarray  # int64 [m]
    bases: np.ndarray  # int64 [m]
    knowledge: np.ndarray  # int64 [m]
    counts: np.ndarray  # int64 [m], rows per shard group
    keys: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, dim]
    versions: np.ndarray  # int64 [n]
    wtimes: np.ndarray  # int64 [n], origin wall clock (ns) of each write
    origin: int = 0
    # The rows encoded (the session asked for a codec): keys..wtimes are then empty and the
    # puller decodes the block, sorted by key, before applying.
    block: RowBlock | None = None
    meta: ShardMeta | None = None  # with a block: the shard columns, which are then empty
    # uint8 [n], 1 where the row is a tombstone; None: every row is live. With a block: None
    # (the block carries them).
    dead: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.block.n if self.block is not None else len(self.keys)

    @property
    def nbytes(self) -> int:
        arrays = self.keys.nbytes + self.values.nbytes + self.versions.nbytes + self.wtimes.nbytes
        if self.block is not None:
            arrays += self.block.nbytes
        if self.meta is not None:
            arrays += 8 * len(self.meta.shards)  # at most; msgpack ints are smaller
        if self.dead is not None:
            arrays += self.dead.nbytes
        return int(arrays)


class PullResponse(msgspec.Struct, frozen=True, tag=True):
    """Rows for one pull. ``tables`` carries the catalog when the session has not seen its
    current version yet, so a puller learns a new table before its first chunk."""

    req_id: int
    catalog_version: int
    chunks: list[Chunk]
    more: bool = False
    tables: list[TableSpec] | None = None
    # On a response with no rows: table -> int64 [shards, lanes], what the responder holds
    # and believes this session has too. A puller that is behind it lost a response the
    # responder counted as delivered (a dropped answer to a duplicated pull) and resyncs.
    holds: dict[str, np.ndarray] | None = None
    # The source history the responder's rows belong to (``Store.lineage``; 0: none yet).
    # A puller holding another lineage rebuilds from this one (``ekko.protocol.puller``).
    lineage: int = 0
    # The source process, its log position when this answer was cut and its log on disk
    # (``ekko.store.settled``): what lets a holder tell knowledge the disk backs.
    mark: Mark | None = None
    # table -> int64 [shards, lanes]: the responder's purge bars (``Table.purge_bar``), when
    # they rose since this session last heard them; the puller purges its own tombstones
    # at or below them.
    purge: dict[str, np.ndarray] | None = None
    # Shards this session must reconcile (its knowledge is below their purge floor).
    reconcile: list[ShardKeys] | None = None


class Error(msgspec.Struct, frozen=True, tag=True):
    """The responder refused a request (unknown table, bad cursor): named, never silent."""

    req_id: int
    code: str
    reason: str


Message = CatalogRequest | Catalog | PullRequest | PullResponse | Error

SHARED_PARTS: tuple[type[msgspec.Struct], ...] = (Chunk,)
"""Parts the responder hands unchanged to several sessions (one Chunk per store state and
range, to every session in step): a transport may encode each object once and reuse the bytes
(``ekko.net.framing.WireSchema.encode_once``)."""
