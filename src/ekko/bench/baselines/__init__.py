"""Honest baselines for the bandwidth bench (DESIGN.md §8): periodic full checkpoint
broadcast, push of every fp32 update to every replica, and a Redis Streams log replayed by each
replica. All replay the same recorded :class:`~ekko.bench.trace.Trace` to the same topology
and report a :class:`BaselineResult`."""

from ekko.bench.baselines.checkpoint import run_checkpoint
from ekko.bench.baselines.common import (
    BaselineResult,
    DataCentre,
    content_digest,
    default_topology,
)
from ekko.bench.baselines.push import run_push
from ekko.bench.baselines.redis_log import RedisUnavailable, redis_server, run_redis

__all__ = [
    "BaselineResult",
    "DataCentre",
    "RedisUnavailable",
    "content_digest",
    "default_topology",
    "redis_server",
    "run_checkpoint",
    "run_push",
    "run_redis",
]
