"""HTTP routes of the Open Inference Protocol (KServe v2) on a ``serve = true`` node.

Why beside ``/v1``: Triton's and KServe's clients (``tritonclient``, KServe's SDK, load
generators such as ``perf_analyzer``) speak this protocol and nothing of Ekko's own shape.
The handlers decode the protocol's tensors (``ekko.serve.oip``) and call the same
``InferenceService.predict`` as ``/v1/models/{model}/predict``, so both routes serve the same
CTR through the same guard split and count in the same metrics and feedback; their errors
map to the same statuses (``ekko.serve.routes.guarded``), as ``{"error": "..."}``.

Routes::

    GET  /v2/health/live             200 while the process serves HTTP
    GET  /v2/health/ready            200 when the node is ready and every model can predict,
                                     else 400 with the reason (the protocol's "false")
    GET  /v2                         server metadata: name, version, extensions
    GET  /v2/models/{model}          model metadata: input and output tensors
    GET  /v2/models/{model}/ready    200, or 400 with why the model cannot predict yet
    POST /v2/models/{model}/infer    named tensors in, ``ctr`` (and ``id``) out

and the three model routes under ``/v2/models/{model}/versions/{version}`` too (the one
version the metadata lists; another is a 404 naming it), as clients given a version call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.net.httpkit import (
    MAX_BODY_BYTES,
    BodyRoute,
    RequestError,
    by_model,
    json_response,
    offload,
    read_body,
)
from ekko.serve.oip import (
    EXTENSIONS,
    HEADER_LENGTH,
    VERSION,
    InferRequest,
    decode_infer,
    encode_infer,
)
from ekko.serve.oip import model_metadata as metadata_of
from ekko.serve.routes import guarded
from ekko.serve.schema import MAX_BATCH
from ekko.serve.service import InferenceService


def _node_ready() -> str | None:
    return None


def oip_routes(
    services: Mapping[str, InferenceService],
    *,
    version: str,
    node_ready: Callable[[], str | None] = _node_ready,
    max_batch: int = MAX_BATCH,
    max_body: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> list[Route]:
    """The protocol's routes over ``services`` by model name. ``version`` is the server's
    (``GET /v2``); ``node_ready()`` says why the node is not ready (None: it is), and
    ``clock`` is the services' monotonic ``now``, as for ``serve_routes``."""

    def not_ready(name: str) -> str | None:
        return services[name].not_ready()

    def model_of(request: Request) -> InferenceService:
        """The ``{model}`` served, at the ``{version}`` the path names if it names one."""
        svc = by_model(services, request)
        version = request.path_params.get("version", VERSION)
        if version != VERSION:
            raise RequestError(
                f"model {svc.name!r} has no version {version[:40]!r} (versions: [{VERSION!r}])",
                404,
            )
        return svc

    @guarded
    async def live(request: Request) -> Response:
        """Server liveness: 200 while this process answers."""
        return json_response({"live": True})

    @guarded
    async def ready(request: Request) -> Response:
        """Server readiness: 200 once the node and every served model are ready."""
        why = node_ready() or next(filter(None, map(not_ready, services)), None)
        if why is not None:
            raise RequestError(f"not ready: {why}")
        return json_response({"ready": True})

    @guarded
    async def server(request: Request) -> Response:
        """Server metadata: name, version and the protocol extensions served."""
        return json_response({"name": "ekko", "version": version, "extensions": EXTENSIONS})

    @guarded
    async def model_metadata(request: Request) -> Response:
        """Model metadata: the input and output tensors of an infer request."""
        svc = model_of(request)
        return json_response(metadata_of(svc.name, svc.config))

    @guarded
    async def model_ready(request: Request) -> Response:
        """Model readiness: 200 once the replica holds what the model needs to predict."""
        svc = model_of(request)
        why = not_ready(svc.name)
        if why is not None:
            raise RequestError(f"not ready: {why}")
        return json_response({"name": svc.name, "ready": True})

    @guarded
    async def infer(request: Request) -> Response:
        """Predict the CTR of each row of the dense and sparse input tensors."""
        svc = model_of(request)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise RequestError(f"Content-Encoding: {encoding[:40]!r} is not accepted", 415)
        header_length = request.headers.get(HEADER_LENGTH)
        body = await read_body(request)
        decoded = await offload(decode_infer, body, header_length, svc.config, max_batch)
        result = await svc.apredict(decoded.dense, decoded.sparse, clock())
        content, json_length = encode_infer(svc.name, decoded, result.ctr, result.ids)
        if json_length is None:
            return Response(content, media_type="application/json")
        headers = {"Inference-Header-Content-Length": str(json_length)}
        return Response(content, headers=headers, media_type="application/octet-stream")

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server, methods=["GET"]),
        *(
            route
            for m in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
            for route in (
                Route(m, model_metadata, methods=["GET"]),
                Route(m + "/ready", model_ready, methods=["GET"]),
                BodyRoute(m + "/infer", infer, max_body=max_body, body=InferRequest),
            )
        ),
    ]
