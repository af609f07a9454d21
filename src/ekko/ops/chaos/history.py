"""What a chaos run did and saw, in the order it happened: the checker's only input.

Times are seconds since the nemesis started, on the harness's monotonic clock. Writes are
kept as ``(acked_at, writer, n, keys, versions)``: the value of write ``n`` of writer ``w``
is ``[n, w, 0, ...]`` at every key, so the final rows say which write they hold without
the history carrying the values.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AckedWrite:
    at: float
    writer: int
    n: int
    keys: list[int]
    versions: list[int]


@dataclass
class History:
    """Appended to by the harness while it runs; ``as_json`` / ``load`` round-trip it.

    Why a plain record rather than the checker reading live state: a failing run must be
    judged again (and its schedule replayed) from the file alone."""

    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    schedule: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    writes: list[AckedWrite] = field(default_factory=list)
    wipes: list[dict[str, Any]] = field(default_factory=list)  # at_risk: [[key, writer, n]]
    convergence: list[dict[str, Any]] = field(default_factory=list)
    reads: list[dict[str, Any]] = field(default_factory=list)  # staleness probes
    crashes: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    disk: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def event(self, what: str, **fields: Any) -> dict[str, Any]:
        e = {"t": self.now(), "event": what, **fields}
        self.events.append(e)
        return e

    def acked(self, writer: int, n: int, keys: list[int], versions: list[int]) -> AckedWrite:
        w = AckedWrite(self.now(), writer, n, keys, versions)
        self.writes.append(w)
        return w

    def fault_windows(self) -> list[tuple[str, str, float, float]]:
        """``(kind, target, started, ended)`` per fault executed (ended: inf if it never
        healed), from the start and heal events."""
        started: dict[int, dict[str, Any]] = {}
        out = []
        for e in self.events:
            if e["event"] == "fault_start":
                started[e["fault"]] = e
            elif e["event"] == "fault_heal" and e["fault"] in started:
                s = started.pop(e["fault"])
                out.append((s["kind"], s["target"], s["t"], e["t"]))
        out += [(s["kind"], s["target"], s["t"], float("inf")) for s in started.values()]
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "settings": self.settings,
            "schedule": self.schedule,
            "events": self.events,
            "writes": [[w.at, w.writer, w.n, w.keys, w.versions] for w in self.writes],
            "wipes": self.wipes,
            "convergence": self.convergence,
            "reads": self.reads,
            "crashes": self.crashes,
            "alarms": self.alarms,
            "disk": self.disk,
            "final": self.final,
        }

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json()))
        return path

    @classmethod
    def load(cls, path: Path) -> History:
        doc = json.loads(Path(path).read_text())
        h = cls(seed=doc["seed"])
        for name in ("settings", "schedule", "events", "wipes", "convergence", "reads"):
            setattr(h, name, doc[name])
        for name in ("crashes", "alarms", "disk", "final"):
            setattr(h, name, doc[name])
        h.writes = [AckedWrite(*w) for w in doc["writes"]]
        return h
