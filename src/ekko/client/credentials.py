"""How a client proves who it is: requests signed as ``ekko.net.signed_requests`` says, with
the cluster secret (any role, the least each call needs) or one role's key file (written by
``ekko cluster keys``: a training process can hold a ``writer`` key that cannot operate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ekko.net.signed_requests import ROLES, role_headers, role_key


@dataclass(frozen=True)
class Credentials:
    """The cluster ``secret``, or a ``key`` of one ``role``.

    Why not just the secret: the secret signs as any role, operator included; a process that
    only publishes rows is better handed a writer key (which also reads)."""

    secret: bytes | None = None
    key: bytes | None = None
    role: str | None = None

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.key is None):
            raise ValueError("give either the cluster secret or one role's key")
        if self.secret is not None and not self.secret:
            raise ValueError("the cluster secret is empty")
        if self.key is not None and self.role not in ROLES:
            raise ValueError(f"a key needs its role, one of {', '.join(ROLES)}; got {self.role!r}")

    @classmethod
    def from_secret_file(cls, path: Path | str) -> Credentials:
        """The cluster secret in ``path`` (``[cluster] secret_file``)."""
        return cls(secret=Path(path).read_bytes().strip())

    @classmethod
    def from_key_file(cls, path: Path | str, role: str) -> Credentials:
        """``role``'s key in ``path`` (hex, as ``ekko cluster keys`` writes it)."""
        text = Path(path).read_text().strip()
        try:
            return cls(key=bytes.fromhex(text), role=role)
        except ValueError as exc:
            raise ValueError(f"{path}: not a hex role key: {exc}") from exc

    def headers(
        self, role: str, method: str, target: str, body: bytes, host: str
    ) -> dict[str, str]:
        """The signature header of one request needing ``role`` (with a key, its own role:
        the node says 403 if that is not enough)."""
        if self.key is not None:
            assert self.role is not None
            return role_headers(self.key, self.role, method, target, body, host=host)
        assert self.secret is not None
        return role_headers(role_key(self.secret, role), role, method, target, body, host=host)
