"""Sans-IO sync: messages in, messages and store writes out; no sockets, no clock."""

from ekko.protocol.latency import LatencyHistogram
from ekko.protocol.messages import (
    DRAIN_ORDER,
    HIGH_LANE,
    LANES,
    LOW_LANE,
    NEW_LANE,
    PROTOCOL_VERSION,
    Catalog,
    CatalogRequest,
    Chunk,
    Cursor,
    Error,
    Message,
    PullRequest,
    PullResponse,
    TableSpec,
)
from ekko.protocol.ready import Ready
from ekko.protocol.traffic import TrafficTally

__all__ = [
    "DRAIN_ORDER",
    "HIGH_LANE",
    "LANES",
    "LOW_LANE",
    "NEW_LANE",
    "PROTOCOL_VERSION",
    "Catalog",
    "CatalogRequest",
    "Chunk",
    "Cursor",
    "Error",
    "LatencyHistogram",
    "Message",
    "PullRequest",
    "PullResponse",
    "Ready",
    "TableSpec",
    "TrafficTally",
]
