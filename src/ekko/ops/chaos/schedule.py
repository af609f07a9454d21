"""The nemesis's schedule: which fault, where, when and for how long, drawn from one seed.

Everything random about a chaos run's faults comes from ``random.Random(seed)`` here, so
``--seed N`` replays the same faults in the same order on the same targets (their wall times
shift with how fast nodes restart; the executor records the times it really used).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

MAX_FAULTS = 100_000  # the 1 000-fault bench is 1 %; beyond, a limit typed by mistake


class ScheduleError(ValueError):
    """A run's limits that draw no schedule: a duration that is not a finite number of
    seconds > 0, fewer than one round, or more than ``MAX_FAULTS`` faults. Why a class: the
    CLI names it as a bad option before it writes a config or starts a node."""


def check_limits(duration_s: float | None, rounds: int | None) -> None:
    """Raise ScheduleError unless exactly one limit is given and it can end a schedule."""
    if duration_s is None and rounds is None:
        raise ScheduleError("generate: give duration_s or rounds")
    if rounds is not None and rounds < 1:
        raise ScheduleError(f"rounds: at least 1, got {rounds}")
    if rounds is None and not (math.isfinite(duration_s) and duration_s > 0):  # type: ignore[arg-type]
        raise ScheduleError(f"duration: a finite number of seconds > 0, got {duration_s:g}")


class FaultKind(StrEnum):
    """Every fault the nemesis injects. A run draws them in rounds, each round a shuffled
    copy of this whole enum, so every kind is injected as often as every other (±1)."""

    KILL = "kill"  # SIGKILL, restart with the data dir
    KILL_WIPE = "kill_wipe"  # SIGKILL, data dir deleted, restart
    PAUSE = "pause"  # SIGSTOP ... SIGCONT
    PARTITION = "partition"  # a link blackholed both ways
    PARTITION_ONE_WAY = "partition_one_way"  # a link's bytes stop in one direction only
    DELAY = "delay"  # WAN delay spike on a link
    BANDWIDTH = "bandwidth"  # bandwidth cap on a link
    CLOCK_JUMP = "clock_jump"  # one node's wall clock jumps (monotonic does not)
    DISK_FULL = "disk_full"  # the source's data dir has no free byte
    OLD_SNAPSHOT = "old_snapshot"  # a replica restarts from an early copy of its data dir


PROCESS_KINDS = frozenset(
    {FaultKind.KILL, FaultKind.KILL_WIPE, FaultKind.PAUSE, FaultKind.OLD_SNAPSHOT}
)
NODE_KINDS = PROCESS_KINDS | {FaultKind.CLOCK_JUMP, FaultKind.DISK_FULL}
LINK_KINDS = frozenset(
    {FaultKind.PARTITION, FaultKind.PARTITION_ONE_WAY, FaultKind.DELAY, FaultKind.BANDWIDTH}
)
# The node comes back only after a restart; nothing else targets it until then.
RESTARTING_KINDS = frozenset({FaultKind.KILL, FaultKind.KILL_WIPE, FaultKind.OLD_SNAPSHOT})


@dataclass(frozen=True)
class Topology:
    """What the nemesis can hit: the nodes (source first) and the sync links, each an
    unordered pair of nodes one of which pulls from the other."""

    source: str
    replicas: tuple[str, ...]
    links: tuple[tuple[str, str], ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.source, *self.replicas)


@dataclass(frozen=True)
class Timing:
    """How long faults last and how densely they come (seconds)."""

    mean_gap_s: float = 0.8  # between fault starts (exponential)
    hold_s: tuple[float, float] = (1.0, 3.5)  # pause, partition, delay, rate, clock, disk
    down_s: tuple[float, float] = (0.2, 1.5)  # a killed node stays down this long
    restart_allowance_s: float = 6.0  # a restarted node is left alone this long
    settle_s: float = 2.0  # quiet time before the source loses its disk
    delay_ms: tuple[float, float] = (50.0, 400.0)
    rate_kbyte_s: tuple[float, float] = (20.0, 200.0)
    clock_jump_s: tuple[float, float] = (5.0, 45.0)  # inside the signatures' 60 s skew
    source_share: int = 3  # every Nth kill (and wipe) hits the source, the first one too
    # every quiet_every_s, quiet_s with no fault at all: paths free of faults long enough
    # for the checker to judge staleness, and a heal's catching up seen alone
    quiet_every_s: float | None = None
    quiet_s: float = 8.0


# Named paces (``ekko chaos --timing NAME`` replays a run of the bench or of CI exactly).
TIMINGS: dict[str, Timing] = {
    "default": Timing(),
    # the bench: 1 000 faults in about half an hour on 2 cores; a quiet spell every 90 s
    # lets the staleness check judge paths free of faults
    "bench": Timing(
        mean_gap_s=0.5,
        hold_s=(0.5, 2.0),
        down_s=(0.2, 1.0),
        restart_allowance_s=4.0,
        settle_s=1.5,
        quiet_every_s=90.0,
        quiet_s=8.0,
    ),
    # CI's short form: two rounds of every kind in well under a minute of faults
    "short": Timing(
        mean_gap_s=0.4,
        hold_s=(0.5, 1.5),
        down_s=(0.2, 0.6),
        restart_allowance_s=3.0,
        settle_s=1.0,
    ),
}


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``kind`` on ``target`` (a node, or a link ``"a|b"``) from ``at``
    seconds after the nemesis starts, for ``hold`` seconds; ``params`` per kind."""

    id: int
    kind: FaultKind
    target: str
    at: float
    hold: float
    params: dict[str, Any] = field(default_factory=dict)
    exclusive: bool = False  # runs alone: nothing else active around it

    @property
    def end(self) -> float:
        return self.at + self.hold

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d


def link_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def generate(
    seed: int,
    topology: Topology,
    *,
    duration_s: float | None = None,
    rounds: int | None = None,
    timing: Timing = Timing(),
) -> list[Fault]:
    """The faults of a run, in start order. Stops after ``rounds`` rounds of every kind or
    at ``duration_s``, whichever comes first (one of them must be given).

    Rules that keep the checker's contract sound: a node or link carries one fault at a
    time (a restarted node is left alone for ``restart_allowance_s``); the source losing
    its disk runs alone, after ``settle_s`` with no fault, so every replica is there for
    its recovery (README: a row acknowledged but on no replica is lost with the disk)."""
    check_limits(duration_s, rounds)
    if not topology.replicas or not topology.links:
        raise ValueError("generate: the topology needs replicas and links")
    rng = random.Random(seed)
    busy: dict[str, float] = {}  # node name or link key -> free again at
    all_until = 0.0  # every fault planned so far has ended by then
    alone_until = 0.0  # an exclusive fault runs until then
    drawn: dict[FaultKind, int] = {k: 0 for k in FaultKind}
    faults: list[Fault] = []
    t = 0.0
    done_rounds = 0
    next_quiet = timing.quiet_every_s or 0.0
    while rounds is None or done_rounds < rounds:
        order = list(FaultKind)
        rng.shuffle(order)
        for kind in order:
            t += rng.expovariate(1.0 / timing.mean_gap_s)
            target = _target(kind, drawn[kind], topology, rng, timing)
            drawn[kind] += 1
            exclusive = kind is FaultKind.KILL_WIPE and target == topology.source
            hold = round(_hold(kind, rng, timing), 3)
            start = max(t, alone_until, busy.get(target, 0.0))
            if exclusive:
                start = max(start, all_until + timing.settle_s)
            if timing.quiet_every_s is not None and start >= next_quiet:
                start = max(start, all_until + timing.quiet_s)
                next_quiet = start + timing.quiet_every_s
            start = _round_up(start)
            if duration_s is not None and start > duration_s:
                return faults
            if len(faults) == MAX_FAULTS:
                raise ScheduleError(
                    f"more than {MAX_FAULTS} faults: a shorter duration or fewer rounds"
                )
            end = start + hold
            free_at = end + (timing.restart_allowance_s if kind in RESTARTING_KINDS else 0.0)
            busy[target] = free_at
            all_until = max(all_until, free_at)
            if exclusive:
                alone_until = free_at
            faults.append(
                Fault(
                    id=len(faults),
                    kind=kind,
                    target=target,
                    at=start,
                    hold=hold,
                    params=_params(kind, rng, timing),
                    exclusive=exclusive,
                )
            )
            t = start
        done_rounds += 1
    return faults


def _round_up(t: float) -> float:
    """Milliseconds in the schedule, rounded up so that no rule is broken by rounding."""
    return math.ceil(t * 1000 - 1e-6) / 1000


def _target(kind: FaultKind, nth: int, topo: Topology, rng: random.Random, tm: Timing) -> str:
    if kind in LINK_KINDS:
        a, b = topo.links[rng.randrange(len(topo.links))]
        return link_key(a, b)
    if kind is FaultKind.DISK_FULL:  # only the source keeps its store on disk
        return topo.source
    if kind is FaultKind.OLD_SNAPSHOT:
        return topo.replicas[rng.randrange(len(topo.replicas))]
    if kind in (FaultKind.KILL, FaultKind.KILL_WIPE) and nth % tm.source_share == 0:
        return topo.source
    if kind in (FaultKind.KILL, FaultKind.KILL_WIPE):
        return topo.replicas[rng.randrange(len(topo.replicas))]
    return topo.nodes[rng.randrange(len(topo.nodes))]


def _hold(kind: FaultKind, rng: random.Random, tm: Timing) -> float:
    lo, hi = tm.down_s if kind in RESTARTING_KINDS else tm.hold_s
    return rng.uniform(lo, hi)


def _params(kind: FaultKind, rng: random.Random, tm: Timing) -> dict[str, Any]:
    if kind is FaultKind.DELAY:
        return {"delay_ms": round(rng.uniform(*tm.delay_ms), 1)}
    if kind is FaultKind.BANDWIDTH:
        return {"rate_bytes_s": int(rng.uniform(*tm.rate_kbyte_s) * 1000)}
    if kind is FaultKind.PARTITION_ONE_WAY:
        # a link "a|b" (names sorted): "forward" drops a's bytes to b, "backward" b's to a
        return {"drop": rng.choice(["forward", "backward"])}
    if kind is FaultKind.CLOCK_JUMP:
        return {"jump_s": round(rng.choice([-1, 1]) * rng.uniform(*tm.clock_jump_s), 1)}
    return {}


def counts(faults: list[Fault]) -> dict[str, int]:
    """Faults per kind, every kind named (0 when none)."""
    out = {k.value: 0 for k in FaultKind}
    for f in faults:
        out[f.kind.value] += 1
    return out
