"""A write port's quarantine (the guard on a partitioned cluster): a rolled-back model's tables
refuse writes and deletes with a 409 naming the epoch and the end, until that wall time by the
port's clock; a rollback's restore and its own deletes pass; other tables are untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.schedule import WritePort
from ekko.schedule.quarantine import (
    EPOCH_HEADER,
    UNTIL_HEADER,
    Quarantine,
    QuarantinedError,
    parse_quarantine,
)
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

KEYS = np.arange(4, dtype=np.int64)
ONES = np.ones((4, 2), np.float32)


def _port() -> tuple[WritePort, FakeClock]:
    store = Store()
    for name in ("emb", "other"):
        store.create_table(TableSpec(name, 2, 2))
    clock = FakeClock(wall=1_000.0)
    port = WritePort(store, clock=clock)
    port.write_rows("emb", KEYS, ONES, now=0.0, now_ns=1)
    return port, clock


def test_every_write_entry_is_refused_until_the_time_and_nothing_changes() -> None:
    port, clock = _port()
    emb = port.store.table("emb")
    before = emb.digest()
    port.quarantine(["emb"], Quarantine("ctr", 3, 1_030.0))
    for call in (
        lambda: port.write_rows("emb", KEYS, 2 * ONES, now=0.0, now_ns=2),
        lambda: port.write("emb", KEYS, 2 * ONES),
        lambda: port.delete("emb", KEYS[:1]),
    ):
        with pytest.raises(QuarantinedError) as err:
            call()
        assert (err.value.epoch, err.value.until, err.value.status) == (3, 1_030.0, 409)
        assert str(err.value).startswith(
            "quarantined: model ctr rolled back (epoch 3); writes refused until "
            "1970-01-01T00:17:10.000+00:00"
        )
        assert err.value.http_headers == {UNTIL_HEADER: "1030.0", EPOCH_HEADER: "3"}
        assert parse_quarantine(str(err.value)) == (3, 1_030.0)
    assert emb.digest() == before
    port.write_rows("other", KEYS, ONES, now=0.0, now_ns=2)  # another model's table: open
    port.restore("emb", KEYS[:2], 5 * ONES[:2], now_ns=3)  # the rollback's own rows pass
    port.delete("emb", KEYS[3:], now_ns=3, restoring=True)
    assert emb.rows == 3
    clock.advance(29.9)
    with pytest.raises(QuarantinedError):
        port.write("emb", KEYS, ONES)
    clock.advance(0.1)  # at until: lifted
    port.write("emb", KEYS, 7 * ONES)
    assert (emb.lookup(KEYS)[0] == 7).all()
    assert port.quarantines.active(clock.wall()) == {}


def test_a_later_rollback_replaces_the_quarantine() -> None:
    port, clock = _port()
    port.quarantine(["emb"], Quarantine("ctr", 0, 1_010.0))
    port.quarantine(["emb"], Quarantine("ctr", 1, 1_020.0))
    clock.advance(15)
    with pytest.raises(QuarantinedError, match=r"epoch 1\)"):
        port.write("emb", KEYS, ONES)


@pytest.mark.parametrize(("until", "epoch"), [(math.nan, 0), (math.inf, 0), (5.0, -1)])
def test_a_bad_quarantine_is_refused_naming_the_field(until: float, epoch: int) -> None:
    with pytest.raises(ValueError, match=r"quarantine (until|epoch)"):
        Quarantine("ctr", epoch, until)


def test_other_refusals_are_not_read_as_a_quarantine() -> None:
    assert parse_quarantine("table 'emb': unknown") is None
    assert parse_quarantine("quarantined: but no fields") is None
