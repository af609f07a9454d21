"""TLS contexts for a cluster's ports: one CA, and per node a key and a certificate it signed.

Sync links are mutual (each side presents its node certificate and checks the other's
against the cluster CA); the HTTP port presents the node's certificate and its clients
check it against the same CA. A node certificate names its node in the subject's common
name (what :func:`certificate_name` reads, bound to the name claimed in the sync handshake)
and in its subject alternative names with the addresses it serves (what hostname checking
reads). ``ekko cluster init --tls`` writes such files; ``ekko.node.config`` checks them
when the config is read.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

MIN_VERSION = ssl.TLSVersion.TLSv1_2
MAX_PEM_BYTES = 1 << 20  # a CA, certificate or key is a few KiB; /dev/zero is endless


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files one process needs: the cluster CA, and its own key pair if it has one.

    Why one object: the sync listener, the sync client, the HTTP server and every HTTP
    client build their contexts here, from the same files, the same way.
    """

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def server_context(self, *, client_certs: bool) -> ssl.SSLContext:
        """A server's context presenting ``cert``; with ``client_certs`` a client must
        present a certificate from the CA (the sync port), without it any client may
        connect (the HTTP port, whose callers prove themselves by signed requests)."""
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs a certificate and its key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSION
        ctx.load_cert_chain(self.cert, self.key)
        if client_certs:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.ca)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client's context trusting only the cluster CA (hostname checked), presenting
        ``cert`` when there is one (a node dialing a sync port)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = MIN_VERSION
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def certificate_name(peercert: dict[str, Any] | None) -> str | None:
    """The node a verified peer certificate (``SSLObject.getpeercert()``) is issued to: the
    common name of its subject; None when there is none."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def describe_tls_error(exc: BaseException) -> str:
    """A TLS failure in words, with the likely cause when the library's text hides it."""
    text = str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "mismatch" in text:
            text += " (not issued to that node)"
        elif "issuer" in text or "self-signed" in text or "self signed" in text:
            text += " (not signed by the cluster CA)"
        return f"certificate verify failed: {text}"
    if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc):
        return f"{text} (the peer does not speak TLS)"
    if "UNKNOWN_CA" in str(exc) or "unknown ca" in str(exc):
        return f"{text} (the peer does not trust our certificate: another CA)"
    return text


class TlsFileError(ValueError):
    """A TLS file that cannot serve: missing, unreadable, not PEM, or not fitting the others.
    ``field`` says which file (``ca``, ``cert`` or ``key``), so the config names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_ca(path: Path) -> x509.Certificate:
    """The cluster CA's certificate, checked to be a CA and within its validity."""
    cert = _certificate(path, "ca")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TlsFileError("ca", f"{path}: not a CA certificate (no basicConstraints CA:TRUE)")
    _check_dates(cert, path, "ca")
    return cert


def check_node_files(ca: x509.Certificate, files: TlsFiles, name: str) -> None:
    """Check node ``name``'s certificate and key: the key is the certificate's, the CA signed
    it, and it is issued to ``name`` (common name, and a DNS name peers check it against)."""
    assert files.cert is not None and files.key is not None
    cert = _certificate(files.cert, "cert")
    raw = _read(files.key, "key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsFileError("key", f"{files.key}: not an unencrypted PEM private key") from exc
    if _public(key.public_key()) != _public(cert.public_key()):
        raise TlsFileError(
            "key", f"{files.key} is not the key of {files.cert} (mismatched key and certificate)"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TlsFileError(
            "cert", f"{files.cert} is not signed by the cluster CA ({files.ca})"
        ) from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    issued = str(names[0].value) if names else None
    if issued != name:
        raise TlsFileError("cert", f"{files.cert} is issued to {issued!r}, not to node {name!r}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if name not in dns:
        raise TlsFileError(
            "cert", f"{files.cert}: {name!r} is not among its DNS names {dns} (peers check it)"
        )
    _check_dates(cert, files.cert, "cert")


def _read(path: Path, field: str) -> bytes:
    try:
        # Non-blocking: a FIFO with no writer reads empty instead of hanging the config load.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            raw = f.read(MAX_PEM_BYTES + 1) or b""
        if len(raw) > MAX_PEM_BYTES:
            raise TlsFileError(field, f"{path}: larger than {MAX_PEM_BYTES} bytes: not a PEM file")
        return raw
    except FileNotFoundError as exc:
        raise TlsFileError(field, f"{path}: no such file") from exc
    except OSError as exc:
        raise TlsFileError(field, f"{path}: cannot read it ({exc.strerror})") from exc


def _certificate(path: Path, field: str) -> x509.Certificate:
    raw = _read(path, field)
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise TlsFileError(field, f"{path}: not a PEM certificate") from exc


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _check_dates(cert: x509.Certificate, path: Path, field: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        raise TlsFileError(field, f"{path}: not valid before {cert.not_valid_before_utc}")
    if now > cert.not_valid_after_utc:
        raise TlsFileError(field, f"{path}: expired on {cert.not_valid_after_utc}")
