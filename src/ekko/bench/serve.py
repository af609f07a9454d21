"""``ekko bench serve``: predict latency at one replica, with and without an update stream.

One real replica node (``serve = true``) in one inference DC, fed by the source. The load
generator runs here, in the bench process (the server is the node subprocess, so the two
share no GIL): ``concurrency`` keep-alive connections, each posting ``batch`` events per
request, one in flight at a time, bounded in requests and time. It is a minimal asyncio
HTTP/1.1 client: httpx costs more CPU per request than the server does on this machine. The
update stream is the source's synthetic writer at 0 (idle, the control), 10 k and 100 k
row-updates/s over the model's embedding keys, which the replica pulls and applies while it
serves.

The writer's rate is fixed when a node starts, so every phase runs on a freshly started
cluster: phases alternate idle, 10k, idle, 10k … (plus 100k phases), and the summary takes
medians over blocks and their ratios (DESIGN.md §8). The bar: p99 under 10 k updates/s is at
most 1.1x idle.

Contract with the node (``ekko.node``): a ``serve = true`` node mounts
``ekko.serve.serve_routes`` for every ``[[models]]`` entry, and the source bootstraps each
model's tables (``emb_{i}``, ``dense/...``) through its ``WritePort``. Until a phase's replica
answers predict with 200 the bench waits (bounded), then measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from ekko.bench.report import median, write_result
from ekko.node.config import ModelConfig
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

console = Console(stderr=True)

BAR_RATIO = 1.1
RATES = {"idle": 0.0, "10k": 10_000.0, "100k": 100_000.0}


@dataclass(frozen=True)
class ServeBenchSpec:
    """Inputs of one run; recorded in the JSON."""

    concurrency: int = 16
    batch: int = 32
    rows_per_table: int = 20_000
    embedding_dim: int = 16
    shards: int = 16
    blocks: int = 4
    blocks_100k: int = 2
    warm_s: float = 3.0
    measure_s: float = 10.0
    max_requests: int = 200_000
    ready_timeout_s: float = 120.0
    request_timeout_s: float = 10.0
    wan_delay_ms: float = 25.0
    seed: int = 20240607

    def model(self) -> ModelConfig:
        return ModelConfig(
            name="ctr", rows_per_table=self.rows_per_table, embedding_dim=self.embedding_dim
        )


def model_tables(model: ModelConfig, shards: int) -> list[tuple[str, int, int]]:
    """(name, dim, shards) of every store table of ``model``, as the publisher creates them
    (``PublisherConfig`` defaults: embeddings over ``shards`` shards, dense tensors 1 shard)."""
    from ekko.serve.replica import dense_shapes

    tables = [(f"emb_{i}", model.embedding_dim, shards) for i in range(model.num_sparse)]
    for key, shape in dense_shapes(model.dlrm()).items():
        tables.append((f"dense/{key}", int(np.prod(shape)), 1))
    return tables


def _writer_args(rate: float, model: ModelConfig) -> list[str]:
    args = [
        "--writer-rate", str(rate), "--writer-batch-ms", "10",
        "--writer-key-space", str(model.rows_per_table),
    ]  # fmt: skip
    # Noise written into dense/... tables would reload (and ruin) the dense weights on every
    # write; restrict the writer to the embedding tables where the node supports it.
    from ekko import cli

    if "writer_tables" in inspect.signature(cli.node).parameters:
        args += ["--writer-tables", ",".join(f"emb_{i}" for i in range(model.num_sparse))]
    return args


def _bodies(spec: ServeBenchSpec, model: ModelConfig, n: int = 64) -> list[bytes]:
    """Pre-encoded predict bodies: Zipf-ish ids over the served rows, so updated rows are hit."""
    rng = np.random.default_rng(spec.seed)
    out = []
    for _ in range(n):
        dense = rng.standard_normal((spec.batch, model.num_dense)).astype(np.float32)
        ranks = rng.zipf(1.2, (spec.batch, model.num_sparse)).astype(np.uint64)
        mixed = ranks * np.uint64(0x9E3779B97F4A7C15)  # wrapping multiply: scatter the ranks
        sparse = (mixed % np.uint64(model.rows_per_table)).astype(np.int64)
        events = [
            {"dense": d, "sparse": s} for d, s in zip(dense.tolist(), sparse.tolist(), strict=True)
        ]
        out.append(msgspec.json.encode({"events": events}))
    return out


class _Conn:
    """One keep-alive HTTP/1.1 connection sending pre-built POSTs.

    Why not httpx here: on this 2-core machine an httpx request costs the client a few ms of
    CPU, more than the server spends; the load generator then measures itself. Pre-built
    request bytes and a minimal response parser keep the client at tens of microseconds.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, body: bytes) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def _load(
    url: str,
    bodies: list[bytes],
    *,
    concurrency: int,
    seconds: float,
    max_requests: int,
    timeout: float,
) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` connections, each one request in flight at a time."""
    u = httpx.URL(url)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    end = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal issued
        conn = _Conn(u.host, u.port or 80, u.raw_path.decode())
        raws = [conn.request(b) for b in bodies]
        i = k
        try:
            while time.perf_counter() < end and issued < max_requests:
                issued += 1
                raw = raws[i % len(raws)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.post(raw), timeout)
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                    key = type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    await conn.close()
                    continue
                dt = time.perf_counter() - t0
                if status == 200:
                    latencies.append(dt)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "mean_ms": float(lat.mean()) if lat.size else float("nan"),
    }


def _wait_serving(
    cluster: LocalCluster, node: str, path: str, body: bytes, timeout: float
) -> float:
    """Seconds until the replica answers predict with 200 (it 503s while syncing)."""
    # Benches pace wall-clock phases on purpose: the cluster syncs while we poll.
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            r = httpx.post(
                cluster.url(node, path),
                content=body,
                timeout=5.0,
                headers={"content-type": "application/json"},
                auth=cluster.auth,
            )
            if r.status_code == 200:
                return time.monotonic() - start
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"replica {node} not serving after {timeout}s: {last}")


def _applied_rows(cluster: LocalCluster, node: str) -> int:
    links = cluster.get(node, "/v1/status").get("links", {})
    return int(sum(v.get("rows", 0) for v in links.values()))


def run_phase(spec: ServeBenchSpec, phase: str, bodies: list[bytes]) -> dict[str, Any]:
    """Start a cluster with the phase's update rate, wait for serving, warm up, measure."""
    model = spec.model()
    rate = RATES[phase]
    with tempfile.TemporaryDirectory(prefix="ekko-bench-serve-") as tmp:
        doc = cluster_doc(
            dcs=1, replicas=1, serve=True, wan_delay_ms=[spec.wan_delay_ms],
            tables=model_tables(model, spec.shards), sync={"snapshot_interval_s": 0},
        )  # fmt: skip
        doc["models"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in model.model_dump().items()}
        ]
        path = write_cluster(doc, Path(tmp) / "cluster.toml")
        cluster = LocalCluster(path, writer_args=_writer_args(rate, model))
        replica = "dc1-r0"
        predict = f"/v1/models/{model.name}/predict"
        try:
            cluster.start(timeout=spec.ready_timeout_s)
            sync_s = _wait_serving(cluster, replica, predict, bodies[0], spec.ready_timeout_s)
            url = cluster.url(replica, predict)
            load = dict(concurrency=spec.concurrency, max_requests=spec.max_requests,
                        timeout=spec.request_timeout_s)  # fmt: skip
            asyncio.run(_load(url, bodies, seconds=spec.warm_s, **load))
            rows0, t0 = _applied_rows(cluster, replica), time.monotonic()
            result = asyncio.run(_load(url, bodies, seconds=spec.measure_s, **load))
            applied = (_applied_rows(cluster, replica) - rows0) / (time.monotonic() - t0)
        finally:
            cluster.stop_all()
    return result | {"phase": phase, "rate": rate, "applied_rows_per_s": applied,
                     "sync_wait_s": sync_s}  # fmt: skip


def schedule(blocks: int, blocks_100k: int) -> list[str]:
    """idle, 10k, idle, 10k, … with a 100k phase after the first ``blocks_100k`` pairs."""
    phases = []
    for b in range(blocks):
        phases += ["idle", "10k"] + (["100k"] if b < blocks_100k else [])
    return phases


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over blocks per phase, and their ratios to idle."""

    def med(phase: str, key: str) -> float:
        return median([r[key] for r in runs if r["phase"] == phase])

    p99_idle = med("idle", "p99_ms")
    p99_10k = med("10k", "p99_ms")
    p99_100k = med("100k", "p99_ms")
    idle_p99s = [r["p99_ms"] for r in runs if r["phase"] == "idle"]
    return {
        "p99_ms_idle": p99_idle,
        "p99_ms_under_updates": p99_10k,
        "p99_ratio_under_updates": p99_10k / p99_idle,
        "p99_ms_under_100k": p99_100k,
        "p99_ratio_under_100k": p99_100k / p99_idle,
        "p50_ms_idle": med("idle", "p50_ms"),
        "p50_ms_under_updates": med("10k", "p50_ms"),
        "p50_ms_under_100k": med("100k", "p50_ms"),
        "rps_idle": med("idle", "rps"),
        "rps_under_updates": med("10k", "rps"),
        "rps_under_100k": med("100k", "rps"),
        "applied_rows_per_s_under_updates": med("10k", "applied_rows_per_s"),
        "applied_rows_per_s_under_100k": med("100k", "applied_rows_per_s"),
        "idle_p99_spread": (max(idle_p99s) / min(idle_p99s)) if idle_p99s else float("nan"),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "bar_p99_ratio_le_1_1": p99_10k / p99_idle <= BAR_RATIO,
    }


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    """Run the bench, write JSON + PNG (``out`` or bench/results/serve.json), return it."""
    spec = ServeBenchSpec()
    if quick:
        spec = ServeBenchSpec(rows_per_table=5_000, blocks=2, blocks_100k=1, warm_s=1.0,
                              measure_s=4.0)  # fmt: skip
    bodies = _bodies(spec, spec.model())
    runs = []
    phases = schedule(spec.blocks, spec.blocks_100k)
    for i, phase in enumerate(phases):
        console.print(f"[serve] phase {i + 1}/{len(phases)}: {phase}")
        r = run_phase(spec, phase, bodies)
        console.print(
            f"  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  {r['rps']:.0f} req/s  "
            f"applied {r['applied_rows_per_s']:.0f} rows/s  errors {r['errors']}"
        )
        runs.append(r)
    summary = summarize(runs)
    inputs = asdict(spec) | {"quick": quick, "schedule": phases}
    write_result("serve", inputs, summary, {"runs": runs}, out, lambda fig: _plot(fig, runs))
    return {"summary": summary, "details": {"runs": runs}}


def _plot(fig: Figure, runs: list[dict[str, Any]]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    phases = [p for p in RATES if any(r["phase"] == p for r in runs)]
    for x, phase in enumerate(phases):
        mine = [r for r in runs if r["phase"] == phase]
        for key, dx, color in (("p50_ms", -0.15, "tab:blue"), ("p99_ms", 0.15, "tab:red")):
            vals = [r[key] for r in mine]
            ax.bar(x + dx, median(vals), 0.3, color=color, alpha=0.5,
                   label=key.replace("_ms", "") if x == 0 else None)  # fmt: skip
            ax.scatter([x + dx] * len(vals), vals, color=color, s=12, zorder=3)
    idle = median([r["p99_ms"] for r in runs if r["phase"] == "idle"])
    ax.axhline(idle * BAR_RATIO, color="k", ls="--", lw=1, label="bar: 1.1 x idle p99")
    ax.set_xticks(range(len(phases)), [f"{p} updates/s" for p in phases])
    ax.set_ylabel("predict latency, ms (batch of events per request)")
    ax.set_title("Predict latency at one replica, with and without a concurrent update stream")
    ax.legend()
