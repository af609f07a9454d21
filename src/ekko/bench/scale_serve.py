"""Predict latency with the model's rows on 4 partitions vs 1 (issue 17's serving bar).

One partitioned cluster (``cluster_doc(partitions=4)``): a source per partition and, in DC
``dc1``, a holder of each partition (``dc1-p{p}-r0``, holding that partition only) and one
node holding every partition (``dc1-all``: the single-partition layout, the whole model on
one node). A client writes the model's rows to the sources (``scale_cluster.publish``); the
holders pull their partitions. A *frontend* process (this module run as ``python -m
ekko.bench.scale_serve frontend``) serves the same model twice by scatter-gather: ``p1``
reads every row from ``dc1-all`` (one partition: the whole model, one frame a batch), ``p4``
from the 4 partition holders (partition p on ``dc1-p{p}-r0``, hedged/retried on
``dc1-all``). ``dc1-all`` also serves the model itself (``local``: a node holding every
partition reads its rows from its own store, no scatter hop).

The load generator (``ekko.bench.serve``'s closed loop: pre-encoded JSON bodies, keep-alive
connections, one request in flight each) runs here and posts to each mode in turn, blocks
alternated (the order reversed every block), and the summary takes medians over blocks
(DESIGN.md §8). The bar: p99 of ``p4`` at most 1.3x the single-partition p99, measured side by
side on the same model, load and processes: ``predict_p99_ms`` {"1": p1, "4": p4}; the local
replica's p99 is reported beside it (``predict_p99_ms_local``), so the cost of the scatter hop
itself is visible too; ``p4-unmerged`` is ``p4`` with ``ScatterConfig.coalesce = 0`` (every
lookup its own scatter, none merged behind one in flight): what the merging buys, in the same
run (``predict_p99_ms_unmerged``). Before measuring, ``p1`` and ``p4`` must predict the same
CTRs for the same bodies: every holder has synced the rows written.

``measure(spec)`` is what ``ekko bench scale`` calls; ``run`` writes the JSON and plot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
from matplotlib.figure import Figure
from rich.console import Console

from ekko.bench.report import median, write_result
from ekko.bench.scale_cluster import partitioned_doc, publish, write_configs
from ekko.bench.serve import _bodies, _load
from ekko.node.access import ClusterAuth
from ekko.node.config import ModelConfig, load_config
from ekko.node.http_client import ClusterHttp
from ekko.ops.cluster_init import free_ports
from ekko.ops.launcher import LocalCluster

console = Console(stderr=True)

BAR_RATIO = 1.3
MODES = ("local", "p1", "p4", "p4-unmerged")


@dataclass(frozen=True)
class ScaleServeSpec:
    """Inputs of one run; recorded in the JSON."""

    partitions: int = 4
    loads: tuple[int, ...] = (1, 4)  # closed-loop connections: light, then CPU-bound here
    batch: int = 32
    rows_per_table: int = 20_000
    embedding_dim: int = 16
    shards: int = 16
    blocks: int = 6
    warm_s: float = 2.0
    measure_s: float = 8.0
    max_requests: int = 200_000
    ready_timeout_s: float = 120.0
    request_timeout_s: float = 10.0
    deadline_s: float = 2.0
    seed: int = 20240607
    streams: bool = True  # holders asked over lookup streams (False: a POST each)

    def model(self) -> ModelConfig:
        return ModelConfig(
            name="ctr", rows_per_table=self.rows_per_table, embedding_dim=self.embedding_dim
        )


WHOLE = "dc1-all"
"""The node holding every partition: ``p1``'s one holder, ``local``'s server."""


def holder_urls(http: Any, partitions: int) -> dict[str, dict[int, list[str]]]:
    """Each lookup's holders per partition: ``p1`` the whole model on ``WHOLE``; ``p4``
    partition p on its holder, then ``WHOLE`` (hedges and retries)."""
    whole = http.url(WHOLE)
    return {
        "1": {0: [whole]},
        "4": {p: [http.url(f"dc1-p{p}-r0"), whole] for p in range(partitions)},
    }


# -- the frontend process ---------------------------------------------------------------------


def frontend(
    config: Path, port: int, partitions: int, deadline_s: float, streams: bool = True
) -> None:
    """Serve models ``p1`` and ``p{partitions}`` by scatter-gather on ``port`` until killed."""
    import torch
    import uvicorn
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ekko.client.credentials import Credentials
    from ekko.net.httpkit import bounded_app
    from ekko.serve import InferenceService, serve_routes
    from ekko.serve.scatter import PartitionedLookup
    from ekko.serve.scatter_http import HttpHolders
    from ekko.serve.scatter_policy import ScatterConfig
    from ekko.store import Store
    from ekko.store.placement import Placement

    torch.set_num_threads(1)  # as a serving node: one intra-op thread
    cfg = load_config(config)
    base = config.parent
    http = ClusterHttp(cfg, base)
    secret = cfg.path(cfg.cluster.secret_file, base).read_bytes().strip()
    with http.client(auth=ClusterAuth(secret), timeout=10.0) as c:
        listing = c.get(http.url(WHOLE, "/v1/tables")).json()["tables"]
    shards = {t["name"]: t["shards"] for t in listing}
    model = next(m for m in cfg.models)
    fetch = HttpHolders(Credentials(secret=secret), streams=streams)
    urls = holder_urls(http, partitions)
    lookups = {}
    services = {}
    for label, layout, coalesce in (("1", "1", 16), (str(partitions), "4", 16), ("u", "4", 0)):
        placement = Placement(1) if layout == "1" else cfg.placement()
        config = ScatterConfig(deadline_s=deadline_s, coalesce=coalesce)
        lookups[label] = PartitionedLookup(
            placement, urls[layout], fetch, shards.__getitem__, config
        )
        served = dataclasses.replace(model.served(), name=f"p{label}")
        services[f"p{label}"] = InferenceService(Store(), served, rows=lookups[label])

    async def stats(request: Any) -> JSONResponse:
        return JSONResponse(
            {f"p{n}": [asdict(s) for s in lk.statistics()] for n, lk in lookups.items()}
            | {f"p{n}_coalesced": lk.coalesced() for n, lk in lookups.items()}
        )

    app = bounded_app([*serve_routes(services), Route("/scatter", stats, methods=["GET"])])
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
        )
    )
    server.run()


def _start_frontend(config: Path, spec: ScaleServeSpec, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "ekko.bench.scale_serve", "frontend", "--config", str(config),
           "--port", str(port), "--partitions", str(spec.partitions),
           "--deadline-s", str(spec.deadline_s),
           *([] if spec.streams else ["--no-streams"])]  # fmt: skip
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _wait_200(url: str, body: bytes, timeout: float, auth: Any = None) -> float:
    """Seconds until ``url`` answers the predict ``body`` with 200 (503 while syncing)."""
    # Benches pace wall-clock phases on purpose: the cluster syncs while we poll.
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            r = httpx.post(url, content=body, timeout=5.0, auth=auth,
                           headers={"content-type": "application/json"})  # fmt: skip
            if r.status_code == 200:
                return time.monotonic() - start
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{url} not serving after {timeout}s: {last}")


# -- the measurement --------------------------------------------------------------------------


def order(blocks: int) -> list[str]:
    """local, p1, p4, then p4, p1, local, ... : every mode in every block, the order reversed
    each block so no mode always follows the same one."""
    out: list[str] = []
    for b in range(blocks):
        out += list(MODES) if b % 2 == 0 else list(reversed(MODES))
    return out


def measure(spec: ScaleServeSpec | None = None) -> dict[str, Any]:
    """Run the alternated blocks; ``{"summary", "runs", "scatter"}`` (the frontend's
    per-partition hedges and retries). What ``ekko bench scale`` calls."""
    spec = spec or ScaleServeSpec()
    model = spec.model()
    bodies = _bodies(spec, model)  # type: ignore[arg-type]  # batch and seed are all it reads
    with tempfile.TemporaryDirectory(prefix="ekko-bench-scale-serve-") as tmp:
        doc = partitioned_doc(
            model, partitions=spec.partitions, dcs=1, replicas=1, shards=spec.shards,
            sync={"snapshot_interval_s": 0},
        )  # fmt: skip
        for node in doc["nodes"]:
            node["serve"] = False
        sync_port, admin_port = free_ports(2)
        doc["nodes"].append({
            "name": WHOLE, "dc": "dc1", "sync_port": sync_port, "admin_port": admin_port,
            "serve": True, "partitions": list(range(spec.partitions)),
        })  # fmt: skip
        path, configs = write_configs(doc, model, Path(tmp))
        cluster = LocalCluster(path, node_configs=configs)
        proc: subprocess.Popen | None = None
        try:
            cluster.start(timeout=spec.ready_timeout_s)
            publish(cluster, model, seed=spec.seed)
            predict = f"/v1/models/{model.name}/predict"
            urls = {"local": cluster.url(WHOLE, predict)}
            _wait_200(urls["local"], bodies[0], spec.ready_timeout_s, cluster.auth)
            proc, front = _start_frontend(configs[WHOLE], spec, Path(tmp) / "frontend.log")
            urls["p1"] = f"{front}/v1/models/p1/predict"
            urls["p4"] = f"{front}/v1/models/p{spec.partitions}/predict"
            urls["p4-unmerged"] = f"{front}/v1/models/pu/predict"
            for mode in ("p1", "p4", "p4-unmerged"):
                _wait_200(urls[mode], bodies[0], spec.ready_timeout_s)
            synced = _wait_same(urls["p1"], urls["p4"], bodies[:8], spec.ready_timeout_s)
            console.print(f"[scale_serve] p1 and p4 predict alike after {synced:.1f} s")
            runs = []
            plan = [(c, mode) for mode in order(spec.blocks) for c in spec.loads]
            for i, (c, mode) in enumerate(plan):
                load = dict(concurrency=c, max_requests=spec.max_requests,
                            timeout=spec.request_timeout_s)  # fmt: skip
                asyncio.run(_load(urls[mode], bodies, seconds=spec.warm_s, **load))
                r = asyncio.run(_load(urls[mode], bodies, seconds=spec.measure_s, **load))
                r |= {"mode": mode, "concurrency": c, "block": i // (len(MODES) * len(spec.loads))}
                console.print(
                    f"[scale_serve] {i + 1}/{len(plan)} {mode:5s} x{c}  p50 {r['p50_ms']:.2f} ms"
                    f"  p99 {r['p99_ms']:.2f} ms  {r['rps']:.0f} req/s  errors {r['errors']}"
                )
                runs.append(r)
            scatter = httpx.get(f"{front}/scatter", timeout=10.0).json()
            fan = asyncio.run(fanout(configs[WHOLE], spec, bodies[0]))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait(10)
            cluster.stop_all()
    summary = summarize(runs, spec.loads) | {"fanout_ms": fan}
    return {"summary": summary, "runs": runs, "scatter": scatter}


async def fanout(config: Path, spec: ScaleServeSpec, body: bytes, n: int = 300) -> dict:
    """p50/p99 ms of one batch's lookups alone (no predict): every table's ids of ``body``
    from the node holding the whole model (one frame), vs from the 4 partition holders in
    parallel (a frame each) — what the fan-out itself costs on this machine."""
    import numpy as np

    from ekko.client.credentials import Credentials
    from ekko.serve.scatter import PartitionedLookup
    from ekko.serve.scatter_http import HttpHolders
    from ekko.store.placement import Placement

    cfg = load_config(config)
    http = ClusterHttp(cfg, config.parent)
    secret = cfg.path(cfg.cluster.secret_file, config.parent).read_bytes().strip()
    shards = {t.name: t.shards for t in cfg.tables}
    sparse = np.array([e["sparse"] for e in msgspec.json.decode(body)["events"]], np.int64)
    tables = {f"emb_{i}": np.unique(sparse[:, i] % spec.rows_per_table) for i in range(26)}
    fetch = HttpHolders(Credentials(secret=secret), streams=spec.streams)
    urls = holder_urls(http, spec.partitions)
    cases = {
        "1_holder": PartitionedLookup(Placement(1), urls["1"], fetch, shards.__getitem__),
        f"{spec.partitions}_holders_parallel": PartitionedLookup(
            cfg.placement(), urls["4"], fetch, shards.__getitem__
        ),
    }
    out = {}
    try:
        for name, lookup in cases.items():
            for _ in range(20):
                await lookup.lookup(tables)
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                await lookup.lookup(tables)
                lat.append((time.perf_counter() - t0) * 1e3)
            out[name] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
    finally:
        await fetch.close()
    return out


def _wait_same(a: str, b: str, bodies: list[bytes], timeout: float) -> float:
    """Seconds until ``a`` and ``b`` predict the same CTRs for every body (to 1e-6): both
    read rows every holder has synced."""
    # Benches pace wall-clock phases on purpose: the holders sync while we poll.
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        got = [[httpx.post(u, content=body, timeout=5.0,
                           headers={"content-type": "application/json"}) for u in (a, b)]
               for body in bodies]  # fmt: skip
        if all(x.status_code == y.status_code == 200 for x, y in got):
            diff = max(
                max(abs(p - q) for p, q in zip(_ctr(x), _ctr(y), strict=True)) for x, y in got
            )
            if diff <= 1e-6:
                return time.monotonic() - start
            last = f"CTRs differ by up to {diff:.3g}"
        else:
            last = "; ".join(f"{r.status_code} {r.text[:120]}" for x in got for r in x)
        time.sleep(0.5)
    raise RuntimeError(f"{a} and {b} still predict differently after {timeout}s: {last}")


def _ctr(r: httpx.Response) -> list[float]:
    return [float(p["ctr"]) for p in r.json()["predictions"]]


def summarize(runs: list[dict[str, Any]], loads: tuple[int, ...]) -> dict[str, Any]:
    """Medians over blocks per mode and load. The headline (``predict_p99_ms``, the bar) is
    the lightest load's: latency with the CPU to spare that separate holder machines would
    have; ``by_load`` has every load's, the heaviest CPU-bound on this machine, where every
    process of the cluster shares its cores and the 4 holders' per-request cost adds up."""

    def med(c: int, mode: str, key: str) -> float:
        return median([r[key] for r in runs if r["mode"] == mode and r["concurrency"] == c])

    by_load = {}
    names = (("1", "p1"), ("4", "p4"), ("local", "local"), ("4_unmerged", "p4-unmerged"))
    for c in loads:
        p1, p4, local = (med(c, m, "p99_ms") for m in ("p1", "p4", "local"))
        by_load[str(c)] = {
            "predict_p99_ms": {m: med(c, k, "p99_ms") for m, k in names},
            "predict_p50_ms": {m: med(c, k, "p50_ms") for m, k in names},
            "rps": {m: med(c, k, "rps") for m, k in names},
            "p99_ratio_4_to_1": p4 / p1,
            "p99_ratio_4_to_local": p4 / local,
            "p99_ratio_4_unmerged_to_1": med(c, "p4-unmerged", "p99_ms") / p1,
        }
    light = by_load[str(loads[0])]
    return {
        "predict_p99_ms": {k: light["predict_p99_ms"][k] for k in ("1", "4")},
        "predict_p99_ms_local": light["predict_p99_ms"]["local"],
        "p99_ratio_4_to_1": light["p99_ratio_4_to_1"],
        "bar_p99_ratio_le_1_3": light["p99_ratio_4_to_1"] <= BAR_RATIO,
        "bar_p99_ratio_le_1_3_at_every_load": all(
            b["p99_ratio_4_to_1"] <= BAR_RATIO for b in by_load.values()
        ),
        "headline_concurrency": loads[0],
        "by_load": by_load,
        "errors": sum(sum(r["errors"].values()) for r in runs),
    }


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    """Run it, write JSON + PNG (``out`` or bench/results/scale_serve.json), return it."""
    spec = ScaleServeSpec()
    if quick:
        spec = ScaleServeSpec(rows_per_table=5_000, blocks=2, warm_s=1.0, measure_s=4.0)
    got = measure(spec)
    inputs = asdict(spec) | {"quick": quick, "order": order(spec.blocks)}
    details = {"runs": got["runs"], "scatter": got["scatter"]}
    write_result("scale_serve", inputs, got["summary"], details, out,
                 lambda fig: _plot(fig, got["runs"], spec.loads))  # fmt: skip
    return got


def _plot(fig: Figure, runs: list[dict[str, Any]], loads: tuple[int, ...]) -> None:
    for i, c in enumerate(loads):
        _plot_load(
            fig.add_subplot(1, len(loads), i + 1), [r for r in runs if r["concurrency"] == c], c
        )


def _plot_load(ax: Any, runs: list[dict[str, Any]], concurrency: int) -> None:
    for x, mode in enumerate(MODES):
        mine = [r for r in runs if r["mode"] == mode]
        for key, dx, color in (("p50_ms", -0.15, "tab:blue"), ("p99_ms", 0.15, "tab:red")):
            vals = [r[key] for r in mine]
            ax.bar(x + dx, median(vals), 0.3, color=color, alpha=0.5,
                   label=key.replace("_ms", "") if x == 0 else None)  # fmt: skip
            ax.scatter([x + dx] * len(vals), vals, color=color, s=12, zorder=3)
    p1 = median([r["p99_ms"] for r in runs if r["mode"] == "p1"])
    ax.axhline(p1 * BAR_RATIO, color="k", ls="--", lw=1, label="bar: 1.3 x p99 of 1 partition")
    ax.set_xticks(range(len(MODES)), ["local replica", "scatter, 1 partition",
                                      "scatter, 4 partitions",
                                      "4 partitions, unmerged"])  # fmt: skip
    ax.set_ylabel("predict latency, ms (batch of events per request)")
    ax.set_title(f"{concurrency} connection(s): rows from 4 partitions vs 1", fontsize=10)
    ax.legend()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ekko.bench.scale_serve")
    sub = parser.add_subparsers(dest="cmd")
    f = sub.add_parser("frontend", help="(internal) the scatter-serving process")
    f.add_argument("--config", type=Path, required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--partitions", type=int, default=4)
    f.add_argument("--deadline-s", type=float, default=2.0)
    f.add_argument("--no-streams", action="store_true", help="a POST per lookup")
    r = sub.add_parser("run", help="measure and write bench/results/scale_serve.json")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "frontend":
        frontend(
            args.config.resolve(), args.port, args.partitions, args.deadline_s,
            not args.no_streams,
        )  # fmt: skip
    else:
        run(quick=getattr(args, "quick", False), out=getattr(args, "out", None))


if __name__ == "__main__":
    main()
