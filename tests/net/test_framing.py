"""Frame codec: round trips, split-invariance, and the decoder's error invariant (h11 test_io
style). Any bytes, any split → messages or RemoteFrameError, nothing else."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.net.arrays import enc_hook
from ekko.net.errors import LocalFrameError, RemoteFrameError
from ekko.net.framing import (
    ARRAY_EXT,
    FLAG_ZSTD,
    HEADER,
    HEADER_SIZE,
    FrameDecoder,
    encode_frame,
)
from ekko.net.handshake import Auth, Challenge, HandshakeMessage
from ekko.protocol.messages import SHARED_PARTS, Catalog, Chunk, Message, PullResponse

from .helpers import (
    WIRE_DTYPES,
    assert_same,
    every_message,
    message_classes,
    messages_strategy,
    sample_chunk,
)


def _raw_frame(payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), flags) + payload


def _decode_all(data: bytes, **kw: object) -> list[object]:
    return FrameDecoder(**{"message_type": Message, **kw}).feed(data)  # type: ignore[arg-type]


def _feed_split(data: bytes, cuts: list[int]) -> list[object]:
    dec = FrameDecoder(message_type=Message)
    out: list[object] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += dec.feed(data[last:cut])
        last = cut
    return out


# -- round trips ------------------------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in every_message()} == set(message_classes())


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("msg", every_message(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(msg: Message, compress: bool) -> None:
    (back,) = _decode_all(encode_frame(msg, compress=compress))
    assert_same(msg, back)


@pytest.mark.parametrize("compress", [False, True])
def test_chunk_arrays_keep_dtype_shape_and_values(compress: bool) -> None:
    chunk = sample_chunk(rows=300, dim=16)
    (back,) = _decode_all(encode_frame(PullResponse(1, 2, [chunk]), compress=compress))
    got = back.chunks[0]
    assert got.values.dtype == np.float32 and got.values.shape == (300, 16)
    assert got.keys.dtype == np.int64 and got.keys.shape == (300,)
    np.testing.assert_array_equal(got.values, chunk.values)
    np.testing.assert_array_equal(got.keys, chunk.keys)
    assert_same(chunk, got)


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    chunk = sample_chunk(rows=6, dim=3)
    values = (np.arange(18) % 100).astype(dtype).reshape(6, 3)
    msg = PullResponse(1, 1, [msgspec.structs.replace(chunk, values=values)])
    (back,) = _decode_all(encode_frame(msg))
    assert_same(values, back.chunks[0].values)


def test_non_contiguous_and_big_endian_arrays_are_sent_as_values() -> None:
    chunk = sample_chunk(rows=8, dim=4)
    strided = np.arange(64, dtype=np.float32).reshape(8, 8)[:, ::2]
    big = np.arange(8, dtype=">i8")
    msg = PullResponse(1, 1, [msgspec.structs.replace(chunk, values=strided, keys=big)])
    (back,) = _decode_all(encode_frame(msg))
    np.testing.assert_array_equal(back.chunks[0].values, strided)
    np.testing.assert_array_equal(back.chunks[0].keys, big)
    assert back.chunks[0].keys.dtype == np.dtype("<i8")


def test_decoded_arrays_are_read_only() -> None:
    (back,) = _decode_all(encode_frame(PullResponse(1, 1, [sample_chunk()])))
    assert not back.chunks[0].values.flags.writeable
    assert not back.chunks[0].keys.flags.writeable


def test_compression_used_only_when_it_shrinks() -> None:
    zeros = msgspec.structs.replace(sample_chunk(rows=2000), values=np.zeros((2000, 4), np.float32))
    packed = encode_frame(PullResponse(1, 1, [zeros]), compress=True)
    plain = encode_frame(PullResponse(1, 1, [zeros]))
    assert packed[4] & FLAG_ZSTD and len(packed) < len(plain)
    tiny = encode_frame(Catalog(1, 1, []), compress=True)
    assert tiny[4] == 0 and tiny == encode_frame(Catalog(1, 1, []))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages_strategy(), compress=st.booleans())
def test_round_trip_generated_messages(msg: Message, compress: bool) -> None:
    (back,) = _decode_all(encode_frame(msg, compress=compress))
    assert_same(msg, back)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages_strategy(PullResponse))
def test_pull_response_bytes_equal_a_plain_encoding(msg: PullResponse) -> None:
    """Chunks are encoded on their own (and reused) but the frame is byte for byte what a
    peer encoding the whole PullResponse in one go would send."""
    plain = msgspec.msgpack.Encoder(enc_hook=enc_hook).encode(msg)
    assert encode_frame(msg, encode_once=SHARED_PARTS) == HEADER.pack(len(plain), 0) + plain
    assert encode_frame(msg) == HEADER.pack(len(plain), 0) + plain


def test_a_chunk_shared_by_several_responses_is_encoded_once(encoded: list[str]) -> None:
    """The responder hands sessions in step the same Chunk object; its bytes are reused for
    every frame that carries it, and each frame still decodes to its own response."""
    shared, other = sample_chunk(rows=7, i=1), sample_chunk(rows=3, i=2)
    frames = [
        encode_frame(
            PullResponse(req_id, 3, [shared, other] if req_id == 1 else [shared]),
            encode_once=SHARED_PARTS,
        )
        for req_id in (1, 2, 3)
    ]
    assert encoded.count("Chunk") == 2  # shared once, other once
    for req_id, frame in zip((1, 2, 3), frames, strict=True):
        (back,) = _decode_all(frame)
        assert back.req_id == req_id
        assert_same(back.chunks[0], shared)
    # An equal but distinct chunk is encoded again (identity, not equality, is the key).
    encode_frame(PullResponse(4, 3, [sample_chunk(rows=7, i=1)]), encode_once=SHARED_PARTS)
    assert encoded.count("Chunk") == 3
    # Without encode_once (a schema naming no shared parts) nothing is reused.
    encode_frame(PullResponse(5, 3, [shared]))
    assert encoded.count("Chunk") == 3 and encoded[-1] == "PullResponse"


# -- splits -------------------------------------------------------------------------------------


def test_whole_buffer_equals_byte_at_a_time() -> None:
    msgs = every_message()
    data = b"".join(encode_frame(m, compress=k % 2 == 0) for k, m in enumerate(msgs))
    whole = _decode_all(data)
    dec = FrameDecoder(message_type=Message)
    one_by_one = [m for i in range(len(data)) for m in dec.feed(data[i : i + 1])]
    assert len(whole) == len(msgs)
    assert_same(whole, msgs)
    assert_same(one_by_one, msgs)
    assert dec.buffered_bytes == 0


@settings(max_examples=100)
@given(
    msgs=st.lists(messages_strategy(), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_any_split_gives_the_same_messages(msgs: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    assert_same(_feed_split(data, [c % (len(data) + 1) for c in cuts]), msgs)


def test_message_type_can_switch_between_frames() -> None:
    challenge = Challenge(nonce=b"n" * 32, protocol_version=1, node="s")
    data = encode_frame(challenge) + encode_frame(Catalog(7, 1, []))
    dec = FrameDecoder(message_type=HandshakeMessage)
    dec.receive_data(data)
    assert dec.next_message() == challenge
    dec.message_type = Message
    assert dec.next_message() == Catalog(7, 1, [])
    assert dec.next_message() is None


def test_handshake_message_is_refused_by_a_data_decoder() -> None:
    with pytest.raises(RemoteFrameError, match="payload"):
        _decode_all(encode_frame(Auth(node="x", nonce=b"", mac=b"", protocol_version=1)))


# -- the error invariant --------------------------------------------------------------------


def _only_messages_or_remote_error(data: bytes, cuts: list[int], max_frame_bytes: int) -> None:
    dec = FrameDecoder(message_type=Message, max_frame_bytes=max_frame_bytes)
    last = 0
    try:
        for cut in [*sorted(set(cuts)), len(data)]:
            for msg in dec.feed(data[last:cut]):
                assert isinstance(msg, message_classes_tuple)
            last = cut
    except RemoteFrameError as e:
        assert e.reason
        with pytest.raises(RemoteFrameError):  # stays in error
            dec.feed(b"")


message_classes_tuple = tuple(message_classes())


@settings(max_examples=400)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=5))
def test_arbitrary_bytes_give_messages_or_remote_frame_error(data: bytes, cuts: list[int]) -> None:
    _only_messages_or_remote_error(data, [c % (len(data) + 1) for c in cuts], 1 << 16)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg=messages_strategy(),
    compress=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=4),
    truncate=st.integers(0, 1 << 20),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=4),
)
def test_corrupted_or_truncated_frames_give_messages_or_remote_frame_error(
    msg: Message,
    compress: bool,
    flips: list[tuple[int, int]],
    truncate: int,
    cuts: list[int],
) -> None:
    data = bytearray(encode_frame(msg, compress=compress))
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    data = data[: max(1, truncate % (len(data) + 1))]
    _only_messages_or_remote_error(bytes(data), [c % (len(data) + 1) for c in cuts], 1 << 20)


@settings(max_examples=200)
@given(payload=st.binary(max_size=200), flags=st.sampled_from([0, FLAG_ZSTD]))
def test_random_payload_in_a_valid_header(payload: bytes, flags: int) -> None:
    _only_messages_or_remote_error(_raw_frame(payload, flags), [], 1 << 16)


def test_decoder_stays_in_error() -> None:
    dec = FrameDecoder(message_type=Message)
    with pytest.raises(RemoteFrameError, match="flags") as first:
        dec.feed(b"\x00\x00\x00\x01\x80x")
    with pytest.raises(RemoteFrameError, match="flags") as again:
        dec.feed(encode_frame(Catalog(1, 1, [])))
    assert again.value.__cause__ is first.value


# -- sizes ---------------------------------------------------------------------------------------


def test_oversize_frame_is_a_local_error_on_encode() -> None:
    msg = PullResponse(1, 1, [sample_chunk(rows=1000, dim=16)])
    with pytest.raises(LocalFrameError, match="above the frame limit"):
        encode_frame(msg, max_frame_bytes=10_000)
    # compression does not lift the limit: the receiver's decompression limit is the same
    zeros = msgspec.structs.replace(sample_chunk(rows=1000), values=np.zeros((1000, 16), "f4"))
    with pytest.raises(LocalFrameError):
        encode_frame(PullResponse(1, 1, [zeros]), compress=True, max_frame_bytes=10_000)


def test_oversize_frame_is_a_remote_error_on_decode_from_the_header_alone() -> None:
    frame = encode_frame(PullResponse(1, 1, [sample_chunk(rows=1000, dim=16)]))
    with pytest.raises(RemoteFrameError, match="above the limit"):
        FrameDecoder(message_type=Message, max_frame_bytes=10_000).feed(frame[:HEADER_SIZE])


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\x00" * 1_000_000)
    assert len(bomb) < 1000
    with pytest.raises(RemoteFrameError, match="declares"):
        FrameDecoder(message_type=Message, max_frame_bytes=100_000).feed(
            _raw_frame(bomb, FLAG_ZSTD)
        )


def test_zstd_without_content_size_is_refused() -> None:
    body = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x81" * 100)
    with pytest.raises(RemoteFrameError, match="content size"):
        FrameDecoder(message_type=Message).feed(_raw_frame(body, FLAG_ZSTD))


def test_zstd_lying_about_its_size_is_refused() -> None:
    payload = encode_frame(Catalog(1, 1, []))[HEADER_SIZE:]
    body = bytearray(zstandard.ZstdCompressor().compress(payload + b"\x00" * 100))
    # shrink the declared content size (single-byte field right after the frame header byte)
    fhd = body[4]
    assert fhd & 0xC0 == 0 and fhd & 0x20  # single segment, 1-byte content size
    body[5] = len(payload)
    with pytest.raises(RemoteFrameError, match="zstd"):
        FrameDecoder(message_type=Message).feed(_raw_frame(bytes(body), FLAG_ZSTD))


def test_bad_zstd_is_refused() -> None:
    with pytest.raises(RemoteFrameError, match="zstd"):
        FrameDecoder(message_type=Message).feed(_raw_frame(b"not zstd at all", FLAG_ZSTD))


# -- arrays ---------------------------------------------------------------------------------------


def _chunk_with_raw_keys(ext: msgspec.msgpack.Ext) -> bytes:
    """A PullResponse frame whose first chunk's ``keys`` is the given ext."""
    good = encode_frame(PullResponse(1, 1, [sample_chunk()]))
    obj = msgspec.msgpack.decode(
        good[HEADER_SIZE:], ext_hook=lambda c, d: msgspec.msgpack.Ext(c, bytes(d))
    )
    obj["chunks"][0][Chunk.__struct_fields__.index("keys")] = ext  # chunks are arrays
    return _raw_frame(msgspec.msgpack.encode(obj))


def _array_ext(
    dtype: str, shape: list[int], raw: bytes, code: int = ARRAY_EXT
) -> msgspec.msgpack.Ext:
    header = msgspec.msgpack.encode([dtype, shape])
    return msgspec.msgpack.Ext(code, struct.pack(">H", len(header)) + header + raw)


def test_well_formed_array_ext_decodes() -> None:
    (back,) = _decode_all(_chunk_with_raw_keys(_array_ext("<i8", [2], b"\x01" * 16)))
    assert back.chunks[0].keys.tolist() == [0x0101010101010101] * 2


@pytest.mark.parametrize(
    ("ext", "reason"),
    [
        (_array_ext("|O", [1], b"\x00" * 8), "not allowed"),
        (_array_ext("<c16", [1], b"\x00" * 16), "not allowed"),
        (_array_ext("|b1", [1], b"\x01"), "not allowed"),
        (_array_ext(">i8", [1], b"\x00" * 8), "not allowed"),
        (_array_ext("<i8", [3], b"\x00" * 16), "needs 24 bytes"),
        (_array_ext("<i8", [-1], b""), "bad array shape"),
        (_array_ext("<i8", [0, 2**62], b""), "bad array shape"),  # 0 bytes, too big a shape
        (_array_ext("<i8", [0, 2**64 - 1], b""), "bad array shape"),
        (_array_ext("<i8", [2**32, 2**32, 0], b""), "bad array shape"),
        (_array_ext("<i8", [2], b"\x00" * 16, code=7), "ext code 7"),
        (msgspec.msgpack.Ext(ARRAY_EXT, b"\x00"), "shorter"),
        (msgspec.msgpack.Ext(ARRAY_EXT, b"\x00\x09ab"), "exceeds"),
        (msgspec.msgpack.Ext(ARRAY_EXT, b"\x00\x02\xc1\xc1"), "bad array header"),
    ],
)
def test_bad_array_ext_is_a_remote_error(ext: msgspec.msgpack.Ext, reason: str) -> None:
    with pytest.raises(RemoteFrameError, match=reason):
        _decode_all(_chunk_with_raw_keys(ext))


@pytest.mark.parametrize("bad", [np.array([object()]), np.array([True]), np.zeros(2, "c8")])
def test_unsupported_arrays_are_a_local_error(bad: np.ndarray) -> None:
    chunk = msgspec.structs.replace(sample_chunk(), keys=bad)
    with pytest.raises(LocalFrameError, match="not allowed"):
        encode_frame(PullResponse(1, 1, [chunk]))


def test_unencodable_value_is_a_local_error() -> None:
    with pytest.raises(LocalFrameError):
        encode_frame(Catalog(1, 1, [object()]))  # type: ignore[list-item]


# -- any typed message ------------------------------------------------------------------------


class _Part(msgspec.Struct, frozen=True, array_like=True):
    name: str
    data: np.ndarray


class _Batch(msgspec.Struct, frozen=True, tag="batch", tag_field="kind", rename="camel",
             omit_defaults=True):  # fmt: skip
    batch_id: int
    parts: list[_Part]
    note_text: str = ""
    extra_parts: list[_Part] = msgspec.field(default_factory=list)
    weights: np.ndarray | None = None


def test_any_typed_message_with_shared_parts_is_its_plain_encoding() -> None:
    """Framing knows no protocol class: a message type it never saw, with renamed fields,
    omitted defaults and two shared-part lists, frames to the bytes of its plain encoding and
    decodes back; its shared parts are encoded once."""
    part = _Part("p", np.arange(6, dtype=np.float32).reshape(2, 3))
    plain_enc = msgspec.msgpack.Encoder(enc_hook=enc_hook)
    for msg in (
        _Batch(1, [part, part]),
        _Batch(2, [part], note_text="n", extra_parts=[_Part("q", np.zeros(2, np.int64))]),
        _Batch(3, [], weights=np.ones(4, np.float16)),
    ):
        plain = plain_enc.encode(msg)
        frame = encode_frame(msg, encode_once=(_Part,))
        assert frame == HEADER.pack(len(plain), 0) + plain
        (back,) = _decode_all(frame, message_type=_Batch)
        assert_same(back, msg)


def test_a_message_with_no_shared_part_field_is_encoded_whole(encoded: list[str]) -> None:
    encode_frame(Catalog(1, 1, []), encode_once=SHARED_PARTS)
    encode_frame(_Batch(1, [_Part("p", np.zeros(1, np.int8))]), encode_once=SHARED_PARTS)
    assert encoded == ["Catalog", "_Batch"]
