"""The guard on a serving node of a partitioned cluster, whose variants are both scatters.

The node reads the online rows from the partitions' holders and the baseline rows from their
lagged stores, so its own store cannot tell it when a rollback is complete: it holds no or
only some partitions. The coordinator says so instead (``holders_restored``, once every
holder reported its digests, each after re-anchoring its lagged store on the restored state:
the baseline this node reads is then the restored model, never one newer than it);
everything else — judging, redirecting, reporting, the post-rollback check — is
``ReplicaGuard``'s.
"""

from __future__ import annotations

import logging
from typing import Any

from ekko.guard.replica_guard import ReplicaGuard

log = logging.getLogger(__name__)


class ScatterReplicaGuard(ReplicaGuard):
    """A ``ReplicaGuard`` whose traffic returns to online on the coordinator's word.

    Why not wait for its own store to cover the watermark: a serving node holding partition
    0 only would wait forever for partition 1's versions. ``holders_restored`` of incident k
    is acted on once that incident's ``rolled_back`` is here (one that overtakes it is kept
    until then); one of an older incident is ignored and logged.

    Args: as ``ReplicaGuard``; ``lagged`` is the node's own lagged store (what its local
    redirect freezes: the baseline of the partitions it holds).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restored_early: int | None = None  # holders_restored ahead of its rolled_back
        self.stale = 0  # messages ignored as about an older incident

    def poll(self) -> None:
        """Nothing to check here: the coordinator's ``holders_restored`` ends the wait."""

    def rolled_back(
        self,
        healthy_wall: float,
        watermark: dict[str, list[list[int]]],
        *,
        automatic: bool = True,
        epoch: int | None = None,
    ) -> bool:
        """``ReplicaGuard.rolled_back`` of incident ``epoch``; False: stale (ignored)."""
        if epoch is not None and epoch < self.epoch:
            return self._stale("rolled_back", epoch)
        super().rolled_back(healthy_wall, watermark, automatic=automatic)
        if epoch is not None:
            self.epoch = epoch + 1
            assert self.restore_pending is not None
            self.restore_pending["epoch"] = epoch
        if self.restored_early is not None and self.restored_early == self.epoch - 1:
            self.holders_restored(self.restored_early, None)
        return True

    def holders_restored(self, epoch: int, at: float | None) -> bool:
        """Every holder holds incident ``epoch``'s rollback: traffic back to online (the
        post-rollback check then judges it). False: stale (ignored)."""
        pending = self.restore_pending
        if pending is None or pending.get("epoch", self.epoch - 1) != epoch:
            if epoch >= self.epoch:  # its rolled_back is still on the way
                self.restored_early = epoch
                log.info(
                    "guard %s on %s: holders_restored of incident %d before its rolled_back: "
                    "kept until it arrives", self.model, self.node, epoch,
                )  # fmt: skip
                return True
            return self._stale("holders_restored", epoch)
        self.restore_pending = None
        self.restored_early = None
        self.router.restore()
        self._judge_afresh()  # every holder re-anchored its baseline before it reported
        self._record(
            {
                "event": "restored",
                "at": self.clock.wall(),
                "model": self.model,
                "why": f"every holder holds the rollback of incident {epoch} (the coordinator "
                f"said so at {at if at is not None else 'an unknown time'}); dropped "
                f"{pending['dropped']} queued rows from this node's baseline",
            }
        )
        return True

    def _stale(self, what: str, epoch: int) -> bool:
        self.stale += 1
        log.info(
            "guard %s on %s: ignored a stale %s of incident %d (rollbacks taken: %d)",
            self.model, self.node, what, epoch, self.epoch,
        )  # fmt: skip
        return False

    def status(self) -> dict[str, Any]:
        return {**super().status(), "stale_messages": self.stale, "scattered": True}
