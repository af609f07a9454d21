"""Which nodes hold which partitions, and who is each partition's source and leader
(issue 17): the partitioned cluster's topology rules, checked once when the config is read.

Apart from ``ekko.node.config`` because these rules are about one thing — every partition
has one origin and reaches every DC — and with ``[cluster] partitions = 1`` (the default)
none of them changes anything: every node holds partition 0, the source is the training DC's
first syncing node, the leader each DC's first.

The source of partition ``p`` is the first syncing node of the training DC that holds ``p``;
the leader of ``p`` in a DC is the first syncing node of that DC holding it (config order).
A replica may hold partitions of several sources: its store keeps one history (lineage,
settled knowledge) per source (``source_groups``, ``ekko.store.sources``), and it pulls each
source's partitions over links of their own (their candidates end at different sources).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ekko.node.config import ClusterConfig, NodeConfig


def held(config: ClusterConfig, node: NodeConfig) -> tuple[int, ...]:
    """The partitions ``node`` holds, ascending (unset: every partition)."""
    if node.partitions is None:
        return tuple(range(config.cluster.partitions))
    return tuple(sorted(node.partitions))


def holders(config: ClusterConfig, dc: str, partition: int) -> list[NodeConfig]:
    """The syncing nodes of ``dc`` holding ``partition``, in config order."""
    return [n for n in config.dc_nodes(dc) if partition in held(config, n)]


def source_of(config: ClusterConfig, partition: int) -> NodeConfig:
    """The origin of ``partition``'s versions: its first holder in the training DC."""
    return holders(config, config.training_dc.name, partition)[0]


def upstreams(config: ClusterConfig, node: NodeConfig, partition: int) -> list[NodeConfig]:
    """Where ``node`` pulls ``partition`` from, in failover order: the DC's holders of it
    ahead of ``node`` (the partition's leader first), then over the WAN the upstream DC's
    holders (a relay tree), then the partition's source."""
    source = source_of(config, partition)
    if node.name == source.name:
        return []
    peers = holders(config, node.dc, partition)
    ahead = peers[: peers.index(node)] if config.sync.use_dc_leader else []
    if node.dc == config.training_dc.name:
        return [*ahead[1:], source] if ahead else [source]
    up_dc = config.dc(node.dc).upstream_dc
    wan = [*holders(config, up_dc, partition), source] if up_dc else [source]
    return [*ahead, *wan]


def source_groups(config: ClusterConfig, node: NodeConfig) -> list[tuple[int, ...]]:
    """``node``'s partitions grouped by their source (one history each in its store), in
    order of each group's first partition."""
    groups: dict[str, list[int]] = {}
    for p in held(config, node):
        groups.setdefault(source_of(config, p).name, []).append(p)
    return [tuple(g) for g in groups.values()]


def check(config: ClusterConfig) -> None:
    """Raise ValueError naming the node or DC when the partitions cannot run: an id out of
    range or repeated, a DC that lacks a partition, a node that is the source of one of its
    partitions and not of another."""
    parts = config.cluster.partitions
    for n in config.nodes:
        if n.partitions is None:
            continue
        if not n.partitions:
            raise ValueError(f"nodes[{n.name}].partitions: empty; a node holds at least one")
        bad = [p for p in n.partitions if not 0 <= p < parts]
        if bad:
            raise ValueError(
                f"nodes[{n.name}].partitions: {bad[0]} is not a partition; "
                f"cluster.partitions = {parts} makes them 0..{parts - 1}"
            )
        if len(set(n.partitions)) != len(n.partitions):
            raise ValueError(f"nodes[{n.name}].partitions: repeated ids in {list(n.partitions)}")
        if n.refresh == "checkpoint" and parts > 1:
            raise ValueError(
                f"nodes[{n.name}].refresh: a checkpoint replica copies one source's store; "
                f"with cluster.partitions = {parts} there is one source per partition"
            )
    for d in config.dcs:
        if not config.dc_nodes(d.name):
            continue  # a DC of checkpoint replicas only (refused above when partitioned)
        missing = [p for p in range(parts) if not holders(config, d.name, p)]
        if missing:
            raise ValueError(
                f"dcs[{d.name}]: no syncing node holds partition {missing[0]} "
                f"(every DC holds every partition; missing {missing})"
            )
    sources = {p: source_of(config, p).name for p in range(parts)}
    origins = set(sources.values())
    if parts > 1 and config.guard.enabled and config.models:
        origin = next((n.name for n in config.nodes if n.serve and n.name in origins), None)
        if origin is not None:
            raise ValueError(
                f"nodes[{origin}].serve: a partition source does not serve a guarded model on "
                f"a cluster of {parts} partitions (its baseline would have no lagged rows: a "
                "source pulls nothing, and the guard's coordinator would wait for its reports "
                "for ever); serve from the holders, or turn the guard off"
            )
    for n in config.nodes:
        if n.refresh != "sync":
            continue
        mine = held(config, n)
        origin_of = [p for p in mine if sources[p] == n.name]
        if origin_of and len(origin_of) != len(mine):
            other = next(p for p in mine if p not in origin_of)
            raise ValueError(
                f"nodes[{n.name}].partitions: it is the source of partition {origin_of[0]} "
                f"(the training DC's first holder of it) and would pull partition {other} from "
                f"{sources[other]}; a source holds only partitions it is the source of"
            )


def describe(parts: Sequence[int], total: int) -> str:
    """``all`` for every partition, else the ids: what ``ekko status`` shows."""
    return "all" if len(parts) == total else ",".join(str(p) for p in parts)
