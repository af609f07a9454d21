"""What the client raises."""

from __future__ import annotations

from collections.abc import Mapping

from ekko.schedule.quarantine import EPOCH_HEADER, UNTIL_HEADER, Quarantine, parse_quarantine

QUARANTINE_PREFIX = "quarantined: model "


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
        """The quarantine a refusal says (None: the refusal is another one): from the HTTP
        headers ``x-ekko-rollback-epoch`` and ``x-ekko-quarantine-until``, else from the
        fields the reason ends with (``ekko.schedule.quarantine``: a stream frame has no
        headers). A 409 that says it is a quarantine but names no epoch or end raises
        ``ClientError`` naming the text: a rank must not guess how long to pause."""
        if status != 409:
            return None
        head = {k.lower(): v for k, v in (headers or {}).items()}
        if UNTIL_HEADER in head or EPOCH_HEADER in head:
            try:
                epoch, until = int(head[EPOCH_HEADER]), float(head[UNTIL_HEADER])
                Quarantine("", epoch, until)  # checks: epoch >= 0, until finite
            except (KeyError, ValueError) as exc:
                raise ClientError(
                    f"a quarantine refusal (409) this client cannot read ({exc!r}): "
                    f"{message[:300]}", 409,
                ) from exc  # fmt: skip
            return cls(epoch, until, message)
        found = parse_quarantine(message)
        if found is not None:
            return cls(found[0], found[1], message)
        if QUARANTINE_PREFIX in message:
            raise ClientError(
                f"a quarantine refusal (409) this client cannot read (no epoch or end): "
                f"{message[:300]}", 409,
            )  # fmt: skip
        return None
