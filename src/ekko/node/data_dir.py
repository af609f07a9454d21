"""Which cluster a node's data directory belongs to.

``ekko cluster init`` gives every config it writes a fresh ``[cluster] id``. A node records
that id in its data directory the first time it starts there, and refuses to start on a
directory recorded for another id: a new config in an old directory once inherited the old
cluster's tables and rows without a word. ``--fresh`` sets the old directory aside (renamed,
never deleted) and starts clean.

A source also records the partitions it is the source of, and refuses to start as the source
of a partition its directory never held: moved there by a config edit, the partition began
empty under this source's history, and every replica of it dropped its rows to follow
(attack2's find: 500 of 500 rows gone without a word).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "cluster-id"
SOURCED = "source-partitions"  # the partitions this directory's rows are the source of


class DataDirMismatch(RuntimeError):
    """The data directory holds another cluster's data; the message says how to proceed."""


def claim_data_dir(
    data_dir: Path,
    cluster_id: str | None,
    *,
    fresh: bool = False,
    sourced: tuple[int, ...] | None = None,
) -> Path | None:
    """Make ``data_dir`` this cluster's: with ``fresh``, set what it holds aside first.
    ``sourced``: the partitions the node is the source of (None: it is no source).

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
        if sourced is not None:
            _claim_partitions(data_dir, sourced)
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
    if sourced is not None:
        _claim_partitions(data_dir, sourced)
    if recorded != cluster_id:
        data_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(cluster_id + "\n")
    return aside


def _claim_partitions(data_dir: Path, sourced: tuple[int, ...]) -> None:
    """Refuse partitions gained by a directory that holds rows (``DataDirMismatch``), then
    record ``sourced``. A directory from before the record is taken as it is."""
    record = data_dir / SOURCED
    held = _holds_data(data_dir)
    if held and record.exists():
        recorded = [int(p) for p in record.read_text().split()]
        gained = sorted(set(sourced) - set(recorded))
        if gained:
            raise DataDirMismatch(
                f"data dir {data_dir} holds this source's rows of partitions {recorded}; the "
                f"config makes it the source of partitions {gained} too, which it never held: "
                f"started so, {gained} would begin empty under this source's history and every "
                f"replica would drop its rows of them. Keep {gained} at the source that held "
                "them, or move their rows first"
            )
    text = " ".join(str(p) for p in sorted(sourced)) + "\n"
    if not record.exists() or record.read_text() != text:
        data_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(text)


def _holds_data(data_dir: Path) -> bool:
    return data_dir.is_dir() and any(p.name not in (MARKER, SOURCED) for p in data_dir.iterdir())
