"""Request bodies of the inference API: decode with msgspec, check shapes with numpy.

Every refusal is a ``RequestError`` whose message starts with the field at fault, e.g.
``events[3].sparse: expected 26 integers, got 25``; nothing here touches a model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import numpy as np

from ekko.net.httpkit import MAX_BODY_BYTES, RequestError

MAX_BATCH = 4096
"""Events per predict request (or labels per feedback request); more is HTTP 413."""

__all__ = ["MAX_BATCH", "MAX_BODY_BYTES", "RequestError", "decode_feedback", "decode_predict",
           "decode_train"]  # fmt: skip

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Event(msgspec.Struct, forbid_unknown_fields=True):
    dense: list[float]
    sparse: list[Int64]


class _PredictBody(msgspec.Struct, forbid_unknown_fields=True):
    events: list[_Event] | None = None
    dense: list[list[float]] | None = None
    sparse: list[list[Int64]] | None = None
    labels: list[Int64] | None = None


class _Label(msgspec.Struct, forbid_unknown_fields=True):
    id: Int64
    label: int


class _FeedbackBody(msgspec.Struct, forbid_unknown_fields=True):
    labels: list[_Label]


_PREDICT = msgspec.json.Decoder(_PredictBody)
_FEEDBACK = msgspec.json.Decoder(_FeedbackBody)
_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")


def _decode(decoder: msgspec.json.Decoder, body: bytes, what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        if m is None:  # the top level itself: wrong type or unknown field
            raise RequestError(f"body: {exc} (expected {what})") from exc
        path = m["path"].lstrip(".")
        raise RequestError(f"{path}: {m['msg'][0].lower()}{m['msg'][1:]}") from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"body: not valid JSON: {exc}") from exc


def _check_batch(n: int, field: str, max_batch: int) -> None:
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
    req: _PredictBody = _decode(_PREDICT, body, '{"events": [{"dense": [...], "sparse": [...]}]}')
    if req.labels is not None:
        raise RequestError("labels: predict takes no labels; send them to feedback")
    return _events(req, num_dense, num_sparse, max_batch, dense_limit)


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
    req: _PredictBody = _decode(
        _PREDICT, body, '{"dense": [[...]], "sparse": [[...]], "labels": [0, 1, ...]}'
    )
    if req.labels is None:
        raise RequestError("labels: missing; training needs one 0/1 label per event")
    dense, sparse = _events(req, num_dense, num_sparse, max_batch, dense_limit)
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


def _events(
    req: _PredictBody, num_dense: int, num_sparse: int, max_batch: int, dense_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    columnar = req.dense is not None or req.sparse is not None
    if req.events is not None and columnar:
        raise RequestError('body: send either "events" or "dense" + "sparse", not both')
    if req.events is not None:
        events = req.events
        _check_batch(len(events), "events", max_batch)
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
        _check_batch(len(req.dense), "dense", max_batch)
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


def decode_feedback(body: bytes, max_batch: int = MAX_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """``{"labels": [{"id": ..., "label": 0|1}, ...]}`` -> (ids int64 [n], labels int8 [n])."""
    req: _FeedbackBody = _decode(_FEEDBACK, body, '{"labels": [{"id": ..., "label": 0}]}')
    _check_batch(len(req.labels), "labels", max_batch)
    ids = np.array([x.id for x in req.labels], dtype=np.int64)
    raw = np.array([x.label for x in req.labels], dtype=object)
    ok = (raw == 0) | (raw == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise RequestError(f"labels[{i}].label: expected 0 or 1, got {raw[i]!r}")
    return ids, raw.astype(np.int8)
