"""A node's HTTP side as the runner composes it: admin, serving, guard and driver routes,
``/metrics`` from every part's collectors, and ``/ready`` naming whatever is down (which
``/v1/status`` shows too)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ekko.net.openapi import openapi_route
from ekko.node.access import AccessPolicy, signature_security
from ekko.node.admin import admin_app, admin_routes
from ekko.node.core import NodeCore
from ekko.node.http_server import EmbeddedServer, http_server
from ekko.node.metrics import node_registry, task_metrics
from ekko.node.models import ModelHost
from ekko.node.replica_lag import knowledge_route
from ekko.node.stream_routes import lookup_stream_route, stream_metrics, write_stream_route
from ekko.node.supervisor import Supervisor
from ekko.node.write_stream import StreamStats


def _version() -> str:
    try:
        return version("ekko")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


class NodeWeb:
    """Builds the node's HTTP server from its parts and answers ``/ready``.

    Why ``/ready`` here: it is the one place that reports every background task (the
    supervisor's, the trainers' threads, the node's own machinery such as its log) and the
    startup state; a task added later shows up by being supervised. ``/v1/status`` shows
    the same judgement (``readiness``), so the two never disagree.

    Args:
        core: the node.
        models: its models (routes, collectors, trainer threads).
        supervisor: its background tasks.
        secret: the cluster secret (signed routes).
        routes: further routes (a driver's, say the checkpoint refresh).
        collectors: further metric collectors.
        status: keys added to ``/v1/status`` (``ready``, ``down`` and ``why`` are this
            object's).
        started: True once the node serves.
        stopping: True once the node is stopping.
        tls: the server context when the cluster runs TLS (https only).
    """

    def __init__(
        self,
        core: NodeCore,
        models: ModelHost,
        supervisor: Supervisor,
        secret: bytes,
        *,
        routes: list[BaseRoute],
        collectors: list,
        status: Callable[[], dict],
        started: Callable[[], bool],
        stopping: Callable[[], bool],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.core = core
        self.tls = tls
        self.models = models
        self.supervisor = supervisor
        self.started = started
        self.stopping = stopping
        self.extra_status = status
        web = core.config.http
        self.streams = StreamStats()
        self.lookup_streams = StreamStats()
        registry = node_registry(
            core,
            [*models.collectors(), task_metrics(supervisor),
             stream_metrics(core.name, self.streams),
             stream_metrics(core.name, self.lookup_streams, "lookup"), *collectors],
        )  # fmt: skip
        admin = admin_routes(core, registry, self.status, web.max_body_bytes, models.baseline_store)
        policy = AccessPolicy(serve_open=web.serve_open)
        advertised = frozenset({f"{core.node.host}:{core.node.admin_port}"})
        all_routes = [
            *models.routes(web.max_body_bytes, version=_version(), node_ready=self.not_ready),
            *admin,
            knowledge_route(core),
            write_stream_route(core, web.max_body_bytes, self.streams, self.lookup_streams),
            lookup_stream_route(
                core, web.max_body_bytes, self.lookup_streams, self.streams, models.baseline_store
            ),
            Route("/ready", self.ready_route),
            *routes,
        ]
        title = f"Ekko node {core.name} ({core.role})"
        security = signature_security(policy)
        all_routes.append(openapi_route(all_routes, title=title, version=_version(),
                                        security=security))  # fmt: skip
        self.app = admin_app(all_routes, secret, policy, names=advertised)

    def server(self) -> EmbeddedServer:
        web = self.core.config.http
        return http_server(
            self.app,
            header_timeout_s=web.header_timeout_s,
            idle_timeout_s=web.idle_timeout_s,
            max_connections=web.max_connections,
            tls=self.tls,
        )

    def down(self) -> dict[str, str]:
        """What is not running, by name: supervised tasks, trainer threads, the node's log."""
        return {**self.supervisor.down(), **self.models.down(), **self.core.down()}

    def not_ready(self) -> str | None:
        """Why the node is not ready (what ``/ready`` answers 503 with), or None."""
        return self._why_not(self.down())

    def _why_not(self, down: dict[str, str]) -> str | None:
        if not self.started():
            return self.core.not_ready or "starting"
        if self.stopping():
            return "stopping"
        return f"down: {', '.join(sorted(down))}" if down else None

    def readiness(self) -> dict[str, object]:
        """``ready``; ``down``: what is not running, by name, with its last error; ``why``
        when not ready. What ``/ready`` answers and ``/v1/status`` shows."""
        down = self.down()
        why = self._why_not(down)
        doc: dict[str, object] = {"ready": why is None, "down": down}
        if why is not None:
            doc["why"] = why
        return doc

    def status(self) -> dict:
        """The keys the node adds to ``/v1/status``: the runner's and ``readiness``."""
        return {**self.extra_status(), **self.readiness()}

    async def ready_route(self, request: Request) -> Response:
        """200 once the node serves and every background task runs; 503 naming what is not
        (a supervised task, or a model's trainer thread: ``trainer/{model}``)."""
        doc = {"node": self.core.name, **self.readiness()}
        return JSONResponse(doc, status_code=200 if doc["ready"] else 503)
