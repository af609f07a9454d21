"""``ekko node``'s process: logging, the numba warm-up, and a clear refusal to start on
data that cannot be opened (exit code 3, nothing changed), around one ``NodeRunner``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ekko.node.config import ClusterConfig
from ekko.node.driver import DriverFactory
from ekko.node.runner import NodeRunner
from ekko.store import SnapshotError, WalError

log = logging.getLogger(__name__)


def run_node(
    config: ClusterConfig,
    name: str,
    base_dir: Path,
    *,
    drivers: Sequence[DriverFactory] = (),
    rebuild: bool = False,
) -> None:
    """Run node ``name`` in the foreground, with ``drivers`` composed in (say, an operator's
    synthetic writer); exit code 3 when its data cannot be opened."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per guard message
    from ekko.store import warm

    warm()
    try:
        runner = NodeRunner(config, name, base_dir, drivers=drivers, rebuild=rebuild)
    except (SnapshotError, WalError) as exc:
        log.error(
            "%s refuses to start: %s. Nothing was changed; to rebuild this source from its "
            "replicas (setting these files aside), start it with --rebuild.",
            name,
            exc,
        )
        raise SystemExit(3) from exc
    asyncio.run(runner.run())
