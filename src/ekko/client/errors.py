"""What the client raises."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime


class ClientError(RuntimeError):
    """A request the node refused or could not be sent; the message names the request, the
    node and the node's reason. ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(ValueError):
    """A cluster config the client cannot use; the message names the file and the field."""


class SinkFailed(ClientError):
    """A ``RemoteSink`` write failed in the background; every later call raises this, with
    the first failure as its cause, until the sink is closed."""


QUARANTINE_UNTIL_HEADER = "x-ekko-quarantine-until"
ROLLBACK_EPOCH_HEADER = "x-ekko-rollback-epoch"
QUARANTINE_PREFIX = "quarantined:"

_EPOCH_IN_TEXT = re.compile(r"\(epoch (\d+)\)")
_UNTIL_IN_TEXT = re.compile(r"refused until (\S+)")


def _field(text: str, name: str) -> str | None:
    """``name: value`` written in a stream refusal's text (a frame has no headers)."""
    found = re.search(re.escape(name) + r"\s*[:=]\s*([^\s;,]+)", text, re.IGNORECASE)
    return found.group(1) if found else None


class Quarantined(ClientError):
    """The source refused a write (409) because the model was rolled back: its tables take
    no writes until ``until`` (a wall-clock time, seconds since the epoch), and ``epoch``
    numbers the rollback.

    Why its own error: a training rank must not die of it, nor retry the write (its rows
    are the poisoned ones); it pauses, then reloads the restored rows
    (``ekko.train.sharded_quarantine``). A rank that caught it tells the other ranks."""

    def __init__(self, epoch: int, until: float, message: str) -> None:
        super().__init__(message, 409)
        self.epoch = epoch
        self.until = until

    @classmethod
    def parse(
        cls, status: int | None, message: str, headers: Mapping[str, str] | None = None
    ) -> Quarantined | None:
        """The quarantine a refusal says (None: the refusal is another one). ``headers``
        (HTTP) carry ``x-ekko-quarantine-until`` and ``x-ekko-rollback-epoch``; a stream
        frame's text may carry them as ``name: value``, else its text's ``(epoch E)`` and
        ``refused until <iso time>`` are read. A 409 that says it is a quarantine but
        names no epoch or time raises ``ClientError`` naming the text: a rank must not
        guess how long to pause."""
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        until_s = headers.get(QUARANTINE_UNTIL_HEADER) or _field(message, QUARANTINE_UNTIL_HEADER)
        epoch_s = headers.get(ROLLBACK_EPOCH_HEADER) or _field(message, ROLLBACK_EPOCH_HEADER)
        if status != 409 or (QUARANTINE_PREFIX not in message and until_s is None):
            return None
        try:
            if epoch_s is None:
                found = _EPOCH_IN_TEXT.search(message)
                epoch_s = found.group(1) if found else None
            if until_s is None:
                found = _UNTIL_IN_TEXT.search(message)
                iso = found.group(1).rstrip(";,.") if found else None
                until_s = str(datetime.fromisoformat(iso).timestamp()) if iso else None
            if epoch_s is None or until_s is None:
                raise ValueError("no rollback epoch or quarantine end")
            epoch, until = int(epoch_s), float(until_s)
            if epoch < 0 or not math.isfinite(until):
                raise ValueError(f"epoch {epoch} or until {until} out of range")
        except ValueError as exc:
            raise ClientError(
                f"a quarantine refusal (409) this client cannot read ({exc}): {message[:300]}",
                409,
            ) from exc
        return cls(epoch, until, message)
