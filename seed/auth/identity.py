"""Who is asking: the principal every access decision is about, and the identity-provider seam.

Rules/invariants:
- A ``Principal`` is built only by an identity provider after checking a secret, by the token
  verifier after checking a signature, or is ``ANONYMOUS``. Nothing else makes one.
- Providers never log or keep passwords; a provider that cannot answer raises
  ``ProviderUnavailable`` (fail closed), one that says no returns ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["ANONYMOUS", "Grant", "IdentityProvider", "MemoryIdentityProvider", "Principal", "PrincipalKind"]

PrincipalKind = Literal["anonymous", "user", "robot"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Actions on repositories matching a glob (``team/*``, ``team-a/**``), e.g. a robot's own access."""

    pattern: str
    actions: frozenset[str]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller (or the anonymous one).

    Attributes:
        kind: ``anonymous``, ``user`` (htpasswd, LDAP, an external token's subject) or ``robot``.
        name: the login name (``alice``, ``robot$ci``); empty for anonymous.
        groups: group names from the provider (LDAP ``memberOf`` / group search; token claim).
        provider: which provider vouched for it (``htpasswd``, ``ldap:corp``, ``robot``, ``token:<issuer>``).
        grants: for robots, the access they were created with (their only rights besides
            ``[[access]]`` entries that name them).
    """

    kind: PrincipalKind
    name: str
    groups: frozenset[str] = frozenset()
    provider: str = ""
    grants: tuple[Grant, ...] = field(default=())

    @property
    def is_anonymous(self) -> bool:
        return self.kind == "anonymous"


ANONYMOUS = Principal(kind="anonymous", name="")


@runtime_checkable
class IdentityProvider(Protocol):
    """Checks a username and password.

    ``authenticate`` returns the principal when the password is right, ``None`` when this
    provider does not know the user or the password is wrong, and raises
    ``seed.errors.ProviderUnavailable`` when it cannot tell (server down, timeout). It must
    compare secrets in constant time and never log them. It may block (it is called in a
    worker thread), and must bound its own network waits.
    """

    name: str

    def authenticate(self, username: str, password: str) -> Principal | None: ...


class MemoryIdentityProvider:
    """An in-memory identity provider (tests, and a fake for code that needs one).

    Args:
        users: username → (password, groups).
        name: the provider name principals carry.
    """

    def __init__(self, users: dict[str, tuple[str, frozenset[str]]], name: str = "memory") -> None:
        self.name = name
        self._users = dict(users)

    def authenticate(self, username: str, password: str) -> Principal | None:
        import hmac

        entry = self._users.get(username)
        expected = entry[0] if entry is not None else ""
        # Compare even for unknown users, so timing does not tell who exists.
        same = hmac.compare_digest(password.encode(), expected.encode())
        if entry is None or not password or not same:
            return None
        return Principal(kind="user", name=username, groups=entry[1], provider=self.name)
