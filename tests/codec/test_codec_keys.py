"""Varint key and integer columns: exact round trips; malformed input raises CodecError.

Corruption that leaves a well-formed varint stream (e.g. a flipped low bit inside one varint)
decodes to wrong values of the right shape: the varint layer has no checksum by design; the
frame layer (``ekko.codec.frames``) and the block CRC detect it.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.codec import (
    CodecError,
    decode_ints,
    decode_keys,
    encode_ints,
    encode_keys,
    sort_rows_by_key,
)

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

int64_arrays = hnp.arrays(
    np.int64,
    st.integers(0, 200),
    elements=st.one_of(
        st.integers(I64_MIN, I64_MAX),
        st.sampled_from([I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 1, I64_MAX]),
        st.integers(-1000, 1000),
    ),
)


@settings(max_examples=300, deadline=None)
@given(int64_arrays)
def test_keys_roundtrip(keys: np.ndarray) -> None:
    data = encode_keys(keys)
    out = decode_keys(data, keys.size)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, keys)
    # sorted order round-trips too, and never costs more than 10 bytes per key
    s = np.sort(keys)
    np.testing.assert_array_equal(decode_keys(encode_keys(s), s.size), s)
    assert len(data) <= 10 * keys.size


@settings(max_examples=300, deadline=None)
@given(int64_arrays)
def test_ints_roundtrip(values: np.ndarray) -> None:
    np.testing.assert_array_equal(decode_ints(encode_ints(values), values.size), values)


def test_ints_modes_are_compact() -> None:
    rng = np.random.default_rng(0)
    const = np.full(10_000, 1_700_000_000_123_456_789, dtype=np.int64)
    assert len(encode_ints(const)) <= 10  # constant: mode byte + base
    dense = rng.permutation(10_000).astype(np.int64) + 5_000_000_000
    assert len(encode_ints(dense)) <= 2 * 10_000 + 12  # frame-of-reference or delta: 2 B/row
    np.testing.assert_array_equal(decode_ints(encode_ints(dense), dense.size), dense)


def test_sorted_keys_are_compact() -> None:
    rng = np.random.default_rng(0)
    keys = np.sort(rng.choice(10_000_000, size=10_000, replace=False)).astype(np.int64)
    assert len(encode_keys(keys)) <= 2.1 * keys.size  # average gap 1000 -> 2-byte varints


def test_sort_rows_by_key_permutes_together() -> None:
    keys = np.array([5, -3, 5, 2**62, -(2**63)], dtype=np.int64)
    vals = np.arange(10, dtype=np.float32).reshape(5, 2)
    tags = np.array([0, 1, 2, 3, 4])
    k, v, t = sort_rows_by_key(keys, vals, tags)
    np.testing.assert_array_equal(k, np.sort(keys))
    np.testing.assert_array_equal(t, [4, 1, 0, 2, 3])  # stable for the duplicate key 5
    np.testing.assert_array_equal(v, vals[t])
    with pytest.raises(CodecError):
        sort_rows_by_key(keys, tags[:3])


@settings(max_examples=200, deadline=None)
@given(int64_arrays.filter(lambda a: a.size > 0), st.data())
def test_truncated_or_extended_raises(keys: np.ndarray, data: st.DataObject) -> None:
    enc = encode_keys(keys)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(CodecError):
        decode_keys(enc[:cut], keys.size)
    with pytest.raises(CodecError):
        decode_keys(enc + data.draw(st.binary(min_size=1, max_size=4)), keys.size)
    with pytest.raises(CodecError):
        decode_keys(enc, keys.size + 1)
    ints = encode_ints(keys)
    with pytest.raises(CodecError):
        decode_ints(ints[: data.draw(st.integers(0, len(ints) - 1))], keys.size)


@settings(max_examples=300, deadline=None)
@given(int64_arrays.filter(lambda a: a.size > 0), st.data())
def test_flipped_bytes_raise_or_keep_shape(keys: np.ndarray, data: st.DataObject) -> None:
    """A corrupted payload raises CodecError or decodes to exactly n int64 values (wrong values
    are undetectable here without a checksum; see the module docstring)."""
    for encode, decode in ((encode_keys, decode_keys), (encode_ints, decode_ints)):
        enc = bytearray(encode(keys))
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(enc) - 1))
            enc[i] ^= data.draw(st.integers(1, 255))
        try:
            out = decode(bytes(enc), keys.size)
        except CodecError:
            continue
        assert out.shape == keys.shape and out.dtype == np.int64


def test_malformed_varints() -> None:
    with pytest.raises(CodecError, match="longer than 10"):
        decode_keys(b"\x80" * 10 + b"\x01", 1)
    with pytest.raises(CodecError, match="overflows"):
        decode_keys(b"\xff" * 9 + b"\x02", 1)
    with pytest.raises(CodecError, match="non-canonical"):
        decode_keys(b"\x81\x00", 1)
    with pytest.raises(CodecError):
        decode_keys(b"\x01", 0)
    with pytest.raises(CodecError):
        decode_keys(b"", 1)
    with pytest.raises(CodecError, match="unknown column mode"):
        decode_ints(b"\x07\x00", 1)
    with pytest.raises(CodecError):
        decode_ints(b"", 0)
    with pytest.raises(CodecError, match="must be integers"):
        encode_keys(np.array([1.5]))
    assert decode_keys(b"", 0).shape == (0,)
    assert decode_ints(encode_ints(np.zeros(0, dtype=np.int64)), 0).shape == (0,)
