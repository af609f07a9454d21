"""Per-model health: healthy → uncertain → corrupted → recovering → healthy.

The states and moves are data (:data:`TRANSITIONS`, a dict of ``(state, event) → state``, as
in h11's ``_state.py``); the diagram in ``docs/guard_states.png`` is generated from it. Code
exists only for the one rule that couples events to history: in ``recovering``, after
``probation`` consecutive ``score_normal`` intervals the machine fires ``recovered`` itself.
Moves to the same state (another ``score_high`` while uncertain) are legal but are not
transitions and return ``None``; every real transition is returned as a :class:`Transition`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ekko.guard.errors import GuardConfigError, GuardStateError

log = logging.getLogger(__name__)


class State(StrEnum):
    """Health of one model. String-valued so the log and the diagram show plain names."""

    HEALTHY = "healthy"
    UNCERTAIN = "uncertain"
    CORRUPTED = "corrupted"
    RECOVERING = "recovering"


class Event(StrEnum):
    """What can happen to a model's health: detector verdicts, operator and rollback steps.

    Why an enum: the transition table is keyed by it, so a misspelt event fails at once.
    """

    SCORE_NORMAL = "score_normal"
    SCORE_HIGH = "score_high"
    SCORE_CRITICAL = "score_critical"
    OPERATOR_ROLLBACK = "operator_rollback"
    AUTOMATIC_ROLLBACK = "automatic_rollback"  # the source rolls back on a replica's verdict
    ROLLBACK_DONE = "rollback_done"
    RECOVERED = "recovered"


_H, _U, _C, _R = State.HEALTHY, State.UNCERTAIN, State.CORRUPTED, State.RECOVERING
_N, _HI, _CR = Event.SCORE_NORMAL, Event.SCORE_HIGH, Event.SCORE_CRITICAL
_OP, _DONE, _REC = Event.OPERATOR_ROLLBACK, Event.ROLLBACK_DONE, Event.RECOVERED
_AUTO = Event.AUTOMATIC_ROLLBACK

TRANSITIONS: dict[tuple[State, Event], State] = {
    (_H, _N): _H,
    (_H, _HI): _U,
    (_H, _CR): _C,
    (_H, _OP): _C,
    (_H, _AUTO): _C,
    (_U, _N): _H,
    (_U, _HI): _U,
    (_U, _CR): _C,
    (_U, _OP): _C,
    (_U, _AUTO): _C,
    # While corrupted, traffic is on the baseline and the rollback runs; verdicts about the
    # (known bad) online model change nothing.
    (_C, _N): _C,
    (_C, _HI): _C,
    (_C, _CR): _C,
    (_C, _OP): _C,
    (_C, _AUTO): _C,
    (_C, _DONE): _R,
    # After the rollback: on probation. A critical score means the restored state is bad too.
    (_R, _N): _R,
    (_R, _HI): _R,
    (_R, _CR): _C,
    (_R, _OP): _C,
    (_R, _AUTO): _C,
    (_R, _REC): _H,
}

_LEVEL_EVENTS: dict[str, Event] = {"healthy": _N, "uncertain": _HI, "corrupted": _CR}


def event_for_level(level: str) -> Event:
    """The event a detector verdict level feeds into the state machine."""
    try:
        return _LEVEL_EVENTS[level]
    except KeyError:
        raise GuardConfigError(f"unknown detector level {level!r}") from None


@dataclass(frozen=True)
class Transition:
    """One change of a model's health: who (model), when, why, with the numbers behind it.

    Why frozen and self-contained: it goes to the durable log and to operators verbatim; ``at``
    is wall time (for humans and other machines), ``mono`` the monotonic time the guard used.
    """

    model: str
    from_state: State
    to_state: State
    event: Event
    at: float
    mono: float
    why: str
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", dict(self.metrics))  # own copy

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as strings, non-finite floats as ``None``."""

        def clean(v: float) -> float | None:
            v = float(v)
            return v if math.isfinite(v) else None

        return {
            "model": self.model,
            "from": str(self.from_state),
            "to": str(self.to_state),
            "event": str(self.event),
            "at": self.at,
            "mono": self.mono,
            "why": self.why,
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
        }


class ModelHealth:
    """The health state machine of one model.

    Why a table-driven machine: which moves are legal is the guard's safety argument (a model
    is never declared healthy straight out of corrupted without a rollback), so it lives in one
    reviewable table, and anything outside it raises :class:`GuardStateError` naming state and
    event instead of being ignored.
    """

    def __init__(
        self, model: str, probation: int = 3, wall_clock: Callable[[], float] = time.time
    ) -> None:
        if probation < 1:
            raise GuardConfigError(f"ModelHealth.probation must be >= 1, got {probation!r}")
        self.model = model
        self.probation = probation
        self._wall = wall_clock
        self._state = State.HEALTHY
        self._normal_streak = 0
        self.history: list[Transition] = []

    @property
    def state(self) -> State:
        return self._state

    @property
    def serve_from_baseline(self) -> bool:
        """Route all traffic to the baseline: only while the online model is known bad."""
        return self._state is State.CORRUPTED

    @property
    def updates_paused(self) -> bool:
        """Stop streaming updates from training: while corrupted (rolling back)."""
        return self._state is State.CORRUPTED

    def handle(
        self,
        event: Event | str,
        now: float,
        why: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> Transition | None:
        """Apply ``event``; the transition made, or ``None`` if the state did not change."""
        try:
            ev = Event(event)
        except ValueError:
            raise GuardStateError(self.model, str(self._state), str(event)) from None
        src = self._state
        dst = TRANSITIONS.get((src, ev))
        if dst is None:
            raise GuardStateError(self.model, str(src), str(ev))

        # The one coupling rule: probation after a rollback ends by itself.
        if src is State.RECOVERING and ev is Event.SCORE_NORMAL:
            self._normal_streak += 1
            if self._normal_streak >= self.probation:
                ev, dst = Event.RECOVERED, TRANSITIONS[(src, Event.RECOVERED)]
                why = f"{self._normal_streak} normal intervals after rollback" + (
                    f"; {why}" if why else ""
                )
        elif src is State.RECOVERING:
            self._normal_streak = 0

        if dst is src:
            return None
        self._state = dst
        self._normal_streak = 0
        t = Transition(
            self.model, src, dst, ev, float(self._wall()), float(now), why, metrics or {}
        )
        self.history.append(t)
        log.info("guard %s: %s -> %s (%s)%s", self.model, src, dst, ev, f": {why}" if why else "")
        return t
