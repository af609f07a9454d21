"""What a new operator meets at the ``ekko`` command line: help, ``cluster init``, ``up``
without a config, ``rollback`` of an unknown model, a port already in use."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ekko.cli import app
from ekko.cli_options import WriterOptions
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LaunchError, LocalCluster

runner = CliRunner()


def _commands(group: Any, prefix: str = "") -> dict[str, Any]:
    """Every command under ``group`` by its full name ("cluster init")."""
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        out[f"{prefix}{name}"] = cmd
        if hasattr(cmd, "commands"):
            out |= _commands(cmd, f"{prefix}{name} ")
    return out


def test_every_command_and_option_has_help_and_it_is_not_mangled() -> None:
    commands = _commands(typer.main.get_command(app))
    assert {"node", "up", "demo", "cluster init", "rollback"} <= set(commands)
    missing = [
        f"{name} {p.opts[0] if p.opts else p.name}"
        for name, cmd in commands.items()
        for p in [*cmd.params, cmd]
        if not getattr(p, "help", None)
    ]
    assert missing == []
    res = runner.invoke(app, ["cluster", "init", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "[[models]]" in res.output  # once eaten as rich markup


def test_node_and_up_share_the_writer_options() -> None:
    commands = _commands(typer.main.get_command(app))

    def writer(cmd: Any) -> dict[str, tuple]:
        return {p.name: (p.default, p.help) for p in cmd.params if p.name.startswith("writer")}

    up, node = writer(commands["up"]), writer(commands["node"])
    assert set(up) == {"writer_rate", "writer_batch_ms", "writer_key_space",
                       "writer_prefill", "writer_tables"}  # fmt: skip
    assert up == node
    args = WriterOptions(rate=5.0, prefill=100, tables="a,b").args()
    assert args[args.index("--writer-prefill") + 1] == "100"
    assert args[args.index("--writer-tables") + 1] == "a,b"
    assert WriterOptions().args() == []  # no rate, no writer


def test_cluster_init_says_ports_logs_next_command_and_how_delays_were_read(
    tmp_path: Path,
) -> None:
    out = tmp_path / "c.toml"
    res = runner.invoke(
        app,
        ["cluster", "init", "--dcs", "2", "--wan-delay-ms", "30", "--serve", "--guard",
         "--out", str(out)],
        terminal_width=200,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = tomllib.loads(out.read_text())
    assert [d.get("wan_delay_ms") for d in doc["dcs"]] == [None, 30.0, 30.0]
    assert doc["guard"]["enabled"] is True
    for n in doc["nodes"]:
        assert f"{n['admin_port']}" in res.output
    assert "--wan-delay-ms 30 applied to all 2 DCs" in res.output
    assert "<node>.log" in res.output and f"ekko up --config {out}" in res.output

    res = runner.invoke(
        app, ["cluster", "init", "--dcs", "2", "--wan-delay-ms", "10,20,30", "--out", str(out)]
    )
    assert res.exit_code == 2 and "3 delays for 2 DCs" in res.output
    res = runner.invoke(app, ["cluster", "init", "--guard", "--out", str(out)])
    assert res.exit_code == 2 and "add --serve" in res.output
    res = runner.invoke(app, ["cluster", "init", "--wan-delay-ms", "-5", "--out", str(out)])
    assert res.exit_code == 2 and "finite and >= 0" in res.output


def test_up_without_a_config_names_the_file_and_the_command_that_writes_one(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nope.toml"
    res = runner.invoke(app, ["up", "--config", str(missing)], terminal_width=300)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"no cluster config at {missing}: write one with `ekko cluster init --out {missing}` "
        "(or pass --config FILE)"
    ]
    res = runner.invoke(app, ["up", "--duration", "-1", "--config", str(missing)])
    assert res.exit_code == 2 and "--duration must be > 0" in res.output


def test_rollback_of_an_unknown_model_names_it_and_the_models_there_are(
    tmp_path: Path,
) -> None:
    config = write_cluster(
        cluster_doc(dcs=1, replicas=1, serve=True, models=[{"name": "ctr"}]),
        tmp_path / "cluster.toml",
    )
    res = runner.invoke(app, ["rollback", "ctx", "--config", str(config)], terminal_width=300)
    assert res.exit_code == 2
    assert f"no model 'ctx' in {config}; its models: ctr" in res.output


def test_a_port_in_use_is_one_line_naming_the_node_and_port(tmp_path: Path) -> None:
    """``ekko node`` logs one line and exits 1; ``ekko up`` (the launcher) says that line."""
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 1)])
    config = write_cluster(doc, tmp_path / "cluster.toml")
    port = doc["nodes"][0]["admin_port"]
    cluster = LocalCluster(config)
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        with pytest.raises(LaunchError) as err:
            cluster.start(["source"], timeout=120)
    log = tmp_path / "data" / "source.log"
    line = (
        f"node source: cannot listen on its admin port {port} (127.0.0.1): Address already in "
        "use; another process holds it, or change admin_port in the config"
    )
    assert str(err.value) == f"{line} (exit code 1; log {log})"
    text = log.read_text()
    assert "Traceback" not in text
    errors = [x for x in text.splitlines() if " ERROR " in x]
    assert len(errors) == 1 and errors[0].endswith(line)


@pytest.mark.parametrize("bad", [["--duration", "0"], ["--rate", "-1"]])
def test_demo_refuses_absurd_options_before_starting(bad: list[str], tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", *bad, "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2
    assert bad[0] in res.output
    assert not (tmp_path / "w").exists()  # nothing started


def test_cluster_init_refuses_a_config_its_nodes_would_refuse_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """A table of rows of length 0: refused naming the field, exit 2, nothing written (``cluster
    init`` once wrote the config and its secret first, then died on the nodes' check with a
    traceback, leaving a config no node could load)."""
    out = tmp_path / "c" / "cluster.toml"
    res = runner.invoke(
        app, ["cluster", "init", "--tables", "emb:0:4", "--out", str(out)], terminal_width=300
    )
    assert res.exit_code == 2, res.output
    assert "tables.0.dim" in res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not (out.parent / "cluster.secret").exists()


def test_cluster_init_writes_a_partitioned_guarded_cluster_its_nodes_load(tmp_path: Path) -> None:
    """``--partitions 2 --serve --guard`` was refused (the guard's source half ran beside an
    in-node trainer); the guard now coordinates every partition's source, so it is written."""
    from ekko.node.config import load_config

    out = tmp_path / "c" / "cluster.toml"
    res = runner.invoke(
        app, ["cluster", "init", "--partitions", "2", "--serve", "--guard", "--out", str(out)],
        terminal_width=300,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = load_config(out)
    assert cfg.guard.enabled and cfg.cluster.partitions == 2 and cfg.models
