"""Row codecs: every codec's error stays within its documented per-row bound."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.codec import CODECS, CodecError, EncodedRows, decode_rows, encode_rows, max_abs_error

FP16_MAX = 65504.0
F32_MAX = float(np.finfo(np.float32).max)


@st.composite
def matrices(draw: st.DrawFn, max_abs: float) -> np.ndarray:
    """float32 [n, dim] with random row magnitudes, negatives and some constant rows."""
    n = draw(st.integers(0, 12))
    dim = draw(st.integers(1, 24))
    x = draw(
        hnp.arrays(
            np.float32,
            (n, dim),
            elements=st.floats(-max_abs, max_abs, width=32, allow_subnormal=True),
        )
    )
    # Per-row magnitude mixes: tiny, ordinary and huge rows in the same matrix.
    exps = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-30, 0)))
    x = (x.astype(np.float64) * 2.0 ** exps[:, None]).astype(np.float32)
    const = draw(hnp.arrays(np.bool_, (n,)))
    x[const] = x[const, :1]
    return x


def _row_err(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return np.zeros(x.shape[0])
    return np.abs(y.astype(np.float64) - x.astype(np.float64)).max(axis=1)


def _roundtrip(x: np.ndarray, codec: str) -> np.ndarray:
    enc = encode_rows(x, codec)
    wire = msgspec.msgpack.encode(enc)
    back = msgspec.msgpack.decode(wire, type=EncodedRows)
    out = decode_rows(back)
    assert out.dtype == np.float32
    assert out.shape == x.shape
    return out


@settings(max_examples=200, deadline=None)
@given(matrices(F32_MAX))
def test_fp32_exact(x: np.ndarray) -> None:
    out = _roundtrip(x, "fp32")
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))
    assert (max_abs_error(x, "fp32") == 0).all()


@settings(max_examples=300, deadline=None)
@given(matrices(FP16_MAX))
def test_fp16_within_bound(x: np.ndarray) -> None:
    out = _roundtrip(x, "fp16")
    assert encode_rows(x, "fp16").codec == "fp16"
    assert (_row_err(x, out) <= max_abs_error(x, "fp16")).all()


AFFINE = pytest.mark.parametrize(("codec", "levels"), [("int8", 255), ("int4", 15)])


@AFFINE
@settings(max_examples=300, deadline=None)
@given(x=matrices(F32_MAX))
def test_int8_within_bound(codec: str, levels: int, x: np.ndarray) -> None:
    out = _roundtrip(x, codec)
    err = _row_err(x, out)
    assert (err <= max_abs_error(x, codec)).all()
    const = (x == x[:, :1]).all(axis=1)
    assert (err[const] == 0).all()  # constant rows are exact


@AFFINE
@settings(max_examples=100, deadline=None)
@given(x=matrices(1.0))
def test_int8_bound_is_half_step(codec: str, levels: int, x: np.ndarray) -> None:
    """For ordinary values the bound is half the quantisation step (at most 1/32 wider when
    the row's parameters travel as float16)."""
    span = (x.max(axis=1).astype(np.float64) - x.min(axis=1)) if x.size else np.zeros(0)
    bound = max_abs_error(x, codec)
    assert (bound <= span / (2 * levels) * (1 + 1 / 32) + 1e-6).all()


@AFFINE
def test_affine_params_fall_back_to_float32_when_float16_would_widen_the_step(
    codec: str, levels: int
) -> None:
    rows = np.random.default_rng(1).normal(scale=0.3, size=(6, 32)).astype(np.float32)
    assert len(encode_rows(rows, codec).params) == 4 * 6  # float16 scale and offset
    # A float16 offset near 1000 is off by up to 0.25: far more than this row's step.
    narrow = np.vstack([rows, 1000.1 + np.linspace(0, 0.01, 32, dtype=np.float32)])
    enc = encode_rows(narrow, codec)
    assert len(enc.params) == 8 * 7
    err = _row_err(narrow, decode_rows(enc))
    assert (err <= max_abs_error(narrow, codec)).all()
    assert err[-1] <= 0.01 / (2 * levels) * 1.001


@AFFINE
def test_int8_constant_rows_exact(codec: str, levels: int) -> None:
    x = np.array([[3.25] * 7, [-1e30] * 7, [0.0] * 7, [1e-40] * 7], dtype=np.float32)
    out = decode_rows(encode_rows(x, codec))
    np.testing.assert_array_equal(out, x)


@AFFINE
def test_int8_extreme_span_stays_finite(codec: str, levels: int) -> None:
    x = np.array([[-F32_MAX, 0.0, F32_MAX, 1.0]], dtype=np.float32)
    out = decode_rows(encode_rows(x, codec))
    assert np.isfinite(out).all()
    assert (_row_err(x, out) <= max_abs_error(x, codec)).all()


@AFFINE
def test_int8_rejects_nonfinite(codec: str, levels: int) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((3, 4), dtype=np.float32)
        x[1, 2] = bad
        with pytest.raises(CodecError, match="NaN/inf"):
            encode_rows(x, codec)
        with pytest.raises(CodecError):
            max_abs_error(x, codec)


def test_fp16_out_of_range_falls_back_to_fp32() -> None:
    x = np.array([[1.0, 70000.0], [0.5, -1e9]], dtype=np.float32)
    enc = encode_rows(x, "fp16")
    assert enc.codec == "fp32"
    np.testing.assert_array_equal(decode_rows(enc), x)
    ok = np.array([[FP16_MAX, -FP16_MAX]], dtype=np.float32)
    assert encode_rows(ok, "fp16").codec == "fp16"
    np.testing.assert_array_equal(decode_rows(encode_rows(ok, "fp16")), ok)


def test_fp_codecs_carry_nonfinite() -> None:
    x = np.array([[np.inf, -np.inf, np.nan, 1.0]], dtype=np.float32)
    for codec in ("fp32", "fp16"):
        out = decode_rows(encode_rows(x, codec))
        np.testing.assert_array_equal(out, x)  # NaN compares equal positionally here


@pytest.mark.parametrize("codec", CODECS)
def test_sizes(codec: str) -> None:
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    enc = encode_rows(x, codec)
    assert enc.nbytes == {"fp32": 640, "fp16": 320, "int8": 160 + 40, "int4": 80 + 40}[codec]


def test_empty_and_zero_dim() -> None:
    for shape in ((0, 8), (5, 0), (0, 0)):
        x = np.zeros(shape, dtype=np.float32)
        for codec in CODECS:
            assert decode_rows(encode_rows(x, codec)).shape == shape
            assert max_abs_error(x, codec).shape == (shape[0],)


def test_unknown_codec_and_bad_input() -> None:
    x = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(CodecError, match="unknown codec"):
        encode_rows(x, "bf16")
    with pytest.raises(CodecError, match="unknown codec"):
        decode_rows(EncodedRows("bf16", 2, 2, b"\0" * 8))
    with pytest.raises(CodecError, match="2-D"):
        encode_rows(np.zeros(4, dtype=np.float32), "fp32")


@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_length_mismatch(codec: str) -> None:
    x = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    enc = encode_rows(x, codec)
    bad = [
        msgspec.structs.replace(enc, payload=enc.payload[:-1]),
        msgspec.structs.replace(enc, payload=enc.payload + b"\0"),
        msgspec.structs.replace(enc, n=enc.n + 1),
        msgspec.structs.replace(enc, n=enc.n - 1),
        msgspec.structs.replace(enc, dim=enc.dim + 1),
        msgspec.structs.replace(enc, n=-1),
        msgspec.structs.replace(enc, params=enc.params + b"\0" * 8),
    ]
    if codec in ("int8", "int4"):
        bad.append(msgspec.structs.replace(enc, params=enc.params[:-8]))
    for b in bad:
        with pytest.raises(CodecError, match="bad"):
            decode_rows(b)


@pytest.mark.parametrize("width", ["<f2", "<f4"])
def test_int8_corrupted_params_rejected(width: str) -> None:
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    if width == "<f4":
        x[3] += 3000.5  # no float16 offset is close enough: float32 parameters
    enc = encode_rows(x, "int8")
    p = np.frombuffer(enc.params, dtype=width).copy()
    assert p.size == 8
    for value in (np.nan, np.inf, -1.0):
        q = p.copy()
        q[1] = value  # a scale
        with pytest.raises(CodecError, match="corrupted int8 params"):
            decode_rows(msgspec.structs.replace(enc, params=q.tobytes()))
    q = p.copy()
    q[4 + 2] = np.nan  # an offset
    with pytest.raises(CodecError, match="corrupted int8 params"):
        decode_rows(msgspec.structs.replace(enc, params=q.tobytes()))
