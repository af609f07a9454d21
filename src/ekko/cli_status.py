"""``ekko status``: the command's options; the table is ``ekko.ops.status``'s.

Why a module of its own: ``cli.py`` is shared by every command and kept to their wiring."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from ekko.cli_options import read_cluster


def status(
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    watch: bool = typer.Option(
        False, help="Refresh every --interval: in place on a terminal, else a frame each time."
    ),
    interval: float = typer.Option(
        1.0, help="Seconds between the two reads a frame's bytes/s come from (and frames)."
    ),
    count: int = typer.Option(0, help="With --watch: stop after this many frames (0: never)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document per frame."),
) -> None:
    """One table of every node: role, DC, partitions, upstream, lag behind the source (in
    versions and seconds), rows, bytes/s in and out, guard states. A node that does not
    answer is a row saying why (without --watch the exit status is then 1). Signed with a
    key derived from the cluster secret; https with the cluster CA when the config turns
    TLS on."""
    from ekko.ops.status import run_status

    err = Console(stderr=True)
    if interval <= 0:
        raise typer.BadParameter(f"--interval must be > 0 seconds, got {interval}")
    cfg, secret = read_cluster(config, err)
    try:
        rows = run_status(
            cfg, config.resolve().parent, secret, watch=watch, interval=interval, count=count,
            json_out=json_out,
            console=Console() if sys.stdout.isatty() else Console(width=160),  # a log: whole lines
        )  # fmt: skip
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if not watch and any(r.error for r in rows):
        raise typer.Exit(1)  # for scripts: some node did not answer
