"""Request bodies of the inference API: decode with msgspec, check shapes with numpy.

Every refusal is a ``RequestError`` whose message starts with the field at fault, e.g.
``events[3].sparse: expected 26 integers, got 25``; nothing here touches a model. The events
body is the trainer's (``ekko.train.schema``) without labels.
"""

from __future__ import annotations

import msgspec
import numpy as np

from ekko.net.httpkit import RequestError
from ekko.train.schema import (
    EVENTS,
    MAX_BATCH,
    EventsBody,
    Int64,
    check_batch,
    decode_json,
    dense_out_of_range,
    events_arrays,
)

__all__ = [
    "MAX_BATCH",
    "EventsBody",
    "FeedbackBody",
    "RequestError",
    "decode_feedback",
    "decode_predict",
    "dense_out_of_range",
]


class Label(msgspec.Struct, forbid_unknown_fields=True):
    """The outcome (0 or 1) of the prediction with this ``id``."""

    id: Int64
    label: int


class FeedbackBody(msgspec.Struct, forbid_unknown_fields=True):
    """Outcomes of served predictions, by prediction id."""

    labels: list[Label]


_FEEDBACK = msgspec.json.Decoder(FeedbackBody)


def decode_predict(
    body: bytes,
    num_dense: int,
    num_sparse: int,
    max_batch: int = MAX_BATCH,
    *,
    dense_limit: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``{"events": [{"dense": [...], "sparse": [...]}, ...]}`` or columnar
    ``{"dense": [[...], ...], "sparse": [[...], ...]}`` -> (float32 [B, N], int64 [B, F]).

    Every dense value must lie in ``[-dense_limit, dense_limit]``; sparse ids may be any
    int64 (the model hashes them into its tables)."""
    req: EventsBody = decode_json(EVENTS, body, '{"events": [{"dense": [...], "sparse": [...]}]}')
    if req.labels is not None:
        raise RequestError("labels: predict takes no labels; send them to feedback")
    return events_arrays(req, num_dense, num_sparse, max_batch, dense_limit)


def decode_feedback(body: bytes, max_batch: int = MAX_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """``{"labels": [{"id": ..., "label": 0|1}, ...]}`` -> (ids int64 [n], labels int8 [n])."""
    req: FeedbackBody = decode_json(_FEEDBACK, body, '{"labels": [{"id": ..., "label": 0}]}')
    check_batch(len(req.labels), "labels", max_batch)
    ids = np.array([x.id for x in req.labels], dtype=np.int64)
    raw = np.array([x.label for x in req.labels], dtype=object)
    ok = (raw == 0) | (raw == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise RequestError(f"labels[{i}].label: expected 0 or 1, got {raw[i]!r}")
    return ids, raw.astype(np.int8)
