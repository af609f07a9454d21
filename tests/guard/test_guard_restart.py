"""A partition source restarted (kill -9, then its data dir) inside a rollback's quarantine:
the quarantine is in its data dir (fsynced when the restore starts), reapplied at start until
its end, and dropped once expired. Without it the restarted source accepted the poisoned
ranks' in-flight writes at once, over the rows it had just restored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ekko.guard.errors import PreimageError
from ekko.guard.quarantine_file import QuarantineFile, QuarantineFileError
from ekko.guard.restore import SourceRestore
from ekko.schedule import WritePort
from ekko.schedule.quarantine import QuarantinedError
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

DIM = 3
KEYS = np.arange(20, dtype=np.int64)


def source(path: Path, clock: FakeClock) -> tuple[WritePort, SourceRestore]:
    """A partition source's port and restore executor over a fresh store (a restart)."""
    port = WritePort(Store(origin=1), clock=clock)
    port.create_table(TableSpec("emb", DIM, 4))
    r = SourceRestore(
        "ctr", "s1", port, ["emb"], partitions=(1,), clock=clock,
        quarantine_file=QuarantineFile(path),
    )  # fmt: skip
    return port, r


def rolled_back(path: Path, clock: FakeClock) -> None:
    """A source that restored epoch 3 with writes refused until wall 1_030."""
    port, r = source(path, clock)
    port.write("emb", KEYS, np.ones((KEYS.size, DIM), np.float32))
    r.checkpoint(clock.wall())
    clock.advance(1.0)
    port.write("emb", KEYS, np.full((KEYS.size, DIM), 50.0, np.float32))
    r.restore(1_000.0, 3, "poison", quarantine_until=1_030.0)


def test_a_restarted_source_keeps_refusing_writes_until_the_quarantine_ends(tmp_path: Path):
    clock = FakeClock(wall=1_000.0)
    path = tmp_path / "quarantine.json"
    rolled_back(path, clock)
    clock.advance(5.0)
    port, r = source(path, clock)  # kill -9, restart with its data dir
    assert r.resume() == {"emb": 1_030.0}
    with pytest.raises(QuarantinedError, match=r"epoch 3\)") as err:
        port.write("emb", KEYS[:1], np.ones((1, DIM), np.float32))
    assert err.value.until == 1_030.0
    with pytest.raises(QuarantinedError):
        port.delete("emb", KEYS[:1])
    assert r.status()["quarantined"] == {"emb": {"epoch": 3, "until": 1_030.0}}
    with pytest.raises(PreimageError, match="epoch 2 after epoch 3"):
        r.restore(1_000.0, 2, "an older coordinator's command")
    clock.advance(30.0)  # past its end: the next start drops it from the file
    port, r = source(path, clock)
    assert r.resume() == {}
    port.write("emb", KEYS[:1], np.ones((1, DIM), np.float32))
    assert json.loads(path.read_text()) == {}


def test_a_damaged_quarantine_file_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "quarantine.json"
    path.write_text('{"ctr": {"epoch": "x"}}')
    with pytest.raises(QuarantineFileError, match=r"quarantine\.json.*ctr"):
        QuarantineFile(path).load(0.0)
    path.write_text("{not json")
    with pytest.raises(QuarantineFileError, match=r"quarantine\.json: not JSON"):
        QuarantineFile(path).load(0.0)
