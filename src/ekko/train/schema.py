"""Labelled events for the online trainer, and the events body serving shares with it.

Decode with msgspec, check shapes with numpy. Every refusal is a ``RequestError`` whose
message starts with the field at fault, e.g. ``sparse[3]: expected 26 integers, got 25``;
nothing here touches a model.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from ekko.net.httpkit import Int64, RequestError, invalid

MAX_BATCH = 4096
"""Events per predict or train request (or labels per feedback request); more is HTTP 413."""


class Event(msgspec.Struct, forbid_unknown_fields=True):
    """One event: ``num_dense`` dense features and ``num_sparse`` sparse ids."""

    dense: list[float]
    sparse: list[Int64]


class EventsBody(msgspec.Struct, forbid_unknown_fields=True):
    """Events as a list (``events``) or as columns (``dense`` + ``sparse``); ``labels``, one
    0/1 per event, for training only."""

    events: list[Event] | None = None
    dense: list[list[float]] | None = None
    sparse: list[list[Int64]] | None = None
    labels: list[Int64] | None = None


EVENTS = msgspec.json.Decoder(EventsBody)
"""Decoder of an events body (predict, and train with labels)."""


def decode_json(decoder: msgspec.json.Decoder, body: bytes, what: str) -> Any:
    """``body`` decoded; ``RequestError`` naming the field at fault (``what``: the expected
    shape, for a top-level refusal)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise invalid(exc, what) from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"body: not valid JSON: {exc}") from exc


def check_batch(n: int, field: str, max_batch: int) -> None:
    """``RequestError`` naming ``field``: an empty batch (400), one over ``max_batch`` (413)."""
    if n == 0:
        raise RequestError(f"{field}: empty batch; send at least one")
    if n > max_batch:
        raise RequestError(f"{field}: {n} in one request; the limit is {max_batch}", status=413)


def _rows(rows: list[list[Any]], width: int, field: str, kind: str) -> None:
    for i, row in enumerate(rows):
        if len(row) != width:
            raise RequestError(field.format(i=i) + f": expected {width} {kind}, got {len(row)}")


def dense_out_of_range(dense: np.ndarray, limit: float) -> tuple[int, int] | None:
    """(row, column) of the first dense value that is NaN, infinite or beyond ``±limit``
    (``DLRMConfig.dense_limit``), or None when every value is acceptable."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(dense) <= limit)  # NaN compares False: refused too
    if not bad.any():
        return None
    i, j = (int(x) for x in np.argwhere(bad)[0])
    return i, j


def decode_train(
    body: bytes,
    num_dense: int,
    num_sparse: int,
    max_batch: int = MAX_BATCH,
    *,
    dense_limit: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled events for the trainer: the columnar predict body plus ``"labels": [0|1, ...]``
    (one per event) -> (float32 [B, N], int64 [B, F], float32 [B]). Dense values as in
    ``decode_predict``."""
    req: EventsBody = decode_json(
        EVENTS, body, '{"dense": [[...]], "sparse": [[...]], "labels": [0, 1, ...]}'
    )
    if req.labels is None:
        raise RequestError("labels: missing; training needs one 0/1 label per event")
    dense, sparse = events_arrays(req, num_dense, num_sparse, max_batch, dense_limit)
    if len(req.labels) != dense.shape[0]:
        raise RequestError(
            f"labels: expected {dense.shape[0]} labels (one per event), got {len(req.labels)}"
        )
    labels = np.array(req.labels, dtype=np.int64)
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RequestError(f"labels[{i}]: expected 0 or 1, got {int(labels[i])}")
    return dense, sparse, labels.astype(np.float32)


def events_arrays(
    req: EventsBody, num_dense: int, num_sparse: int, max_batch: int, dense_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """The events of ``req`` as (float32 [B, N], int64 [B, F]), every shape and dense value
    checked; ``RequestError`` naming the first field at fault."""
    columnar = req.dense is not None or req.sparse is not None
    if req.events is not None and columnar:
        raise RequestError('body: send either "events" or "dense" + "sparse", not both')
    if req.events is not None:
        events = req.events
        check_batch(len(events), "events", max_batch)
        for i, ev in enumerate(events):
            if len(ev.dense) != num_dense:
                raise RequestError(
                    f"events[{i}].dense: expected {num_dense} numbers, got {len(ev.dense)}"
                )
            if len(ev.sparse) != num_sparse:
                raise RequestError(
                    f"events[{i}].sparse: expected {num_sparse} integers, got {len(ev.sparse)}"
                )
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            dense = np.array([ev.dense for ev in events], dtype=np.float32)
        sparse = np.array([ev.sparse for ev in events], dtype=np.int64)
        dense_field = "events[{i}].dense[{j}]"
    else:
        if req.dense is None or req.sparse is None:
            missing = "dense" if req.dense is None else "sparse"
            raise RequestError(f'{missing}: missing; send "events", or both "dense" and "sparse"')
        check_batch(len(req.dense), "dense", max_batch)
        if len(req.sparse) != len(req.dense):
            raise RequestError(
                f"sparse: expected {len(req.dense)} rows (one per dense row), got {len(req.sparse)}"
            )
        _rows(req.dense, num_dense, "dense[{i}]", "numbers")
        _rows(req.sparse, num_sparse, "sparse[{i}]", "integers")
        with np.errstate(over="ignore"):
            dense = np.array(req.dense, dtype=np.float32)
        sparse = np.array(req.sparse, dtype=np.int64)
        dense_field = "dense[{i}][{j}]"
    at = dense_out_of_range(dense, dense_limit)
    if at is not None:
        i, j = at
        value = req.events[i].dense[j] if req.events is not None else req.dense[i][j]
        raise RequestError(
            dense_field.format(i=i, j=j) + f": {value!r} is outside [-{dense_limit:g}, "
            f"{dense_limit:g}], the model's dense feature range (log-transformed counts)"
        )
    return dense, sparse
