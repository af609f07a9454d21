"""Guard: watch online quality against a lagging baseline and roll back bad updates (DESIGN §6).

I/O-free core: metrics from feedback, a sequential detector, the health state machine, the
durable transition log, the traffic split and pre-image bookkeeping for rollback. Every
time-dependent call takes ``now`` (monotonic seconds) so callers and tests own the clock.
"""

from ekko.guard.detector import Detector, DetectorConfig, Verdict
from ekko.guard.errors import GuardConfigError, GuardStateError, PreimageError, TransitionLogError
from ekko.guard.log import TransitionLog
from ekko.guard.preimages import Coalesce, PreimageLog, RestorePlan, RestoreSet
from ekko.guard.router import TrafficRouter, Variant
from ekko.guard.state import TRANSITIONS, Event, ModelHealth, State, Transition, event_for_level

__all__ = [
    "TRANSITIONS",
    "Coalesce",
    "Detector",
    "DetectorConfig",
    "Event",
    "GuardConfigError",
    "GuardStateError",
    "ModelHealth",
    "PreimageError",
    "PreimageLog",
    "RestorePlan",
    "RestoreSet",
    "State",
    "TrafficRouter",
    "Transition",
    "TransitionLog",
    "TransitionLogError",
    "Variant",
    "Verdict",
    "event_for_level",
]
