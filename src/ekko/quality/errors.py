"""Errors of the quality metrics."""

from __future__ import annotations


class QualityConfigError(ValueError):
    """A metric was set up with a value it cannot work with (named in the message)."""
