"""The ``ekko`` command: cluster set-up, nodes, the demo and the benchmarks."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path

import typer

from ekko import cli_checkpoint, cli_status
from ekko.cli_options import console, floats
from ekko.cli_options import tables as tables_option
from ekko.cli_run import demo, node, rollback, up

app = typer.Typer(
    help="Ekko: fresh recommendation models in every data centre.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "[[models]]" is not markup to strip
)
cluster_app = typer.Typer(
    help="Local cluster configuration.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(cluster_app, name="cluster")
app.command("status")(cli_status.status)
for command in (node, up, rollback, demo):
    app.command()(command)
app.command("export")(cli_checkpoint.export)
app.command("load")(cli_checkpoint.load)

BENCHES = (
    "chaos",
    "apply",
    "churn",
    "latency",
    "ablation",
    "train",
    "serve",
    "freshness",
    "rollback",
    "bandwidth",
    "congestion",
    "client",
    "dynamic",
    "lifecycle",
    "sharded_train",
    "scale",
)


@cluster_app.command("init")
def cluster_init(
    dcs: int = typer.Option(3, help="Inference data centres."),
    replicas: int = typer.Option(2, help="Replicas per inference DC."),
    wan_delay_ms: str | None = typer.Option(
        None,
        help="One-way WAN delay in ms: one per DC (25,50,100) or one value for all "
        "(default 25,50,100, repeated past three DCs).",
    ),
    wan_mbit: float | None = typer.Option(None, help="WAN bandwidth cap per DC (Mbit/s)."),
    tables: str | None = typer.Option(None, help="NAME:DIM:SHARDS,... (default emb:32:16)."),
    serve: bool = typer.Option(
        False,
        help="Add a DLRM [[models]] entry ('ctr'): the source trains it, every replica serves it.",
    ),
    guard: bool = typer.Option(
        False, help="Turn on the guard ([guard] enabled): detection and rollback; needs --serve."
    ),
    out: Path = typer.Option(Path("cluster.toml"), help="Where to write the config."),
    tls: bool = typer.Option(
        False,
        help="Every port over TLS: a cluster CA and a key pair per node under tls/ "
        "(sync links mutual; README 'TLS').",
    ),
    partitions: int = typer.Option(
        1,
        help="Partitions (issue 17): one source each in the training DC, REPLICAS holders "
        "of each in every inference DC.",
    ),
    max_memory_mb: float | None = typer.Option(
        None, help="Every node's memory budget for its rows (MB); refused by name past it."
    ),
) -> None:
    """Write a runnable local cluster: a training DC with the source, N inference DCs."""
    from pydantic import ValidationError

    from ekko.node.config import ClusterConfig
    from ekko.ops.cluster_init import (
        cluster_doc,
        describe,
        new_cluster_id,
        wan_delays,
        write_cluster,
    )
    from ekko.ops.deploy import write_deploy

    if guard and not serve:
        raise typer.BadParameter("--guard watches a model's quality: add --serve")
    try:
        delays, note = wan_delays(floats(wan_delay_ms, "--wan-delay-ms"), dcs)
        doc = cluster_doc(
            dcs=dcs,
            replicas=replicas,
            wan_delay_ms=delays,
            wan_mbit=wan_mbit,
            tables=tables_option(tables),
            serve=serve,
            models=[{"name": "ctr"}] if serve else None,
            tls=tls,
            cluster_id=new_cluster_id(),
            partitions=partitions,
            max_memory_mb=max_memory_mb,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if guard:
        doc["guard"] = {"enabled": True}
    try:  # the nodes' own check, before a file is written (a config no node could load)
        config = ClusterConfig.model_validate(doc)
    except ValidationError as exc:
        raise typer.BadParameter(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors()
            )
        ) from exc
    path = write_cluster(doc, out)
    write_deploy(config, path.parent)
    files = "its secret file" + (", a cluster CA and node certificates in tls/" if tls else "")
    files += ", a Prometheus scrape config and a Grafana dashboard in deploy/"
    console.print(f"wrote {path} ({len(doc['nodes'])} nodes) and {files}")
    for line in describe(doc, out, note):
        console.print(line, markup=False, highlight=False)


@cluster_app.command("keys")
def cluster_keys(
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    out: Path = typer.Option(Path("keys"), help="Directory for <role>.key files (0600)."),
    roles: str = typer.Option("reader,writer,operator", help="Comma-separated roles."),
) -> None:
    """Write one key per role, derived from the cluster secret, to hand out apart from it
    (a writer's key cannot sign as operator). Use one with ``ekko sign --key FILE``."""
    import os

    from ekko.net.signed_requests import role_key

    secret = _secret(config)
    out.mkdir(parents=True, exist_ok=True)
    for role in (r.strip() for r in roles.split(",") if r.strip()):
        try:
            key = role_key(secret, role)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        path = out / f"{role}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        console.print(f"wrote {path}")


def _secret(config: Path) -> bytes:
    from ekko.node.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        return cfg.path(cfg.cluster.secret_file, config.resolve().parent).read_bytes().strip()
    except (ConfigError, OSError) as exc:
        console.print(f"[red]cannot read the cluster config or its secret:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def sign(
    method: str = typer.Argument(..., help="HTTP method, e.g. GET."),
    url: str = typer.Argument(
        ..., help="The full URL as sent, e.g. http://HOST:PORT/v1/status (it names the node)."
    ),
    role: str | None = typer.Option(None, help="Role to sign as (default: least needed)."),
    data: Path | None = typer.Option(None, help="File holding the exact body to send."),
    key: Path | None = typer.Option(None, help="A role key file (ekko cluster keys)."),
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (its secret)."),
) -> None:
    """Print one request's credential header, for curl: ``curl -H "$(ekko sign GET
    http://HOST:PORT/v1/status)" http://HOST:PORT/v1/status``. Each header is good once, for
    60 s, at that node only."""
    import httpx

    from ekko.net.signed_requests import host_of, role_headers, role_key, target_of
    from ekko.node.access import AccessPolicy, least_role

    try:
        u = httpx.URL(url)
        if not u.host:
            raise ValueError("no host")
    except (httpx.InvalidURL, ValueError) as exc:
        console.print(f"[red]give the full URL (http://HOST:PORT/path), got {url!r}:[/red] {exc}")
        raise typer.Exit(2) from exc
    path = target_of(u)  # decoded, as the node checks it: dense%2Fx signs as dense/x
    body = data.read_bytes() if data is not None else b""
    # As if serving were closed: a header is harmless where a route is open.
    role = role or least_role(method.upper(), path, AccessPolicy(serve_open=False))
    if role is None:
        console.print(f"{method} {path} is open: no credential needed")
        raise typer.Exit(0)
    try:
        k = bytes.fromhex(key.read_text().strip()) if key else role_key(_secret(config), role)
        headers = role_headers(k, role, method.upper(), path, body, host=host_of(url))
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot sign:[/red] {exc}")
        raise typer.Exit(2) from exc
    for name, value in headers.items():
        print(f"{name}: {value}")


@app.command()
def sim(
    seeds: int = typer.Option(100, help="How many seeds to run."),
    start: int = typer.Option(0, help="The first seed."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write seeds, failures, elapsed_s and coverage here."
    ),
    replay: int | None = typer.Option(None, help="Run this one seed again (with -v: each step)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Print the actions as they run."),
) -> None:
    """Deterministic simulation: each seed draws a cluster, faults and restarts, runs them on
    a simulated clock and network, heals, and checks every replica equals the source."""
    from ekko.sim import run_seed, run_seeds
    from ekko.sim.runner import Summary

    if min(start, replay or 0) < 0:
        raise typer.BadParameter("seeds are >= 0")
    if replay is not None:
        result = run_seed(replay, log=print if verbose else None)
        print(f"scenario: {result.scenario.compact()}")
        print(f"trace {result.trace_hash}, {result.sim_s:.1f} simulated s")
        if result.ok:
            print(f"seed {replay}: every replica equals the source")
            return
        print(result.report())
        raise typer.Exit(1)
    if seeds < 1:
        raise typer.BadParameter(f"--seeds must be >= 1, got {seeds}")
    progress = Summary()
    step = max(1, seeds // 20)

    def on_result(result) -> None:
        progress.add(result)
        if not result.ok:
            print(result.report(), file=sys.stderr, flush=True)  # unwrapped, for logs
        if verbose or progress.seeds % step == 0 or progress.seeds == seeds:
            console.print(
                f"{progress.seeds}/{seeds} seeds, {len(progress.failures)} failed",
                highlight=False,
            )

    summary = run_seeds(range(start, start + seeds), on_result=on_result)
    doc = summary.to_json()
    if json_out is not None:
        json_out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"{summary.seeds} seeds from {start}: {len(summary.failures)} failed "
        f"in {summary.elapsed_s:.1f} s"
    )
    if summary.failures:
        raise typer.Exit(1)


@app.command()
def chaos(
    config: Path | None = typer.Option(
        None, help="Cluster config to run (default: a source and 2 DCs of 2 replicas)."
    ),
    duration: float = typer.Option(60.0, help="Seconds of faults (the schedule's end)."),
    seed: int = typer.Option(0, help="Draws the schedule; the same seed replays it."),
    rounds: int | None = typer.Option(
        None, help="Stop after this many rounds of every fault kind instead of --duration."
    ),
    workdir: Path = typer.Option(Path("chaos-run"), help="Configs, data, logs, history.json."),
    timing: str = typer.Option(
        "default", help="The faults' pace: default, bench or short (CI's test)."
    ),
) -> None:
    """Run a cluster under writes and training while a nemesis injects faults; check it."""
    from ekko.ops.chaos import ChaosSettings, run_chaos
    from ekko.ops.chaos.harness import ChaosTerminated
    from ekko.ops.chaos.schedule import TIMINGS, ScheduleError

    if timing not in TIMINGS:
        raise typer.BadParameter(f"--timing: one of {', '.join(TIMINGS)}, got {timing!r}")
    try:
        settings = ChaosSettings(
            seed=seed,
            duration_s=None if rounds is not None else duration,
            rounds=rounds,
            timing=TIMINGS[timing],
            warmup_s=2.0 if timing == "short" else 3.0,
        )
    except ScheduleError as exc:
        raise typer.BadParameter(f"--{exc}") from exc
    try:
        history, verdict = run_chaos(settings, workdir, config, say=console.print)
    except ScheduleError as exc:  # drawn before anything starts
        raise typer.BadParameter(str(exc)) from exc
    except ChaosTerminated as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(128 + signal.SIGTERM) from None
    json.dump(verdict.summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not verdict.ok:
        console.print("schedule (id at kind target hold params):")
        for f in history.schedule:
            console.print(
                f"  {f['id']} {f['at']:.3f} {f['kind']} {f['target']} {f['hold']} {f['params']}",
                markup=False,
            )
        for failure in verdict.failures:
            console.print(f"[red]FAILED[/red] {failure}")
        replay = f"ekko chaos --seed {seed} --timing {timing} " + (
            f"--rounds {rounds}" if rounds else f"--duration {duration:g}"
        )
        if config is not None:
            replay += f" --config {config}"
        console.print(
            f"seed {seed}; schedule and history in {workdir / 'history.json'}; replay: {replay}"
        )
        raise typer.Exit(1)


@app.command()
def bench(
    name: str = typer.Argument(..., help=f"One of: {', '.join(BENCHES)}."),
    out: Path | None = typer.Option(None, help="JSON output (PNG beside it)."),
    quick: bool = typer.Option(False, help="A short run (< 60 s)."),
    rate: float | None = typer.Option(None, help="Row updates/s (latency, ablation, scale)."),
    wal: str | None = typer.Option(
        None, help="The source's write-ahead log: on, off or both (apply, latency)."
    ),
    tls: str | None = typer.Option(
        None, help="Every port over TLS: on, off or both, alternated blocks (latency)."
    ),
) -> None:
    """Run one benchmark; writes JSON and a PNG to bench/results/ (or --out)."""
    if name not in BENCHES:
        console.print(f"[red]unknown bench {name!r}[/red]; choose from {', '.join(BENCHES)}")
        raise typer.Exit(2)
    module = importlib.import_module(f"ekko.bench.{name}")
    kwargs: dict = {"quick": quick, "out": out}
    if rate is not None:
        kwargs["rate"] = rate
    if wal is not None:
        kwargs["wal"] = wal
    if tls is not None:
        kwargs["tls"] = tls
    result = module.run(**kwargs)
    json.dump(result.get("summary", result), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:  # pragma: no cover
    app()
