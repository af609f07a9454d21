"""Hostile lookup frames at a holder's lookup stream (beside ``test_stream_reads``' bad
frames): each is refused naming its problem (counts that wrap, empty names, sizes, another
partition's keys), the stream answers the next frame, and nothing stored changes; random
frames get answers or refusals, never an internal error. No sockets: ``test_stream_reads``'
harness feeds ``WriteStreamProtocol``. Under ``NUMBA_BOUNDSCHECK=1`` (``make test`` runs
this file so) a kernel read past the frame is an internal error (500)."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_stream_reads import _feed, _protocol, _store

from ekko.client.stream_frames import ANSWER, FLAG_KNOWN, KIND_LOOKUP, REQUEST, lookup_frame
from ekko.store import Store
from ekko.store.holding import Holding
from ekko.store.index import shard_of
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

BIG = (1 << 63) - 1


def _raw(names: bytes, counts: list[int], keys: list[int] | np.ndarray,
         known: list[int] | None = None, seq: int = 9) -> bytes:  # fmt: skip
    body = np.array(counts, "<i8").tobytes() + np.asarray(keys, "<i8").tobytes()
    if known is not None:
        body += np.array(known, "<i8").tobytes()
    flags = 0 if known is None else FLAG_KNOWN
    return REQUEST.pack(KIND_LOOKUP, flags, len(names), len(keys), len(counts), seq) + names + body


_GOOD = b"".join(map(bytes, lookup_frame(100, ["emb", "wide"], [np.array([1, 2]), np.array([3])])))


def _parse(out: bytes) -> list[tuple[int, int | str, str]]:
    """(seq, status or "found", reason or the versions) of each answer in ``out``."""
    got, at = [], 0
    while at < len(out):
        kind, _, status, n, seq = ANSWER.unpack_from(out, at)
        at += ANSWER.size
        if kind == 2:
            got.append((seq, status, out[at : at + n].decode()))
            at += n
            continue
        assert kind == 3, kind
        tables = struct.unpack_from("<I", out, at)[0]
        at += 8
        dims, rows = np.frombuffer(out, "<i8", 2 * tables, at).reshape(2, tables)
        at += 16 * tables
        got.append((seq, "found", str(np.frombuffer(out, "<i8", n, at).tolist())))
        at += 8 * n + 4 * int((dims * rows).sum())
    assert at == len(out)
    return got


def _run(store: Store, data: bytes) -> tuple[list[tuple[int, int | str, str]], bool]:
    """The answers to ``data`` fed to a lookup stream of ``store``, and whether it ended."""

    async def go() -> tuple[list[tuple[int, int | str, str]], bool]:
        p, t = _protocol(store)
        _feed(p, data, [])
        for _, _, answer in p._answers:
            t.writelines(answer) if isinstance(answer, list) else t.write(answer)
        p._disarm()
        return _parse(bytes(t.out)), p._last

    return asyncio.run(go())


def _rows(store: Store) -> list[tuple[str, bytes]]:
    return [(n, b"".join(a.tobytes() for a in store.table(n).all_rows()[:3]))
            for n in ("emb", "wide")]  # fmt: skip


COUNTS = "counts of at least 1 key summing to n"


@pytest.mark.parametrize(
    ("frame", "status", "says"),
    [
        (_raw(b"emb\nwide", [1, 1], [1, 2, 3]), 400, COUNTS),
        (_raw(b"emb\nemb\nemb", [BIG, BIG, 4], [1, 2]), 400, COUNTS),  # sums to 2 mod 2**64
        (_raw(b"emb\n\nwide", [1, 1, 1], [1, 2, 3]), 404, "unknown table ''"),
        (_raw(b"emb\nwide\n", [1, 1, 1], [1, 2, 3]), 404, "unknown table ''"),
        (_raw(b"emb", [1 << 20], np.zeros(1 << 20, np.int64)), 413, "split the lookup"),
        (_raw(b"emb\nemb", [1, 1], [1, 2]), "found", "[1, 1]"),
        (_raw(b"emb\nwide", [1, 1], [1, 2], known=[1, -1]), "found", "[1, 1]"),
    ],
    ids=[
        "sum-under-n",
        "sum-wraps-to-n",
        "empty-name",
        "trailing-newline",
        "answer-too-big",
        "duplicate-names",
        "known",
    ],
)
def test_a_hostile_frame_is_refused_by_name_and_the_stream_goes_on(
    frame: bytes, status: int | str, says: str
) -> None:
    store = _store()
    before = _rows(store)
    got, ended = _run(store, frame + _GOOD)
    assert len(got) == 2 and got[0][1] == status and says in got[0][2], got[0]
    assert got[1] == (100, "found", "[1, 1, 2]") and not ended
    assert _rows(store) == before


def test_a_key_of_another_partition_is_refused_421_naming_its_partition() -> None:
    placement = Placement(2)
    store = Store()
    store.set_holding(Holding("h", placement, (0,)))
    store.create_table(TableSpec("emb", 4, 4), initial_rows=64)
    part = placement.partitions_of("emb", 4)[shard_of(np.arange(40, dtype=np.int64), 4)]
    mine, theirs = int(np.flatnonzero(part == 0)[0]), int(np.flatnonzero(part == 1)[0])
    got, ended = _run(store, _raw(b"emb", [2], [mine, theirs]) + _raw(b"emb", [1], [mine], seq=10))
    assert got[0][1] == 421 and "is in partition 1" in got[0][2], got[0]
    assert got[1] == (10, "found", "[0]") and not ended


_NAMES = ["emb", "wide", "emb", "wide", "", "nope", "em\udcff"]
_count = st.one_of(st.integers(-3, 6), st.sampled_from([BIG, -BIG - 1, 1 << 62, 1 << 32]))
_big = st.sampled_from([1, 3, BIG, BIG - 1, 1 << 62, 1 << 61])
_key = st.one_of(st.integers(0, 60), st.integers(-(1 << 63), BIG))
_off = st.sampled_from([0, 0, 0, -1, 1])  # the head's tables or n: mostly right


@given(data=st.data(), known=st.booleans(), tail=st.binary(max_size=24))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_lookup_frames_get_an_answer_or_a_refusal_never_an_internal_error(
    data: st.DataObject, known: bool, tail: bytes
) -> None:
    """Names (some empty, unknown, not utf-8), counts that fit the keys or not (0, negative,
    near 2**63, summing to n only modulo 2**64), keys, the head's tables and n off by one,
    trailing bytes (the next frame's head): every answer parses, none is a 500, a frame
    whole in its bytes is answered, and nothing stored changes."""
    mode = data.draw(st.sampled_from(["fit", "wild", "wrap"]))
    if mode == "wrap":  # tables that exist, 3 or more: counts >= 1 that wrap to n
        names = data.draw(st.lists(st.sampled_from(_NAMES[:2]), min_size=3, max_size=4))
    else:
        names = data.draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4))
    if mode == "fit":  # counts that fit the keys: the kernel answers
        counts = data.draw(st.lists(st.integers(1, 4), min_size=len(names), max_size=len(names)))
        n = sum(counts)
    else:
        big = _big if mode == "wrap" else _count
        counts = data.draw(st.lists(big, min_size=len(names), max_size=len(names)))
        n = data.draw(st.integers(1, 8))
        if mode == "wrap":  # the last count makes the sum n modulo 2**64
            last = (n - sum(counts[:-1])) % (1 << 64)
            counts[-1] = last - (1 << 64) if last > BIG else last
    keys = data.draw(st.lists(_key, min_size=n, max_size=n))
    tables, more = data.draw(_off), data.draw(_off)
    store = _store()
    before = _rows(store)
    raw = "\n".join(names).encode("utf-8", "surrogateescape")
    frame = bytearray(_raw(raw, counts, keys, keys if known else None))
    kind, flags, name_len, n0, t0, seq = REQUEST.unpack_from(frame)
    REQUEST.pack_into(frame, 0, kind, flags, name_len, max(n0 + more, 0), max(t0 + tables, 0),
                      seq)  # fmt: skip
    got, _ = _run(store, bytes(frame) + tail)
    for _, status, _ in got[:1]:
        event(f"answer: {status}")
    assert all(status != 500 for _, status, _ in got), got
    assert got or more > 0 or tables > 0  # only a frame longer than its bytes waits for more
    assert _rows(store) == before
