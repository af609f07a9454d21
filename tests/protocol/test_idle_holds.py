"""An idle link's empty answers say what the responder holds once per ``HOLDS_QUIET_S``, not
once per answer: a puller keeps ``window`` pulls parked, all expiring each ``wait_ms``, and
every one of them carried a copy of every table's knowledge for the puller to decode and
check (a third of an idle holder's CPU in a 4-partition cluster)."""

from __future__ import annotations

import itertools

import numpy as np

from ekko.protocol.messages import PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.responder import HOLDS_QUIET_S, Responder
from ekko.store import Store
from ekko.store.spec import TableSpec

SPECS = [TableSpec(f"emb_{i}", 4, 8) for i in range(3)]


def _store(rows: int) -> Store:
    store = Store()
    for i, spec in enumerate(SPECS):
        t = store.create_table(spec)
        if rows:
            keys = np.arange(rows, dtype=np.int64) + 1000 * i
            t.write(keys, np.full((rows, spec.dim), i + 1, np.float32), now_ns=1)
    return store


def _deliver(responder: Responder, puller: Puller, answers: list, now: float) -> list:
    """Hand ``answers`` to the puller and its new pulls to the responder, until nothing is
    answered at once (every pull parked); the empty answers seen on the way."""
    seen = []
    for _ in range(100):
        if not answers:
            return seen
        pulls = []
        for a in answers:
            if isinstance(a, PullResponse) and not a.chunks:
                seen.append(a)
            pulls += [m for _, m in puller.receive(a, now).sends]
        answers = []
        for p in pulls:
            answers += [m for _, m in responder.receive(7, p, now).sends]
    raise AssertionError("the link did not settle")


def _idle(window: int, seconds: float, step: float = 0.05) -> list[tuple[float, PullResponse]]:
    """A link synced at t=1 left idle for ``seconds``, the responder ticked every ``step``:
    each empty answer with the time it was sent."""
    source, replica = _store(200), _store(0)
    responder = Responder(source)
    puller = Puller(replica, PullerConfig(wait_ms=1000, window=window))
    start = [m for _, m in puller.start(1.0).sends]
    first = [m for p in start for _, m in responder.receive(7, p, 1.0).sends]
    _deliver(responder, puller, first, 1.0)
    assert all(
        np.array_equal(replica.table(s.name).knowledge, source.table(s.name).knowledge)
        for s in SPECS
    )
    out = []
    now = 1.0
    while now < 1.0 + seconds:
        now += step
        expired = [m for _, m in responder.tick(now).sends]
        out += [(now, a) for a in _deliver(responder, puller, expired, now)]
    return out


def test_an_idle_links_empty_answers_carry_the_holds_once_a_second() -> None:
    got = _idle(32, 8.0)
    held = [t for t, a in got if a.holds is not None]
    assert 6 <= len(held) <= 8, f"{len(held)} of {len(got)} carried the holds"
    assert all(b - a >= HOLDS_QUIET_S for a, b in itertools.pairwise(held))


def test_an_idle_window_turns_over_half_as_often_as_it_holds_pulls() -> None:
    """Pulls wait 1 to WAIT_SPREAD x ``wait_ms``: of a window of 32 idle for 8 s, each pull
    expires every 2.5 s on average, not every second (256 empty answers before; 85 now),
    spread over the seconds rather than all in one tick."""
    got = _idle(32, 8.0)
    assert 32 <= len(got) <= 0.6 * 32 * 8, len(got)
    per_tick: dict[float, int] = {}
    for t, _ in got:
        per_tick[t] = per_tick.get(t, 0) + 1
    assert max(per_tick.values()) <= 12


def test_a_lost_answer_is_still_found_by_the_next_holds() -> None:
    """A parked pull's answer with rows is lost; the puller hears of it from the next empty
    answer's holds (within ``HOLDS_QUIET_S`` of quiet), resyncs, and converges."""
    source, replica = _store(50), _store(0)
    responder = Responder(source)
    puller = Puller(replica, PullerConfig(wait_ms=1000, window=4))
    start = [m for _, m in puller.start(1.0).sends]
    first = [m for p in start for _, m in responder.receive(7, p, 1.0).sends]
    _deliver(responder, puller, first, 1.0)
    key = np.array([7], np.int64)
    source.table("emb_1").write(key, np.full((1, 4), 9, np.float32), now_ns=2)
    lost = [m for _, m in responder.store_changed(1.1).sends]  # a parked pull answered ...
    assert any(isinstance(m, PullResponse) and m.chunks for m in lost)  # ... and dropped
    now = 1.1
    for _ in range(6):
        now += 1.0 + HOLDS_QUIET_S / 10
        _deliver(responder, puller, [m for _, m in responder.tick(now).sends], now)
        if replica.table("emb_1").lookup(key)[1][0] > 0:
            break
    rows, versions, _ = replica.table("emb_1").lookup(key)
    assert versions[0] > 0 and rows[0].tolist() == [9.0] * 4


def test_an_idle_link_dropping_answers_still_converges() -> None:
    """A lost answer with rows, then an idle link that drops a third of its answers —
    the empty answers carrying the holds among them (a lost holds answer is not resent:
    ``holds_at`` moved when it was built): a later one gets through, the puller resyncs
    and converges."""
    source, replica = _store(50), _store(0)
    responder = Responder(source)
    puller = Puller(replica, PullerConfig(wait_ms=1000, window=8))
    start = [m for _, m in puller.start(1.0).sends]
    _deliver(
        responder, puller, [m for p in start for _, m in responder.receive(7, p, 1.0).sends], 1.0
    )
    key = np.array([3], np.int64)
    source.table("emb_2").write(key, np.full((1, 4), 5, np.float32), now_ns=2)
    lost = [m for _, m in responder.store_changed(1.1).sends]
    assert any(isinstance(m, PullResponse) and m.chunks for m in lost)  # dropped
    rng = np.random.default_rng(11)
    now, rounds = 1.1, 0
    while replica.table("emb_2").lookup(key)[1][0] == 0:
        rounds += 1
        assert rounds <= 20, "an idle link losing a third of its answers never resynced"
        now += 1.0 + HOLDS_QUIET_S / 10
        expired = [m for _, m in responder.tick(now).sends]
        holds_first = [i for i, m in enumerate(expired) if getattr(m, "holds", None) is not None]
        kept = [m for m in expired if rng.random() >= 1 / 3]
        if rounds <= 2 and holds_first:  # the answers carrying the holds: lost, twice
            kept = [m for i, m in enumerate(expired) if i not in holds_first and m in kept]
        _deliver(responder, puller, kept, now)
    assert rounds >= 3
    rows, versions, _ = replica.table("emb_2").lookup(key)
    assert versions[0] > 0 and rows[0].tolist() == [5.0] * 4
