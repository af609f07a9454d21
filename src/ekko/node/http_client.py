"""How any process reaches a cluster's HTTP ports: each node's URL, and httpx clients that
check a TLS cluster's nodes against its CA and by name.

Why one helper: nodes (guard messages, checkpoint copies), the launcher, the live view, the
demo and the CLI all call nodes; each builds its URLs and clients here, so turning TLS on in
the config changes every one of them the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ekko.node.config import ClusterConfig


class ClusterHttp:
    """URLs and httpx clients for the nodes of ``config`` (files relative to ``base_dir``).

    With ``[cluster] tls`` the scheme is https, clients trust the cluster CA only, and each
    request to a node's port checks the certificate is the one issued to that node (the TLS
    server name is the node's name, whatever host the URL gives).
    """

    def __init__(self, config: ClusterConfig, base_dir: Path) -> None:
        self.config = config
        files = config.tls_files(base_dir)
        self.tls = files is not None
        self.scheme = "https" if self.tls else "http"
        self.verify: Any = files.client_context() if files is not None else True
        self._names = {(n.host, n.admin_port): n.name for n in config.nodes}

    def url(self, name: str, path: str = "") -> str:
        """Node ``name``'s HTTP port, with ``path``."""
        n = self.config.node(name)
        return f"{self.scheme}://{n.host}:{n.admin_port}{path}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for the cluster's nodes (``kwargs`` as httpx's: auth, timeout...)."""
        hooks = {"request": [self._name_request]} if self.tls else {}
        return httpx.Client(verify=self.verify, event_hooks=hooks, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An async httpx client for the cluster's nodes."""

        async def name_request(request: httpx.Request) -> None:
            self._name_request(request)

        hooks = {"request": [name_request]} if self.tls else {}
        return httpx.AsyncClient(verify=self.verify, event_hooks=hooks, **kwargs)

    def _name_request(self, request: httpx.Request) -> None:
        name = self._names.get((request.url.host, request.url.port or 443))
        if name is not None:
            request.extensions["sni_hostname"] = name
