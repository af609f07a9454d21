"""Start, stop, kill and restart node processes of a local cluster (``ekko up``, tests, benches).

Each node is a real ``ekko node`` subprocess; readiness is the node's ``EKKO-READY`` line on
stdout, awaited with a deadline. stderr goes to ``data/<node>.log`` beside the config.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ekko.node.access import ClusterAuth
from ekko.node.config import ClusterConfig, ConfigError, load_config
from ekko.node.http_client import ClusterHttp
from ekko.node.parent_watch import ENV as PARENT_ENV
from ekko.node.runner import READY_MARK

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A node did not come up (it exited, or was not ready in time); names the node and log."""


def open_cluster(config_path: Path, **kwargs: object) -> LocalCluster:
    """``LocalCluster(config_path, ...)`` for an operator: a missing or broken config or
    secret is a ``LaunchError`` of one line saying which file and what to do."""
    path = Path(config_path)
    if not path.exists():
        init = "ekko cluster init" + ("" if path == Path("cluster.toml") else f" --out {path}")
        raise LaunchError(
            f"no cluster config at {path}: write one with `{init}` (or pass --config FILE)"
        )
    try:
        return LocalCluster(path, **kwargs)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise LaunchError(f"config error: {exc}") from exc
    except OSError as exc:
        raise LaunchError(f"cannot read the cluster secret named in {path}: {exc}") from exc


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # where this run's lines start in the appended log
    ready: threading.Event = field(default_factory=threading.Event)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(READY_MARK):
                self.ready.set()
        # EOF: the node is exiting. Wait until it has, so whoever waits on ``ready`` sees
        # the exit code (a node that closed stdout but had not exited yet was taken as ready).
        self.proc.wait()
        self.ready.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_line(self) -> str:
        """What an operator is told when this node exits on its own."""
        return f"node {self.name} exited (code {self.proc.returncode}); its log: {self.log_path}"


class LocalCluster:
    """The processes of one cluster config on this machine."""

    def __init__(
        self,
        config_path: Path,
        *,
        writer_args: list[str] | None = None,
        node_configs: dict[str, Path] | None = None,
        node_env: dict[str, dict[str, str]] | None = None,
        fresh: bool = False,
    ) -> None:
        """``node_configs``: a node started with its own config file instead (the chaos
        harness's, whose peers' sync addresses are its proxies); ``node_env``: extra
        environment per node; ``fresh``: each node's first start sets its data dir aside
        (``ekko node --fresh``), a restart keeps what it wrote since."""
        self.config_path = Path(config_path).resolve()
        self.node_configs = {n: Path(p).resolve() for n, p in (node_configs or {}).items()}
        self.node_env = node_env or {}
        self.config: ClusterConfig = load_config(self.config_path)
        self.base_dir = self.config_path.parent
        self.log_dir = self.config.path(self.config.cluster.data_dir, self.base_dir)
        self.writer_args = writer_args or []
        self.procs: dict[str, NodeProcess] = {}
        self._fresh = {n.name for n in self.config.nodes} if fresh else set()
        secret_path = self.config.path(self.config.cluster.secret_file, self.base_dir)
        self.secret = secret_path.read_bytes().strip()
        self.auth = ClusterAuth(self.secret)  # signs with the least role a route needs
        self.http = ClusterHttp(self.config, self.base_dir)  # https with [cluster] tls

    def start(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        names = names or [n.name for n in self.config.nodes]
        for name in names:
            self._spawn(name)
        for name in names:
            self.wait_ready(name, timeout)

    def _spawn(self, name: str) -> NodeProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "ekko",
            "node",
            "--config",
            str(self.node_configs.get(name, self.config_path)),
            "--name",
            name,
        ]
        if name in self.writes_at():
            cmd += self.writer_args
        if name in self._fresh:
            cmd.append("--fresh")
            self._fresh.discard(name)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.node_env.get(name, {}))
        env[PARENT_ENV] = str(os.getpid())  # the node stops if this process is gone
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as err:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,
            )
        np_ = NodeProcess(name, proc, log_path, offset)
        threading.Thread(target=np_._read_stdout, daemon=True).start()
        self.procs[name] = np_
        return np_

    def writes_at(self) -> set[str]:
        """The nodes given the synthetic writer's options: every partition's source (each
        writes its own partitions' keys), none without options."""
        return {n.name for n in self.config.sources} if self.writer_args else set()

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        p = self.procs[name]
        if not p.ready.wait(timeout) or not p.alive:
            text = ""
            if p.log_path.exists():
                with open(p.log_path, "rb") as f:
                    f.seek(p.log_offset)
                    text = f.read().decode(errors="replace")
            refusal = _refusal(text) if p.proc.poll() is not None else None
            if refusal is not None:  # the node said why in one line: that is the message
                raise LaunchError(f"{refusal} (exit code {p.proc.poll()}; log {p.log_path})")
            tail = text[-2000:]
            raise LaunchError(
                f"node {name} not ready after {timeout}s (exit code {p.proc.poll()}); "
                f"log {p.log_path}:\n{tail}"
            )

    def kill(self, name: str) -> None:
        """SIGKILL: no snapshot, no goodbye."""
        p = self.procs[name]
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)

    def stop(self, name: str, timeout: float = 15.0) -> int:
        p = self.procs[name]
        if p.alive:
            p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("node %s ignored SIGTERM for %ss; killing", name, timeout)
                p.proc.kill()
                p.proc.wait(10)
        return p.proc.returncode

    def restart(self, name: str, timeout: float = 60.0) -> None:
        if self.procs[name].alive:
            self.stop(name)
        self._spawn(name)
        self.wait_ready(name, timeout)

    def stop_all(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.alive:
                p.proc.send_signal(signal.SIGTERM)
        return {name: self.stop(name) for name in list(self.procs)}

    # -- admin API helpers --------------------------------------------------------------

    def url(self, name: str, path: str) -> str:
        return self.http.url(name, path)

    def get(self, name: str, path: str, timeout: float = 10.0) -> dict:
        with self.http.client(timeout=timeout, auth=self.auth) as client:
            r = client.get(self.url(name, path))
        r.raise_for_status()
        return r.json()

    def post(self, name: str, path: str, body: object, timeout: float = 10.0) -> httpx.Response:
        with self.http.client(timeout=timeout, auth=self.auth) as client:
            return client.post(
                self.url(name, path),
                content=json.dumps(body),
                headers={"content-type": "application/json"},
            )

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _refusal(log_text: str) -> str | None:
    """The last ``ERROR`` line of a node that refused to start and said why (a port in use,
    data it cannot open), without its timestamp; None when it did not (a traceback)."""
    if "Traceback (most recent call last)" in log_text:
        return None
    errors = [line for line in log_text.splitlines() if " ERROR " in line]
    if not errors:
        return None
    _stamp, _, rest = errors[-1].partition(" ERROR ")
    return rest.split(": ", 1)[-1]
