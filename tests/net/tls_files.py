"""Certificates for the TLS tests: the cluster's CA, a second CA, key pairs issued by either."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ekko.net.tls import TlsFiles
from ekko.ops.cluster_tls import Authority, write_private


@dataclass
class Pki:
    """A cluster CA (``cluster``) and a stranger's (``other``), files written under ``root``."""

    root: Path
    cluster: Authority = field(default_factory=lambda: Authority.create("cluster"))
    other: Authority = field(default_factory=lambda: Authority.create("other"))

    def files(self, name: str, *, issuer: str = "cluster", trust: str = "cluster") -> TlsFiles:
        """Node ``name``'s key pair issued by CA ``issuer``, trusting CA ``trust``."""
        d = self.root / f"{issuer}-{trust}"
        d.mkdir(exist_ok=True)
        ca = d / "ca.crt"
        if not ca.exists():
            ca.write_bytes(getattr(self, trust).pem()[0])
        cert, key = d / f"{name}.crt", d / f"{name}.key"
        if not cert.exists():
            cert_pem, key_pem = getattr(self, issuer).issue(name)
            write_private(key, key_pem)
            cert.write_bytes(cert_pem)
        return TlsFiles(ca, cert, key)
