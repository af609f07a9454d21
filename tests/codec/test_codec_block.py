"""RowBlock: round trip for every codec with and without zstd; corruption detected; sizes."""

from __future__ import annotations

import zlib

import hypothesis.extra.numpy as hnp
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.codec import (
    CODECS,
    CodecError,
    RowBlock,
    decode_block,
    decode_dead,
    encode_block,
    max_abs_error,
)

FIELDS = ("keys", "versions", "wtimes", "values", "params")


def make_rows(
    n: int, dim: int, seed: int = 0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n rows with random int64 keys in a 10M range, dense versions and ns write times."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(10_000_000, size=n, replace=False).astype(np.int64)
    values = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
    versions = 1_000_000 + np.arange(n, dtype=np.int64)  # written in this order
    wtimes = 1_700_000_000_000_000_000 + np.sort(rng.integers(0, 10**9, size=n))  # within 1 s
    return keys, values, versions, wtimes


def check_roundtrip(
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    wtimes: np.ndarray,
    codec: str,
    compress: bool,
) -> RowBlock:
    block = encode_block(keys, values, versions, wtimes, codec=codec, compress=compress)
    wire = msgspec.msgpack.encode(block)
    block2 = msgspec.msgpack.decode(wire, type=RowBlock)
    k, v, ver, wt = decode_block(block2)
    order = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(k, keys[order])
    np.testing.assert_array_equal(ver, versions[order])
    np.testing.assert_array_equal(wt, wtimes[order])
    assert v.dtype == np.float32 and v.shape == values.shape
    src = values[order]
    err = np.abs(v.astype(np.float64) - src).max(axis=1) if src.size else np.zeros(len(src))
    assert (err <= max_abs_error(src, codec)).all()
    return block


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip(codec: str, compress: bool) -> None:
    for n, dim in ((1000, 16), (37, 32), (1, 1), (0, 8)):
        check_roundtrip(*make_rows(n, dim, seed=n, scale=0.01), codec, compress)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 40).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.int64, n, elements=st.integers(-(2**63), 2**63 - 1)),
            hnp.arrays(np.float32, (n, 3), elements=st.floats(-1e4, 1e4, width=32)),
            hnp.arrays(np.int64, n, elements=st.integers(-(2**63), 2**63 - 1)),
            hnp.arrays(np.int64, n, elements=st.integers(0, 2**62)),
        )
    ),
    st.sampled_from(CODECS),
    st.booleans(),
)
def test_roundtrip_arbitrary(cols: tuple[np.ndarray, ...], codec: str, compress: bool) -> None:
    check_roundtrip(*cols, codec, compress)


def test_duplicate_keys_keep_stable_order() -> None:
    keys = np.array([7, 3, 7, 3], dtype=np.int64)
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    versions = np.array([10, 11, 12, 13], dtype=np.int64)
    k, v, ver, _ = decode_block(
        encode_block(keys, values, versions, versions, codec="fp32", compress=False)
    )
    np.testing.assert_array_equal(k, [3, 3, 7, 7])
    np.testing.assert_array_equal(ver, [11, 13, 10, 12])
    np.testing.assert_array_equal(v, values[[1, 3, 0, 2]])


def test_fp16_fallback_recorded() -> None:
    keys, values, versions, wtimes = make_rows(10, 4)
    values[3, 1] = 1e6
    block = encode_block(keys, values, versions, wtimes, codec="fp16", compress=True)
    assert block.codec == "fp32"
    _, v, _, _ = decode_block(block)
    np.testing.assert_array_equal(v, values[np.argsort(keys)])


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_corruption_detected(codec: str, compress: bool) -> None:
    rng = np.random.default_rng(5)
    block = encode_block(*make_rows(300, 16, scale=0.01), codec=codec, compress=compress)
    for name in FIELDS:
        data = getattr(block, name)
        if not data:
            continue
        for _ in range(5):
            buf = bytearray(data)
            buf[rng.integers(len(buf))] ^= int(rng.integers(1, 256))
            with pytest.raises(CodecError, match="checksum"):
                decode_block(msgspec.structs.replace(block, **{name: bytes(buf)}))
        with pytest.raises(CodecError):
            decode_block(msgspec.structs.replace(block, **{name: data[:-1]}))
    for bad in (
        {"n": block.n + 1},
        {"n": block.n - 1},
        {"dim": block.dim + 1},
        {"n": -1},
        {"codec": "bf16"},
        {"zmask": 1 << 7},
        {"crc": block.crc ^ 1},
    ):
        with pytest.raises(CodecError):
            decode_block(msgspec.structs.replace(block, **bad))


def test_shape_mismatch_rejected() -> None:
    keys, values, versions, wtimes = make_rows(10, 4)
    with pytest.raises(CodecError):
        encode_block(keys[:9], values, versions, wtimes, codec="fp32", compress=False)
    with pytest.raises(CodecError):
        encode_block(keys, values[0], versions, wtimes, codec="fp32", compress=False)
    with pytest.raises(CodecError, match="unknown codec"):
        encode_block(keys, values, versions, wtimes, codec="int3", compress=False)


@pytest.mark.parametrize("dim", [16, 32])
def test_sizes_shrink(dim: int) -> None:
    """Realistic embedding rows: int8 + zstd is at least 2x smaller than plain fp32 per row,
    and compression never makes a block bigger than uncompressed."""
    rows = make_rows(10_000, dim, scale=0.01)
    size = {
        (c, z): encode_block(*rows, codec=c, compress=z).nbytes
        for c in CODECS
        for z in (False, True)
    }
    for c in CODECS:
        assert size[c, True] <= size[c, False]
    assert size["fp32", False] / size["int8", True] >= 2
    # keys (~2 B) + versions (~2 B) + wtimes (< 5 B) stay well under 3 int64 columns
    assert size["fp32", False] - 10_000 * dim * 4 < 10_000 * 10


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_tombstones_round_trip_without_their_values(codec: str, compress: bool) -> None:
    keys, values, versions, wtimes = make_rows(60, 8, seed=3)
    dead = np.zeros(60, np.uint8)
    dead[[0, 7, 8, 59]] = 1
    block = encode_block(keys, values, versions, wtimes, codec=codec, compress=compress, dead=dead)
    assert block.ndead == 4
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(block), type=RowBlock)
    k, v, ver, _ = decode_block(back)
    flags = decode_dead(back)
    order = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(k, keys[order])
    np.testing.assert_array_equal(ver, versions[order])
    np.testing.assert_array_equal(flags, dead[order])
    assert not v[flags == 1].any()  # a tombstone decodes to zeros
    live = flags == 0
    err = np.abs(v[live].astype(np.float64) - values[order][live]).max(axis=1)
    assert (err <= max_abs_error(values[order][live], codec)).all()
    plain = encode_block(keys, values, versions, wtimes, codec=codec, compress=compress)
    assert len(block.values) < len(plain.values)  # their values are not sent


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"ndead": 61}, "ndead"),
        ({"ndead": -1}, "ndead"),
        ({"dead": b"\x02\x01", "ndead": 2}, "not increasing"),  # positions 1, 0
        ({"dead": b"\x00\x7e", "ndead": 2}, "not increasing"),  # positions 0, 63: past n
        ({"dead": b"", "ndead": 2}, "keys"),
    ],
)
def test_bad_tombstone_positions_are_refused(bad: dict, why: str) -> None:
    dead = np.zeros(60, np.uint8)
    dead[[3, 4]] = 1
    block = encode_block(*make_rows(60, 4), codec="fp32", compress=False, dead=dead)
    forged = msgspec.structs.replace(block, **bad)
    if "dead" in bad:  # a sender that computed its checksum over the forged positions
        parts = (*(getattr(forged, f) for f in FIELDS), forged.dead)
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        forged = msgspec.structs.replace(forged, crc=crc)
    with pytest.raises(CodecError, match=why):
        decode_dead(forged) if "ndead" in bad and "dead" not in bad else decode_block(forged)
    flipped = msgspec.structs.replace(block, dead=bytes([block.dead[0] ^ 1]) + block.dead[1:])
    with pytest.raises(CodecError, match="checksum"):
        decode_block(flipped)
