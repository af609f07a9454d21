"""What a protocol step asks its driver to do before the next step (raft's ``Ready``)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from ekko.protocol.messages import Message

SessionId = Hashable


@dataclass
class Ready:
    """Messages to send, in order, and when to call ``tick`` next (``None``: no timer)."""

    sends: list[tuple[SessionId, Message]] = field(default_factory=list)
    wake_at: float | None = None

    def extend(self, other: Ready) -> Ready:
        self.sends.extend(other.sends)
        self.wake_at = _earliest(self.wake_at, other.wake_at)
        return self


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
