"""Row encodings for float32 matrices ``[n, dim]``: ``fp32``, ``fp16``, row-wise ``int8`` and
``int4``.

Why three: fp32 is exact (dense parameters, debugging); fp16 halves the bytes with a relative
error of at most 2**-11; int8 row-wise quarters them (plus 4 or 8 bytes of per-row parameters) with
an absolute error of at most half a quantisation step of the row. Sync is state-based, so a
replica's row differs from the source's by one encoding's error only, never by an accumulating
drift (see ``tests/codec/test_drift.py``).

Formats (little endian):

- ``fp32``: ``payload`` = float32[n*dim], ``params`` empty. Lossless, NaN/inf carried as is.
- ``fp16``: ``payload`` = float16[n*dim], ``params`` empty. Round to nearest. **Fallback:** if
  any finite value has magnitude above 65504 (the largest fp16) the whole matrix is sent as
  ``fp32`` instead, so the result is never clipped and never becomes inf; the returned
  :class:`EncodedRows` then says ``codec="fp32"``. Non-finite values are kept (inf stays inf,
  NaN stays NaN).
- ``int8``: min/max affine per row: ``offset = min(row)``, ``scale = (max - min) / 255``
  (stored as float32, rounded *up* so no code ever clips), ``code = rint((x - offset) /
  scale)`` as uint8 0..255, decoded as ``offset + code * scale``. ``payload`` = uint8[n*dim],
  ``params`` = scale[n] followed by offset[n], as float16 (offset rounded down, scale up) when
  that widens no row's step by more than 1/32, else as float32 — the length says which; the
  4 bytes saved per row are a sixth of an int4 row of dim 32. Constant rows have ``scale = 0`` and
  decode exactly. Rows holding NaN or inf are rejected with :class:`CodecError`.

- ``int4``: as ``int8`` with 15 as the top code (``scale = (max - min) / 15``), two codes per
  byte (low nibble first, a last odd code padded with 0): an eighth of fp32 plus the per-row
  parameters, with an error of at most half its (17x coarser) step.

``decode_rows`` validates codec, shape and byte lengths exactly (and, for int8, that the
parameters are finite and the scales non-negative); anything else raises :class:`CodecError`,
so a truncated or corrupted message never yields a silently wrong shape.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np

from ekko.codec.errors import CodecError

FP32 = "fp32"
FP16 = "fp16"
INT8 = "int8"
INT4 = "int4"
CODECS: tuple[str, ...] = (FP32, FP16, INT8, INT4)
_LEVELS = {INT8: 255, INT4: 15}  # affine row-wise codecs: top code

FP16_MAX = 65504.0
_F4 = np.dtype("<f4")
_F2 = np.dtype("<f2")
_U1 = np.dtype("u1")
# fp16: half an ulp is <= 2**-11 * |x| for normal numbers; subnormal spacing is 2**-24.
_FP16_REL = 2.0**-11
_FP16_FLOOR = 2.0**-25
# int8: float32 rounding of the decoded value (half an ulp, 2**-24 relative; bound with 2**-23)
# and of the smallest subnormal.
_F32_REL = 2.0**-23
_F32_FLOOR = 2.0**-149
_F32_MAX = float(np.finfo(np.float32).max)
# int8/int4 parameters travel as float16 when that widens a row's step by at most this share.
_HALF_SLACK = 1.0 / 32


class EncodedRows(msgspec.Struct, frozen=True):
    """An encoded ``[n, dim]`` float32 matrix, ready to embed in a sync message.

    Why a struct of plain bytes: msgspec serialises it without copies or pickle, and the
    receiver can check every length against ``n`` and ``dim`` before trusting the data.
    ``params`` carries the per-row parameters of codecs that need them (int8: scale, offset).
    """

    codec: str
    n: int
    dim: int
    payload: bytes
    params: bytes = b""

    @property
    def nbytes(self) -> int:
        """Bytes of payload and parameters (the part that grows with the rows)."""
        return len(self.payload) + len(self.params)


def _as_matrix(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise CodecError(f"rows must be a 2-D [n, dim] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise CodecError(f"rows must be numeric, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


class _AffineParams(NamedTuple):
    scale: np.ndarray  # float32 [n], rounded up
    offset: np.ndarray  # float32 [n], the row minimum
    half_scale: np.ndarray  # float16 [n], rounded up from the float16 offset
    half_offset: np.ndarray  # float16 [n], rounded down
    half_fits: np.ndarray  # bool [n]: float16 widens the step by at most _HALF_SLACK


def _affine_params(x: np.ndarray, codec: str) -> _AffineParams:
    """Per-row scale and offset of an affine row-wise codec, in float32 and in float16 (the
    offset rounded down and the scale up, so codes still span the row); rejects non-finite
    rows."""
    levels = _LEVELS[codec]
    if x.size and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise CodecError(f"{codec} cannot encode NaN/inf: {bad.size} rows, first row {bad[0]}")
    n = x.shape[0]
    if x.shape[1] == 0:
        z4, z2 = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=_F2)
        return _AffineParams(z4, z4, z2, z2, np.ones(n, dtype=bool))
    lo = x.min(axis=1)
    hi = x.max(axis=1).astype(np.float64)
    scale = _step_up(hi - lo.astype(np.float64), levels, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        off = lo.astype(_F2)
        high = off.astype(np.float64) > lo
        off[high] = np.nextafter(off[high], np.float16(-np.inf))
        step = _step_up(hi - off.astype(np.float64), levels, _F2)
        fits = (
            np.isfinite(off)
            & np.isfinite(step)
            & (step.astype(np.float64) <= scale.astype(np.float64) * (1.0 + _HALF_SLACK))
        )
    return _AffineParams(scale, lo, step, off, fits)


def _step_up(span: np.ndarray, levels: int, dtype: np.dtype | type) -> np.ndarray:
    """``span / levels`` in ``dtype``, rounded up where rounding made it too small, so
    ``span / step <= levels`` (no code ever clips)."""
    step = (span / levels).astype(dtype)
    short = step.astype(np.float64) * levels < span
    step[short] = np.nextafter(step[short], step.dtype.type(np.inf))
    return step


def encode_rows(values: np.ndarray, codec: str) -> EncodedRows:
    """Encode a float32 ``[n, dim]`` matrix (other numeric dtypes are cast to float32 first).

    ``fp16`` falls back to ``fp32`` when a finite value exceeds the fp16 range: read the codec
    of the result, not the one asked for.
    """
    _check_codec(codec)
    x = _as_matrix(values)
    n, dim = x.shape
    if codec == FP32:
        return EncodedRows(FP32, n, dim, x.astype(_F4, copy=False).tobytes())
    if codec == FP16:
        finite = np.abs(x[np.isfinite(x)]) if x.size else x.ravel()
        if finite.size and float(finite.max()) > FP16_MAX:
            return EncodedRows(FP32, n, dim, x.astype(_F4, copy=False).tobytes())
        return EncodedRows(FP16, n, dim, x.astype(_F2).tobytes())
    ap = _affine_params(x, codec)
    scale, offset, param_dtype = ap.scale, ap.offset, _F4
    if ap.half_fits.all():
        scale, offset, param_dtype = ap.half_scale, ap.half_offset, _F2
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    codes = np.rint((x - offset[:, None].astype(np.float64)) / safe[:, None])
    np.clip(codes, 0, _LEVELS[codec], out=codes)
    params = scale.astype(param_dtype).tobytes() + offset.astype(param_dtype).tobytes()
    packed = codes.astype(_U1).ravel()
    if codec == INT4:  # two codes per byte, low nibble first
        if packed.size % 2:
            packed = np.append(packed, np.uint8(0))
        packed = packed[0::2] | (packed[1::2] << 4)
    return EncodedRows(codec, n, dim, packed.tobytes(), params)


def decode_rows(enc: EncodedRows) -> np.ndarray:
    """Decode to a new, writable float32 ``[n, dim]`` array; :class:`CodecError` on any
    inconsistency between codec, shape and byte lengths."""
    _check_codec(enc.codec)
    n, dim = enc.n, enc.dim
    if not isinstance(n, int) or not isinstance(dim, int) or n < 0 or dim < 0:
        raise CodecError(f"bad shape n={n!r} dim={dim!r}")
    size = n * dim
    want = (size + 1) // 2 if enc.codec == INT4 else size * {FP32: 4, FP16: 2, INT8: 1}[enc.codec]
    if len(enc.payload) != want:
        raise CodecError(
            f"bad payload length for {enc.codec} [{n}, {dim}]: "
            f"{len(enc.payload)} bytes, expected {want}"
        )
    want_params = (4 * n, 8 * n) if enc.codec in _LEVELS else (0,)
    if len(enc.params) not in want_params:
        raise CodecError(
            f"bad params length for {enc.codec} with n={n}: "
            f"{len(enc.params)} bytes, expected {' or '.join(map(str, want_params))}"
        )
    if enc.codec == FP32:
        return np.frombuffer(enc.payload, dtype=_F4).astype(np.float32).reshape(n, dim)
    if enc.codec == FP16:
        return np.frombuffer(enc.payload, dtype=_F2).astype(np.float32).reshape(n, dim)
    p = np.frombuffer(enc.params, dtype=_F2 if len(enc.params) == 4 * n else _F4)
    scale, offset = p[:n].astype(np.float64), p[n:].astype(np.float64)
    if not (np.isfinite(scale).all() and np.isfinite(offset).all()) or (scale < 0).any():
        raise CodecError(f"corrupted {enc.codec} params: non-finite offset/scale or negative scale")
    raw = np.frombuffer(enc.payload, dtype=_U1)
    if enc.codec == INT4:
        raw = np.stack([raw & 0x0F, raw >> 4], axis=1).ravel()[:size]
    codes = raw.reshape(n, dim)
    out = offset[:, None] + codes * scale[:, None]
    # The top code may land a hair above max(row); near the float32 limit keep it finite.
    np.clip(out, -_F32_MAX, _F32_MAX, out=out)
    return out.astype(np.float32)


def max_abs_error(values: np.ndarray, codec: str) -> np.ndarray:
    """Per-row bound (float64 ``[n]``) on ``|decode_rows(encode_rows(values, codec)) - values|``.

    fp32: 0. fp16: ``2**-11 * max|x| + 2**-25`` (relative rounding plus the subnormal floor;
    also covers the fp32 fallback). int8: ``scale / 2`` plus float32 rounding of the decoded
    value. Raises :class:`CodecError` where ``encode_rows`` would (unknown codec, int8 NaN/inf).
    """
    _check_codec(codec)
    x = _as_matrix(values)
    n, dim = x.shape
    if codec == FP32:
        return np.zeros(n, dtype=np.float64)
    absmax = np.abs(x).max(axis=1).astype(np.float64) if dim else np.zeros(n, dtype=np.float64)
    if codec == FP16:
        return _FP16_REL * absmax + _FP16_FLOOR
    ap = _affine_params(x, codec)
    step = np.where(ap.half_fits, ap.half_scale.astype(np.float64), ap.scale.astype(np.float64))
    return 0.5 * step + _F32_REL * absmax + _F32_FLOOR
