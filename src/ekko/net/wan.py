"""WAN emulation arithmetic: when does a frame sent now arrive? Sans-IO, clock passed in.

``tc netem`` is not available on these machines (ENVIRONMENT.md), so the transport delays
frames itself; this module holds the math so it can be tested with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanProfile:
    """One direction of an emulated WAN link.

    Why a value object: topologies map peer names to profiles, and a frozen profile can be
    shared and compared. ``delay_ms`` is the one-way propagation delay; ``mbit`` the bandwidth
    in megabits per second (None = unlimited, frames only delayed).
    """

    delay_ms: float = 0.0
    mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"WanProfile.delay_ms must be >= 0, got {self.delay_ms}")
        if self.mbit is not None and self.mbit <= 0:
            raise ValueError(f"WanProfile.mbit must be > 0 or None, got {self.mbit}")


class WanLine:
    """A serialising link: frames leave one after another at the bandwidth, then propagate.

    Why: bandwidth, not delay, is what makes a busy link queue up; the scheduler's experiments
    need that queueing to be real. ``delivery_time(now, size)``: transmission starts when the
    line is free (``max(now, busy_until)``), takes ``size * 8 / (mbit * 1e6)`` seconds, and the
    frame arrives ``delay_ms`` after its last bit left. Times are in seconds on any clock.
    """

    def __init__(self, profile: WanProfile) -> None:
        self._profile = profile
        self._busy_until = float("-inf")

    @property
    def profile(self) -> WanProfile:
        return self._profile

    @property
    def busy_until(self) -> float:
        """When the last frame accepted so far finishes transmitting."""
        return self._busy_until

    def set_mbit(self, mbit: float | None) -> None:
        """Change the bandwidth for frames sent from now on (congestion experiments)."""
        self._profile = WanProfile(delay_ms=self._profile.delay_ms, mbit=mbit)

    def set_profile(self, profile: WanProfile) -> None:
        """Change delay and bandwidth for frames sent from now on."""
        self._profile = profile

    def transmission_end(self, now: float, size: int) -> float:
        """Reserve the line for a frame of ``size`` bytes; return when its last bit leaves."""
        start = max(now, self._busy_until)
        mbit = self._profile.mbit
        end = start if mbit is None else start + size * 8 / (mbit * 1e6)
        self._busy_until = end
        return end

    def delivery_time(self, now: float, size: int) -> float:
        """Reserve the line for a frame of ``size`` bytes; return when it reaches the peer."""
        return self.transmission_end(now, size) + self._profile.delay_ms / 1000.0
