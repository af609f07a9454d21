"""Errors raised by the codec layer."""

from __future__ import annotations


class CodecError(ValueError):
    """Raised when data cannot be encoded or a payload cannot be decoded safely.

    Why a dedicated type: everything that arrives from a peer passes through the codec, and a
    receiver must be able to tell "this message is malformed or corrupted, drop it and re-pull"
    apart from bugs. Subclassing ``ValueError`` keeps it catchable by generic callers. The
    message always names the problem (unknown codec, bad length, checksum mismatch, ...).
    """
