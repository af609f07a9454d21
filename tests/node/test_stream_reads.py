"""How a stream's bytes are cut does not change its answers: lookup frames fed to
``WriteStreamProtocol`` whole, byte at a time or in random pieces (several frames in one
read, a frame cut in its head, names or body) get the same answers, in order; with the
window full, frames already read wait and are answered once it drains. No sockets: the
protocol is fed as asyncio feeds it (``get_buffer`` then ``buffer_updated``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ekko.client.stream_frames import ANSWER, FOUND, KIND_LOOKUP, REFUSED, REQUEST, lookup_frame
from ekko.node.write_stream import STAGE_BYTES, StreamStats, WriteStreamProtocol
from ekko.store import Store
from ekko.store.spec import TableSpec


class _Core:
    def __init__(self, store: Store) -> None:
        self.store = store


class _Transport:
    """What the protocol writes, and whether it is reading."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: list) -> None:
        for p in parts:
            self.out += bytes(p)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str) -> None:
        return None


def _store() -> Store:
    store = Store()
    for name, dim in (("emb", 4), ("wide", 3)):
        t = store.create_table(TableSpec(name, dim, 4), initial_rows=64)
        keys = np.arange(50, dtype=np.int64)
        t.write(keys, np.arange(50 * dim, dtype=np.float32).reshape(50, dim), now_ns=1)
    return store


def _frames(rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for seq in range(1, count + 1):
        n = int(rng.choice([1, 3, 40, 700]))  # 700 keys: a frame longer than a read
        keys = [rng.integers(0, 60, n), rng.integers(0, 60, 2)]
        known = [np.full(n, -1), np.ones(2, np.int64)] if seq % 3 == 0 else None
        out.append(b"".join(bytes(p) for p in lookup_frame(seq, ["emb", "wide"], keys, known)))
    return out


def _protocol(store: Store, window: int = 256) -> tuple[WriteStreamProtocol, _Transport]:
    p = WriteStreamProtocol(_Core(store), 1 << 24, StreamStats(), window, lookups=True)
    t = _Transport()
    p.connection_made(t)  # type: ignore[arg-type]
    return p, t


def _feed(p: WriteStreamProtocol, data: bytes, cuts: list[int]) -> int:
    """Feed ``data`` in pieces ending at ``cuts``, as far as the protocol reads; returns
    how much was fed."""
    at = 0
    for end in [*cuts, len(data)]:
        while at < end:
            if p._reading_paused:
                return at
            buf = p.get_buffer(-1)
            m = min(len(buf), end - at)
            buf[:m] = data[at : at + m]
            p.buffer_updated(m)
            at += m
    return at


def _answers(p: WriteStreamProtocol, t: _Transport) -> bytes:
    for _, _, answer in p._answers:  # what run() would send
        t.writelines(answer) if isinstance(answer, list) else t.write(answer)
    p._answers.clear()
    p._disarm()
    return bytes(t.out)


@pytest.mark.parametrize("seed", range(6))
async def test_answers_do_not_depend_on_how_the_bytes_are_cut(seed: int) -> None:
    rng = np.random.default_rng(seed)
    store = _store()
    frames = _frames(rng, 12)
    data = b"".join(frames)
    one_by_one, t = _protocol(store)
    for f in frames:
        _feed(one_by_one, f, [])
    want = _answers(one_by_one, t)
    assert one_by_one.stats.frames == 12
    if seed == 0:
        cuts = list(range(1, len(data)))  # byte at a time
    else:
        cuts = np.cumsum(rng.integers(1, 300, len(data))).tolist()  # reads of 1..299 bytes
        cuts = [c for c in cuts if c < len(data)]
    p, t = _protocol(store)
    assert _feed(p, data, cuts) == len(data)
    assert _answers(p, t) == want
    assert p.stats.frames == 12 and not p._last


async def test_frames_read_past_a_full_window_wait_and_are_answered_in_order() -> None:
    rng = np.random.default_rng(9)
    store = _store()
    frames = [f for f in _frames(rng, 60) if len(f) < 200][:20]  # many small frames: one read
    data = b"".join(frames)
    assert len(data) < STAGE_BYTES
    alone, t = _protocol(store)
    for f in frames:
        _feed(alone, f, [])
    want = _answers(alone, t)
    p, t = _protocol(store, window=3)
    p._writing.clear()  # the client reads nothing: answers queue up to the window
    assert _feed(p, data, []) == len(data)  # one read took every frame
    assert not t.reading and len(p._answers) == 3  # the rest wait, read but not answered
    sent = bytearray()
    for _ in range(len(frames)):  # each round answers at least one frame
        if not (p._answers or p._got):
            break
        for _, _, answer in p._answers:
            sent += b"".join(map(bytes, answer)) if isinstance(answer, list) else answer
        p._answers.clear()
        p._resume_reading()  # as run() does once the answers are sent
    assert t.reading and bytes(sent) == want
    assert p.stats.frames == len(frames)
    p._disarm()


async def test_a_frame_cut_short_arms_its_deadline_and_a_whole_one_does_not() -> None:
    store = _store()
    frame = _frames(np.random.default_rng(1), 1)[0]
    p, _ = _protocol(store)
    _feed(p, frame, [])
    assert p._deadline is None  # read whole in one go: no timer to arm and cancel
    _feed(p, frame[: REQUEST.size + 2], [])
    assert p._deadline is not None  # its names cut short: the rest must come in time
    _feed(p, frame[REQUEST.size + 2 :], [])
    assert p._deadline is None and p.stats.frames == 2
    await asyncio.sleep(0)


def _raw(seq: int, names: bytes, tables: int, counts: list[int], keys: list[int]) -> bytes:
    body = np.array([*counts, *keys], "<i8").tobytes()
    return REQUEST.pack(KIND_LOOKUP, 0, len(names), len(keys), tables, seq) + names + body


@pytest.mark.parametrize(
    ("names", "tables", "counts", "status", "why"),
    [
        (b"emb\nwide", 3, [1, 1, 1], 400, "a lookup of 3 tables needs as many names (got 2)"),
        (b"emb\nwide", 2, [0, 2], 400, "n = 2: count 0 (table 'emb') is 0, expected 1..2"),
        (b"emb\nwide", 2, [1, 2], 400, "n = 2: count 1 (table 'wide') is 2, expected 1..1"),
        (b"emb\nwide", 2, [-1, 3], 400, "n = 2: count 0 (table 'emb') is -1, expected 1..2"),
        (b"emb\nemb\nwide", 3, [1, 0, 1], 400, "count 1 (table 'emb') is 0, expected 1..1"),
        (b"emb", 1, [1], 400, "summing to n = 2: they sum to 1"),
        (b"emb\nnope", 2, [1, 1], 404, "nope"),
        (b"emb\n\xff", 2, [1, 1], 400, "table name: not utf-8"),
    ],
)
async def test_a_bad_lookup_frame_is_refused_by_name_and_the_stream_goes_on(
    names: bytes, tables: int, counts: list[int], status: int, why: str
) -> None:
    """Counts, names and tables that do not agree, an unknown table, names not utf-8: the
    frame is refused with its reason, nothing else, and the next frame is answered."""
    store = _store()
    p, t = _protocol(store)
    _feed(p, _raw(1, names, tables, counts, [1, 2]), [])
    good = _frames(np.random.default_rng(2), 1)[0]
    _feed(p, REQUEST.pack(*REQUEST.unpack(good[: REQUEST.size])[:-1], 2) + good[REQUEST.size :], [])
    out = _answers(p, t)
    kind, _, got, n, seq = ANSWER.unpack_from(out)
    assert (kind, got, seq) == (REFUSED, status, 1), out[:80]
    assert why in out[ANSWER.size : ANSWER.size + n].decode()
    assert ANSWER.unpack_from(out, ANSWER.size + n)[0] == FOUND and p.stats.frames == 1
