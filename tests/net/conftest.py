"""Shared fixtures of the transport tests."""

from __future__ import annotations

import threading

import pytest

from ekko.net import framing

from .tls_files import Pki


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The type name of every object framing's encoder encodes from now on, starting from a
    cold encode-once cache."""
    names: list[str] = []
    real = framing._ENCODER

    class Counting:
        def encode(self, obj: object) -> bytes:
            names.append(type(obj).__name__)
            return real.encode(obj)

    monkeypatch.setattr(framing, "_local", threading.local())
    monkeypatch.setattr(framing, "_ENCODER", Counting())
    return names


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A cluster CA and a second one, for the TLS tests."""
    return Pki(tmp_path_factory.mktemp("pki"))
