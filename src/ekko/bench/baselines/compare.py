"""Run every baseline on one trace and topology, alternating systems block by block.

Numbers on these machines drift between blocks (DESIGN.md §8), so each block runs every
system once (A B C, A B C, ...) and the summary takes medians over blocks. Bytes do not drift;
latencies do. Usage::

    python -m ekko.bench.baselines.compare TRACE.npz [--speed 5] [--blocks 1] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from ekko.bench.baselines.checkpoint import run_checkpoint
from ekko.bench.baselines.common import BaselineResult, DataCentre, default_topology
from ekko.bench.baselines.push import run_push
from ekko.bench.baselines.redis_log import redis_server, run_redis
from ekko.bench.trace import Trace, load_trace

SYSTEMS = ("checkpoint", "push-fp32", "redis-streams")


async def compare(
    trace: Trace,
    topology: list[DataCentre] | None = None,
    *,
    speed: float = 1.0,
    checkpoint_interval_s: float = 5.0,
    blocks: int = 1,
    systems: tuple[str, ...] = SYSTEMS,
) -> dict[str, Any]:
    """Every system in ``systems`` once per block; returns per-system block results and
    medians (``wan_bytes``, ``fp32_ratio``, ``latency_p50_ms``, ``latency_p99_ms``)."""
    topology = topology or default_topology()
    runs: dict[str, list[BaselineResult]] = {s: [] for s in systems}
    async with redis_server() as server:
        for _ in range(blocks):
            for system in systems:
                if system == "checkpoint":
                    r = await run_checkpoint(
                        trace, topology, interval_s=checkpoint_interval_s, speed=speed
                    )
                elif system == "push-fp32":
                    r = await run_push(trace, topology, speed=speed)
                elif system == "redis-streams":
                    r = await run_redis(trace, topology, speed=speed, redis_port=server.port)
                else:
                    raise ValueError(f"unknown system {system!r}; known: {SYSTEMS}")
                runs[system].append(r)
    summary = {
        s: {
            key: statistics.median(getattr(r, key) for r in rs)
            for key in ("wan_bytes", "fp32_ratio", "latency_p50_ms", "latency_p99_ms")
        }
        | {"digests_equal_source": all(r.digests_equal_source for r in rs)}
        for s, rs in runs.items()
    }
    return {
        "trace": {
            "rows": trace.rows,
            "fp32_bytes": trace.fp32_bytes,
            "table_fp32_bytes": trace.table_fp32_bytes,
            "duration_s": trace.duration_s,
            "tables": len(trace.specs),
        },
        "topology": [
            {
                "name": dc.name,
                "wan": None if dc.wan is None else vars(dc.wan),
                "replicas": dc.replicas,
            }
            for dc in topology
        ],
        "speed": speed,
        "checkpoint_interval_s": checkpoint_interval_s,
        "summary": summary,
        "blocks": {s: [r.to_dict() for r in rs] for s, rs in runs.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--interval", type=float, default=5.0, help="checkpoint interval, s")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    doc = asyncio.run(
        compare(
            load_trace(args.trace),
            speed=args.speed,
            checkpoint_interval_s=args.interval,
            blocks=args.blocks,
        )
    )
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text)
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
