"""The guard at a partitioned cluster's sources: the coordinator's ``SourceGuard`` over every
partition source, and every other source's restore executor.

Why apart from ``ModelHost``: on one partition the source's guard is built beside its
in-node trainer; on ``P`` partitions no source trains (ranks do, outside the nodes), the
source of partition 0 coordinates, and each other source records its own pre-images and
restores on command. This module reads the topology from the config (who is a source, a
holder, a serving node) and gives the coordinator its I/O: posts through the node's
``GuardLink``, restore commands whose answers it awaits with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ekko.guard.coordinator import PartitionPlan, SourceResults
from ekko.guard.log import TransitionLog
from ekko.guard.quarantine_file import QuarantineFile
from ekko.guard.restore import SourceRestore
from ekko.guard.source_guard import SourceGuard
from ekko.node import config_partitions
from ekko.node.core import NodeCore
from ekko.serve.replica import dense_shapes
from ekko.store.clock import Clock
from ekko.train.dlrm import dense_table_name, embedding_table_name

if TYPE_CHECKING:
    from ekko.node.config import ClusterConfig, ModelConfig
    from ekko.node.guard_link import GuardLink

log = logging.getLogger(__name__)


def model_tables(m: ModelConfig) -> list[str]:
    """Every store table of model ``m``: its embedding tables, then its dense tensors' (the
    names the sharded ranks publish, known before any rank has created them)."""
    cfg = m.dlrm()
    ns = cfg.table_namespace
    return [embedding_table_name(i, ns) for i in range(cfg.num_sparse)] + [
        dense_table_name(k, ns) for k in dense_shapes(cfg)
    ]


def topology(config: ClusterConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple]]:
    """``(sources, holders)``: each partition source with the partitions it is the source
    of, and each holder (a syncing node that is no source) with the partitions it holds."""
    sources: dict[str, tuple[int, ...]] = {}
    for p in range(config.cluster.partitions):
        name = config_partitions.source_of(config, p).name
        sources[name] = (*sources.get(name, ()), p)
    holders = {
        n.name: config_partitions.held(config, n)
        for n in config.nodes
        if n.refresh == "sync" and n.name not in sources
    }
    return sources, holders


def inexact_holders(config: ClusterConfig, holders: dict[str, tuple]) -> dict[str, str]:
    """Each holder whose rows may come through a lossy row codec, and that codec: a lossy
    ``lan_codec`` reaches every holder; a lossy ``wan_codec`` every holder outside the DC
    of one of its partitions' sources (relayed rows keep the WAN's quantization)."""
    lan, wan = config.sync.lan_codec, config.sync.wan_codec
    out: dict[str, str] = {}
    for name, parts in holders.items():
        dc = config.node(name).dc
        far = any(config_partitions.source_of(config, p).dc != dc for p in parts)
        lossy = [c for c in (lan, wan if far else None) if c not in (None, "fp32")]
        if lossy:
            out[name] = "/".join(dict.fromkeys(lossy))
    return out


class GuardSources:
    """This source's part of the guard on a partitioned cluster, per model: the coordinator's
    ``SourceGuard`` (``guards``) at the source of partition 0, a ``SourceRestore``
    (``restorers``) at every other partition source.

    Args:
        core: this node (a source of a partitioned cluster).
        link: the node's ``GuardLink`` (posts, and the restore commands' answers).
        clock: the guard's clock.
        open_log: the node's guard transition log (opened on first use).
    """

    def __init__(
        self,
        core: NodeCore,
        link: GuardLink | None,
        clock: Clock,
        open_log: Callable[[], TransitionLog],
    ) -> None:
        cfg = core.config
        self.core = core
        self.link = link
        self.guards: dict[str, SourceGuard] = {}
        self.restorers: dict[str, SourceRestore] = {}
        sources, self.holders = topology(cfg)
        mine = sources[core.name]
        self.coordinator = cfg.source_of(0).name == core.name
        g = cfg.guard
        serving = [n.name for n in cfg.nodes if n.serve and n.refresh == "sync"]
        others = {n: p for n, p in sources.items() if n != core.name}
        kept = QuarantineFile(core.data_dir / "quarantine.json")  # a restart keeps refusing
        for m in cfg.models:
            tables = model_tables(m)
            if not self.coordinator:
                self.restorers[m.name] = SourceRestore(
                    m.name, core.name, core.port, tables, partitions=mine,
                    placement=cfg.placement(), window_s=g.preimage_window_s, clock=clock,
                    quarantine_file=kept,
                )  # fmt: skip
                self.restorers[m.name].resume()
                continue
            plan = PartitionPlan(
                cfg.placement(), mine, others, self.holders, self._send,
                self._restore_remote(m.name, others, g.restore_timeout_s),
                inexact=inexact_holders(cfg, self.holders),
            )  # fmt: skip

            def broadcast(path: str, body: dict, _m: str = m.name) -> None:
                for node in serving:
                    self._send(node, f"/v1/models/{_m}/{path}", body)

            self.guards[m.name] = SourceGuard(
                m.name, core.port, tables, None, serving, broadcast, open_log(),
                margin_s=g.rollback_margin_s, window_s=g.preimage_window_s,
                probation=g.probation, quarantine_s=g.quarantine_s,
                report_max_age_s=max(3.0, 5 * g.interval_s), clock=clock, node=core.name,
                plan=plan, quarantine_file=kept,
            )  # fmt: skip
            self.guards[m.name].local.resume()
            self.guards[m.name].resume(TransitionLog.read(core.data_dir / "guard.log"))

    def _send(self, target: str, path: str, body: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.send(target, path, body)

    def _restore_remote(
        self, model: str, others: dict[str, tuple[int, ...]], timeout_s: float
    ) -> Callable[[dict[str, Any], Callable[[SourceResults], None]], None]:
        path = f"/v1/models/{model}/guard/restore"

        def restore_remote(body: dict[str, Any], done: Callable[[SourceResults], None]) -> None:
            link = self.link
            if link is None:  # no link: nobody to ask (tests of the node without the guard)
                done({n: "the node has no guard link" for n in others})
                return

            async def ask_all() -> None:
                names = list(others)
                answers = await asyncio.gather(*(link.ask(n, path, body, timeout_s) for n in names))
                results = dict(zip(names, answers, strict=True))
                for n, a in results.items():
                    if isinstance(a, str):
                        log.error("guard %s: restore at %s failed: %s", model, n, a)
                done(results)

            link.supervisor.spawn("guard_restore", ask_all())

        return restore_remote

    def routes(self) -> list:
        """The coordinator's routes (health, rollback, report, restored) or a partition
        source's (health, checkpoint, restore)."""
        from ekko.guard.routes import partition_source_routes, source_guard_routes

        if self.coordinator:
            return source_guard_routes(self.guards)
        return partition_source_routes(self.restorers)
