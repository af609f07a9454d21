"""A restarted source rebuilds from its replicas before it takes writes (sans-IO)."""

from __future__ import annotations

import secrets


def new_lineage() -> int:
    """A fresh lineage id: nonzero, 62 random bits (0 means "none yet")."""
    return secrets.randbits(62) | 1
