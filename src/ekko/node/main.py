"""``ekko node``'s process: logging, the numba warm-up, and a clear refusal to start on
data that cannot be opened (exit code 3, nothing changed), a data dir of another cluster
(exit code 2) or a port it cannot listen on (exit code 1), around one ``NodeRunner``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ekko.node.config import ClusterConfig
from ekko.node.data_dir import DataDirMismatch
from ekko.node.driver import DriverFactory
from ekko.node.runner import NodeRunner, PortUnavailable
from ekko.store import SnapshotError, WalError
from ekko.store.holding import MemoryBudgetError

log = logging.getLogger(__name__)


def run_node(
    config: ClusterConfig,
    name: str,
    base_dir: Path,
    *,
    drivers: Sequence[DriverFactory] = (),
    rebuild: bool = False,
    fresh: bool = False,
) -> None:
    """Run node ``name`` in the foreground, with ``drivers`` composed in (say, an operator's
    synthetic writer); ``fresh``: set its data dir aside and start clean. Exit code 3 when
    its data cannot be opened, 2 when its data dir holds another cluster's data (or a
    table of its config does not fit its max_memory_mb), 1 when a
    port it must listen on is taken (each one line in the log, no traceback)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per guard message
    from ekko.store import warm

    warm()
    try:
        runner = NodeRunner(config, name, base_dir, drivers=drivers, rebuild=rebuild, fresh=fresh)
    except DataDirMismatch as exc:
        log.error("node %s refuses to start: %s", name, exc)
        raise SystemExit(2) from None
    except MemoryBudgetError as exc:  # a config table larger than its max_memory_mb
        log.error("node %s refuses to start: %s", name, exc)
        raise SystemExit(2) from None
    except (SnapshotError, WalError) as exc:
        log.error(
            "%s refuses to start: %s. Nothing was changed; to rebuild this source from its "
            "replicas (setting these files aside), start it with --rebuild.",
            name,
            exc,
        )
        raise SystemExit(3) from exc
    try:
        asyncio.run(runner.run())
    except PortUnavailable as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
