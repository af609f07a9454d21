"""Errors of the inference API; each names the model and what is missing or wrong."""

from __future__ import annotations

from ekko.net.httpkit import UnknownModel

__all__ = ["ModelNotReady", "NonFiniteRows", "ServeError", "UnknownModel", "UnknownVariant"]


class ServeError(Exception):
    """Base of the serving errors, so the HTTP layer can map them as one kind."""


class ModelNotReady(ServeError):
    """The replica cannot serve the model yet (a dense table has not arrived): HTTP 503.

    Why not a crash or zeros: a replica that is still syncing must say so and keep serving the
    moment the rows land; predicting with an all-zero dense network would look healthy.
    """


class NonFiniteRows(ModelNotReady):
    """The replica holds a NaN or infinite value the model would read (or the forward pass
    overflowed): HTTP 503 naming the table, never a ``null`` prediction.

    Why refuse rather than serve: a non-finite row makes the prediction NaN, which JSON shows
    as ``null`` and which no feedback can be scored against; the replica serves again as soon
    as a finite version of the row arrives.
    """


class UnknownVariant(ServeError, KeyError):
    """A variant name (``online``, ``baseline``) the service was not given."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown variant {self.name!r} (known: {self.known})"
