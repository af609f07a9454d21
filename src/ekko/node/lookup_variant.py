"""Which store a lookup reads: the node's own (``online``) or the guard's lagged store
(``baseline``), picked by the request's ``x-ekko-variant`` header.

Why a header and not a query: the lookup routes' paths are what callers sign and the access
policy matches; the variant changes what is read, not who may read it (reader role either
way), and the stream's upgrade request carries headers already.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ekko.client.stream_frames import VARIANT_HEADER, VARIANTS
from ekko.net.httpkit import RequestError
from ekko.store import Store

Baseline = Callable[[], "Store | None"]
"""The node's baseline store now (the guard's lagged store), or None when it keeps none."""


def lookup_store(node: str, online: Store, baseline: Baseline | None, headers: Mapping) -> Store:
    """The store a lookup with ``headers`` reads at node ``node``: ``online`` unless the
    header asks for the baseline. A node that keeps no baseline refuses (409, naming it):
    answering from the online store would hand a baseline scatter poisoned rows."""
    variant = headers.get(VARIANT_HEADER, "online").strip().lower()
    if variant not in VARIANTS:
        raise RequestError(
            f"{VARIANT_HEADER}: expected one of {', '.join(VARIANTS)}, got {variant!r}"
        )
    if variant == "online":
        return online
    store = baseline() if baseline is not None else None
    if store is None:
        raise RequestError(
            f"node {node} keeps no baseline store (the guard's lagged store: the guard is "
            f"off, or this node neither holds partitions as a replica nor serves); ask "
            f"another holder",
            status=409,
        )
    return store
