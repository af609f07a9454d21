"""What the client raises."""

from __future__ import annotations


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
