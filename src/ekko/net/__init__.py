"""asyncio transport for Ekko: framing, peer authentication, WAN emulation (DESIGN.md §1, §3).

Public names are re-exported here; modules: ``errors``, ``arrays``, ``framing`` and ``auth``
(sans-IO),
``wan`` (delay/bandwidth math), ``connection`` (one interface over any byte stream),
``transport`` (TCP ``connect``/``serve``, optionally over mutual TLS), ``tls`` (contexts and
file checks for a cluster CA's certificates), ``memory`` (in-memory pair for tests).
"""

from ekko.net.connection import ByteStream, Connection, ConnectionStats
from ekko.net.errors import (
    AuthError,
    BrokenConnection,
    ConnectionClosed,
    FrameError,
    LocalFrameError,
    RemoteFrameError,
    TransportError,
)
from ekko.net.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, WireSchema, encode_frame
from ekko.net.memory import memory_pair
from ekko.net.tls import TlsFiles
from ekko.net.transport import Listener, ListenerStats, connect, serve
from ekko.net.wan import WanLine, WanProfile

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "AuthError",
    "BrokenConnection",
    "ByteStream",
    "Connection",
    "ConnectionClosed",
    "ConnectionStats",
    "FrameDecoder",
    "FrameError",
    "Listener",
    "ListenerStats",
    "LocalFrameError",
    "RemoteFrameError",
    "TlsFiles",
    "TransportError",
    "WanLine",
    "WanProfile",
    "WireSchema",
    "connect",
    "encode_frame",
    "memory_pair",
    "serve",
]
