"""``ekko bench client``: the client SDK against a real source node, binary rows vs JSON.

One source node process (the launcher starts it as ``ekko up`` would, write-ahead log on);
this process is the training side: ``RemoteSink`` over a ``Client`` publishes rows of dim
32 (random keys of a 1 M key space; the table is sized for it in the config) in write
batches of 1 k and 16 k rows, and ``Client.lookup`` reads 1 k and 100 k keys. Each figure
is taken in blocks that alternate binary (``application/x-ekko-rows``) and JSON in one run,
on the same node, and the summary takes the median over blocks. Publish rows/s counts from
the first ``write`` to the return of ``flush``: every row acknowledged by the source, on
disk. The bar: binary publish at least 2 M rows/s over loopback and 20x the JSON route.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from ekko.bench.report import median, write_result
from ekko.client import Client, Credentials, RemoteSink, TableSpec
from ekko.client.calls import FORMATS
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

console = Console(stderr=True)

BAR_ROWS_PER_S = 2_000_000
BAR_RATIO = 20.0
TABLE = "emb"


@dataclass(frozen=True)
class ClientBenchSpec:
    """Inputs of one run; recorded in the JSON."""

    dim: int = 32
    shards: int = 16
    key_space: int = 1_000_000
    publish_batches: tuple[int, ...] = (1024, 16384)
    binary_rows: int = 2_000_000  # per publish block
    json_rows: int = 100_000
    lanes: int = 4
    lookup_batches: tuple[int, ...] = (1000, 100_000)
    lookups: int = 40  # per block and batch size (binary; JSON does a quarter, at least 3)
    blocks: int = 3

    @classmethod
    def quick(cls) -> ClientBenchSpec:
        return cls(binary_rows=400_000, json_rows=20_000, lookups=12, blocks=2)


def _batches(
    rng: np.random.Generator, spec: ClientBenchSpec, batch: int, count: int
) -> list[np.ndarray]:
    """``count`` batches of ``batch`` distinct keys: consecutive slices of one permutation
    of the key space (each batch's keys unique, as a publisher's are)."""
    perm = rng.permutation(spec.key_space).astype(np.int64)
    starts = (np.arange(count) * batch) % max(1, spec.key_space - batch)
    return [perm[s : s + batch] for s in starts]


def publish(client: Client, spec: ClientBenchSpec, batch: int, rows: int, seed: int) -> float:
    """Rows/s of ``rows`` published in writes of ``batch`` through a ``RemoteSink``."""
    rng = np.random.default_rng(seed)
    keys = _batches(rng, spec, batch, max(1, rows // batch))
    data = [(k, rng.standard_normal((k.shape[0], spec.dim)).astype(np.float32)) for k in keys]
    n = sum(k.shape[0] for k in keys)
    with RemoteSink(client, lanes=spec.lanes) as sink:
        t0 = time.perf_counter()
        for keys, values in data:
            sink.write(TABLE, keys, values)
        sink.flush()
        took = time.perf_counter() - t0
    return n / took


def lookups(
    client: Client, spec: ClientBenchSpec, batch: int, count: int, seed: int
) -> list[float]:
    """Milliseconds of ``count`` lookups of ``batch`` keys (most of them written)."""
    out = []
    for keys in _batches(np.random.default_rng(seed), spec, batch, count):
        t0 = time.perf_counter()
        rows = client.lookup(TABLE, keys)
        out.append((time.perf_counter() - t0) * 1000)
        assert rows.values.shape == (batch, spec.dim)
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run(quick: bool = False, out: Path | None = None, **_: Any) -> dict[str, Any]:
    spec = ClientBenchSpec.quick() if quick else ClientBenchSpec()
    publish_runs: dict[str, dict[int, list[float]]] = {f: {} for f in FORMATS}
    lookup_runs: dict[str, dict[int, list[dict[str, float]]]] = {f: {} for f in FORMATS}
    with tempfile.TemporaryDirectory(prefix="ekko-bench-client-") as tmp:
        doc = cluster_doc(dcs=1, replicas=1, tables=[(TABLE, spec.dim, spec.shards)])
        # sized for its keys, as an operator sizes a table it knows: the cost of growing one
        # is ekko bench apply's subject, not the client's
        doc["tables"][0]["initial_rows"] = spec.key_space
        doc["durability"] = {"recovery_timeout_s": 0.5}  # no replica runs: none to recover from
        config = write_cluster(doc, Path(tmp) / "cluster.toml")
        with LocalCluster(config) as cluster:
            cluster.start(["source"], timeout=120)
            url = cluster.url("source", "")
            creds = Credentials(secret=cluster.secret)
            clients = {f: Client.at(url, creds, fmt=f, pool=spec.lanes + 1) for f in FORMATS}
            clients["binary"].create_table(TableSpec(TABLE, spec.dim, spec.shards))
            seed = 0
            for block in range(spec.blocks):
                order = FORMATS if block % 2 == 0 else FORMATS[::-1]
                for fmt in order:
                    rows = spec.binary_rows if fmt == "binary" else spec.json_rows
                    for batch in spec.publish_batches:
                        seed += 1
                        rate = publish(clients[fmt], spec, batch, rows, seed)
                        publish_runs[fmt].setdefault(batch, []).append(rate)
                        console.print(
                            f"block {block} publish {fmt} batch {batch}: {rate:,.0f} rows/s"
                        )
                    for batch in spec.lookup_batches:
                        seed += 1
                        count = spec.lookups if fmt == "binary" else max(3, spec.lookups // 4)
                        ms = lookups(clients[fmt], spec, batch, count, seed)
                        got = {"p50": _pct(ms, 50), "p99": _pct(ms, 99)}
                        lookup_runs[fmt].setdefault(batch, []).append(got)
                        console.print(
                            f"block {block} lookup {fmt} {batch}: p50 {got['p50']:.1f} ms "
                            f"p99 {got['p99']:.1f} ms"
                        )
            for c in clients.values():
                c.close()
    summary = _summary(spec, publish_runs, lookup_runs)
    details = {"publish_rows_per_s": publish_runs, "lookup_ms": lookup_runs}
    write_result("client", asdict(spec), summary, details, out,
                 lambda fig: _plot(fig, summary))  # fmt: skip
    return {"summary": summary}


def _summary(
    spec: ClientBenchSpec,
    publish_runs: dict[str, dict[int, list[float]]],
    lookup_runs: dict[str, dict[int, list[dict[str, float]]]],
) -> dict[str, Any]:
    pub = {f: {str(b): round(median(v)) for b, v in publish_runs[f].items()} for f in FORMATS}
    look = {
        q: {
            str(b): {f: round(median([r[q] for r in lookup_runs[f][b]]), 2) for f in FORMATS}
            for b in spec.lookup_batches
        }
        for q in ("p50", "p99")
    }
    best = max(pub["binary"].values())
    ratio = {b: round(pub["binary"][b] / max(pub["json"][b], 1), 1) for b in pub["binary"]}
    return {
        "binary_publish_rows_per_s": pub["binary"],
        "json_publish_rows_per_s": pub["json"],
        "binary_over_json": ratio,
        "lookup_p50_ms": look["p50"],
        "lookup_p99_ms": look["p99"],
        "bar": {
            "binary_rows_per_s": BAR_ROWS_PER_S,
            "ratio": BAR_RATIO,
            "met": best >= BAR_ROWS_PER_S and max(ratio.values()) >= BAR_RATIO,
        },
    }


def _plot(fig: Figure, summary: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    batches = list(summary["binary_publish_rows_per_s"])
    x = np.arange(len(batches))
    for i, fmt in enumerate(FORMATS):
        ys = [summary[f"{fmt}_publish_rows_per_s"][b] / 1e6 for b in batches]
        left.bar(x + (i - 0.5) * 0.4, ys, 0.4, label=fmt)
    left.axhline(BAR_ROWS_PER_S / 1e6, color="grey", linestyle="--", label="bar")
    left.set_xticks(x, [f"{int(b):,} rows/write" for b in batches])
    left.set_ylabel("M rows/s acknowledged (dim 32)")
    left.set_title("publish through RemoteSink")
    left.legend()
    sizes = list(summary["lookup_p50_ms"])
    x = np.arange(len(sizes))
    for i, fmt in enumerate(FORMATS):
        p50 = [summary["lookup_p50_ms"][s][fmt] for s in sizes]
        p99 = [summary["lookup_p99_ms"][s][fmt] for s in sizes]
        right.bar(x + (i - 0.5) * 0.4, p50, 0.4, label=f"{fmt} p50")
        right.scatter(x + (i - 0.5) * 0.4, p99, marker="_", s=400, color="black")
    right.set_yscale("log")
    right.set_xticks(x, [f"{int(s):,} keys" for s in sizes])
    right.set_ylabel("lookup latency, ms (bar p50, tick p99)")
    right.set_title("lookup")
    right.legend()
