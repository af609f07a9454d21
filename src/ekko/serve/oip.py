"""The Open Inference Protocol (KServe v2, as Triton serves it) for a served DLRM: bodies only.

Why a codec apart from the routes: the protocol's tensors (named, typed, shaped, as JSON
``data`` or as the binary tensor extension's raw bytes after a JSON header) are decoded to the
same two arrays ``/v1/.../predict`` hands ``InferenceService.predict``, and the prediction
encoded back as output tensors; nothing here predicts or touches a store, so every refusal
can be tested byte by byte. Every refusal is a ``RequestError`` naming the tensor at fault.

A model's tensors::

    inputs   dense   FP32   [-1, num_dense]    dense features, row-major
             sparse  INT64  [-1, num_sparse]   raw sparse ids (the model hashes them)
    outputs  ctr     FP32   [-1, 1]            predicted click-through rate
             id      INT64  [-1, 1]            prediction id, for /v1/models/{m}/feedback

Binary tensor extension: with an ``Inference-Header-Content-Length: n`` header the first
``n`` bytes are the JSON header and the rest the raw little-endian data of each input whose
``parameters.binary_data_size`` says so, in input order. Outputs are binary when the request's
``parameters.binary_data_output`` is true (tritonclient's default) or an output's
``parameters.binary_data`` says so; the answer then carries the same header.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from ekko.net.httpkit import RequestError, convert, parse_json
from ekko.train.dlrm import DLRMConfig
from ekko.train.schema import check_batch

HEADER_LENGTH = "inference-header-content-length"
"""The binary tensor extension's header: the length of the JSON part of the body."""
EXTENSIONS = ["binary_tensor_data"]
DENSE, SPARSE, CTR, ID = "dense", "sparse", "ctr", "id"
VERSION = "1"
"""A model's one version (its metadata's ``versions``; the replica serves the live rows)."""
_DTYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}


class InferInput(msgspec.Struct, forbid_unknown_fields=True):
    """One input tensor: its name, shape, datatype, and its elements row-major as ``data``
    (flat or nested) or, with the binary extension, as ``parameters.binary_data_size`` bytes."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestedOutput(msgspec.Struct, forbid_unknown_fields=True):
    """An output the caller wants (``parameters.binary_data``: as raw bytes)."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v2/models/{model}/infer``: named input tensors, optionally which outputs."""

    inputs: list[InferInput]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True)
class Decoded:
    """An infer request as arrays: dense float32 [B, N], sparse int64 [B, F], the request
    id to echo, and the outputs to answer by name -> binary or not."""

    dense: np.ndarray
    sparse: np.ndarray
    request_id: str | None
    outputs: dict[str, bool]


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_metadata(name: str, config: DLRMConfig) -> dict[str, Any]:
    """``GET /v2/models/{model}``: the model's input and output tensors (-1: any batch)."""
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "ekko_dlrm",
        "inputs": [
            _tensor(DENSE, "FP32", [-1, config.num_dense]),
            _tensor(SPARSE, "INT64", [-1, config.num_sparse]),
        ],
        "outputs": [_tensor(CTR, "FP32", [-1, 1]), _tensor(ID, "INT64", [-1, 1])],
    }


def _label(name: str) -> str:
    """A tensor name as refusals quote it: cut short when a caller sent a long one."""
    return name if len(name) <= 64 else reprlib.repr(name)


def _flag(params: dict[str, Any] | None, key: str, where: str) -> bool:
    value = (params or {}).get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"{where}.{key}: expected true or false, got {reprlib.repr(value)}")
    return value


def _nested(data: Any, shape: list[int], depth: int, where: str, out: list[Any]) -> None:
    """Append the elements of ``data``, nested exactly as ``shape[depth:]``, to ``out``."""
    if depth == len(shape):
        out.append(data)
        return
    if not isinstance(data, list) or len(data) != shape[depth]:
        got = f"{len(data)} items" if isinstance(data, list) else reprlib.repr(data)
        raise RequestError(
            f"{where} holds {got}; shape {shape} nests {shape[depth]} there (or send it flat)"
        )
    for i, item in enumerate(data):
        _nested(item, shape, depth + 1, f"{where}[{i}]", out)


def _flatten(data: Any, shape: list[int], name: str, integer: bool) -> list[Any]:
    """The elements of ``data`` in row-major order: a flat list, or lists nested exactly as
    ``shape`` (a ragged or mixed nesting would shift elements across rows: refused);
    ``RequestError`` naming the tensor for anything else."""
    if isinstance(data, list) and not any(isinstance(x, list) for x in data):
        out = data
    else:
        out = []
        _nested(data, shape, 0, f"{name}: data", out)
    for item in out:
        if not (type(item) is int or (not integer and type(item) is float)):
            kind = "integers" if integer else "numbers"
            raise RequestError(f"{name}: data holds {reprlib.repr(item)}; expected {kind}")
    return out


def _json_data(t: InferInput, dtype: np.dtype, count: int) -> np.ndarray:
    values = _flatten(t.data, t.shape, t.name, dtype.kind == "i")
    if len(values) != count:
        raise RequestError(
            f"{t.name}: shape {t.shape} holds {count} elements, data has {len(values)}"
        )
    if dtype.kind == "i":
        if any(not -(2**63) <= v < 2**63 for v in values):
            raise RequestError(f"{t.name}: an id is outside int64")
        return np.array(values, dtype=np.int64)
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused by the service
            return np.array(values, dtype=np.float64).astype(np.float32)
    except OverflowError:
        raise RequestError(f"{t.name}: a number beyond float64") from None


def _header(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise RequestError(
            f"Inference-Header-Content-Length: {header_length[:40]!r} is not a length within "
            f"the body's {len(body)} bytes"
        )
    n = int(header_length)
    return body[:n], body[n:]


def decode_infer(
    body: bytes,
    header_length: str | None,
    config: DLRMConfig,
    max_batch: int,
) -> Decoded:
    """An infer request's body (and its ``Inference-Header-Content-Length``, if any) as the
    arrays the model takes; ``RequestError`` naming the tensor at fault."""
    head, raw = _header(body, header_length)
    req = convert(parse_json(head), InferRequest, '{"inputs": [{"name", "shape", ...}]}')
    want = {DENSE: ("FP32", config.num_dense), SPARSE: ("INT64", config.num_sparse)}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for t in req.inputs:
        t.name = _label(t.name)
        if t.name not in want:
            raise RequestError(f"{t.name}: no such input (the model takes {sorted(want)})")
        if t.name in arrays:
            raise RequestError(f"{t.name}: given twice")
        datatype, width = want[t.name]
        if t.datatype != datatype:
            got = reprlib.repr(t.datatype)
            raise RequestError(f"{t.name}: datatype {got}; the model takes {datatype}")
        if len(t.shape) != 2 or t.shape[1] != width or t.shape[0] < 0:
            raise RequestError(f"{t.name}: shape {t.shape}; the model takes [-1, {width}]")
        check_batch(t.shape[0], t.name, max_batch)
        dtype = _DTYPES[datatype]
        count = t.shape[0] * width
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            if t.data is None:
                raise RequestError(f"{t.name}: no data and no parameters.binary_data_size")
            flat = _json_data(t, dtype, count)
        else:
            if t.data is not None:
                raise RequestError(f"{t.name}: both data and parameters.binary_data_size")
            if type(size) is not int or size != count * dtype.itemsize:
                raise RequestError(
                    f"{t.name}: parameters.binary_data_size {size!r}; shape {t.shape} of "
                    f"{datatype} takes {count * dtype.itemsize} bytes"
                )
            if offset + size > len(raw):
                raise RequestError(
                    f"{t.name}: binary data ends at byte {offset + size}, the body has "
                    f"{len(raw)} after its JSON header"
                )
            flat = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
            offset += size
        arrays[t.name] = flat.reshape(t.shape).astype(dtype.newbyteorder("="))  # a copy
    if offset != len(raw):
        raise RequestError(
            f"body: {len(raw) - offset} bytes after the JSON header belong to no input"
        )
    for name in want:
        if name not in arrays:
            raise RequestError(f"{name}: missing input (the model takes {sorted(want)})")
    if arrays[DENSE].shape[0] != arrays[SPARSE].shape[0]:
        raise RequestError(
            f"sparse: {arrays[SPARSE].shape[0]} rows, dense has {arrays[DENSE].shape[0]}"
        )
    return Decoded(arrays[DENSE], arrays[SPARSE], req.id, _outputs(req))


def _outputs(req: InferRequest) -> dict[str, bool]:
    every = _flag(req.parameters, "binary_data_output", "parameters")
    if req.outputs is None:
        return {CTR: every, ID: every}
    out: dict[str, bool] = {}
    for i, o in enumerate(req.outputs):
        if o.name not in (CTR, ID):
            raise RequestError(f"{_label(o.name)}: no such output (the model gives {[CTR, ID]})")
        if (o.parameters or {}).get("classification"):
            raise RequestError(f"{o.name}: the classification extension is not served")
        out[o.name] = _flag(o.parameters, "binary_data", f"outputs[{i}].parameters") or every
    return out


def encode_infer(
    model: str, decoded: Decoded, ctr: np.ndarray, ids: np.ndarray
) -> tuple[bytes, int | None]:
    """The infer answer: JSON, and the length of its JSON header when outputs are binary
    (send it as ``Inference-Header-Content-Length``), else None."""
    n = int(ctr.shape[0])
    tensors = {
        CTR: ("FP32", np.ascontiguousarray(ctr, dtype="<f4")),
        ID: ("INT64", np.ascontiguousarray(ids, dtype="<i8")),
    }
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in decoded.outputs.items():
        datatype, values = tensors[name]
        doc = _tensor(name, datatype, [n, 1])
        if binary:
            blob = values.tobytes()
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = values.tolist()
        outputs.append(doc)
    answer: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if decoded.request_id is not None:
        answer["id"] = decoded.request_id
    head = msgspec.json.encode(answer)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
