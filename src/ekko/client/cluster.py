"""Where a client finds a cluster's nodes: the addresses, roles, TLS CA and secret in the
cluster config (``cluster.toml``), read without the node package.

Why not ``ekko.node.config``: a training process imports the client, and the node's config
brings the node's parts with it (the guard's detector, the scheduler, pydantic models of
every section). The client reads only what it needs to reach a node: ``[cluster]``
``secret_file`` and ``tls.ca``, each DC's ``training`` flag, and each node's ``name``,
``dc``, ``host``, ``admin_port`` and ``refresh``. The source is the first syncing node of
the training DC, as the node's config says (``tests/client/test_cluster_file.py`` checks
the two agree).
"""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ekko.client.errors import ConfigError
from ekko.net.tls import TlsFiles


class _Dc(msgspec.Struct):
    name: str
    training: bool = False


class _Node(msgspec.Struct):
    name: str
    dc: str
    admin_port: int
    host: str = "127.0.0.1"
    refresh: str = "sync"


class _Tls(msgspec.Struct):
    ca: str


class _Cluster(msgspec.Struct):
    secret_file: str = "cluster.secret"
    tls: _Tls | None = None


class _File(msgspec.Struct):
    dcs: list[_Dc]
    nodes: list[_Node]
    cluster: _Cluster = msgspec.field(default_factory=_Cluster)


@dataclass(frozen=True)
class Endpoint:
    """One node's HTTP port: ``url`` (scheme, host, port) and the name its TLS certificate
    is issued to (checked instead of the URL's host)."""

    name: str
    url: str


@dataclass(frozen=True)
class ClusterFile:
    """What a client needs of a cluster config."""

    path: Path
    nodes: dict[str, Endpoint]
    roles: dict[str, str]  # source | replica | checkpoint
    source: str
    secret_file: Path
    ca: Path | None

    @classmethod
    def read(cls, path: Path | str) -> ClusterFile:
        """``path`` read; ``ConfigError`` naming the file and what is missing."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
            doc = msgspec.convert(raw, _File)
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such config file") from exc
        except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        training = [d.name for d in doc.dcs if d.training]
        syncing = [n for n in doc.nodes if n.refresh == "sync"]
        sources = [n for n in syncing if training and n.dc == training[0]]
        if not sources:
            raise ConfigError(f"{path}: no syncing node in a training DC (no source)")
        base = path.resolve().parent
        tls = doc.cluster.tls
        scheme = "https" if tls is not None else "http"
        nodes = {n.name: Endpoint(n.name, f"{scheme}://{n.host}:{n.admin_port}") for n in doc.nodes}
        source = sources[0].name
        return cls(
            path=path,
            nodes=nodes,
            roles={n.name: _role(n, source) for n in doc.nodes},
            source=source,
            secret_file=_under(base, doc.cluster.secret_file),
            ca=_under(base, tls.ca) if tls is not None else None,
        )

    def endpoint(self, name: str) -> Endpoint:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: unknown node {name!r} (known: {sorted(self.nodes)})"
            ) from None

    def replica(self) -> str:
        """The node lookups go to by default: the first replica in the config, else the
        source."""
        return next((n for n, r in self.roles.items() if r == "replica"), self.source)

    def verify(self) -> ssl.SSLContext | bool:
        """What the client checks a node's certificate against: the cluster CA (TLS on)."""
        return TlsFiles(self.ca).client_context() if self.ca is not None else True


def _role(node: _Node, source: str) -> str:
    if node.name == source:
        return "source"
    return "replica" if node.refresh == "sync" else "checkpoint"


def _under(base: Path, relative: str) -> Path:
    p = Path(relative)
    return p if p.is_absolute() else base / p
