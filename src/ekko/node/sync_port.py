"""This node's ends of sync links: the port pullers connect to, and dialing an upstream."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ekko.net.errors import AuthError, TransportError
from ekko.net.tls import TlsFiles
from ekko.net.transport import Connection, Listener, connect, serve
from ekko.net.wan import WanProfile
from ekko.node.config import ClusterConfig, NodeConfig
from ekko.node.sync_host import SYNC_SCHEMA

log = logging.getLogger(__name__)


class SyncPort:
    """Opens authenticated sync connections for one node, over the emulated WAN profile of
    each link when the config gives one.

    Why one object: the listener, the upstream link, its probe of preferred upstreams and a
    recovering source's pulls must all connect the same way (secret, schema, WAN profile,
    compression, timeout, TLS). With ``tls`` (this node's files) links are mutual TLS: the
    listener requires a certificate from the cluster CA, and a dialed peer's certificate
    must be issued to the node we dial.
    """

    def __init__(
        self, config: ClusterConfig, name: str, secret: bytes, tls: TlsFiles | None = None
    ) -> None:
        self.config = config
        self.name = name
        self.secret = secret
        self._server_tls = tls.server_context(client_certs=True) if tls else None
        self._client_tls = tls.client_context() if tls else None

    def wan(self, peer: str) -> WanProfile | None:
        """The emulated WAN profile of the link to ``peer`` (None: a LAN link)."""
        try:
            return self.config.wan(self.name, peer)
        except ValueError:
            return None

    async def listen(self, on_connection: Callable[[Connection], Awaitable[None]]) -> Listener:
        """Serve this node's sync port: ``on_connection`` for every authenticated peer."""
        node = self.config.node(self.name)
        return await serve(
            node.host,
            node.sync_port,
            node=self.name,
            secret=self.secret,
            schema=SYNC_SCHEMA,
            on_connection=on_connection,
            wan_for=self.wan,
            compress=self.config.sync.compress,
            tls=self._server_tls,
        )

    async def dial(self, peer: NodeConfig) -> Connection | None:
        """Connect to ``peer``'s sync port; None (logged) when it does not answer."""
        try:
            return await connect(
                peer.host,
                peer.sync_port,
                node=self.name,
                secret=self.secret,
                schema=SYNC_SCHEMA,
                wan=self.wan(peer.name),
                compress=self.config.sync.compress,
                timeout=self.config.sync.connect_timeout_s,
                tls=self._client_tls,
                server_name=peer.name,
            )
        except AuthError as exc:  # not a flaky link: the peer or its credentials are wrong
            log.warning("upstream %s refused: %s", peer.name, exc)
            return None
        except (TimeoutError, OSError, TransportError) as exc:
            log.info("upstream %s unreachable: %s", peer.name, exc)
            return None
