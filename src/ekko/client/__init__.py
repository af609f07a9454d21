"""Ekko's client SDK: write and read a cluster's rows from any Python process.

``Client`` / ``AsyncClient`` sign each request with the cluster secret or a role key
(``Credentials``) and send rows in the binary format of ``wire`` (numpy buffers; JSON on
request); ``RemoteSink`` is the ``Sink`` an ``EmbeddingPublisher`` publishes through. The
package needs nothing of the node: it sits just above ``net`` in the layers.
"""

from ekko.client.aio import AsyncClient
from ekko.client.calls import Rows
from ekko.client.credentials import Credentials
from ekko.client.errors import ClientError, ConfigError, SinkFailed
from ekko.client.remote_sink import RemoteSink, SinkStatistics
from ekko.client.sync import Client
from ekko.store.spec import TableSpec

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "Credentials",
    "RemoteSink",
    "Rows",
    "SinkFailed",
    "SinkStatistics",
    "TableSpec",
]
