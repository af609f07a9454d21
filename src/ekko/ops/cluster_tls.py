"""``ekko cluster init --tls``: a cluster CA and, per node, a key and a certificate it signs.

A node's certificate names the node in its subject's common name (what a sync peer's claimed
name is held to) and in its DNS names, with ``localhost``, 127.0.0.1 and the node's host (what
clients check the server's name against). Keys are EC P-256, written readable only by their
owner. The CA is kept when it already exists beside the config, so certificates issued
before stay valid; node certificates are issued afresh.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "tls"
CA_DAYS = 3650
NODE_DAYS = 825
_BACKDATE = datetime.timedelta(minutes=5)  # clocks of a cluster's machines differ a little
_CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Authority:
    """A CA's certificate and key. Why: tests issue certificates from a second CA with the
    same code (a node "from another CA")."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} cluster CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Authority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), f"{key_path}: not an EC key"
        return cls(cert, key)

    def issue(self, name: str, host: str = "127.0.0.1") -> tuple[bytes, bytes]:
        """PEM certificate and key of node ``name`` serving on ``host``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
        for h in dict.fromkeys(["127.0.0.1", host]):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def pem(self) -> tuple[bytes, bytes]:
        return self.cert.public_bytes(serialization.Encoding.PEM), _key_pem(self.key)


def tls_entries(doc: dict[str, Any], tls_dir: str = TLS_DIR) -> None:
    """Name the TLS files in the config document: the CA in ``cluster.tls``, each node's
    certificate and key in ``nodes[].tls`` (paths relative to the config)."""
    doc["cluster"]["tls"] = {"ca": f"{tls_dir}/ca.crt"}
    for node in doc["nodes"]:
        name = node["name"]
        node["tls"] = {"cert": f"{tls_dir}/{name}.crt", "key": f"{tls_dir}/{name}.key"}


def write_tls_files(doc: dict[str, Any], base: Path) -> None:
    """Write the files ``doc`` names: the CA (kept when it exists, its key beside its
    certificate) and a fresh certificate and key for every node."""
    ca_path = base / doc["cluster"]["tls"]["ca"]
    ca_key_path = ca_path.with_suffix(".key")
    ca_path.parent.mkdir(parents=True, exist_ok=True)
    if ca_path.exists() and ca_key_path.exists():
        ca = Authority.load(ca_path, ca_key_path)
    else:
        ca = Authority.create(doc["cluster"].get("name", "ekko"))
        cert_pem, key_pem = ca.pem()
        write_private(ca_key_path, key_pem)
        ca_path.write_bytes(cert_pem)
    for node in doc["nodes"]:
        cert_pem, key_pem = ca.issue(node["name"], node.get("host", "127.0.0.1"))
        cert_path, key_path = base / node["tls"]["cert"], base / node["tls"]["key"]
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(key_path, key_pem)
        cert_path.write_bytes(cert_pem)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable and writable by its owner only (0600), replacing the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
