"""``deploy/``: a Prometheus scrape config and a Grafana dashboard for a cluster config.

Why generated from the config: the scrape targets are the nodes' admin ports, which
``cluster init`` picks, and under TLS each node's certificate names the node, so Prometheus
needs one job per node with its server name. The dashboard's queries use only metric names
the nodes export (a test reads them from live nodes' ``/metrics``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ekko.node.config import ClusterConfig

DEPLOY_DIR = "deploy"
SCRAPE_INTERVAL_S = 5


def _q(s: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(s)


def prometheus_yaml(cfg: ClusterConfig, config_dir: Path, out_dir: Path) -> str:
    """The scrape config: every node's ``/metrics`` with ``node`` and ``dc`` labels (the CA
    path relative to ``out_dir``, as Prometheus resolves it from its config file)."""
    lines = [
        f"# Prometheus scrape config of Ekko cluster {cfg.cluster.name!r}, written by",
        "# `ekko cluster init`: prometheus --config.file=deploy/prometheus.yml",
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s",
        "scrape_configs:",
    ]
    tls = cfg.cluster.tls
    if tls is None:  # one job, every node a target
        lines += ["  - job_name: ekko", "    metrics_path: /metrics", "    scheme: http",
                  "    static_configs:"]  # fmt: skip
        for n in cfg.nodes:
            lines += [
                f"      - targets: [{_q(f'{n.host}:{n.admin_port}')}]",
                f"        labels: {{ekko_node: {_q(n.name)}, ekko_dc: {_q(n.dc)}}}",
            ]
        return "\n".join(lines) + "\n"
    ca = os.path.relpath(cfg.path(tls.ca, config_dir), out_dir)
    for n in cfg.nodes:  # a job per node: its certificate is checked by the node's name
        lines += [
            f"  - job_name: {_q('ekko-' + n.name)}",
            "    metrics_path: /metrics",
            "    scheme: https",
            "    tls_config:",
            f"      ca_file: {_q(ca)}",
            f"      server_name: {_q(n.name)}",
            "    static_configs:",
            f"      - targets: [{_q(f'{n.host}:{n.admin_port}')}]",
            f"        labels: {{ekko_node: {_q(n.name)}, ekko_dc: {_q(n.dc)}}}",
        ]
    return "\n".join(lines) + "\n"


PANELS: tuple[tuple[str, str, list[tuple[str, str]]], ...] = (
    ("Update latency p50 / p99 (write at the source → applied), per DC", "s", [
        ("histogram_quantile(0.5, sum by (le, dc) "
         "(rate(ekko_update_latency_seconds_bucket[1m])))", "p50 {{dc}}"),
        ("histogram_quantile(0.99, sum by (le, dc) "
         "(rate(ekko_update_latency_seconds_bucket[1m])))", "p99 {{dc}}"),
    ]),
    ("Replica lag behind the source (versions)", "short", [
        ("sum by (node) (ekko_replica_lag_versions)", "{{node}}"),
    ]),
    ("Replica lag behind the source (seconds)", "s", [
        ("max by (node) (ekko_replica_lag_seconds)", "{{node}}"),
    ]),
    ("Bytes per link (pulled)", "Bps", [
        ("sum by (node, link) (rate(ekko_pulled_bytes_total[1m]))", "{{link}} → {{node}}"),
    ]),
    ("Bytes served to pullers", "Bps", [
        ("sum by (node) (rate(ekko_served_bytes_total[1m]))", "{{node}}"),
    ]),
    ("Rows per lane at the source", "short", [
        ("sum by (lane) (rate(ekko_scheduler_rows_total[1m]))", "{{lane}}"),
    ]),
    ("Guard state (0 healthy, 1 uncertain, 2 corrupted, 3 recovering)", "short", [
        ("max by (ekko_node, model) (ekko_guard_state)", "{{model}} @ {{ekko_node}}"),
    ]),
    ("Write-ahead log at the source", "short", [
        ("rate(ekko_wal_fsyncs_total[1m])", "fsyncs/s"),
        ("rate(ekko_wal_bytes_total[1m])", "bytes/s"),
        ("ekko_wal_failed", "failed"),
    ]),
    ("Background tasks up", "short", [
        ("min by (ekko_node) (ekko_task_up)", "{{ekko_node}}"),
    ]),
)  # fmt: skip


def grafana_dashboard(cfg: ClusterConfig) -> dict[str, Any]:
    """A Grafana dashboard (JSON model) over the exported metrics; its Prometheus data
    source is a variable chosen on import."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": ds, "expr": expr, "legendFormat": legend}
                for j, (expr, legend) in enumerate(targets)
            ],
        })  # fmt: skip
    return {
        "title": f"Ekko · {cfg.cluster.name}",
        "uid": f"ekko-{cfg.cluster.name}"[:40],
        "tags": ["ekko"],
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


def write_deploy(cfg: ClusterConfig, config_dir: Path) -> list[Path]:
    """Write ``deploy/prometheus.yml`` and ``deploy/grafana-dashboard.json`` beside the
    config; returns their paths."""
    out = Path(config_dir) / DEPLOY_DIR
    out.mkdir(parents=True, exist_ok=True)
    prom = out / "prometheus.yml"
    prom.write_text(prometheus_yaml(cfg, Path(config_dir), out))
    dash = out / "grafana-dashboard.json"
    dash.write_text(json.dumps(grafana_dashboard(cfg), indent=2, ensure_ascii=False) + "\n")
    return [prom, dash]
