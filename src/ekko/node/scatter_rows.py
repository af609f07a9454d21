"""Where a serving node of a partitioned cluster reads rows it predicts from.

Why one function: the online variant and the guard's baseline scatter alike (each partition
from this node's own store when it holds it, then from the partition's other holders in its
DC over signed lookup streams); they differ only in the store read locally, the variant the
holders read and the holders left out.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from ekko.client.credentials import Credentials
from ekko.node import config_partitions
from ekko.node.core import NodeCore
from ekko.node.http_client import ClusterHttp
from ekko.store import Store
from ekko.store.errors import UnknownTableError

if TYPE_CHECKING:
    from ekko.serve.scatter import PartitionedLookup


def scatter_rows(
    core: NodeCore,
    http: ClusterHttp,
    secret: bytes,
    *,
    local: Store | None = None,
    variant: str = "online",
    skip: Collection[str] = (),
) -> PartitionedLookup:
    """Each partition from ``local`` (the node's own store by default) when the node holds
    it (``LOCAL`` first), then from its holders in the node's DC in config order (its leader
    first), but for the nodes in ``skip``, reading ``variant`` there.

    Why the DC only: the issue's serving reads within a DC; a partition whose DC holders
    are all down is a 503 naming it, not a WAN read. A table's shard count is the node's own
    catalog's (every holder has every table's spec; it lacks only other partitions' rows).
    A partition with no holder to ask at all is a ValueError naming it."""
    from ekko.serve.errors import ModelNotReady
    from ekko.serve.scatter import PartitionedLookup
    from ekko.serve.scatter_http import LOCAL, HttpHolders, LocalFirst

    cfg = core.config
    mine = set(cfg.held(core.name))
    holders = {
        p: [LOCAL] * (p in mine)
        + [http.url(n.name) for n in config_partitions.holders(cfg, core.dc, p)
           if n.name != core.name and n.name not in skip]
        for p in range(cfg.cluster.partitions)
    }  # fmt: skip
    empty = [p for p, h in holders.items() if not h]
    if empty:
        raise ValueError(
            f"node {core.name}: no node in DC {core.dc} to read the {variant} rows of "
            f"partitions {empty} from (left out: {sorted(skip) or 'none'})"
        )
    names = {http.url(n.name): n.name for n in cfg.nodes}
    tls = http.verify if http.tls else None
    remote = HttpHolders(
        Credentials(secret=secret), tls=tls, server_name=names.get, variant=variant
    )

    def num_shards(table: str) -> int:
        try:
            return core.store.table(table).spec.num_shards
        except UnknownTableError:
            raise ModelNotReady(
                f"table {table!r} is not in node {core.name}'s catalog yet (still syncing)"
            ) from None

    store = core.store if local is None else local
    return PartitionedLookup(cfg.placement(), holders, LocalFirst(store, remote), num_shards)
