"""Options more than one ``ekko`` command takes, defined once, their parsers, and the one
console the commands print to.

Why a module: ``ekko node`` and ``ekko up`` both run the synthetic writer at the source, and
their options drifted apart when each command spelled them out (``up`` had no
``--writer-prefill``); the type aliases here are the only definition both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

Fresh = Annotated[
    bool,
    typer.Option(
        help="Set each node's data dir aside (renamed, kept) and start clean, e.g. when it "
        "holds the data of another cluster config."
    ),
]
console = Console(stderr=True, soft_wrap=True)  # a message is one line, whatever the width

WriterRate = Annotated[
    float | None,
    typer.Option(help="Synthetic rows/s written at the source (default: no writer)."),
]
WriterBatchMs = Annotated[
    float, typer.Option(help="Synthetic writer: milliseconds between batches.")
]
WriterKeySpace = Annotated[
    int, typer.Option(help="Synthetic writer: keys drawn from 0..N-1 (Zipf).")
]
WriterPrefill = Annotated[
    int, typer.Option(help="Synthetic writer: rows 0..N-1 written once before the stream.")
]
WriterTables = Annotated[
    str, typer.Option(help="Synthetic writer: comma-separated tables to write (default all).")
]


@dataclass(frozen=True)
class WriterOptions:
    """The synthetic writer's options as one command line took them."""

    rate: float | None = None
    batch_ms: float = 10.0
    key_space: int = 1_000_000
    prefill: int = 0
    tables: str = ""

    def args(self) -> list[str]:
        """The same options for an ``ekko node`` subprocess (none without a rate)."""
        if self.rate is None:
            return []
        return [
            "--writer-rate", str(self.rate),
            "--writer-batch-ms", str(self.batch_ms),
            "--writer-key-space", str(self.key_space),
            "--writer-prefill", str(self.prefill),
            "--writer-tables", self.tables,
        ]  # fmt: skip


def floats(raw: str | None, option: str) -> list[float] | None:
    """``"25,50,100"`` → ``[25.0, 50.0, 100.0]``; a bad item is named with its option."""
    if raw is None:
        return None
    try:
        return [float(x) for x in raw.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            f"{option}: expected comma-separated numbers, got {raw!r}"
        ) from exc


def tables(raw: str | None) -> list[tuple[str, int, int]] | None:
    """``"emb:32:16,..."`` → ``[("emb", 32, 16), ...]``."""
    if raw is None:
        return None
    out = []
    for item in raw.split(","):
        try:
            name, dim, shards = item.split(":")
            out.append((name, int(dim), int(shards)))
        except ValueError as exc:
            raise typer.BadParameter(f"--tables {item!r}: expected NAME:DIM:SHARDS") from exc
    return out


def read_cluster(config: Path, err: Console) -> tuple[Any, bytes]:
    """The cluster config and its secret; exit status 2 naming what cannot be read."""
    from ekko.node.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        secret = cfg.path(cfg.cluster.secret_file, config.resolve().parent).read_bytes().strip()
    except (ConfigError, OSError) as exc:
        err.print(f"[red]cannot read the cluster config or its secret:[/red] {exc}")
        raise typer.Exit(2) from exc
    return cfg, secret
