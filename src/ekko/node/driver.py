"""What the node's supervisor runs: a named background loop, and how extra ones come in.

Every background loop of a node (the upstream link, the checkpoint refresher, the guard
tick, the snapshotter, the release timer, an operator's synthetic writer) is a ``Driver``:
the runner starts each one under its ``Supervisor`` by name, so a failure is logged with its
traceback, restarted with backoff and shown in ``/ready`` and ``ekko_task_*`` metrics the
same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ekko.node.core import NodeCore


class Driver:
    """One supervised background loop of a node.

    Why a base class: the runner composes drivers it does not know (``run_node(...,
    drivers=...)``); it needs only a name to supervise them by, ``run`` to start again after
    a failure, ``status`` for ``/v1/status`` and ``stop`` to finish in order at shutdown.
    """

    name: str = "driver"

    async def run(self) -> None:
        """The loop; returns when done, raises to be restarted (a fresh ``run()``)."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """Keys this driver adds to the node's ``/v1/status`` (none by default)."""
        return {}

    async def stop(self) -> None:
        """Called at shutdown before the node's last snapshot (nothing by default); the
        supervisor then cancels ``run``."""


DriverFactory = Callable[["NodeCore"], Driver | None]
"""An extra driver for a node: ``factory(core)``, or None when it does not apply to this
node (say, a writer on a replica). A write through ``core.write`` wakes parked pulls."""
