"""Sans-IO sync: messages in, messages and store writes out; no sockets, no clock."""

from ekko.protocol.messages import (
    DRAIN_ORDER,
    PROTOCOL_VERSION,
    Catalog,
    CatalogRequest,
    Chunk,
    Cursor,
    Error,
    Message,
    PullRequest,
    PullResponse,
)
from ekko.protocol.ready import Ready
from ekko.protocol.traffic import TrafficTally

__all__ = [
    "DRAIN_ORDER",
    "PROTOCOL_VERSION",
    "Catalog",
    "CatalogRequest",
    "Chunk",
    "Cursor",
    "Error",
    "Message",
    "PullRequest",
    "PullResponse",
    "Ready",
    "TrafficTally",
]
