"""``ekko node``, ``ekko up``, ``ekko rollback`` and ``ekko demo``: running a cluster.

Why apart from ``cli``: the command module had grown past what one reads at once; these are
the commands that start processes and speak to them. ``cli`` registers them on the app.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from ekko.cli_options import (
    Fresh,
    WriterBatchMs,
    WriterKeySpace,
    WriterOptions,
    WriterPrefill,
    WriterRate,
    WriterTables,
    console,
    read_cluster,
)


def node(
    config: Path = typer.Option(..., help="Cluster config (TOML)."),
    name: str = typer.Option(..., help="This node's name in the config."),
    writer_rate: WriterRate = None,
    writer_batch_ms: WriterBatchMs = 10.0,
    writer_key_space: WriterKeySpace = 1_000_000,
    writer_prefill: WriterPrefill = 0,
    writer_tables: WriterTables = "",
    rebuild: bool = typer.Option(
        False,
        help="Source only: set its snapshot and log aside and rebuild from the replicas "
        "(after a corrupt file, or to say its data dir is lost).",
    ),
    fresh: Fresh = False,
) -> None:
    """Run one node of a cluster in the foreground (its log on stderr)."""
    from ekko.node.config import ConfigError, load_config
    from ekko.node.main import run_node
    from ekko.ops.synthetic import SyntheticWriterConfig, synthetic_writer

    try:
        cfg = load_config(config, node=name)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc
    drivers = []
    if writer_rate is not None:
        writer = SyntheticWriterConfig(
            rate_rows_per_s=writer_rate,
            batch_interval_ms=writer_batch_ms,
            key_space=writer_key_space,
            prefill=writer_prefill,
            tables=tuple(t for t in writer_tables.split(",") if t),
        )
        drivers.append(synthetic_writer(writer))
    run_node(cfg, name, config.resolve().parent, drivers=drivers, rebuild=rebuild, fresh=fresh)


def up(
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    writer_rate: WriterRate = None,
    writer_batch_ms: WriterBatchMs = 10.0,
    writer_key_space: WriterKeySpace = 1_000_000,
    writer_prefill: WriterPrefill = 0,
    writer_tables: WriterTables = "",
    duration: float | None = typer.Option(None, help="Stop after this many seconds."),
    report_every: float = typer.Option(2.0, help="Seconds between status lines."),
    fresh: Fresh = False,
) -> None:
    """Run every node of the cluster as subprocesses; Ctrl-C stops them cleanly. Each
    node's log goes to DATA_DIR/<node>.log."""
    from ekko.ops.launcher import LaunchError, open_cluster
    from ekko.ops.live import print_summary, watch

    if duration is not None and not duration > 0:
        raise typer.BadParameter(f"--duration must be > 0 s, got {duration:g}")
    if not report_every > 0:
        raise typer.BadParameter(f"--report-every must be > 0 s, got {report_every:g}")
    writer = WriterOptions(
        writer_rate, writer_batch_ms, writer_key_space, writer_prefill, writer_tables
    )
    try:
        cluster = open_cluster(config, writer_args=writer.args(), fresh=fresh)
    except LaunchError as exc:
        console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from exc
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"node logs: {cluster.log_dir}/<node>.log", highlight=False)
    try:
        with console.status("starting nodes"):
            cluster.start()
        console.print(f"{len(cluster.procs)} nodes ready; Ctrl-C stops them")
        summary = watch(cluster, stop, duration=duration, every=report_every, console=console)
    except LaunchError as exc:
        console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from exc
    finally:
        codes = cluster.stop_all()  # whatever went wrong here, no node is left running
    print_summary(summary)
    bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
    if bad:
        console.print(f"[yellow]nodes exited uncleanly: {bad}[/yellow]")


def rollback(
    model: str = typer.Argument(..., help="The model to roll back."),
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    to: float | None = typer.Option(None, help="Unix time to restore (default: guard's choice)."),
    why: str = typer.Option("operator rollback", help="Recorded with the incident."),
) -> None:
    """Roll MODEL back at the source, signed as ``operator`` with a key derived from the
    cluster secret (the route refuses anything else)."""
    import httpx

    from ekko.node.access import ClusterAuth
    from ekko.node.http_client import ClusterHttp

    cfg, secret = read_cluster(config, console)
    models = [m.name for m in cfg.models]
    if model not in models:
        known = ", ".join(models) if models else "none (no [[models]] in it)"
        console.print(f"no model {model!r} in {config}; its models: {known}", markup=False)
        raise typer.Exit(2)
    src = cfg.source
    http = ClusterHttp(cfg, config.resolve().parent)
    doc: dict = {"why": why} | ({"to": to} if to is not None else {})
    try:
        with http.client(auth=ClusterAuth(secret), timeout=30.0) as client:
            r = client.post(http.url(src.name, f"/v1/models/{model}/rollback"), json=doc)
    except httpx.HTTPError as exc:
        console.print(f"[red]source {src.name} unreachable:[/red] {exc}")
        raise typer.Exit(1) from exc
    print(r.text)
    if r.status_code >= 400:
        raise typer.Exit(1)


def demo(
    duration: float = typer.Option(60.0, help="Seconds of online traffic."),
    rate: float = typer.Option(1024.0, help="Events/s predicted, labelled and trained."),
    checkpoint_every: float | None = typer.Option(
        None,
        help="Full-copy interval of the checkpoint replica, the no-Ekko comparison "
        "(default: a quarter of --duration, at least 10 s).",
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Write the result JSON here, PNG beside it (default: WORKDIR/demo.json).",
    ),
    workdir: Path = typer.Option(Path("data/demo"), help="Where the demo cluster lives."),
    poison_at: float | None = typer.Option(
        None, help="Train on flipped labels from this second of the run (the guard's test)."
    ),
    poison_for: float = typer.Option(20.0, help="Seconds of poisoned training input."),
    partitions: int = typer.Option(
        1,
        help="Partitions per DC (> 1: a source per partition, serving by scatter-gather, "
        "trained by the sharded trainer's ranks; no checkpoint replica).",
    ),
) -> None:
    """Online DLRM training served fresh in 3 DCs (WAN 25/50/100 ms) vs a checkpoint replica.
    The terminal gets the progress and the summary; the whole result goes to the JSON file."""
    from ekko.demo.setup import DemoSpec  # light: the options are checked before the rest loads

    spec = DemoSpec(
        duration_s=duration,
        rate=rate,
        checkpoint_every_s=checkpoint_every,
        poison_at_s=poison_at,
        poison_for_s=poison_for,
        partitions=partitions,
    )
    try:
        spec.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    from ekko.demo.run import run_demo
    from ekko.ops.launcher import LaunchError

    try:
        run_demo(spec, workdir, json_path=json_out, console=console)
    except (LaunchError, TimeoutError) as exc:
        console.print(f"demo failed: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from exc
