"""Which cluster a node's data directory belongs to.

``ekko cluster init`` gives every config it writes a fresh ``[cluster] id``. A node records
that id in its data directory the first time it starts there, and refuses to start on a
directory recorded for another id: a new config in an old directory once inherited the old
cluster's tables and rows without a word. ``--fresh`` sets the old directory aside (renamed,
never deleted) and starts clean.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "cluster-id"


class DataDirMismatch(RuntimeError):
    """The data directory holds another cluster's data; the message says how to proceed."""


def claim_data_dir(data_dir: Path, cluster_id: str | None, *, fresh: bool = False) -> Path | None:
    """Make ``data_dir`` this cluster's: with ``fresh``, set what it holds aside first.

    Returns where the old directory went (``fresh`` and it held something), else None.
    Raises ``DataDirMismatch`` when it holds data recorded for another cluster id, or data
    from before ids while this config has one (a dir holding only another id's marker, a
    replica's that kept nothing, is simply claimed). A config without an id (written by hand or
    by an older ``cluster init``) claims nothing and is never refused."""
    aside = None
    if fresh and _holds_data(data_dir):
        aside = data_dir.with_name(f"{data_dir.name}.set-aside-{time.strftime('%Y%m%dT%H%M%S')}")
        data_dir.rename(aside)
        log.warning("--fresh: %s set aside as %s; starting clean", data_dir, aside)
    if cluster_id is None:
        return aside
    marker = data_dir / MARKER
    recorded = marker.read_text().strip() if marker.exists() else None
    if recorded != cluster_id and _holds_data(data_dir):  # only a marker: nothing to mix
        made_for = f"cluster id {recorded}" if recorded else "a cluster from before cluster ids"
        raise DataDirMismatch(
            f"data dir {data_dir} holds the data of another cluster ({made_for}; this config's "
            f"id is {cluster_id}), its tables and rows included; start with --fresh to set it "
            "aside and start clean (it is kept, renamed), or give this config another "
            "[cluster] data_dir"
        )
    if recorded != cluster_id:
        data_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(cluster_id + "\n")
    return aside


def _holds_data(data_dir: Path) -> bool:
    return data_dir.is_dir() and any(p.name != MARKER for p in data_dir.iterdir())
