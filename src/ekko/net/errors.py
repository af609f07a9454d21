"""Errors raised by the transport, split by whose fault they are (trio / h11 style).

``ConnectionClosed`` means *we* closed the connection and then used it: a bug or a shutdown
race on our side. ``BrokenConnection`` means the peer or the network ended it: expected in a
distributed system, retry elsewhere. Frame errors are split the same way: ``LocalFrameError``
(we asked to send something invalid) vs ``RemoteFrameError`` (the peer sent bad bytes).
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error raised by ``ekko.net``, so a node can catch one type per link."""


class ConnectionClosed(TransportError):
    """Raised when this side already closed the connection: the caller used it after close."""


class BrokenConnection(TransportError):
    """Raised when the peer or the network ended the connection.

    Why a separate type from :class:`ConnectionClosed`: a broken link is an external event the
    node must handle (fail over, re-pull); a closed one is our own doing. ``clean`` is True when
    the peer closed its side at a frame boundary (an orderly EOF) and False for a reset, an EOF in
    the middle of a frame, or an ``OSError`` (kept as ``__cause__``).
    """

    def __init__(self, reason: str, *, clean: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clean = clean


class FrameError(TransportError):
    """A frame could not be encoded or decoded; ``reason`` names the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalFrameError(FrameError):
    """We were asked to send something that cannot be framed (too large, unsupported array).

    Why: the connection is still healthy; the caller must fix or split the message.
    """


class RemoteFrameError(FrameError):
    """The peer sent bytes that are not a valid frame or message.

    Why: the stream is desynchronised or hostile; the connection cannot be trusted any longer
    and is closed. The decoder that raised it stays in error.
    """


class AuthError(TransportError):
    """The handshake failed: wrong secret, bad MAC, protocol version mismatch, or a peer that
    broke the handshake. Why a separate type: it is a configuration problem, not a flaky link,
    so retrying the same peer will not help."""
